"""The loop with real data, model and optimizers: accumulation, metrics, best/latest, divergence."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_support import make_trainer, read_metrics, small_run_overrides, write_corpus

from trainer.checkpoint import load_trainer_state
from trainer.loop import TrainingDiverged
from trainer.step import accumulate_gradients, train_step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root / "play.txt")


def _overrides(corpus, *extra: str) -> list[str]:
    root, path = corpus
    return [*small_run_overrides(root, path, cache_dir=root / "cache"), *extra]


def test_grad_accumulation_gives_the_same_gradients_and_update(corpus, tmp_path) -> None:
    """grad_accum=4 x batch 4 equals grad_accum=1 x batch 16: same batch, same gradients, and
    (AdamW; Muon's bf16 Newton-Schulz would amplify rounding) the same parameters after the step."""
    runs = {}
    for name, bs, ga in (("whole", 16, 1), ("accum", 4, 4)):
        t = make_trainer(
            _overrides(
                corpus,
                "optim=adamw",
                f"trainer.batch_size={bs}",
                f"trainer.grad_accum={ga}",
                # float32: bf16 autocast (auto on CPUs with native bf16) rounds each
                # micro-batch's matmuls differently from the whole batch's
                "trainer.precision=fp32",
            ),
            tmp_path / name,
        )
        x, y = t.parts.sampler.batch(0)
        assert x.shape == (16, 32)
        loss = accumulate_gradients(t.parts.forward, x, y, ga, t.parts.precision).item()
        grads = {n: p.grad.clone() for n, p in t.parts.model.named_parameters()}
        t.parts.optimizers.zero_grad()
        res = train_step(
            t.parts.forward, t.parts.optimizers, x, y, ga, t.parts.precision, 1.0
        ).read()
        assert not res["skipped"] and res["loss"] == pytest.approx(loss, rel=1e-6)
        runs[name] = (loss, grads, res, t.parts.model)
    (l1, g1, r1, m1), (l2, g2, r2, m2) = runs["whole"], runs["accum"]
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-7, msg=n)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters(), strict=True):
        # AdamW's first update is ~lr * sign(g): a gradient within rounding of zero may flip, so
        # compare against the update size (lr 3e-3), not float epsilon.
        torch.testing.assert_close(p, q, rtol=0, atol=5e-5, msg=n)
    fresh = make_trainer(_overrides(corpus, "optim=adamw"), tmp_path / "fresh").parts.model
    assert not torch.equal(fresh.lm_head.weight, m1.lm_head.weight)  # the step did update


