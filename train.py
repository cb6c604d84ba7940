"""Train a Qwen3 model, or talk to one.

python train.py model=tiny                 # train (Hydra overrides; -m for sweeps)
python train.py resume=latest              # continue the most recent run
python train.py prepare [overrides]        # build the tokenizer and token cache, then stop
python train.py sft [overrides]            # chat fine-tuning of the latest run's best (conf/sft.yaml)
python train.py config [overrides]         # every key: its value, where it came from, what it means
python train.py demo [ckpt=DIR] [...]      # sample from the best checkpoint of the latest run
python train.py interactive [ckpt=DIR]     # a prompt loop
python train.py eval tasks=[hellaswag] [ckpt=DIR] [limit=N] [...]  # lm-eval-harness tasks
python train.py --help                     # all of these, the config groups and every key
"""

from __future__ import annotations

import time

START = time.perf_counter()

import sys  # noqa: E402

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv, START))
