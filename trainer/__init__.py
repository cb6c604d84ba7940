"""Training: the loop, evaluation, checkpoints, logging, and the ``train.py`` command line.

Entry points: ``trainer.cli_entry.main`` (what ``train.py`` runs), ``trainer.run.run_training``
(a typed :class:`trainer.run_config.RunConfig` to a finished run), ``trainer.loop.Trainer``.
"""

from trainer.config import SampleConfig, TrainConfig, WandbConfig
from trainer.typed_config import ConfigError

__all__ = ["ConfigError", "SampleConfig", "TrainConfig", "WandbConfig"]
