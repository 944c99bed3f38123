"""The reference trainer behind ``ckpt train`` (see docs/training.md).

* :mod:`~ckpt_core.trainer.config`: ``TrainConfig``, the whole TOML file;
* :mod:`~ckpt_core.trainer.data`: the synthetic token stream (state: one position);
* :mod:`~ckpt_core.trainer.loop`: build, parallelize, load, train, save;
* :mod:`~ckpt_core.trainer.launch`: process groups and the torchrun relaunch;
* :mod:`~ckpt_core.trainer.metrics` and :mod:`~ckpt_core.trainer.progress`: output.
"""

from ckpt_core.trainer.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]
