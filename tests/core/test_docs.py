"""Docs stay in step with the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ckpt_core.protocol import hookspecs
from tests.conftest import REPO_ROOT
from tests.core import _doc_snippets as snippets

DOCS = REPO_ROOT / "docs"


def declared_hooks() -> set[str]:
    """Every function of ckpt_core.protocol.hookspecs that carries the ``@hookspec`` marker."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker)}


def hooks_missing_from(text: str) -> set[str]:
    """Declared hooks without a ``## `hook(...)` `` section in ``text``."""
    sections = set(re.findall(r"^## `(\w+)", text, flags=re.M))
    return declared_hooks() - sections


def test_hook_names_list_every_declared_hookspec():
    assert declared_hooks() == set(hookspecs.HOOK_NAMES)


def test_every_hook_has_a_section_in_plugin_hooks_doc():
    text = (DOCS / "plugin-hooks.md").read_text()
    missing = hooks_missing_from(text)
    assert not missing, f"hooks missing from docs/plugin-hooks.md: {sorted(missing)}"
    # The check itself bites: drop one section and it is reported.
    cut = re.sub(r"^## `key_filter.*?(?=^## )", "", text, flags=re.M | re.S)
    assert hooks_missing_from(cut) == {"key_filter"}


def test_every_hookspec_docstring_covers_when_returns_and_composition():
    for name in hookspecs.HOOK_NAMES:
        doc = getattr(hookspecs, name).__doc__ or ""
        for word in ("When:", "Returns:", "Composition:", "Args:"):
            assert word in doc, f"hookspec {name} docstring lacks {word!r}"


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    assert "ckpt" in blocks[0]
    for line in blocks[1].strip().splitlines():
        assert line in ci.splitlines(), f"'.ci/run' must run README's {line!r}"


# -- every Python block of README.md and docs/*.md runs (tests/core/_doc_snippets.py) ----

RUNNABLE = [b for b in snippets.python_blocks() if b.marker not in ("illustrative", "file")]


def _run_jobs(jobs: list[dict], folder) -> dict[str, dict]:
    spec = folder / "jobs.json"
    spec.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "-c", snippets.RUNNER, str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result["id"]] = result
    for job in jobs:
        results.setdefault(
            job["id"], {"ok": False, "error": f"the runner died: {proc.stderr[-3000:]}"}
        )
    return results


@pytest.fixture(scope="module")
def snippet_runs(tmp_path_factory):
    """Every runnable block, run once: id -> (result, its working folder)."""
    shared, alone, folders = [], [], {}
    for block in RUNNABLE:
        setup, isolated = snippets.SETUPS[block.value] if block.marker == "setup" else ("", False)
        cwd = tmp_path_factory.mktemp("snippet")
        folders[block.id] = cwd
        job = {"id": block.id, "setup": setup, "code": block.code, "cwd": str(cwd)}
        (alone if isolated else shared).append(job)
    results = _run_jobs(shared, tmp_path_factory.mktemp("runner"))
    for job in alone:
        results.update(_run_jobs([job], tmp_path_factory.mktemp("runner")))
    return {k: (results[k], folders[k]) for k in folders}


def test_the_docs_have_python_blocks_to_run():
    assert len(RUNNABLE) >= 8
    assert {b.marker for b in snippets.python_blocks()} <= {None, "setup", "illustrative", "file"}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_every_python_block_of_the_docs_runs(block, snippet_runs):
    result, _ = snippet_runs[block.id]
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    assert result["ok"], f"{block.id} failed:\n{result.get('error')}"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_a_python_block_writes_only_into_folders_it_names(block, snippet_runs):
    setup = snippets.SETUPS[block.value][0] if block.marker == "setup" else ""
    named = {p.split("/")[0] for p in re.findall(r"\"([\w.-]+(?:/[\w.-]+)*)\"", block.code + setup)}
    _, cwd = snippet_runs[block.id]
    written = {p.name for p in cwd.iterdir()}
    assert written <= named, f"{block.id} wrote {sorted(written - named)} in the working directory"


def test_every_setup_is_used_and_every_illustrative_block_says_why():
    used = {b.value for b in snippets.python_blocks() if b.marker == "setup"}
    assert used == set(snippets.SETUPS)
    for block in snippets.python_blocks():
        if block.marker == "illustrative":
            assert block.value, f"{block.id}: say why (<!-- illustrative: ... -->)"


def test_the_block_runner_reports_a_failing_block_and_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- illustrative: a sketch -->\n```python\nnot run\n```\n\n"
        "<!-- setup: tiny-llama -->\n\n```python\nx = 1\n```\n```python\nundefined_name\n```\n"
    )
    found = snippets.blocks(page)
    assert [(b.marker, b.value, b.line) for b in found] == [
        ("illustrative", "a sketch", 2),
        ("setup", "tiny-llama", 8),
        (None, None, 11),
    ]
    jobs = [
        {"id": "bad", "setup": "", "code": found[2].code, "cwd": str(tmp_path)},
        {
            "id": "optional",
            "setup": "import pytest\npytest.importorskip('not_installed_pkg')\n",
            "code": "x = 1\n",
            "cwd": str(tmp_path),
        },
    ]
    results = _run_jobs(jobs, tmp_path)
    assert (
        not results["bad"]["ok"] and "NameError: name 'undefined_name'" in results["bad"]["error"]
    )
    assert results["optional"]["ok"] and "not_installed_pkg" in results["optional"]["skipped"]
