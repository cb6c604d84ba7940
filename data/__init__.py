"""Data pipeline: text sources, tokenizer training, token cache, batch sampler."""

from data.config import DataConfig
from data.errors import DataError
from data.prepare import DataNotReady, PreparedData, SourceData, prepare_data, wait_for_data
from data.sampler import BatchSampler, val_batches

__all__ = [
    "BatchSampler",
    "DataConfig",
    "DataError",
    "DataNotReady",
    "PreparedData",
    "SourceData",
    "prepare_data",
    "val_batches",
    "wait_for_data",
]
