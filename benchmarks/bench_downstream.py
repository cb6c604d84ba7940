"""What in-loop downstream evaluation costs: the main job's model (``model=tiny``, the default
config) training with ``trainer.eval_tasks=[core_local]`` at the default cadence (the suite scored
at each evaluation, every ``trainer.eval_every`` steps), against the same training without it.

One process builds the run as ``train.py`` does (data, model, optimizers, the downstream scorer),
then alternates rounds: a stretch of training steps alone, and the same number of training
steps followed by one scoring of the suite, the in-loop evaluation's share of an evaluation
interval. The cost at the default cadence is scoring / (``eval_every`` x step) of the medians:
the ratio of training time with the suite to training time without (target: at most 1.10,
issue 29). The one-time setup (lm-eval's import and the tasks' loading) is shown apart, and as
its share of the main job's 400 steps.

    .venv/bin/python benchmarks/bench_downstream.py            # 3 rounds of 20 steps
    .venv/bin/python benchmarks/bench_downstream.py --quick    # 1 round of 2 steps, to check it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from hydra import compose, initialize_config_dir

from trainer.build import apply_runtime_settings, build_parts, resolve_device
from trainer.cli import CONF_DIR, register_resolvers
from trainer.config import RunConfig, build_run_config, register_config_nodes, to_container
from trainer.distributed import DistInfo
from trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def run_config(overrides: list[str]) -> RunConfig:
    """The typed config ``python train.py OVERRIDES`` would run."""
    register_resolvers()
    register_config_nodes()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return build_run_config(to_container(compose("config", overrides=overrides)))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``: CPU time of this process is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="training steps per round")
    ap.add_argument("--suite", default="core_local")
    ap.add_argument("--threads", type=int, default=None, help="trainer.num_threads")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 2
    os.chdir(REPO)  # the local tasks name their data relative to the repository root
    out = Path(tempfile.mkdtemp(prefix="bench-downstream-"))
    overrides = ["model=tiny", f"out_dir={out}", "wandb.mode=disabled"]
    if args.threads:
        overrides.append(f"trainer.num_threads={args.threads}")
    base = run_config(overrides)
    cfg = run_config([*overrides, f"trainer.eval_tasks=[{args.suite}]"])
    device, precision = resolve_device(cfg)
    apply_runtime_settings(cfg, device)
    parts = build_parts(base, DistInfo(), device, precision)
    from trainer.downstream_loop import DownstreamScorer  # lm-eval is imported here

    setup_wall, setup_cpu = timed(
        lambda: setattr(parts, "downstream", DownstreamScorer(cfg.trainer, parts, DistInfo()))
    )
    trainer = Trainer(cfg, parts, out / "run", DistInfo(), "", None, 1e11)

    def steps() -> None:
        for _ in range(args.steps):
            trainer._train_one_step()  # the loop's own step (its log/eval/save cadence aside)

    scorer = parts.downstream
    assert scorer is not None
    scores: dict[str, float] = {}
    train_w, train_c, score_w, score_c = [], [], [], []
    steps()  # warm up: first steps allocate, the first scoring reads the tasks' documents
    scorer()
    for _ in range(args.rounds):
        w, c = timed(steps)
        train_w.append(w / args.steps)
        train_c.append(c / args.steps)
        steps()
        w, c = timed(lambda: scores.update(scorer()))
        score_w.append(w)
        score_c.append(c)
    every, total = cfg.trainer.eval_every, cfg.trainer.max_steps
    n_scores = len({*range(every, total + 1, every), total}) if every else 1
    print(f"model=tiny, {args.suite} ({', '.join(scorer.tasks.names)}), device {device}")
    print(f"{args.rounds} rounds of {args.steps} steps; eval_every={every}, max_steps={total}\n")
    print("| measure | wall s | CPU s |")
    print("|---|---|---|")
    med = statistics.median
    print(f"| training step | {med(train_w):.3f} | {med(train_c):.3f} |")
    print(f"| one scoring of {args.suite} | {med(score_w):.2f} | {med(score_c):.2f} |")
    print(f"| setup (import, load tasks), once | {setup_wall:.2f} | {setup_cpu:.2f} |")
    ratio_w = 1 + med(score_w) / (every * med(train_w))
    ratio_c = 1 + med(score_c) / (every * med(train_c))
    run_w = 1 + (n_scores * med(score_w) + setup_wall) / (total * med(train_w))
    print(
        f"\nratio at the default cadence (1 scoring per {every} steps): {ratio_w:.3f} wall, "
        f"{ratio_c:.3f} CPU (target <= 1.10)"
    )
    print(f"whole main job ({n_scores} scorings + setup over {total} steps): {run_w:.3f} wall")
    key = scorer.main_metric
    if key is not None and key in scores:
        print(f"{key} at the last round: {scores[key]:.4f}")


if __name__ == "__main__":
    main()
