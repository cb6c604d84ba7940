"""The inference-only decode paths (issue 19): the written-out float32 RMSNorm equals
``F.rms_norm`` bit for bit, transposed weight copies exist only under ``torch.inference_mode()``
and follow every weight change, and greedy decoding stays token for token equal to
``transformers``' ``generate`` on the benchmark grid's kinds of shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from qwen3.layers import rms_norm_f32
from qwen3.projections import inference_linear
from qwen3.quantize import quantize_int8

transformers = pytest.importorskip("transformers")

# The grid's kinds (GQA 1, 2, 5; head_dim 16 to 64), at sizes a test decodes in a second.
SHAPES = {
    "gqa1": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa5": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1, head_dim=16),
    "gqa2-d64": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def _config(**shape: int) -> Qwen3Config:
    width = shape["hidden_size"]
    return Qwen3Config(
        vocab_size=300,
        intermediate_size=3 * width,
        num_hidden_layers=2,
        max_position_embeddings=128,
        **shape,
    )


@pytest.mark.parametrize("shape", [(1, 1, 160), (8, 1, 512), (3, 7, 6, 32), (4, 1024)])
def test_inference_rms_norm_is_f_rms_norm_bit_for_bit(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 100.0):
        x = torch.randn(shape) * scale
        weight = torch.randn(shape[-1])
        with torch.inference_mode():
            for w in (weight, None):
                assert torch.equal(rms_norm_f32(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6))


def test_transposed_copies_are_inference_only_and_follow_weight_changes() -> None:
    torch.manual_seed(1)
    model = Qwen3(_config(**SHAPES["gqa1"])).eval()
    x = torch.randint(0, 300, (1, 6))
    head, o_proj = model.lm_head, model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        expected = model(x)
    assert "_transposed" not in head.__dict__ and "_transposed" not in o_proj.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert "_transposed" in head.__dict__ and "_transposed" in o_proj.__dict__
    for weight in (head.weight, o_proj.weight):  # the head is tied: the embedding changes too
        with torch.no_grad():
            weight.mul_(1.5)  # in place, as an optimizer step would
            expected = model(x)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # A projection narrower than its input (down_proj) keeps its own layout.
    down = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        inference_linear(torch.randn(1, 1, down.in_features), down)
    assert "_transposed" not in down.__dict__


def test_int8_linears_keep_their_own_kernels() -> None:
    torch.manual_seed(2)
    model = quantize_int8(Qwen3(_config(**SHAPES["gqa5"])).eval())
    x = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert "_transposed" not in model.lm_head.__dict__


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_greedy_decoding_equals_transformers_generate(name: str, tmp_path) -> None:
    torch.manual_seed(3)
    ours = Qwen3(_config(**SHAPES[name])).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sdpa"
    ).eval()
    for batch in (1, 3):
        prompts = torch.randint(1, 300, (batch, 7))
        got = generate(ours, prompts.tolist(), Sampling(40, temperature=0))
        out = theirs.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
        )
        assert got == out[:, 7:].tolist(), f"batch {batch}"
