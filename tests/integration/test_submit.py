"""`elastic-ft submit` against a real local Ray head (dashboard on 127.0.0.1), end to end.

The storage_path is a separate local directory standing in for the shared store (NFS, s3://,
gs://) every node of a real cluster would write checkpoints to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
def ray_head(tmp_path_factory):
    """A head started by `ray start --head` in a directory of its own: the jobs' working
    dirs are what submit uploads, not this checkout."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--block",
         "--include-dashboard=true"], cwd=tmp_path_factory.mktemp("head"),
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


def _project(tmp_path: Path, tiny_assets: Path) -> Path:
    """A user's project: the demo config with its relative paths, sample data, and the tiny
    model under assets/, which its .gitignore ignores (Ray's upload skips it)."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny-lora-cpu.yaml", project / "configs")
    (project / "data" / "sample").mkdir(parents=True)
    lines = (ROOT / "data" / "sample" / "alpaca.jsonl").read_text().splitlines()[:300]
    (project / "data" / "sample" / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copytree(tiny_assets, project / "assets" / "tiny" / "model")
    (project / ".gitignore").write_text("assets/\nruns/\n")
    return project


def test_submit_ships_gitignored_inputs_streams_logs_and_exports(ray_head, tiny_assets,
                                                                 tmp_path):
    address, env = ray_head
    project, out, shared = _project(tmp_path, tiny_assets), tmp_path / "out", tmp_path / "store"
    cmd = [sys.executable, "-m", "elastic_ft.cli", "submit", "configs/tiny-lora-cpu.yaml",
           "--address", address, "--set", f"output_dir={out}", "--set", f"storage_path={shared}",
           "--set", "train.max_steps=4", "--set", "checkpoint.every_steps=2"]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                          timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"job id: (\S+)", done.stdout).group(1)
    assert "[elastic_ft] step 4/4" in done.stdout  # the job's logs were streamed
    assert done.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert done.stdout.count("[elastic_ft] step 4/4") == 1  # each log line once

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and (out / "merged" / "config.json").exists()
    assert list((shared / "train").glob("checkpoint_00000004_*"))  # checkpoints: shared store
    # the job trained the shipped copy of the gitignored model, not a path of this machine
    assert "elastic_ft_inputs_" in summary["config"]["model"]["name_or_path"]
    assert str(project) not in summary["config"]["model"]["name_or_path"]

    status = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "status", job_id,
                             "--address", address], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.stdout.strip() == "SUCCEEDED"

    # a job that fails on the cluster: the command exits 1 with the job's status
    bad = project / "data" / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "hi"}\n'
                   + "".join(f'{{"instruction": "Count {i}.", "output": {i}}}\n'
                             for i in range(5)))
    failed = subprocess.run(cmd + ["--set", "data.paths=[data/bad.jsonl]"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=420)
    assert failed.returncode == 1
    assert re.search(r"job \S+: FAILED$", failed.stdout.rstrip())


def test_inputs_over_the_upload_limit_are_refused_before_submission(tmp_path, tiny_assets,
                                                                    monkeypatch):
    from elastic_ft import launch
    from elastic_ft.config import ConfigError, load_config

    project = _project(tmp_path, tiny_assets)
    monkeypatch.chdir(project)
    cfg = load_config("configs/tiny-lora-cpu.yaml")
    monkeypatch.setattr(launch, "MAX_UPLOAD_BYTES", 200_000)  # the data fits, the model not
    with pytest.raises(ConfigError, match=r"model.name_or_path assets/tiny/model is .* MiB.*"
                                          r"use a hub name, or put it on storage every node "
                                          r"reads and pass --shared PREFIX"):
        launch.stage_inputs("configs/tiny-lora-cpu.yaml", cfg, [])
    # under a shared prefix the model is not shipped; the data still is
    stage, overrides = launch.stage_inputs("configs/tiny-lora-cpu.yaml", cfg,
                                           [str((project / "assets").resolve())])
    assert not any(o.startswith("model.name_or_path") for o in overrides)
    assert any(o.startswith("data.paths=") and "@inputs/" in o for o in overrides)
    assert (stage / "config.yaml").exists()


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
