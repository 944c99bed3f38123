"""torchtitan interop: read its Llama 3 step folders, write ones it loads, never silently wrong.

ckpt's reference Llama computes rotary embeddings in the rotate-half layout;
torchtitan keeps q/k interleaved, names its weights its own way, fuses
``wq``/``wk``/``wv`` (0.3), and keeps its own scheduler and train-state fields.
This package moves whole training states across, weights and Adam moments
through the same permutation:

* :mod:`~ckpt_core.torchtitan.keys`: the names (0.3 and ≤ 0.2), and telling a
  torchtitan folder apart;
* :mod:`~ckpt_core.torchtitan.tensors`: the q/k row permutation, ``wqkv`` split and fuse;
* :mod:`~ckpt_core.torchtitan.translate`: whole states, entry by entry (content);
* :mod:`~ckpt_core.torchtitan.architecture`: torchtitan's model arguments as a
  ``config.json`` of the ``llama`` family;
* :mod:`~ckpt_core.torchtitan.convert`: ``ckpt convert --from torchtitan`` / ``--to torchtitan``;
* :mod:`~ckpt_core.torchtitan.initial_load`: ``[checkpoint.initial_load] format = "torchtitan"``;
* :mod:`~ckpt_core.torchtitan.detect`: the refusals for folders whose layout nothing records.

torchtitan itself is never imported (it is a test dependency only). User guide:
``docs/torchtitan.md``.
"""

from ckpt_core.torchtitan.translate import Heads, from_torchtitan, to_torchtitan

__all__ = ["Heads", "from_torchtitan", "to_torchtitan"]
