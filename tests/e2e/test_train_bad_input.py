"""Bad input to ``ckpt train``: one clear message, a non-zero exit, no traceback,
and existing checkpoints untouched."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.e2e import _train as t


def assert_one_clear_error(proc, *fragments: str) -> str:
    """Non-zero exit, exactly one ``error:`` line with every fragment, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    starts = [i for i, line in enumerate(proc.stderr.splitlines()) if "ckpt train: error:" in line]
    assert len(starts) == 1, proc.stderr
    message = "\n".join(proc.stderr.splitlines()[starts[0] :])
    for fragment in fragments:
        assert fragment in message, message
    return message


def snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (names of folders too)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--converters.enabled", "nosuch"],
            ["unknown converter 'nosuch'", "Installed converters"],
        ),
        (
            ["--converters.enabled", "lora", "--converters.lora.rank", "-1"],
            ["Converter 'lora' option 'rank'", "-1"],
        ),
        (["--training.stepz", "3"], ["training.stepz: unknown field"]),
        (["--training.steps", "many"], ["training.steps", "'many'"]),
        (["--model.name", "no/such/folder"], ["model.name", "'no/such/folder' does not exist"]),
        (["--model.name", "huge"], ["model.name", "'huge'", "debug"]),
        (["--nproc", "3"], ["batch_size = 4 is not divisible", "3"]),
        (["--nproc", "2", "--converters.enabled", "nosuch"], ["unknown converter 'nosuch'"]),
    ],
    ids=[
        "unknown-converter",
        "bad-option-value",
        "unknown-field",
        "bad-field-type",
        "missing-model-folder",
        "unknown-flavor",
        "batch-not-divisible-by-ranks",
        "unknown-converter-under-nproc",
    ],
)
def test_a_config_error_exits_non_zero_with_one_message_and_no_traceback(args, fragments, tmp_path):
    proc = t.run(t.command(tmp_path / "run", *args), tmp_path)
    assert_one_clear_error(proc, *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_toml_names_the_file_and_the_syntax_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[training\nsteps = 3\n")
    proc = t.run(t.command(tmp_path / "run", "--config", str(config)), tmp_path)
    assert_one_clear_error(proc, str(config), "is not valid TOML")


def test_a_checkpoint_of_another_architecture_is_refused_and_left_untouched(tmp_path):
    run = tmp_path / "run"
    t.run_ok(t.command(run, steps=3), tmp_path)
    before = snapshot(run)
    # Same layer names, other widths: an HF config.json for a narrower Llama.
    arch = tmp_path / "narrow.json"
    arch.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 256,
                "max_position_embeddings": 256,
            }
        )
    )
    proc = t.run(t.command(run, "--model.name", str(arch), steps=6), tmp_path)
    message = assert_one_clear_error(proc, "does not match the model", "Shape mismatch for")
    # The first mismatched key (in sorted order) with both shapes.
    assert "'layers.0.attention.wk.weight': model [32, 64], checkpoint [64, 128]" in message
    assert "... and 16 more tensors whose shape or dtype differ" in message  # not 21 lines
    assert snapshot(run) == before

    # Other failed restarts on the same folder leave it untouched as well.
    for args, fragment in [
        (["--converters.enabled", "lora"], "Model keys missing from the checkpoint"),
        (["--converters.enabled", "nosuch"], "unknown converter 'nosuch'"),
    ]:
        proc = t.run(t.command(run, *args, steps=6), tmp_path)
        assert_one_clear_error(proc, fragment)
        assert snapshot(run) == before, args
