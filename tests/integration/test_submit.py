"""`elastic-ft submit` against a real local Ray head (dashboard on 127.0.0.1), end to end.

The storage_path is a separate local directory standing in for the shared store (NFS, s3://,
gs://) every node of a real cluster would write checkpoints to.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elastic_ft.core.ports import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head():
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--block",
         "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("local Ray head did not come up") from None
            time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(60)


def test_submit_tiny_config_succeeds_and_writes_summary(ray_head, tiny_assets, tmp_path):
    address, env = ray_head
    out, shared = tmp_path / "out", tmp_path / "shared-store"
    cmd = [sys.executable, "-m", "elastic_ft.cli", "submit", "configs/tiny-lora-cpu.yaml",
           "--address", address,
           "--set", f"model.name_or_path={tiny_assets}", "--set", f"output_dir={out}",
           "--set", f"storage_path={shared}", "--set", "train.max_steps=4",
           "--set", "checkpoint.every_steps=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"job id: (\S+)", done.stdout).group(1)
    assert "[elastic_ft] step 4/4" in done.stdout  # the job's logs were streamed
    assert done.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and (out / "merged" / "config.json").exists()
    assert list((shared / "train").glob("checkpoint_00000004_*"))  # checkpoints: shared store

    status = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "status", job_id,
                             "--address", address], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.stdout.strip() == "SUCCEEDED"


def test_submit_no_wait_then_stop(ray_head, tiny_assets, tmp_path):
    address, env = ray_head
    cli = [sys.executable, "-m", "elastic_ft.cli"]
    done = subprocess.run(cli + [
        "submit", "configs/tiny-lora-cpu.yaml", "--address", address, "--no-wait",
        "--set", f"model.name_or_path={tiny_assets}", "--set", f"output_dir={tmp_path / 'o'}",
        "--set", "train.max_steps=100000"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"job id: (\S+)", done.stdout).group(1)
    stopped = subprocess.run(cli + ["stop", job_id, "--address", address], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert stopped.stdout.strip() == "stopped"
    deadline = time.time() + 60
    status = ""
    while time.time() < deadline and status != "STOPPED":
        status = subprocess.run(cli + ["status", job_id, "--address", address], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60).stdout.strip()
        time.sleep(1)
    assert status == "STOPPED"
