"""Packed documents (qwen3.documents): a row holding several documents with ``document_ids``
computes what each document computes run alone (logits, loss and gradients, dense and MoE,
eager and compiled), and without ``document_ids`` the model's path is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from qwen3 import Qwen3, Qwen3Config
from qwen3.compile import compile_for_training, graph_breaks
from qwen3.documents import (
    document_attention,
    document_block_mask,
    document_causal_mask,
    document_positions,
)

DENSE = Qwen3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
MOE = Qwen3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
LENGTHS = [(5, 7, 4), (9, 7), (16,)]  # documents of each row; every row is 16 tokens


def _ids(lengths: list[tuple[int, ...]]) -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]
    return torch.stack(rows)


def _packed(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, targets (-100 on each document's last token: its next one is another document's)
    and document ids of the rows LENGTHS describes."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = _ids(LENGTHS)
    x = torch.randint(0, DENSE.vocab_size, doc_ids.shape, generator=gen)
    y = torch.randint(0, DENSE.vocab_size, doc_ids.shape, generator=gen)
    last = torch.ones_like(doc_ids, dtype=torch.bool)
    last[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return x, y.masked_fill(last, -100), doc_ids


def _alone(doc_ids: torch.Tensor) -> list[tuple[int, slice]]:
    """(row, span) of every document."""
    spans = []
    for r in range(doc_ids.shape[0]):
        for d in doc_ids[r].unique().tolist():
            where = (doc_ids[r] == d).nonzero().flatten()
            spans.append((r, slice(int(where[0]), int(where[-1]) + 1)))
    return spans


def test_positions_restart_and_mask_is_block_diagonal_causal() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    mask = document_causal_mask(ids)[:, 0]
    assert mask[0, 4].tolist() == [False, False, False, True, True, False]
    assert mask[0, 2].tolist() == [True, True, True, False, False, False]
    assert torch.equal(mask[1], torch.ones(6, 6, dtype=torch.bool).tril())
    positions, sdpa_mask = document_attention(ids)  # the CPU takes the SDPA mask
    assert torch.equal(positions, document_positions(ids))
    assert isinstance(sdpa_mask, torch.Tensor) and torch.equal(sdpa_mask[:, 0], mask)
    with pytest.raises(ValueError, match="document_ids must be a \\(B, T\\) integer"):
        document_attention(ids.float())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_is_the_same_mask_and_flex_computes_sdpa() -> None:
    """The CUDA path's BlockMask allows exactly the SDPA mask's pairs, and FlexAttention under it
    (forward only here: it has no CPU backward) equals SDPA with the boolean mask."""
    ids = _ids(LENGTHS)
    block = document_block_mask(ids)
    dense = create_mask(block.mask_mod, ids.shape[0], 1, 16, 16, device="cpu")
    assert torch.equal(dense, document_causal_mask(ids))
    q, k, v = (torch.randn(3, 4, 16, 8) for _ in range(3))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=block)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=document_causal_mask(ids)
    )
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_packed_row_equals_each_document_alone(config: Qwen3Config) -> None:
    torch.manual_seed(0)
    model = Qwen3(config).train()
    x, y, doc_ids = _packed()
    with torch.no_grad():
        packed = model(x, document_ids=doc_ids)
        for r, span in _alone(doc_ids):
            alone = model(x[r : r + 1, span])
            torch.testing.assert_close(packed[r : r + 1, span], alone, atol=1e-5, rtol=1e-5)
        plain = model(x)  # without document ids the documents see each other
        assert not torch.allclose(plain, packed, atol=1e-3)

    # Loss and gradients: the packed mean over every counted target equals the documents' own
    # losses weighted by their counted targets.
    model.zero_grad()
    model(x, targets=y, document_ids=doc_ids).backward()
    packed_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    counted = int((y != -100).sum())
    total = torch.zeros(())
    for r, span in _alone(doc_ids):
        ys = y[r : r + 1, span]
        n = int((ys != -100).sum())
        if n:
            loss = model(x[r : r + 1, span], targets=ys) * n / counted
            loss.backward()
            total = total + loss.detach()
    alone_grads = [p.grad for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        packed_loss = model(x, targets=y, document_ids=doc_ids)
    torch.testing.assert_close(packed_loss, total, atol=1e-5, rtol=1e-5)
    assert len(packed_grads) == len(alone_grads)
    for a, b in zip(packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_without_document_ids_the_path_is_unchanged() -> None:
    """``document_ids=None`` is the plain causal forward, bit for bit; one document per row
    through the mask gives the same numbers (to rounding: SDPA with a mask is another kernel)."""
    torch.manual_seed(0)
    model = Qwen3(DENSE).eval()
    x = torch.randint(0, DENSE.vocab_size, (2, 16))
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(model(x, document_ids=None), plain)
        one = model(x, document_ids=torch.zeros_like(x))
    torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)


def test_document_ids_with_a_kv_cache_are_refused() -> None:
    from qwen3.cache import KVCache

    model = Qwen3(DENSE).eval()
    x = torch.randint(0, DENSE.vocab_size, (1, 4))
    cache = KVCache(DENSE, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="document_ids .* not a KVCache"):
        model(x, cache=cache, document_ids=torch.zeros_like(x))


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_training_forward_takes_document_ids(mode: str) -> None:
    """The compiled blocks take the document mask as one more input (no graph break) and
    compute what the eager model does; the no-document forward still traces as one graph."""
    torch.manual_seed(0)
    model = Qwen3(DENSE).train()
    model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
    x, y, doc_ids = _packed()
    found = graph_breaks(model, x, y)
    assert (found.breaks, found.graphs) == (0, 1), found.reasons
    eager = model(x, targets=y, document_ids=doc_ids)
    compile_for_training(model, backend="aot_eager")
    try:
        compiled = model(x, targets=y, document_ids=doc_ids)
        compiled.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_train_step_passes_document_ids_to_each_micro_batch() -> None:
    """Accumulating over micro-batches with document ids gives the gradients of the masked
    forward over the whole batch (and differs from the unmasked one)."""
    from trainer.build import Precision
    from trainer.step import accumulate_gradients

    torch.manual_seed(0)
    model = Qwen3(DENSE).train()
    x, y, doc_ids = _packed()
    fp32 = Precision("fp32", "cpu", None)
    loss = accumulate_gradients(model, x, y, 3, fp32, None, doc_ids)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    whole = sum(
        model(x[i : i + 1], targets=y[i : i + 1], document_ids=doc_ids[i : i + 1]) / 3
        for i in range(3)
    )
    whole.backward()
    torch.testing.assert_close(loss, whole.detach(), atol=1e-6, rtol=1e-6)
    for a, p in zip(grads, (p for p in model.parameters() if p.grad is not None), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    model.zero_grad()
    plain = accumulate_gradients(model, x, y, 3, fp32)
    assert not torch.allclose(plain, loss)
