"""``train.py demo`` (a few samples) and ``train.py interactive`` (a prompt loop)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen3 import Qwen3, pick_device
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.config import GenerationCliConfig, build_dataclass
from trainer.errors import CheckpointError, ConfigError
from trainer.run_layout import find_model_dir
from trainer.sampling import complete, stream_text

GENERIC_PROMPTS = ["Once upon a time", "The meaning of life is", "ROMEO:"]


def parse_options(command: str, args: list[str]) -> GenerationCliConfig:
    """``key=value`` words (YAML values, as Hydra overrides) into a checked config."""
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(
            f"{command}: {bad[0]!r} is not key=value (e.g. ckpt=checkpoints/RUN/best)"
        )
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist(args))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{command}: cannot parse the options ({e})") from None
    assert isinstance(parsed, dict)  # a dotlist always makes a mapping
    values = {str(k): v for k, v in parsed.items()}
    if isinstance(values.get("prompts"), str):  # prompts="ROMEO:" means one prompt
        values["prompts"] = [values["prompts"]]
    return build_dataclass(GenerationCliConfig, values, command, skip=GenerationCliConfig.not_keys)


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


def load(cfg: GenerationCliConfig) -> tuple[Path, Qwen3, Qwen3Tokenizer]:
    ckpt = find_model_dir(cfg.ckpt, cfg.out_dir)
    try:
        device = pick_device(cfg.device)
    except RuntimeError as e:  # the device is not available on this machine
        raise ConfigError(str(e)) from None
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    try:
        tokenizer = Qwen3Tokenizer.from_dir(ckpt)
        model = Qwen3.from_pretrained(ckpt, device=device)
    except (FileNotFoundError, ValueError) as e:  # how qwen3 (standalone) reports a bad file
        raise CheckpointError(f"cannot load {ckpt}: {e}") from e
    model.eval()
    return ckpt, model, tokenizer


def demo(cfg: GenerationCliConfig) -> None:
    ckpt, model, tok = load(cfg)
    prompts = cfg.prompts or run_prompts(ckpt) or GENERIC_PROMPTS
    print(f"checkpoint {ckpt.resolve()} ({model.num_params() / 1e6:.2f} M parameters)")
    # Unseeded, demo still shows the same samples each time.
    texts = complete(model, tok, prompts, replace(cfg, seed=cfg.seed or 0))
    for prompt, text in zip(prompts, texts, strict=True):
        print("-" * 60)
        print(prompt + text)
    print("-" * 60)


def interactive(cfg: GenerationCliConfig) -> None:
    ckpt, model, tok = load(cfg)
    print(f"checkpoint {ckpt.resolve()} ({model.num_params() / 1e6:.2f} M parameters)")
    print("Type a prompt and press Enter (\\n for a newline). Ctrl-C stops a generation; "
          "/quit or Ctrl-D exits.", flush=True)  # fmt: skip
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D exits)", flush=True)
            continue
        if line.strip() == "/quit":
            return
        if not line.strip():
            continue
        prompt = line.replace("\\n", "\n")
        print(prompt, end="", flush=True)
        try:
            for piece in stream_text(model, tok, prompt, cfg, cfg.stop_at_eos):
                print(piece, end="", flush=True)
            print(flush=True)
        except KeyboardInterrupt:
            print("\n[generation stopped]", flush=True)


def run_subcommand(command: str, args: list[str]) -> int:
    """Run ``demo`` or ``interactive`` with ``key=value`` options; returns the exit code."""
    try:
        cfg = parse_options(command, args)
        (demo if command == "demo" else interactive)(cfg)
    except (ConfigError, CheckpointError) as e:  # a user's to fix; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
