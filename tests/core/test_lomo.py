from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from elastic_ft.core.lomo import Lomo


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4))


IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def _reference_sgd(model, lr: float, clip: float) -> float:
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if clip else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
    return norm


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fused_update_equals_sgd_with_clipping(clip: float) -> None:
    lomo_model, ref_model = _model(), _model()
    ref_norm = _reference_sgd(ref_model, 0.1, clip)
    lomo = Lomo(lomo_model, lr=0.1, grad_clip=clip)
    info = lomo.step(lambda: lomo_model(input_ids=IDS, labels=IDS).loss)
    if clip:
        assert info["grad_norm"] == pytest.approx(ref_norm, rel=1e-4) and info["clip"] < 1
    for a, b in zip(lomo_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert a.grad is None  # nothing kept between steps


def test_fp16_style_overflow_skips_step_and_halves_scale() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    lomo = Lomo(model, lr=0.1, grad_clip=1.0, loss_scale=1e38)  # scaled grads overflow fp32
    info = lomo.step(lambda: model(input_ids=IDS, labels=IDS).loss * 1e3)
    assert info["skipped"] and lomo.loss_scale == 5e37
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lomo.loss_scale = 1024.0
    assert not lomo.step(lambda: model(input_ids=IDS, labels=IDS).loss)["skipped"]