def test_metrics_checkpoints_and_best_pointer(corpus, tmp_path) -> None:
    run = tmp_path / "run"
    t = make_trainer(
        _overrides(
            corpus,
            "trainer.max_steps=6",
            "trainer.eval_every=2",
            "trainer.save_every=0",
            "trainer.keep_last=1",
        ),
        run,
    )
    out = t.fit()
    assert out.step == 6 and out.stopped_by is None
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 <= r["val_acc"] <= 1 and r["val_bpb"] > 0
    best_row = min(evals, key=lambda r: r["val_loss"])
    assert (run / "best").resolve().name == f"step-{best_row['step']:06d}"
    assert (run / "latest").resolve().name == "step-000006"
    kept = sorted(p.name for p in run.glob("step-*"))
    assert kept == sorted({f"step-{best_row['step']:06d}", "step-000006"})
    assert not list(run.glob(".tmp-*"))
    t.plots.wait()  # drawn in the background
    assert (run / "metrics.png").stat().st_size > 1000
    state = load_trainer_state(run / "latest")
    assert state["step"] == 6 and state["best_value"] == pytest.approx(best_row["val_loss"])
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.pt",
        "config.yaml",
    ):
        assert (run / "latest" / f).is_file(), f

    # A worse (but finite) evaluation moves latest, never best.
    worse = make_trainer(
        _overrides(
            corpus,
            "trainer.max_steps=7",
            "trainer.eval_every=1",
            "trainer.save_every=1",
            "resume=latest",
        ),
        run,
    )
    worse.resume_from((run / "latest").resolve())
    best_before = (run / "best").resolve()
    with torch.no_grad():
        for p in worse.parts.model.parameters():
            p.add_(torch.randn_like(p))
    worse.fit()
    last = read_metrics(run)[-1]
    assert last["step"] == 7 and last["val_loss"] > best_row["val_loss"]
    assert (run / "best").resolve() == best_before
    assert (run / "latest").resolve().name == "step-000007"

    # Non-finite steps are skipped; after max_bad_steps in a row the run stops, checkpoints intact.
    bad = make_trainer(
        _overrides(
            corpus, "trainer.max_steps=20", "trainer.eval_every=1", "trainer.max_bad_steps=3"
        ),
        run,
    )
    bad.resume_from((run / "latest").resolve())
    with torch.no_grad():
        bad.parts.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        bad.fit()
    rows = read_metrics(run)
    assert rows[-1]["skipped_steps"] >= 1
    assert all(r["val_loss"] is None for r in rows if r["step"] > 7 and "val_loss" in r)
    assert (run / "best").resolve() == best_before
    assert (run / "latest").resolve().name == "step-000007"
    weights = load_file(run / "latest" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_wandb_offline_run_files_are_written(corpus, tmp_path, monkeypatch) -> None:
    from trainer.config import WandbConfig
    from trainer.metrics import WandbLogger, resolve_mode

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("auto") == "offline"  # not logged in
    assert resolve_mode("disabled") == "disabled"
    run = tmp_path / "run"
    logger = WandbLogger(
        WandbConfig(mode="offline"), run, "wandb-test", {"trainer": {"max_steps": 2}}
    )
    t = make_trainer(_overrides(corpus, "trainer.max_steps=3", "trainer.eval_every=3"), run, logger)
    t.fit()
    local = logger.run_path
    logger.finish()
    import wandb

    wandb.teardown()  # stop the wandb service: every record is on disk after this
    assert local is not None and local.parent == tmp_path / "wb" / "wandb"
    assert local.name.startswith("offline-run-")
    (records,) = local.glob("run-*.wandb")
    logged = records.read_bytes()  # the run's protobuf log: config and metric keys as text
    assert b"max_steps" in logged and b"val_loss" in logged and b"train_loss" in logged


def test_wandb_starts_in_the_background_and_its_errors_reach_the_caller(
    tmp_path, monkeypatch, capsys
) -> None:
    """wandb starts in a thread while the run sets up; a failure inside wandb leaves the run
    without wandb and says so, and a bug in our start-up code is raised at the first use."""
    import wandb

    import trainer.metrics as metrics
    from trainer.config import WandbConfig

    started = threading.Event()

    def failing_init(**kwargs: object) -> None:
        started.set()
        assert threading.current_thread() is not threading.main_thread()
        raise OSError("the wandb service did not start")

    monkeypatch.setattr(wandb, "init", failing_init)
    logger = metrics.WandbLogger(WandbConfig(mode="offline"), tmp_path / "r", "r", {})
    assert started.wait(60)
    assert logger.run is None  # waits for the thread; training goes on without wandb
    logger.log({"step": 1, "train_loss": 1.0})
    logger.finish()
    assert (
        "could not start a offline run (the wandb service did not start)" in capsys.readouterr().err
    )

    def buggy_mode(mode: str) -> str:
        raise KeyError("a bug")

    monkeypatch.setattr(metrics, "resolve_mode", buggy_mode)
    logger = metrics.WandbLogger(WandbConfig(mode="auto"), tmp_path / "r", "r", {})
    with pytest.raises(KeyError, match="a bug"):
        logger.log({"step": 1, "train_loss": 1.0})
    assert logger.run is None  # raised once; the run then continues without wandb
    assert metrics.WandbLogger(WandbConfig(mode="disabled"), tmp_path, "r", {}).run is None


def test_each_rank_evaluates_its_share_of_the_val_batches(monkeypatch) -> None:
    """Rank r of W takes val batches r, r + W, ...; ranks short of a batch run a discarded extra
    forward (FSDP/DDP collectives need equal counts); the sums over ranks give one process's
    figures. Ranks are simulated here; tests/test_distributed_ddp.py runs real ones."""
    import numpy as np

    import trainer.evaluation as evaluation
    from qwen3 import Qwen3, Qwen3Config
    from trainer.build import resolve_precision

    torch.manual_seed(0)
    model = Qwen3(
        Qwen3Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    tokens = np.random.default_rng(0).integers(0, 50, 2000).astype(np.int32)
    precision = resolve_precision("fp32", torch.device("cpu"))
    token_bytes = torch.arange(50) % 4  # 0 to 3 bytes per id: a made-up table
    args = (tokens, 2, 16, 3, precision, torch.device("cpu"), token_bytes)
    whole = evaluation.evaluate(model, *args)

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
            self.calls += 1
            return self.inner(x, **kwargs)

    counting = Counting()
    sums: list[list[float]] = []
    monkeypatch.setattr(evaluation, "sum_across_ranks", lambda v: sums.append(v) or v)
    for rank in (0, 1):
        monkeypatch.setattr(evaluation, "group_rank_world", lambda r=rank: (r, 2))
        evaluation.evaluate(counting, *args)
    assert counting.calls == 4  # 3 batches over 2 ranks: 2 forwards each, one of them discarded
    assert [s[2] for s in sums] == [2 * 2 * 16, 1 * 2 * 16]  # tokens counted per rank
    loss_sum, correct, count, nbytes = (a + b for a, b in zip(*sums, strict=True))
    assert loss_sum / count == pytest.approx(whole["val_loss"], rel=1e-6)
    assert correct / count == pytest.approx(whole["val_acc"])
    assert loss_sum / math.log(2) / nbytes == pytest.approx(whole["val_bpb"], rel=1e-6)


def test_async_save_writes_the_same_checkpoints_and_resumes_exactly(corpus, tmp_path) -> None:
    """trainer.async_save: the training state is written in the background, each checkpoint is
    published whole (latest moves once it is), and resuming from one continues exactly."""
    from trainer.run_layout import TRAIN_STATE_DIR, check_checkpoint

    steps = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=5"]
    losses = {}
    for mode in ("false", "true"):
        t = make_trainer(_overrides(corpus, *steps, f"trainer.async_save={mode}"), tmp_path / mode)
        t.fit()
        assert t.checkpoints.pending is None  # fit() ends with every save published
        losses[mode] = [r["train_loss"] for r in read_metrics(tmp_path / mode)]
        run = tmp_path / mode
        assert sorted(p.name for p in run.glob("step-*")) == [f"step-{s:06d}" for s in (2, 4, 6)]
        assert (run / "latest").resolve().name == "step-000006"
        for ckpt in run.glob("step-*"):
            check_checkpoint(ckpt, training=True)
            assert (ckpt / TRAIN_STATE_DIR / ".metadata").is_file()
        assert not list(run.glob(".tmp-*"))
    assert losses["true"] == losses["false"]
    for name in ("step-000002", "step-000006"):  # the same bytes of weights either way
        sync, background = (
            load_file(tmp_path / m / name / "model.safetensors") for m in ("false", "true")
        )
        assert all(torch.equal(sync[k], background[k]) for k in sync)

    resumed = make_trainer(_overrides(corpus, *steps), tmp_path / "resumed")
    resumed.resume_from(tmp_path / "true" / "step-000002")
    resumed.fit()
    assert [r["train_loss"] for r in read_metrics(tmp_path / "resumed")] == losses["true"][2:]


def test_a_resume_in_another_precision_says_so(corpus, tmp_path) -> None:
    """A checkpoint records the precision ``trainer.precision`` resolved to; resuming in another
    one (``auto`` on a machine of another kind, or an explicit change) gets one line naming
    both and the override that keeps the checkpoint's."""
    run = tmp_path / "run"
    first = make_trainer(
        _overrides(corpus, "trainer.max_steps=2", "trainer.precision=fp32", "trainer.eval_every=0"),
        run,
    )
    first.fit()
    assert load_trainer_state(run / "latest")["precision"] == "fp32"
    for precision, note in (("fp32", ""), ("bf16", "trained in fp32; this run computes in bf16")):
        again = make_trainer(
            _overrides(corpus, "trainer.max_steps=3", f"trainer.precision={precision}"), run
        )
        again.resume_from((run / "latest").resolve())
        assert note in again.precision_note and bool(note) == bool(again.precision_note)
    assert "pass trainer.precision=fp32 to keep it" in again.precision_note
