"""Real Ray Train + DeepSpeed runs on the tiny assets (no mocks)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from elastic_ft.events import read_events
from tests.conftest import ROOT

pytestmark = pytest.mark.ray


def _cfg(tiny_assets: Path, out: Path, data: Path | None = None, **overrides):
    base = {"model.name_or_path": str(tiny_assets), "output_dir": str(out)}
    if data is not None:
        base["data.paths"] = [str(data)]
    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {**base, **overrides})


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}  # a step redone after a restart replaces the lost one


def test_cluster_processes_find_their_own_cluster_past_a_stale_address_file(ray_local) -> None:
    """Ray Train's placement-group cleaner asks the state API, from inside the cluster, whether
    the controller lives. A dead `ray start` head named in ray_current_cluster made each fit()
    wait 12 s for it; the embedded cluster's processes must ask the embedded cluster."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:9")  # a head that is gone

    @ray_local.remote(num_cpus=0)
    def api_server_url() -> str:
        from ray.dashboard.utils import get_address_for_submission_client

        return get_address_for_submission_client(None)

    try:
        url = ray_local.get(api_server_url.remote(), timeout=30)
    finally:
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(saved)
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":9")


def test_lora_zero2_two_workers_then_resume_at_one(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.core.trainer import run_training

    lines = (ROOT / "data" / "sample" / "alpaca.jsonl").read_text().splitlines()[:400]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    first = run_training(_cfg(tiny_assets, out, data, **{
        "train.max_steps": 16, "train.global_batch": 4, "train.micro_batch": 1,
        "checkpoint.every_steps": 8, "train.log_sample_ids": True, "optim.lr": 0.02}),
        export=True)
    assert first["world_size"] == 2 and first["steps"] == 16
    assert first["final_loss"] < first["initial_loss"] - 0.2
    assert len(first["peak_mem_bytes"]) == 2 and min(first["peak_mem_bytes"]) > 0
    for key in ("tokens", "wall_s", "config"):
        assert key in first
    events = [e["event"] for e in read_events(out / "events.jsonl")]
    assert {"start", "plan", "checkpoint", "end"} <= set(events)

    # the exported merged model loads with the plain HF API and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = tok("### User:\nReverse the word.\ncat\n### Assistant:\n", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    # corrupt the newest checkpoint (truncate one of its files), as a crash mid-write would
    (newest,) = (out / "ray_storage" / "train").glob("checkpoint_00000016_*")
    saved = json.loads((newest / "state.json").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["method"] == "lora"  # resume guard
    victim = max((p for p in (newest / "ds").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    # run again on the same output dir, one worker: the bad checkpoint is reported and
    # skipped, the run resumes from step 8 (the newest valid), data position kept
    report = json.loads((out / "data_report.json").read_text())
    steps_per_epoch = -(-report["blocks"] // 4)
    second = run_training(_cfg(tiny_assets, out, data, **{
        "train.max_steps": steps_per_epoch + 2, "train.global_batch": 4, "train.micro_batch": 1,
        "checkpoint.every_steps": 8, "train.log_sample_ids": True, "workers.min": 1,
        "workers.max": 1, "optim.lr": 0.02}), export=False)
    events = read_events(out / "events.jsonl")
    invalid = [e for e in events if e["event"] == "checkpoint_invalid"]
    assert invalid and victim.name in invalid[0]["error"] and "checkpoint_00000016" in (
        invalid[0]["error"])
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["step"] == 8 and resume["world_size"] == 1 and resume["from_world_size"] == 2
    assert resume["universal"] is True  # ZeRO-2 shards re-partitioned, optimizer kept
    assert resume["position"] == {"epoch": 0, "consumed": 32}
    assert second["world_size"] == 1 and second["steps"] == steps_per_epoch + 2

    # every kept sample of epoch 0 was trained exactly once across the two world sizes
    metrics = _metrics(out)
    epoch0 = [s for step in range(1, steps_per_epoch + 1) for s in metrics[step]["sample_ids"]]
    assert len(epoch0) == len(set(epoch0)) == report["kept"]


def test_checkpoints_faster_than_ray_takes_them_keep_one_upload_in_flight(
        tmp_path, tiny_assets, ray_local) -> None:
    """A checkpoint every step (faster than Ray Train's controller takes reports, one per
    1 s poll): each save first waits for its rank's previous upload, so the newest checkpoint
    complete in storage, what a hard node loss resumes from, stays one save behind instead
    of falling further behind with every save."""
    from elastic_ft.core.trainer import run_training

    out = tmp_path / "frequent"
    steps = 12
    summary = run_training(_cfg(tiny_assets, out, **{
        "train.max_steps": steps, "train.global_batch": 4, "train.micro_batch": 1,
        "checkpoint.every_steps": 1, "checkpoint.keep": 2}), export=False)
    assert summary["steps"] == steps and summary["world_size"] == 2
    saves = [e for e in read_events(out / "events.jsonl") if e["event"] == "checkpoint"]
    assert [e["step"] for e in saves] == list(range(1, steps + 1))
    # rank 1's "uploaded" may reach the controller after rank 0's event: one more of slack
    lags = [e["step"] - (e["newest_complete_step"] or 0) for e in saves]
    assert max(lags) <= 2, lags
    assert any(e["upload_wait_s"] > 0.05 for e in saves), saves  # the gate held saves back
    # no Ray Data on the workers' path: Ray Train started no DatasetManager actor per group
    # (a new process importing Ray Data, beside each restart's model load)
    classes = {a.get("ActorClassName") for a in ray_local._private.state.actors().values()}
    assert "RayTrainWorker" in classes and "DatasetManager" not in classes, classes


def test_full_finetune_zero3(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.core.trainer import run_training

    out = tmp_path / "full"
    summary = run_training(_cfg(tiny_assets, out, **{
        "method.kind": "full", "deepspeed.zero_stage": 3, "train.max_steps": 6,
        "optim.lr": 0.003, "checkpoint.every_steps": 3}), export=True)
    assert summary["steps"] == 6 and summary["world_size"] == 2
    assert summary["final_loss"] < summary["initial_loss"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert sum(p.numel() for p in merged.parameters()) > 100_000


def test_micro_batch_over_memory_cap_is_replanned_not_crashed(tmp_path, tiny_assets, ray_local):
    """Plan time: micro-batch 4 is over the cap -> 2. Run time: the measured peak trend is
    over the budget -> checkpoint, re-plan to 1 with more accumulation, resume. Same global
    batch throughout, no crash."""
    from elastic_ft.core.optimizer import estimate_for
    from elastic_ft.core.trainer import run_training

    out = tmp_path / "mem"
    overrides = {"train.max_steps": 8, "train.global_batch": 4, "train.micro_batch": 4,
                 "workers.min": 1, "workers.max": 1, "checkpoint.every_steps": 100,
                 # a memory re-plan restarts the group, and is not counted as a failure
                 "workers.max_failures": 0}
    # Between the memory model's figures for micro-batch 2 (fits) and 3 (does not); both are
    # far below what the run then really holds (its RSS growth), which forces the re-plan.
    cfg = _cfg(tiny_assets, out, **overrides)
    fits, over = (estimate_for(cfg, 1, m, use_gpu=False).total_bytes for m in (2, 3))
    cap_bytes = (fits + over) // 2
    summary = run_training(_cfg(tiny_assets, out, **overrides, **{
        "train.mem_cap_bytes": cap_bytes}), export=False)
    events = read_events(out / "events.jsonl")
    capped = [e for e in events if e["event"] == "micro_batch_capped"]
    assert capped and capped[0]["requested"] == 4 and capped[0]["chosen"] == 2
    plans = [(e["micro_batches"], e["grad_accum"], e["global_batch"]) for e in events
             if e["event"] == "plan"]
    assert plans == [([2], 2, 4), ([1], 4, 4)]
    replans = [e for e in events if e["event"] == "replan_memory"]
    assert replans and replans[0]["max_micro_batch"] == 1
    jit = [e for e in events if e["event"] == "jit_checkpoint"]
    resume = [e for e in events if e["event"] == "resume"]
    assert jit[0]["reason"] == "memory" and resume[0]["step"] == jit[0]["step"]
    assert summary["steps"] == 8


def test_micro_batch_auto_probes_and_trains(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.core.trainer import run_training

    out = tmp_path / "auto"
    summary = run_training(_cfg(tiny_assets, out, **{
        "train.micro_batch": "auto", "train.max_steps": 3, "checkpoint.every_steps": 3}),
        export=False)
    events = read_events(out / "events.jsonl")
    (auto,) = [e for e in events if e["event"] == "micro_batch_auto"]  # one device type
    # the probe ran real steps at doubling sizes and measured each one
    assert auto["probed"] >= 1 and len(auto["peaks"]) >= 2
    assert all(v is None or v > 0 for v in auto["peaks"].values())
    assert auto["chosen"] == min(auto["probed"], 8) and auto["calibration"]["median"] > 0
    plan = [e for e in events if e["event"] == "plan"][0]
    assert auto["device_type"] == "cpu"
    assert max(plan["micro_batches"]) <= auto["chosen"]
    assert sum(plan["micro_batches"]) * plan["grad_accum"] == 8 == plan["global_batch"]
    assert summary["steps"] == 3 and summary["final_loss"] > 0


# CI runs the cells whose conversion differs (ZeRO-1 vs ZeRO-3 layouts, LoRA's frozen base
# under ZeRO-3); ELASTIC_FT_ALL_ZERO_CELLS=1 adds full ZeRO-2 and LoRA ZeRO-1 (~1.5 min more on
# 2 cores; both passed on 2026-11-23). LoRA ZeRO-2: the test above and test_elastic.py.
_ALL_CELLS = os.environ.get("ELASTIC_FT_ALL_ZERO_CELLS") == "1"


@pytest.mark.parametrize(("method", "stages", "worlds"), [
    ("full", (1, 2, 3) if _ALL_CELLS else (1, 3), (2, 1)),
    ("lora", (1, 3) if _ALL_CELLS else (3,), (1, 2))])
def test_resumes_at_another_world_size_with_optimizer_state(
        method, stages, worlds, tmp_path, tiny_assets, ray_local, uninterrupted_run) -> None:
    """Full fine-tuning at ZeRO-1/2/3, 2 workers -> checkpoint -> 1 worker, and LoRA at
    ZeRO-1/3, 1 -> 2 (LoRA ZeRO-2: the test above and test_elastic.py): the universal
    checkpoint carries the Adam moments, so the resumed steps match an uninterrupted 2-worker
    run (ZeRO stages and world sizes give the same losses; a fresh optimizer would not). At
    1 -> 2 both ranks share one node: its local rank 0 converts, rank 1 loads the same copy."""
    from elastic_ft.core.trainer import run_training

    settings = {"method.kind": method, "optim.lr": 0.003, "optim.schedule": "constant",
                "optim.warmup_steps": 0, "train.global_batch": 4, "train.micro_batch": 1,
                "checkpoint.every_steps": 4}
    expected = uninterrupted_run(_cfg(tiny_assets, tmp_path / "reference", **settings, **{
        "train.max_steps": 6, "deepspeed.zero_stage": 1}))  # full: test_offload's reference
    before, after = ({"workers.min": w, "workers.max": w} for w in worlds)
    started = time.time()
    for zero_stage in stages:
        out = tmp_path / f"zero{zero_stage}"
        stage = {**settings, "deepspeed.zero_stage": zero_stage}
        run_training(_cfg(tiny_assets, out, **stage, **before, **{"train.max_steps": 4}),
                     export=False)
        run_training(_cfg(tiny_assets, out, **stage, **after, **{"train.max_steps": 6}),
                     export=False)
        resume = [e for e in read_events(out / "events.jsonl") if e["event"] == "resume"][-1]
        assert (resume["step"], resume["from_world_size"], resume["world_size"]) == (4, *worlds)
        assert resume["universal"] is True
        converted = Path(tempfile.gettempdir()).glob("eft_universal_*")
        assert not [p for p in converted if p.stat().st_mtime >= started]  # removed once loaded
        resumed = _metrics(out)
        for step in (5, 6):
            assert resumed[step]["world_size"] == worlds[1]
            assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-4), (
                method, zero_stage, step)
