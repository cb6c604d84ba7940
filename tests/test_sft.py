"""SFT data and loss: the offline corpus, the assistant-only loss mask, packed rows that are a
pure function of the step, and the fused loss honouring ignored targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer_support import tiny_qwen3

from data.conversations import (
    SFTDataConfig,
    assistant_spans,
    encode_conversations,
    prepared,
    read_conversations,
)
from data.errors import DataError
from data.sampler import Batch
from data.sft_data import TokenizedConversations, prepare_conversations
from data.sft_sampler import IGNORE, SFTSampler, build_rows, sft_val_batches, to_batch
from data.shakespeare import shakespeare_documents
from data.tokenizer_training import train_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "You are Juliet."},
    {"role": "user", "content": "Who is there?"},
    {"role": "assistant", "content": "It is I, thy love.", "reasoning_content": "Be brief."},
    {"role": "user", "content": "Speak again."},
    {"role": "assistant", "content": "<think>\nA sigh first.\n</think>\n\nAy me!"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shakespeare_documents("train", None, 0.05)[:3], 600)


@pytest.fixture(scope="module")
def plays() -> list[tuple[bool, list[dict]]]:
    return list(read_conversations(SFTDataConfig()))


def test_the_offline_corpus_is_deterministic_with_held_out_plays(plays) -> None:
    again = list(read_conversations(SFTDataConfig()))
    assert again == plays and len(plays) > 20_000
    val = [chat for is_val, chat in plays if is_val]
    train = [chat for is_val, chat in plays if not is_val]
    assert 0 < len(val) < len(train) / 5
    titles = {chat[0]["content"].split("Shakespeare's ")[1].split(".")[0] for chat in val}
    assert titles and not titles & {
        chat[0]["content"].split("Shakespeare's ")[1].split(".")[0] for chat in train
    }
    roles = {tuple(m["role"] for m in chat) for _, chat in plays}
    assert roles == {("system", "user", "assistant")}
    # The system prompt names the character who replies; the reply is that speaker's words.
    romeo = next(
        chat
        for _, chat in plays
        if chat[0]["content"].startswith("You are Romeo")
        and "Juliet" in chat[0]["content"]
        and "Romeo and Juliet" in chat[0]["content"]
    )
    assert "[" not in romeo[2]["content"] and romeo[2]["content"].strip()


def test_the_loss_mask_covers_assistant_thinking_content_and_end_of_turn(tokenizer) -> None:
    cfg = SFTDataConfig(enable_thinking=True)
    chat = prepared(MULTI_TURN, cfg)
    ((ids, mask),) = encode_conversations(tokenizer, [chat])
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(chat, False))
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # An earlier turn as the template shows it in history (no thinking), the last with it.
    assert (
        trained
        == "It is I, thy love.<|im_end|><think>\nA sigh first.\n</think>\n\nAy me!<|im_end|>"
    )
    # Every turn is a run of tokens that starts right after `<|im_start|>assistant\n`.
    runs = np.flatnonzero(np.diff(np.array([0, *mask, 0], dtype=np.int8)) == 1)
    for start in runs:
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    # Without thinking, reasoning is dropped: the model learns to answer after an empty block.
    ((ids, mask),) = encode_conversations(tokenizer, [prepared(MULTI_TURN, SFTDataConfig())])
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "It is I, thy love.<|im_end|><think>\n\n</think>\n\nAy me!<|im_end|>"


def test_a_template_whose_prefixes_differ_is_refused(tokenizer) -> None:
    from qwen3.tokenizer import Qwen3Tokenizer

    odd = Qwen3Tokenizer(
        tokenizer.tokenizer,
        "{% for m in messages %}{{ m.content }}|{{ messages|length }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}",
    )
    with pytest.raises(DataError, match="prefixes"):
        assistant_spans(odd, MULTI_TURN[:3])


def _xyd(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert batch.document_ids is not None  # SFT rows always carry them
    return batch.x, batch.y, batch.document_ids


def _conversations(tokenizer, plays, n: int) -> TokenizedConversations:
    chats = [prepared(chat, SFTDataConfig()) for _, chat in plays[:n]]
    return TokenizedConversations.from_lists(encode_conversations(tokenizer, chats))


def test_rows_are_a_pure_function_of_the_step_and_split_across_ranks(tokenizer, plays) -> None:
    convs = _conversations(tokenizer, plays, 400)
    one = SFTSampler(convs, 8, 64, seed=3, pad_id=tokenizer.eos_id)
    again = SFTSampler(convs, 8, 64, seed=3, pad_id=tokenizer.eos_id)
    ranks = [SFTSampler(convs, 4, 64, 3, tokenizer.eos_id, rank=r, world_size=2) for r in (0, 1)]
    steps = [0, 7, 200, 3]  # 200 is past the first epoch: epochs are packed on demand
    for step in steps:
        x, y, doc = _xyd(one.sample(step))
        assert x.shape == y.shape == doc.shape == (8, 64)
        for a, b in zip((x, y, doc), _xyd(again.sample(step)), strict=True):
            assert torch.equal(a, b)
        halves = [_xyd(r.sample(step)) for r in ranks]
        for i in range(3):
            assert torch.equal(torch.cat([h[i] for h in halves]), (x, y, doc)[i])
    assert not torch.equal(one.sample(0).x, one.sample(1).x)
    other = SFTSampler(convs, 8, 64, seed=4, pad_id=tokenizer.eos_id)
    assert not torch.equal(other.sample(0).x, one.sample(0).x)
    assert one.truncated == int((convs.lengths > 65).sum()) > 0
    # A state from other conversations is refused; the same one restores the seed.
    other.load_state_dict(one.state_dict())
    assert torch.equal(other.sample(5).x, one.sample(5).x)
    with pytest.raises(DataError, match="same sft settings"):
        SFTSampler(_conversations(tokenizer, plays, 50), 8, 64, 3, 0).load_state_dict(
            one.state_dict()
        )


def test_targets_are_the_assistant_tokens_of_the_same_conversation(tokenizer, plays) -> None:
    convs = _conversations(tokenizer, plays, 200)
    sampler = SFTSampler(convs, 16, 128, seed=0, pad_id=tokenizer.eos_id)
    x, y, doc = _xyd(sampler.sample(0))
    im_end = tokenizer.im_end_id
    for row in range(16):
        starts = torch.nonzero(doc[row, 1:] != doc[row, :-1]).flatten() + 1
        for s in starts.tolist():  # nothing is learned across a boundary, or in padding
            assert y[row, s - 1] == IGNORE
        keep = y[row] != IGNORE
        kept = y[row][keep]
        following = x[row, 1:][keep[:-1]]  # a target is the next input token
        assert torch.equal(kept[: len(following)], following)
        text = tokenizer.decode(kept.tolist())
        assert "<|im_start|>" not in text and "user\n" not in text
        # Every whole conversation in the row contributes its assistant turn, ended by im_end.
        assert text.count("<|im_end|>") >= len(starts) - (doc[row, -1] != doc[row, 0]).item() - 1
    assert (y == im_end).sum() > 0
    assert ((y != IGNORE).float().mean()) > 0.1


def test_val_batches_are_fixed_and_held_out(tokenizer, plays) -> None:
    val = [chat for is_val, chat in plays if is_val][:100]
    convs = TokenizedConversations.from_lists(
        encode_conversations(tokenizer, [prepared(c, SFTDataConfig()) for c in val])
    )
    first = sft_val_batches(convs, 4, 64, 3, tokenizer.eos_id)
    second = sft_val_batches(convs, 4, 64, 3, tokenizer.eos_id)
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(_xyd(a), _xyd(b), strict=True))


def test_the_conversation_cache_is_reused_and_rebuilt_when_damaged(tokenizer, tmp_path) -> None:
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": MULTI_TURN[:3]}, {"messages": MULTI_TURN}] * 10
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTDataConfig(source="local", paths=[str(chats)], val_conversations=2)
    data = prepare_conversations(cfg, tokenizer, tmp_path / "cache")
    assert (len(data.train), len(data.val)) == (18, 2)
    again = prepare_conversations(cfg, tokenizer, tmp_path / "cache")
    assert again.cache_path == data.cache_path and np.array_equal(again.train.ids, data.train.ids)
    (data.cache_path / "train" / "mask.npy").write_bytes(b"broken")
    rebuilt = prepare_conversations(cfg, tokenizer, tmp_path / "cache")
    assert np.array_equal(rebuilt.train.mask, data.train.mask)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match="sft.messages_field"):
        prepare_conversations(SFTDataConfig(source="local", paths=[str(bad)]), tokenizer, tmp_path)


def test_the_loss_and_gradients_ignore_every_non_assistant_target(tokenizer, plays) -> None:
    convs = _conversations(tokenizer, plays, 60)
    sampler = SFTSampler(convs, 4, 256, seed=1, pad_id=tokenizer.eos_id)
    ids, trained, doc = build_rows(convs, sampler.rows(0), 257, tokenizer.eos_id)
    x, y = to_batch(ids, trained, doc).x, to_batch(ids, trained, doc).y
    # Change every token that is not an assistant token of its conversation, in its role as a
    # target: the targets, the loss and every gradient stay the same.
    rng = np.random.default_rng(0)
    changed = np.where(trained, ids, rng.integers(0, tokenizer.vocab_size, ids.shape))
    y2 = to_batch(changed, trained, doc).y
    assert torch.equal(y, y2) and (y != IGNORE).sum() > 100
    model = tiny_qwen3(tokenizer, max_positions=256)

    def loss_and_grads(targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(x, targets=targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(y)
    loss2, grads2 = loss_and_grads(y2)
    assert torch.equal(loss, loss2) and all(
        torch.equal(a, b) for a, b in zip(grads, grads2, strict=True)
    )
    # ... and the fused loss is the cross-entropy of the assistant targets alone.
    model.zero_grad()
    logits = model(x)
    keep = y != IGNORE
    ref = F.cross_entropy(logits[keep], y[keep])
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_packed_conversations_compute_what_each_computes_alone(tokenizer, plays) -> None:
    convs = _conversations(tokenizer, plays, 80)
    sampler = SFTSampler(convs, 8, 384, seed=2, pad_id=tokenizer.eos_id)
    # Best-fit rows start with the longest conversations: find one holding two and padding.
    x, y, doc = next(b for b in map(_xyd, map(sampler.sample, range(20))) if b[2].max() >= 2)
    row = int(torch.argmax(doc.max(dim=1).values))
    model = tiny_qwen3(tokenizer, max_positions=512).eval()
    with torch.no_grad():
        packed = model(x[row : row + 1], document_ids=doc[row : row + 1])[0]  # (T, V)
        stats = model(x[row : row + 1], targets=y[row : row + 1], document_ids=doc[row : row + 1])
        for d in doc[row].unique().tolist():
            where = torch.nonzero(doc[row] == d).flatten()
            alone = model(x[row : row + 1, where])[0]
            torch.testing.assert_close(packed[where], alone, rtol=1e-5, atol=1e-5)
    # The same loss as the conversations' assistant targets scored one by one.
    keep = y[row] != IGNORE
    ref = F.cross_entropy(packed[keep], y[row][keep])
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-5)
