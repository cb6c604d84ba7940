"""`train.py sft`: chat fine-tuning. The same trainer as pretraining (checkpoints, exact resume,
wandb, FSDP, plots) with another data source and loss mask: conversations rendered with the
checkpoint's chat template, packed into rows without attention across conversations, and the
loss on the assistant's tokens alone (data/conversations.py, data/sft_sampler.py).

The run starts from `init_from`, by default the `best` checkpoint of the newest pretraining run
under `out_dir`; its tokenizer (and chat template) is the run's, and every checkpoint carries it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from data import Batch
from data.conversations import SFTDataConfig
from data.errors import DataError
from data.sft_data import SFTData, prepare_conversations
from data.sft_sampler import SFTSampler, sft_val_batches
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.build import Precision
from trainer.config import SampleConfig
from trainer.errors import ConfigError
from trainer.evaluation import evaluate_batches


def prepare_sft_data(
    init_from: str, sft_cfg: SFTDataConfig, cache_dir: str, is_main: bool = True
) -> SFTData:
    """The conversations of the ``sft`` section tokenized with ``init_from``'s tokenizer and
    chat template (cached under ``cache_dir``). Every rank of a torchrun job reads them (the
    first to finish publishes the cache; the build is deterministic)."""
    try:
        tokenizer = Qwen3Tokenizer.from_dir(init_from)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init_from={init_from!r}: {e}") from None
    data = prepare_conversations(sft_cfg, tokenizer, cache_dir, repair=is_main)
    if len(data.train) == 0 or len(data.val) == 0:
        raise DataError(
            f"the sft source gave {len(data.train)} train and {len(data.val)} held-out "
            "conversations; a run needs both: check sft.paths / sft.path and sft.val_fraction"
        )
    if is_main:
        print(
            f"conversations: {len(data.train):,} train ({data.train.assistant_tokens:,} "
            f"assistant tokens), {len(data.val):,} held out; cache {data.cache_path}"
        )
    return data


def sft_sampler(
    data: SFTData,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int,
    world_size: int,
    is_main: bool = True,
) -> SFTSampler:
    """The packed-rows sampler; says once how many conversations a row cuts."""
    sampler = SFTSampler(
        data.train, batch_size, seq_len, seed, data.tokenizer.eos_id, rank, world_size
    )
    if sampler.truncated and is_main:
        print(
            f"{sampler.truncated:,} of {len(data.train):,} train conversations are longer than "
            f"trainer.seq_len + 1 = {seq_len + 1} tokens and are cut to it (raise "
            "trainer.seq_len to keep them whole)"
        )
    return sampler


def val_conversation_batches(
    data: SFTData, batch_size: int, seq_len: int, num_batches: int
) -> list[Batch]:
    """The fixed held-out batches: assistant-token loss, accuracy and perplexity are read from
    them by :func:`trainer.evaluation.evaluate_batches`."""
    return list(sft_val_batches(data.val, batch_size, seq_len, num_batches, data.tokenizer.eos_id))


def evaluate_sft(
    model: nn.Module,
    data: SFTData,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    precision: Precision,
    device: torch.device,
    token_bytes: torch.Tensor | None,
) -> dict[str, float]:
    """Held-out assistant-token metrics (val_loss, val_acc, val_ppl, val_bpb)."""
    batches = val_conversation_batches(data, batch_size, seq_len, num_batches)
    return evaluate_batches(model, batches, precision, device, token_bytes)


def chat_prompt(tokenizer: Qwen3Tokenizer, user: str) -> str:
    """A one-turn chat prompt, as the server renders it: the user's words then the assistant's
    turn (without thinking, when the template has the option, as the plays were trained)."""
    options = (
        {"enable_thinking": False} if "enable_thinking" in tokenizer.chat_template_options else {}
    )
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options)


def chat_sampling(tokenizer: Qwen3Tokenizer, sampling: SampleConfig) -> SampleConfig:
    """``sampling`` for a chat model's end-of-run samples: each prompt a user turn, stopping at
    the end of the assistant's turn."""
    prompts = [chat_prompt(tokenizer, p) for p in sampling.prompts]
    return replace(sampling, prompts=prompts, stop_ids=(*sampling.stop_ids, tokenizer.im_end_id))
