"""DeepSpeed's loader unpickles; ours does not: a crafted checkpoint file cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """What a crafted checkpoint file carries: unpickling it calls `Path.touch(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _engine(tiny_assets: Path, zero_stage: int, method: str = "full"):
    from elastic_ft.config import load_config
    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.model import load_model
    from elastic_ft.core.probe import local_process_group
    from elastic_ft.resources.planning import WorkerPlan

    local_process_group()
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tiny_assets), "method.kind": method,
        "deepspeed.zero_stage": zero_stage})
    plan = WorkerPlan(micro_batches=(1,), grad_accum=1, global_batch=1,
                      requested_global_batch=1, lr_scale=1.0, reason="test")
    engine, _ = build_engine(cfg, load_model(cfg), plan, total_steps=4, load_universal=False)
    return engine


@pytest.mark.parametrize(("zero_stage", "method"), [(0, "full"), (1, "full"), (2, "lora"),
                                                    (3, "full")])
def test_real_checkpoints_load_weights_only(tmp_path, tiny_assets, zero_stage, method) -> None:
    import torch

    from elastic_ft.core.safe_load import weights_only_loads

    engine = _engine(tiny_assets, zero_stage, method)
    ids = torch.randint(0, 100, (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="ds", client_state={"universal_checkpoint_info": {}})
    fresh = _engine(tiny_assets, zero_stage, method)
    with weights_only_loads():
        path, _ = fresh.load_checkpoint(str(tmp_path), tag="ds", load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
    assert path is not None
    for a, b in zip(engine.module.parameters(), fresh.module.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_crafted_checkpoint_cannot_run_code(tmp_path, tiny_assets) -> None:
    import torch

    from elastic_ft.core.safe_load import weights_only_loads

    engine = _engine(tiny_assets, 0)
    engine.save_checkpoint(str(tmp_path), tag="ds")
    (model_file,) = (tmp_path / "ds").glob("mp_rank_*_model_states.pt")
    marker = tmp_path / "code_ran"
    torch.save({"module": _Payload(marker)}, model_file)

    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        _engine(tiny_assets, 0).load_checkpoint(str(tmp_path), tag="ds")
    assert not marker.exists()
    # The danger is real: DeepSpeed's own loader, unguarded, runs the payload.
    with pytest.raises(Exception):  # noqa: B017  (what fails after the payload ran varies)
        _engine(tiny_assets, 0).load_checkpoint(str(tmp_path), tag="ds")
    assert marker.exists()


def test_universal_conversion_runs_in_process_weights_only(tmp_path, tiny_assets) -> None:
    """The conversion for a resume at another world size runs in the training process (no
    fresh interpreter): a clean ZeRO checkpoint converts, a crafted one is refused by name
    without running its payload."""
    import torch

    from elastic_ft.core.checkpoint import TAG, CheckpointError, to_universal

    engine = _engine(tiny_assets, 1)
    ids = torch.randint(0, 100, (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    clean, crafted = tmp_path / "clean", tmp_path / "crafted"
    for folder in (clean, crafted):
        engine.save_checkpoint(str(folder), tag=TAG,
                               client_state={"universal_checkpoint_info": {}})
    converted = to_universal(clean, tmp_path / "universal")
    assert (converted / "latest_universal").read_text() == f"{TAG}_universal"
    assert list((converted / f"{TAG}_universal" / "zero").iterdir())  # per-parameter states

    (optim_file,) = (crafted / TAG).glob("*optim_states.pt")
    marker = tmp_path / "code_ran"
    torch.save({"optimizer_state_dict": _Payload(marker)}, optim_file)
    with pytest.raises(CheckpointError, match="ds_to_universal failed on .*crafted") as failed:
        to_universal(crafted, tmp_path / "universal_crafted")
    assert isinstance(failed.value.__cause__, pickle.UnpicklingError), failed.value
    assert not marker.exists()
