"""Qwen3 models on their own: config and presets, layers, KV-cache generation, HF import/export.

Usable without Hydra, wandb or datasets: it needs torch, safetensors and tokenizers only.
"""

from qwen3.cache import KVCache
from qwen3.config import PRESETS, Qwen3Config
from qwen3.device import pick_device
from qwen3.generate import Sampling, generate, generate_steps, sample_next, stream_generate
from qwen3.model import Qwen3
from qwen3.tokenizer import SPECIAL_TOKENS, Qwen3Tokenizer

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "KVCache",
    "Qwen3",
    "Qwen3Config",
    "Qwen3Tokenizer",
    "Sampling",
    "generate",
    "generate_steps",
    "pick_device",
    "sample_next",
    "stream_generate",
]
