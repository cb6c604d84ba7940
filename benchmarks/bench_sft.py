"""Chat fine-tuning, before and after: held-out assistant-token loss, accuracy and perplexity of a
pretrained checkpoint and of the same after `train.py sft`, with greedy chat answers of both.

    python benchmarks/bench_sft.py --init-from checkpoints/RUN/best --steps 150
    python benchmarks/bench_sft.py --quick     # pretrains a small model itself: a smoke run

Both sides are scored by the trainer's own evaluation (trainer.sft.evaluate_sft) on the same
held-out conversations (the validation plays), so the figures compare. Results go to
benchmarks/results/sft.md by hand, with the command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.conversations import SFTDataConfig  # noqa: E402
from qwen3 import Qwen3, Sampling, generate  # noqa: E402
from qwen3.tokenizer import Qwen3Tokenizer  # noqa: E402
from trainer.build import resolve_precision  # noqa: E402
from trainer.run_layout import default_init_from  # noqa: E402
from trainer.sft import evaluate_sft, prepare_sft_data  # noqa: E402

CHATS = [
    ("You are Juliet in Shakespeare's Romeo and Juliet.", "Wherefore art thou sad, lady?"),
    ("You are Hamlet in Shakespeare's Hamlet.", "My lord, the king would speak with you."),
    ("You are Falstaff in Shakespeare's Henry IV.", "Where hast thou been, Jack?"),
]
SMALL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=32",
    "model.vocab_size=512",
]


def train(*args: str) -> None:
    res = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, text=True)
    if res.returncode:
        raise SystemExit(f"train.py {' '.join(args)} failed ({res.returncode})")


def answers(model: Qwen3, tok: Qwen3Tokenizer, max_new: int) -> list[str]:
    """Greedy answers to CHATS, rendered as the server renders them (no thinking)."""
    out = []
    for system, user in CHATS:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = tok.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False
        )
        sampling = Sampling(max_new_tokens=max_new, temperature=0.0, stop_ids=(tok.im_end_id,))
        ids = generate(model, [tok.encode(prompt)], sampling, vocab_size=tok.vocab_size)[0]
        out.append(tok.decode(ids, skip_special_tokens=True).strip().replace("\n", " / "))
    return out


def score(
    ckpt: Path, args: argparse.Namespace, sft: SFTDataConfig
) -> tuple[dict[str, float], list[str]]:
    """Held-out assistant metrics of ``ckpt`` and its answers to CHATS."""
    data = prepare_sft_data(str(ckpt), sft, args.cache_dir, is_main=False)
    model = Qwen3.from_pretrained(ckpt, device="cpu", dtype=torch.float32).eval()
    lengths = torch.tensor(data.tokenizer.token_byte_lengths(), dtype=torch.int64)
    pad = model.config.vocab_size - len(lengths)
    token_bytes = torch.cat([lengths, torch.zeros(pad, dtype=torch.int64)])
    precision = resolve_precision("fp32", torch.device("cpu"))
    metrics = evaluate_sft(
        model, data, args.batch_size, args.seq_len, args.eval_batches, precision,
        torch.device("cpu"), token_bytes,
    )  # fmt: skip
    return metrics, answers(model, data.tokenizer, args.max_new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--init-from", help="pretrained checkpoint (default: newest run's best)")
    ap.add_argument("--out-dir", default="checkpoints")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--cache-dir", default=".cache/data")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="pretrain a small model first; few steps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sft = SFTDataConfig()
    common = [f"data.cache_dir={args.cache_dir}", "wandb.mode=disabled", "sample.max_new_tokens=0"]
    if args.threads:
        common.append(f"trainer.num_threads={args.threads}")
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        args.out_dir, args.steps, args.eval_batches, args.max_new_tokens = tmp.name, 4, 2, 8
        args.batch_size, args.seq_len = 4, 128
        sft = SFTDataConfig(max_conversations=300)
        train(*SMALL, *common, f"out_dir={tmp.name}", "trainer.max_steps=4",
              "trainer.batch_size=4", "trainer.seq_len=64", "trainer.eval_every=0",
              "run_name=pretrain")  # fmt: skip
    init = Path(args.init_from or default_init_from(args.out_dir)).resolve()
    before, said_before = score(init, args, sft)
    cap = [f"sft.max_conversations={sft.max_conversations}"] if sft.max_conversations else []
    train("sft", *common, *cap, f"init_from={init}", f"out_dir={args.out_dir}", "run_name=bench-sft",
          f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
          f"trainer.seq_len={args.seq_len}", f"trainer.eval_batches={args.eval_batches}",
          f"trainer.eval_every={args.steps}")  # fmt: skip
    after, said_after = score(Path(args.out_dir) / "bench-sft" / "best", args, sft)
    print(f"\ninit_from {init}; sft {args.steps} steps of {args.batch_size} x {args.seq_len}")
    print("\n| model | held-out assistant loss | accuracy | perplexity |")
    print("|---|---|---|---|")
    for name, m in (("pretrained", before), ("after SFT", after)):
        print(f"| {name} | {m['val_loss']:.3f} | {m['val_acc']:.3f} | {m['val_ppl']:.1f} |")
    print("\n| system / user | pretrained | after SFT |")
    print("|---|---|---|")
    for (system, user), a, b in zip(CHATS, said_before, said_after, strict=True):
        print(f"| {system} / {user} | {a or '(nothing)'} | {b or '(nothing)'} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
