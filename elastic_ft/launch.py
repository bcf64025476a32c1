"""`elastic-ft submit`: run a config on a cluster through the Ray Jobs API."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path

from elastic_ft.events import redact_text

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_job(config: str, address: str, overrides: list[str], wait: bool = True,
               echo: Callable[[str], None] = print, timeout_s: float = 3600.0) -> str:
    """Ship the working dir (config, data, assets) and run `elastic-ft train` there."""
    from ray.job_submission import JobSubmissionClient

    root = Path.cwd()
    client = JobSubmissionClient(address)
    cmd = ["python", "-m", "elastic_ft.cli", "train", config] + [
        arg for o in overrides for arg in ("--set", o)]
    job_id = client.submit_job(
        entrypoint=shlex.join(cmd),
        runtime_env={"working_dir": str(root),
                     "excludes": [".venv", ".git", "runs", "**/__pycache__", "benchmarks/results"]},
    )
    echo(f"job id: {job_id}")
    if not wait:
        return client.get_job_status(job_id).value
    deadline = time.time() + timeout_s
    printed = 0
    while time.time() < deadline:
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            echo(redact_text(logs[printed:]).rstrip())
            printed = len(logs)
        status = client.get_job_status(job_id).value
        if status in TERMINAL:
            echo(f"job {job_id}: {status}")
            return status
        time.sleep(2)
    return client.get_job_status(job_id).value
