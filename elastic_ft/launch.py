"""`elastic-ft submit`: run a config on a cluster through the Ray Jobs API.

The job runs `elastic-ft train` in a copy of the working dir, which Ray uploads honouring
`.gitignore`: `assets/` and other ignored inputs would never reach the cluster. So every local
path the run reads (the config itself, model, tokenizer, data, eval data and prompts) is
copied into an inputs package shipped beside it (`py_modules`, no ignore rules), and the job's
config is pointed at those copies (`@inputs/...`, resolved on the cluster by `train --inputs`).
Paths under a `--shared` prefix are on storage every node reads and stay as they are; an input
over the upload limit is refused before submission, with what to do instead.

The follow-up streams the job's log with Ray's `tail_job_logs`, has no time limit of its own,
and returns the job's final status (the command exits 0 only for SUCCEEDED).
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elastic_ft.config import ConfigError, RunConfig
from elastic_ft.events import redact_text

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Ray caps an uploaded package at 500 MiB (and keeps it in the head's object store)
MAX_UPLOAD_BYTES = 400 * 2**20
INPUTS = "@inputs/"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())


def local_inputs(cfg: RunConfig) -> dict[str, Path]:
    """Config field -> the local file or folder it names (what exists on this machine)."""
    found: dict[str, Path] = {}

    def add(key: str, value: Any) -> None:
        path = Path(str(value)) if value is not None else None
        if path is not None and path.exists():
            found[key] = path

    add("model.name_or_path", cfg.model.name_or_path)
    add("model.tokenizer", cfg.model.tokenizer)
    for section, paths in (("data.paths", cfg.data.paths), ("eval.paths", cfg.eval.paths)):
        for i, entry in enumerate(paths):
            add(f"{section}.{i}", entry if isinstance(entry, str) else entry.path)
    if isinstance(cfg.eval.prompts, str):
        add("eval.prompts", cfg.eval.prompts)
    return found


def stage_inputs(config: str, cfg: RunConfig, shared: list[str]) -> tuple[Path, list[str]]:
    """A folder holding the config and every local input not under a shared prefix, and the
    `--set` overrides that point the job's config at them."""
    stage = Path(tempfile.mkdtemp(prefix="elastic_ft_submit_")) / (
        f"elastic_ft_inputs_{uuid.uuid4().hex[:10]}")
    stage.mkdir()
    (stage / "__init__.py").write_text("")  # a py_modules package: found by import
    shutil.copy2(config, stage / "config.yaml")
    inputs = {k: p for k, p in local_inputs(cfg).items()
              if not any(str(p.resolve()).startswith(s) for s in shared)}
    total = sum(_size(p) for p in set(inputs.values()))
    if total > MAX_UPLOAD_BYTES:
        biggest = max(inputs.items(), key=lambda kv: _size(kv[1]))
        raise ConfigError(
            f"{biggest[0]} {biggest[1]} is {_size(biggest[1]) / 2**20:.0f} MiB, and the job's "
            f"inputs {total / 2**20:.0f} MiB, over the {MAX_UPLOAD_BYTES // 2**20} MiB a job "
            "can upload: use a hub name, or put it on storage every node reads and pass "
            "--shared PREFIX")
    overrides, data_paths = [], {"data.paths": list(cfg.data.paths),
                                 "eval.paths": list(cfg.eval.paths)}
    for n, (key, path) in enumerate(sorted(inputs.items())):
        name = f"{n}_{path.name}"
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, stage / name)
        section, _, index = key.rpartition(".")
        if section in data_paths:
            entry = data_paths[section][int(index)]
            data_paths[section][int(index)] = (INPUTS + name if isinstance(entry, str) else
                                               entry.model_copy(update={"path": INPUTS + name}))
        else:
            overrides.append(f"{key}={INPUTS}{name}")
    for section, entries in data_paths.items():
        if entries:
            import json

            overrides.append(f"{section}=" + json.dumps(
                [e if isinstance(e, str) else e.model_dump(exclude_none=True) for e in entries]))
    return stage, overrides


def resolve_inputs(package: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """On the cluster: where the inputs package landed, and the overrides made absolute."""
    import importlib

    folder = Path(importlib.import_module(package).__file__).parent
    return folder, [o.replace(INPUTS, f"{folder}/") for o in overrides]


def submit_job(config: str, cfg: RunConfig, address: str, overrides: list[str],
               wait: bool = True, echo: Callable[[str], None] = print,
               shared: list[str] | None = None) -> str:
    """Ship the working dir and the run's inputs, run `elastic-ft train` there."""
    from ray.job_submission import JobSubmissionClient

    stage, staged = stage_inputs(config, cfg, [str(Path(s).resolve()) for s in shared or []])
    client = JobSubmissionClient(address)
    cmd = ["python", "-m", "elastic_ft.cli", "train", f"{INPUTS}config.yaml",
           "--inputs", stage.name] + [arg for o in list(overrides) + staged
                                      for arg in ("--set", o)]
    try:
        job_id = client.submit_job(
            entrypoint=shlex.join(cmd),
            runtime_env={"working_dir": str(Path.cwd()), "py_modules": [str(stage)],
                         "excludes": [".venv", ".git", "runs", "**/__pycache__",
                                      "benchmarks/results"]})
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)
    echo(f"job id: {job_id}")
    if not wait:
        return client.get_job_status(job_id).value
    return follow_job(client, job_id, echo)


def follow_job(client: Any, job_id: str, echo: Callable[[str], None]) -> str:
    """Stream the job's log as Ray writes it, until the job ends; its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            text = redact_text(chunk).rstrip("\n")
            if text:
                echo(text)

    asyncio.run(stream())
    status = client.get_job_status(job_id).value
    echo(f"job {job_id}: {status}")
    return status
