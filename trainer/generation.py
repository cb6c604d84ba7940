"""Text from a model: the samples printed after training, ``train.py demo`` (a few samples from
a checkpoint) and ``train.py interactive`` (a prompt loop)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from qwen3 import Qwen3, Sampling, generate, pick_device, stream_generate
from qwen3.quantize import quantize
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.config import GenerationCliConfig
from trainer.errors import CheckpointError, ConfigError
from trainer.run_layout import find_model_dir, is_sft_checkpoint


def _prompt_ids(tokenizer: Qwen3Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|> (a document boundary)."""
    return tokenizer.encode(prompt) or [tokenizer.eos_id]


def max_new_for(model: Qwen3, prompt_len: int, wanted: int) -> int:
    """``wanted`` capped so prompt + completion fit the model's context."""
    return max(0, min(wanted, model.config.max_position_embeddings - prompt_len))


def _fitted(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    sampling: Sampling,
    prompt_len: int,
    stop_at_eos: bool,
) -> Sampling:
    """``sampling`` with only as many new tokens as fit the context after the prompt, and
    stopping at <|endoftext|> as well unless ``stop_at_eos`` is off."""
    stops = (*sampling.stop_ids, tokenizer.eos_id) if stop_at_eos else sampling.stop_ids
    wanted = max_new_for(model, prompt_len, sampling.max_new_tokens)
    return replace(sampling, max_new_tokens=wanted, stop_ids=stops)


@torch.no_grad()
def complete(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    prompts: list[str],
    sampling: Sampling,
    fixed_length: bool = False,
) -> list[str]:
    """One completion per prompt (batched, KV cache) as ``sampling`` says, stopping at
    <|endoftext|> too.

    ``fixed_length``: every row decodes ``max_new_tokens`` and is cut at its first stop id
    afterwards, so the number of forward passes does not depend on the tokens drawn. A sharded
    model needs that: each forward gathers the weights on every rank, and a rank whose draws
    differed (by a rounding) must not stop while the others still gather. The text is the same:
    rows draw from one generator whether or not they have stopped."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    longest = max(len(i) for i in ids)
    sampling = _fitted(model, tokenizer, sampling, longest, True)
    stops = set(sampling.stop_ids)
    if fixed_length:
        sampling = replace(sampling, stop_ids=())
    out = generate(model, ids, sampling, vocab_size=tokenizer.vocab_size)
    if fixed_length:
        out = [o[: next((i for i, t in enumerate(o) if t in stops), len(o))] for o in out]
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def stream_text(
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    prompt: str,
    sampling: Sampling,
    stop_at_eos: bool = True,
) -> Iterator[str]:
    """Yield pieces of text as tokens are generated: whole characters, through the tokenizer's
    incremental decoder; a character left unfinished when generation ends shows as U+FFFD."""
    ids = _prompt_ids(tokenizer, prompt)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    for tok in stream_generate(
        model,
        ids,
        _fitted(model, tokenizer, sampling, len(ids), stop_at_eos),
        vocab_size=tokenizer.vocab_size,
    ):
        text = decoder.step(tok)
        if text:
            yield text
    tail = decoder.flush()
    if tail:
        yield tail


GENERIC_PROMPTS = ["Once upon a time", "The meaning of life is", "ROMEO:"]


def run_prompts(ckpt: Path) -> list[str] | None:
    """The ``sample.prompts`` of the run that wrote ``ckpt``, if it is one of ours."""
    config = ckpt / "config.yaml"
    if not config.is_file():
        return None
    try:
        saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(
            f"{config} is damaged ({' '.join(str(e).split())}); pass the prompts yourself, "
            "e.g. prompts='[\"ROMEO:\"]'"
        ) from None
    sample = saved.get("sample") if isinstance(saved, dict) else None
    prompts = sample.get("prompts") if isinstance(sample, dict) else None
    return [str(p) for p in prompts] if isinstance(prompts, list) and prompts else None


def inference_device(name: str) -> torch.device:
    """The device ``name`` (``auto``, ``cpu``, ``cuda:N``...) for running a model here, or a
    :class:`ConfigError` if this machine has none; on a CPU, denormals are flushed (their softmax
    tails slow it down severalfold)."""
    try:
        device = pick_device(name)
    except RuntimeError as e:  # the device is not available on this machine
        raise ConfigError(str(e)) from None
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def load(cfg: GenerationCliConfig) -> tuple[Path, Qwen3, Qwen3Tokenizer]:
    """The checkpoint ``cfg`` names, its model (quantized as ``cfg.quantize`` says) and
    tokenizer; prints which checkpoint it is."""
    ckpt = find_model_dir(cfg.ckpt, cfg.out_dir)
    # int8 kernels are CPU kernels: there `auto` means the CPU (another device is refused below)
    device = inference_device("cpu" if cfg.quantize and cfg.device == "auto" else cfg.device)
    try:
        tokenizer = Qwen3Tokenizer.from_dir(ckpt)
        model = Qwen3.from_pretrained(ckpt, device=device)
    except (FileNotFoundError, ValueError) as e:  # how qwen3 (standalone) reports a bad file
        raise CheckpointError(f"cannot load {ckpt}: {e}") from e
    model.eval()
    params = model.num_params()  # counted before quantizing hides the weights in packed form
    try:
        model = quantize(model, cfg.quantize)
    except ValueError as e:  # a device, dtype or model that int8 does not support
        raise ConfigError(str(e)) from None
    how = f", {cfg.quantize}" if cfg.quantize else ""
    print(f"checkpoint {ckpt.resolve()} ({params / 1e6:.2f} M parameters{how})")
    return ckpt, model, tokenizer


def demo(cfg: GenerationCliConfig) -> None:
    ckpt, model, tok = load(cfg)
    prompts = cfg.prompts or run_prompts(ckpt) or GENERIC_PROMPTS
    # Unseeded, demo still shows the same samples each time.
    texts = complete(model, tok, prompts, replace(cfg, seed=cfg.seed or 0))
    for prompt, text in zip(prompts, texts, strict=True):
        print("-" * 60)
        print(prompt + text)
    print("-" * 60)


def interactive(cfg: GenerationCliConfig) -> None:
    # Ctrl-C (SIGINT) stops a generation as a KeyboardInterrupt. Python leaves SIGINT ignored
    # when its launcher ignored it (a background job of a non-interactive shell, as some CI
    # runners start us), so the contract is set here rather than inherited.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interactive(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interactive(cfg: GenerationCliConfig) -> None:
    ckpt, model, tok = load(cfg)
    if cfg.chat or (cfg.chat is None and is_sft_checkpoint(ckpt)):
        _chat(cfg, model, tok)
        return
    print(
        "Type a prompt and press Enter (\\n for a newline). Ctrl-C stops a generation; "
        "/quit or Ctrl-D exits.",
        flush=True,
    )
    while (line := _read_line(">>> ")) is not None:
        if not line.strip():
            continue
        prompt = line.replace("\\n", "\n")
        print(prompt, end="", flush=True)
        _print_stream(model, tok, prompt, cfg)


def _read_line(prompt: str) -> str | None:
    """The next input line; None on /quit or Ctrl-D. Ctrl-C at the prompt says how to exit."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D exits)", flush=True)
            continue
        return None if line.strip() == "/quit" else line


