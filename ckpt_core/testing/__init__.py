"""Contract kit: checks a third party runs against its own converter, in its own CI.

One line in a test file::

    from ckpt_core.testing import check_converter

    def test_my_converter_keeps_the_contract():
        check_converter("ema")                      # or the class: check_converter(EMAConverter)

:func:`check_converter` builds a small model, converts it, and checks what the
converter *does*, not what it is called: what ``key_filter`` claims before and
after ``convert``, that ``state_dict_transform`` is pure and deterministic, that
its adapter round-trips ``to_hf``/``from_hf``, that a save and a load through
:class:`ckpt_core.CheckpointManager` restore the model bit-exactly, that the HF
export reads back through the adapters, and that its options validate and list.
A broken rule raises :class:`AssertionError` whose message starts with the
rule's id in brackets (``[key_filter-claims-added-keys] ...``); :data:`RULES`
lists them all.
"""

from __future__ import annotations

from ckpt_core.testing.converter_contract import RULES, check_converter

__all__ = ["RULES", "check_converter"]
