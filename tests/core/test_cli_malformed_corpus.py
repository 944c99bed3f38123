"""Every reading subcommand of ``ckpt`` over a corpus of malformed inputs: one line, no traceback.

One tiny HF folder and one tiny checkpoint (a DCP step with its manifest) are
written once per module; each corpus case copies one of them and damages the
copy. ``inspect``, ``verify``, ``convert --to hf`` and ``convert --to dcp`` run
in-process through ``ckpt_core.cli.main.main``. A case fails when an exception
escapes ``main``, when the output holds a traceback or an ``internal error``
(an exception that is neither a ``CkptError`` nor an ``OSError``), or when a
failure takes more than one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable

import pytest
import torch

from ckpt_core.cli.main import main
from tests.core.hf_helpers import save_hf_llama

COMMANDS = {
    "inspect": lambda src, out: ["inspect", src],
    "verify": lambda src, out: ["verify", src],
    "convert-hf": lambda src, out: ["convert", src, out, "--to", "hf", "--no-progress"],
    "convert-dcp": lambda src, out: ["convert", src, out, "--to", "dcp", "--no-progress"],
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """``{"hf": folder, "ckpt": checkpoint folder with step-1}``, written once."""
    from ckpt_core import CheckpointConfig, CheckpointManager
    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model

    root = tmp_path_factory.mktemp("corpus")
    save_hf_llama(root / "hf", layers=1, vocab=32)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32, ffn_hidden_dim=64)
    torch.manual_seed(0)
    model = build_model(args)
    config = CheckpointConfig(folder=str(root / "ckpt"), export={"enable": False})
    manager = CheckpointManager(config, model, sd_adapter=LlamaStateDictAdapter(args))
    manager.save(1, last_step=True)
    manager.close()
    return {"hf": root / "hf", "ckpt": root / "ckpt"}


# -- the corpus: (what to copy, how to damage it) ----------------------------------------


def _rewrite_json(path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _set(key, value):
    def change(data):
        data[key] = value
        return data

    return change


def _truncate(path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _header_length(path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 8) + raw[8:])


def _outside_index(folder) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "/etc/hostname"}})
    )


def _symlink_out(folder) -> None:
    os.remove(folder / "model.safetensors")
    os.symlink("/etc/hostname", folder / "model.safetensors")


def _tmp_step_symlink(folder) -> None:
    os.symlink("/tmp", folder / ".tmp-step-2")


def _step(folder):
    return folder / "step-1"


def _step_symlink_out(folder) -> None:
    outside = folder.parent / "elsewhere"
    os.replace(_step(folder), outside)
    os.symlink(outside, _step(folder))


def _unreadable(folder) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 folder anyway")
    os.chmod(folder, 0)


CASES: dict[str, tuple[str, Callable]] = {
    # HF folders
    "hf-truncated-safetensors": ("hf", lambda f: _truncate(f / "model.safetensors")),
    "hf-header-length": ("hf", lambda f: _header_length(f / "model.safetensors")),
    "hf-garbage-safetensors": ("hf", lambda f: (f / "model.safetensors").write_bytes(b"\x01" * 9)),
    "hf-empty-safetensors": ("hf", lambda f: (f / "model.safetensors").write_bytes(b"")),
    "hf-config-not-json": ("hf", lambda f: (f / "config.json").write_text("{oops")),
    "hf-config-a-list": ("hf", lambda f: (f / "config.json").write_text("[1]")),
    "hf-config-huge": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("vocab_size", 1 << 24)),
    ),
    "hf-config-string": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("num_hidden_layers", "1")),
    ),
    "hf-config-missing-field": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", lambda d: {**d, "hidden_size": None}),
    ),
    "hf-config-quantization-a-list": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("quantization_config", [1])),
    ),
    "hf-config-model-type-a-list": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("model_type", ["llama"])),
    ),
    "hf-config-rope-a-string": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("rope_parameters", "llama3")),
    ),
    "hf-config-tie-a-string": (
        "hf",
        lambda f: _rewrite_json(f / "config.json", _set("tie_word_embeddings", "no")),
    ),
    "hf-config-a-folder": (
        "hf",
        lambda f: (os.remove(f / "config.json"), os.mkdir(f / "config.json")),
    ),
    "hf-index-not-json": (
        "hf",
        lambda f: (f / "model.safetensors.index.json").write_text("{"),
    ),
    "hf-index-weight-map-list": (
        "hf",
        lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
    ),
    "hf-index-outside": ("hf", _outside_index),
    "hf-safetensors-symlink-out": ("hf", _symlink_out),
    "hf-no-weights": ("hf", lambda f: os.remove(f / "model.safetensors")),
    "hf-index-dotdot": (
        "hf",
        lambda f: (f / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "../hf/model.safetensors"}})
        ),
    ),
    "hf-unreadable": ("hf", _unreadable),
    # checkpoints (DCP + manifest)
    "ckpt-garbage-metadata": ("ckpt", lambda f: (_step(f) / ".metadata").write_bytes(b"\x80junk")),
    "ckpt-empty-metadata": ("ckpt", lambda f: (_step(f) / ".metadata").write_bytes(b"")),
    "ckpt-truncated-metadata": ("ckpt", lambda f: _truncate(_step(f) / ".metadata")),
    "ckpt-truncated-data": ("ckpt", lambda f: _truncate(_step(f) / "__0_0.distcp", 0.3)),
    "ckpt-manifest-not-json": ("ckpt", lambda f: (_step(f) / "manifest.json").write_text("{")),
    "ckpt-manifest-a-list": ("ckpt", lambda f: (_step(f) / "manifest.json").write_text("[]")),
    "ckpt-manifest-files-wrong-type": (
        "ckpt",
        lambda f: _rewrite_json(_step(f) / "manifest.json", _set("files", "all of them")),
    ),
    "ckpt-manifest-model-wrong-type": (
        "ckpt",
        lambda f: _rewrite_json(_step(f) / "manifest.json", _set("model", [1, 2])),
    ),
    "ckpt-manifest-config-huge": (
        "ckpt",
        lambda f: _rewrite_json(
            _step(f) / "manifest.json",
            lambda d: {
                **d,
                "model": {**d["model"], "config": {**d["model"]["config"], "hidden_size": 1 << 19}},
            },
        ),
    ),
    "ckpt-manifest-entry-wrong-type": (
        "ckpt",
        lambda f: _rewrite_json(_step(f) / "manifest.json", lambda d: {**d, "files": {"x": 3}}),
    ),
    "ckpt-metadata-a-folder": (
        "ckpt",
        lambda f: (os.remove(_step(f) / ".metadata"), os.mkdir(_step(f) / ".metadata")),
    ),
    "ckpt-step-symlink-out": ("ckpt", _step_symlink_out),
    "ckpt-tmp-step-symlink": ("ckpt", _tmp_step_symlink),
    "ckpt-step-is-a-file": (
        "ckpt",
        lambda f: (shutil.rmtree(_step(f)), _step(f).write_text("not a folder")),
    ),
    # anything
    "empty-folder": ("empty", lambda f: None),
    "a-file-not-a-folder": ("file", lambda f: None),
    "missing-path": ("missing", lambda f: None),
}

#: Known gaps, as strict xfails so a fix shows up: none left.
KNOWN: dict[tuple[str, str], str] = {}


#: A leftover temporary folder, or a step that links to its folder elsewhere, is not damage.
CONVERT_MAY_SUCCEED = {"ckpt-tmp-step-symlink", "ckpt-step-symlink-out"}
#: Cases that are the user's wrong input (exit 2), not damaged data (exit 1).
BAD_INPUT = {
    "hf-no-weights": 2,
    "hf-config-model-type-a-list": 2,  # no family reads model_type ['llama']: unsupported
    "ckpt-step-is-a-file": 2,
    "empty-folder": 2,
    "a-file-not-a-folder": 2,
    "missing-path": 2,
}


def _materialize(pristine, tmp_path, case: str):
    kind, damage = CASES[case]
    target = tmp_path / "src"
    if kind in ("hf", "ckpt"):
        shutil.copytree(pristine[kind], target, symlinks=True)
    elif kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("just a file")
    damage(target)
    return target


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - the test is that nothing escapes
        pytest.fail(f"ckpt {' '.join(argv[:1])} raised {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _params():
    for case in CASES:
        for command in COMMANDS:
            reason = KNOWN.get((case, command))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(case, command, id=f"{case}-{command}", marks=marks)


@pytest.mark.parametrize("case, command", list(_params()))
def test_a_malformed_input_ends_in_one_line_never_a_traceback(
    pristine, tmp_path, capsys, case, command
):
    src = _materialize(pristine, tmp_path, case)
    argv = COMMANDS[command](str(src), str(tmp_path / "out"))
    code, out, err = _run(argv, capsys)
    assert "Traceback" not in out + err, err
    assert "internal error" not in err, err
    assert code in (0, 1, 2), code
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) <= 1, f"a failure takes {len(errors)} lines:\n{err}"
    if code != 0 and not errors:
        assert command == "verify" and out.strip(), "a failure with no message"
    if command.startswith("convert") and case not in CONVERT_MAY_SUCCEED:
        want = BAD_INPUT.get(case, 1)  # damaged data: exit 1; a wrong path or kind: exit 2
        assert code == want, f"convert of {case} exited {code}, not {want}: {err}"


def test_debug_shows_the_traceback_and_still_ends_in_the_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{oops")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "hf"]
    monkeypatch.delenv("CKPT_DEBUG", raising=False)
    for args, env in (
        (argv, None),
        (["--debug", *argv], None),
        (argv + ["--debug"], None),
        (argv, "1"),
    ):
        if env is not None:
            monkeypatch.setenv("CKPT_DEBUG", env)
        code, _, err = _run(args, capsys)
        assert code == 1
        assert err.strip().splitlines()[-1].startswith("ckpt convert: error: ")
        assert ("Traceback" in err) is (args is not argv or env is not None)


def test_an_unexpected_exception_is_one_internal_error_line(capsys):
    from ckpt_core.cli import failures

    assert failures.report("inspect", KeyError("surprise"), debug=False) == 1
    assert capsys.readouterr().err == (
        "ckpt inspect: internal error: KeyError: 'surprise' "
        "(rerun with --debug for the traceback)\n"
    )
