"""Chaos on a real local Ray: killed workers, a killed driver, a failure budget running out.

(Node removal, drain, SIGTERM and a cloud-metadata notice are in test_elastic.py; a corrupted
checkpoint on local disk in test_train.py, one on S3 here.)
Every scenario ends at max steps with each sample of the epoch trained once and the losses
of an undisturbed run, or, past the failure budget, with a clear error and a valid checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from elastic_ft.config import load_config
from elastic_ft.core.checkpoint import find_latest_valid, run_storage
from elastic_ft.events import read_events
from elastic_ft.testing.fake_nodes import BackgroundRun
from tests.conftest import ROOT, assert_each_sample_once, losses_by_step

pytestmark = pytest.mark.ray
STEPS = 120
LOSS_TOLERANCE = 1e-4  # see test_elastic.py: restarts change summation order only


def _overrides(tiny_assets: Path, out: Path, **extra) -> dict:
    return {"model.name_or_path": str(tiny_assets), "output_dir": str(out),
            "train.max_steps": STEPS, "checkpoint.every_steps": 20, "optim.lr": 0.003,
            "train.log_sample_ids": True, "workers.start_timeout_s": 10, **extra}


def _cfg(tiny_assets: Path, out: Path, **extra):
    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml",
                       _overrides(tiny_assets, out, **extra))


@pytest.fixture(scope="module")
def undisturbed(tiny_assets, ray_local, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("undisturbed")
    BackgroundRun(_cfg(tiny_assets, out)).join(300)
    return losses_by_step(out)


def _worker_pids(run: BackgroundRun) -> list[int]:
    starts = [e for e in run.events() if e["event"] == "start"]
    return starts[-1]["pids"] if starts else []


def test_sigkill_worker_mid_run(tiny_assets, ray_local, undisturbed, tmp_path) -> None:
    out = tmp_path / "kill"
    run = BackgroundRun(_cfg(tiny_assets, out))
    run.wait_until(lambda r: bool(r.registered_checkpoint_steps()) and _worker_pids(r), 240,
                   "a registered checkpoint")
    victim = _worker_pids(run)[1]
    os.kill(victim, signal.SIGKILL)
    summary = run.join(300)
    assert summary["steps"] == STEPS and summary["restarts"] == 1
    losses = losses_by_step(out)
    assert max(abs(losses[s] - undisturbed[s]) for s in undisturbed) <= LOSS_TOLERANCE
    assert_each_sample_once(out)


def test_failure_budget_exhausted_stops_with_clear_error(tiny_assets, ray_local, tmp_path):
    out = tmp_path / "budget"
    run = BackgroundRun(_cfg(tiny_assets, out, **{"workers.max_failures": 1}))
    for attempt in range(2):  # two faults in a row; the budget allows one
        run.wait_until(lambda r, n=attempt: len(
            [e for e in r.events() if e["event"] == "start"]) > n and _worker_pids(r), 240,
            f"worker group {attempt + 1} started")
        run.wait_until(lambda r: bool(r.registered_checkpoint_steps()), 120, "a checkpoint")
        os.kill(_worker_pids(run)[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"failure budget .*max_failures=1.*re-run"):
        run.join(300)
    assert find_latest_valid(out / "ray_storage" / "train") is not None
    assert [e for e in read_events(out / "events.jsonl") if e["event"] == "run_failed"]


def _worker_pids_of(out: Path) -> list[int]:
    return [pid for e in read_events(out / "events.jsonl") if e["event"] == "start"
            for pid in e["pids"]]


def _kill_and_reap(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _s3_steps(fs, run_dir: str) -> dict[str, int]:
    """checkpoint dir name -> step, of what the bucket holds."""
    steps = {}
    for info in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            with fs.open_input_stream(f"{info.path}/state.json") as f:
                steps[info.base_name] = json.loads(f.read())["step"]
    return steps


def test_driver_killed_then_same_command_resumes_from_s3(tiny_assets, undisturbed, s3_storage,
                                                         tmp_path) -> None:
    """Scenarios 5 and 6 with the checkpoints on S3 (moto's server on 127.0.0.1): the driver
    and its Ray are killed without warning, the newest checkpoint in the bucket is then
    truncated, and the same command resumes from the newest one that verifies, in place."""
    out = tmp_path / "driver"
    overrides = _overrides(tiny_assets, out, storage_path=s3_storage)
    sets = [a for k, v in overrides.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")]
    cmd = [sys.executable, "-m", "elastic_ft.cli", "train", "configs/tiny-lora-cpu.yaml",
           "--no-export", *sets]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    fs, run_dir = run_storage(s3_storage)
    deadline = time.time() + 240
    while (latest := find_latest_valid(run_dir, fs=fs)) is None or latest.state["step"] < 40:
        assert time.time() < deadline and driver.poll() is None, "no checkpoints before kill"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray, no warning
    # The training workers are in Ray's own process groups: they would go on uploading for a
    # moment. The machine is gone: so are they.
    for pid in _worker_pids_of(out):
        _kill_and_reap(pid)
    driver.wait(30)
    trained = (out / "metrics.jsonl").read_text().splitlines()
    assert len(trained) < STEPS  # killed mid-run
    latest = find_latest_valid(run_dir, fs=fs)
    shard = max((i for i in fs.get_file_info(pafs.FileSelector(latest.path, recursive=True)) if i.size),
                key=lambda i: i.size)
    with fs.open_input_stream(shard.path) as f:
        head = f.read(shard.size // 2)
    with fs.open_output_stream(shard.path) as f:  # a truncated upload
        f.write(head)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    events = read_events(out / "events.jsonl")
    # the truncated one is reported and skipped; so is a newer one whose upload the kill cut
    # short (a rank's part without state.json), when the kill came during an upload
    invalid = [e["error"] for e in events
               if e["event"] == "checkpoint_invalid"]
    assert any(latest.path.rsplit("/", 1)[-1] in error for error in invalid), invalid
    resume = [e for e in events if e["event"] == "resume"]
    assert resume and 20 <= resume[-1]["step"] < latest.state["step"]
    losses = losses_by_step(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - undisturbed[s]) for s in undisturbed) <= LOSS_TOLERANCE
    assert_each_sample_once(out)
    # keep=2 in the bucket: the two newest valid ones; the truncated one has aged out
    assert sorted(_s3_steps(fs, run_dir).values()) == [STEPS - 20, STEPS]

