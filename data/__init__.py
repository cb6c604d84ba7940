"""Data pipeline: text sources, tokenizer training, token cache, batch sampler."""

from data.config import DataConfig
from data.errors import DataError
from data.prepare import DataNotReady, PreparedData, SourceData, prepare_data, wait_for_data
from data.sampler import Batch, BatchSampler, val_batches, val_samples

__all__ = [
    "Batch",
    "BatchSampler",
    "DataConfig",
    "DataError",
    "DataNotReady",
    "PreparedData",
    "SourceData",
    "prepare_data",
    "val_batches",
    "val_samples",
    "wait_for_data",
]
