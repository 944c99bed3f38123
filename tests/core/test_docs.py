"""Docs stay in step with the code."""

from __future__ import annotations

import re

from ckpt_core import hookspecs
from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def declared_hooks() -> set[str]:
    """Every function of ckpt_core.hookspecs that carries the ``@hookspec`` marker."""
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
