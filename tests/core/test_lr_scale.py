"""The plan's learning-rate scale survives a resume (DeepSpeed restores the old base rate)."""

from __future__ import annotations

import pytest

from elastic_ft.config import load_config
from tests.conftest import ROOT


# the test moves the schedule on without training steps, which torch warns of
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_lr_scale_of_the_new_plan_survives_loading_the_scheduler_state(tmp_path,
                                                                       tiny_assets) -> None:
    from elastic_ft.core.engine import apply_lr_scale, build_engine, lr_lambda
    from elastic_ft.core.model import load_model
    from elastic_ft.core.probe import local_process_group
    from elastic_ft.core.safe_load import weights_only_loads
    from elastic_ft.resources.planning import WorkerPlan, plan_per_worker

    local_process_group()
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tiny_assets), "output_dir": str(tmp_path),
        "deepspeed.zero_stage": 1, "optim.warmup_steps": 0, "optim.schedule": "linear"})
    even = plan_per_worker([8], 8)
    # 7 over 2 ranks of cap 1: the nearest feasible global batch is 6, lr x 6/7
    odd = plan_per_worker([1, 1], 7)
    assert odd.lr_scale == pytest.approx(6 / 7)
    odd_rank0 = WorkerPlan((1,), odd.grad_accum, 3, 7, odd.lr_scale, odd.reason)

    engine, scheduler = build_engine(cfg, load_model(cfg), even, 10, False)
    for _ in range(3):
        scheduler.step()
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    expected = cfg.optim.lr * odd.lr_scale * lr_lambda(cfg, 10)(3)

    def resumed(fix: bool) -> float:
        engine, scheduler = build_engine(cfg, load_model(cfg), odd_rank0, 10, False)
        with weights_only_loads():
            engine.load_checkpoint(str(tmp_path / "ckpt"), tag="t", load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        if fix:
            apply_lr_scale(cfg, odd_rank0, scheduler)
        return [g["lr"] for g in engine.optimizer.param_groups][0], scheduler

    lr_unfixed, _ = resumed(fix=False)  # what the checkpoint alone gives back: the old rate
    assert lr_unfixed == pytest.approx(cfg.optim.lr * lr_lambda(cfg, 10)(3))
    lr, scheduler = resumed(fix=True)
    assert lr == pytest.approx(expected) and scheduler.get_last_lr()[0] == pytest.approx(lr)
    scheduler.step()  # and it stays scaled on the next steps
    assert scheduler.get_last_lr()[0] == pytest.approx(
        cfg.optim.lr * odd.lr_scale * lr_lambda(cfg, 10)(4))
