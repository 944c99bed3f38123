"""Fixtures shared by the ``ckpt train`` end-to-end tests."""

from __future__ import annotations

import pytest

from tests.e2e import _train as t


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(name)``: step -> loss of an uninterrupted tiny run with that converter set.

    Each converter set runs once per session; a set with a third-party converter
    that is not installed is skipped with the reason, and a missing or broken bundled
    converter fails (``_train.plugin_missing``).
    """
    cache: dict[str, dict[int, float]] = {}

    def get(name: str) -> dict[int, float]:
        if name not in cache:
            reason = t.plugin_missing(t.CONVERTER_SETS[name])
            if reason:
                pytest.skip(reason)
            folder = tmp_path_factory.mktemp(f"ref-{name.replace('+', '-')}")
            t.run_ok(t.command(folder, *t.converter_args(t.CONVERTER_SETS[name])), folder)
            ref = t.losses(folder)
            assert sorted(ref) == list(range(1, t.STEPS + 1))
            cache[name] = ref
        return cache[name]

    return get
