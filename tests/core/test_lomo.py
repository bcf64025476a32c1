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


def test_clipped_update_with_gradient_checkpointing_and_weight_decay_equals_sgd() -> None:
    """The norm pass retains the graph for the update pass; checkpointed blocks recompute."""
    lomo_model, ref_model = _model(), _model()
    lomo_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lomo_model.train()
    loss = ref_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
    torch.optim.SGD(ref_model.parameters(), lr=0.1, weight_decay=0.01).step()
    info = Lomo(lomo_model, lr=0.1, grad_clip=0.5, weight_decay=0.01).step(
        lambda: lomo_model(input_ids=IDS, labels=IDS).loss)
    assert info["clip"] < 1
    for a, b in zip(lomo_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_engine_checkpoint_restores_weights_schedule_and_loss_scale(tmp_path) -> None:
    from elastic_ft.core.lomo import build_lomo_engine

    def engine():
        return build_lomo_engine(_model(), lr=0.1, lr_fn=lambda s: (s + 1) / 3, grad_clip=1.0,
                                 weight_decay=0.0, precision="fp32")

    trained, scheduler = engine()
    for _ in range(2):
        trained.backward(trained(input_ids=IDS, labels=IDS).loss)
        trained.step()
    trained.lomo.loss_scale = 512.0  # as if fp16 had halved it
    trained.save_checkpoint(str(tmp_path), tag="ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["lomo_state.json",
                                                                   "model.safetensors"]
    resumed, resumed_scheduler = engine()
    resumed.load_checkpoint(str(tmp_path), tag="ds")
    for a, b in zip(resumed.module.parameters(), trained.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_scheduler.last_epoch == scheduler.last_epoch == 2
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr() == [0.1]
    assert resumed.lomo.loss_scale == 512.0
    # the next step is the same step on both
    for e in (trained, resumed):
        e.backward(e(input_ids=IDS, labels=IDS).loss)
        e.step()
    for a, b in zip(resumed.module.parameters(), trained.module.parameters(), strict=True):
        assert torch.equal(a, b)
