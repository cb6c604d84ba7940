"""Training: the command line, the run's config, the loop, evaluation, checkpoints, metrics.

A run reads top to bottom: ``trainer.cli`` (what ``train.py`` runs) -> ``trainer.config``
(:class:`~trainer.config.RunConfig`, validated once) -> ``trainer.run`` -> ``trainer.build``
(device, precision, data, model, optimizers) -> ``trainer.loop`` (with ``trainer.step`` and
``trainer.evaluation``) -> ``trainer.checkpoint`` and ``trainer.run_layout`` (where and what a
checkpoint is) and ``trainer.metrics``; ``trainer.distributed`` under torchrun. This package
file imports nothing, so each entry point loads only what it uses.
"""