def _print_stream(model: Qwen3, tok: Qwen3Tokenizer, prompt: str, cfg: GenerationCliConfig) -> str:
    """Print the generation as it comes and return it; Ctrl-C stops it (what came is kept)."""
    text = ""
    try:
        for piece in stream_text(model, tok, prompt, cfg, cfg.stop_at_eos):
            text += piece
            print(piece, end="", flush=True)
        print(flush=True)
    except KeyboardInterrupt:
        print("\n[generation stopped]", flush=True)
    return text


def _chat(cfg: GenerationCliConfig, model: Qwen3, tok: Qwen3Tokenizer) -> None:
    """A chat: each line is a user turn, the conversation so far goes through the checkpoint's
    chat template (without thinking, as SFT trains on conversations without reasoning), and the
    answer ends at the assistant's end of turn."""
    history: list[dict[str, str]] = (
        [{"role": "system", "content": cfg.system}] if cfg.system else []
    )
    options = {"enable_thinking": False} if "enable_thinking" in tok.chat_template_options else {}
    sampling = replace(cfg, stop_ids=(*cfg.stop_ids, tok.im_end_id))
    print(
        "Chat: type a message and press Enter. /reset starts over; /quit or Ctrl-D exits.",
        flush=True,
    )
    while (line := _read_line("you> ")) is not None:
        if line.strip() == "/reset":
            history = history[:1] if cfg.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.replace("\\n", "\n")})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, **options)
        print("model> ", end="", flush=True)
        answer = _print_stream(model, tok, prompt, sampling)
        history.append({"role": "assistant", "content": answer.strip()})
