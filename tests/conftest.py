"""Shared fixtures for the whole test tree."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a real (metadata-only) distribution with entry points on ``sys.path``.

    ``fake_dist("dist-name", {"conv": "mod:Class"}, {"mod": "source"})`` writes
    ``mod.py`` and a ``dist_name-0.1.dist-info`` folder that importlib.metadata
    discovers exactly as it discovers pip-installed distributions. ``group``
    picks the entry-point group (converters by default).
    """
    root = tmp_path / "site"
    root.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(
        dist: str,
        entry_points: dict[str, str],
        modules: dict[str, str] | None = None,
        group: str = "ckpt_core.converters",
    ):
        for mod, source in (modules or {}).items():
            (root / f"{mod}.py").write_text(textwrap.dedent(source))
            created.append(mod)
        info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return info

    yield make
    for mod in created:
        sys.modules.pop(mod, None)


REPO_ROOT = Path(__file__).resolve().parents[1]
