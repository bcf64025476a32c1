"""Seconds spent verifying checkpoints, before and after the run-wide record of hashed ones
(issue 21: "a 1 GB checkpoint: seconds spent verifying at group start, before and after").

The checkpoint is a real one of the 268M-parameter local model, full fine-tuning with LOMO in
fp32 (its weights: 1.07 GB), written by the workers' own save path (`save_rank_checkpoint`:
safetensors, state.json, manifest with sha256). A run's life is replayed on local disk:
`--checkpoints` checkpoints arrive one after another, each followed by the controller's prune
(keep `--keep`), then a group start picks the newest. "before": every prune and the group
start hash what they check (the code before this change); "after": one record of hashed
checkpoints shared by the prunes and the group start, as the controller and rank 0 share it.
The files are in the page cache, so this measures hashing, not the disk or the network.

    python benchmarks/checkpoint_verify.py [--model assets/medium/model --repeats 3]
Writes benchmarks/results/<hardware>/checkpoint_verify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(model_dir: Path, ckpt: Path) -> int:
    """One LOMO checkpoint of the model, by the workers' save path; returns its bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from elastic_ft.core.checkpoint import save_rank_checkpoint
    from elastic_ft.core.lomo import build_lomo_engine

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, _ = build_lomo_engine(model, 1e-5, lambda s: 1.0, 1.0, 0.0, "fp32")
    save_rank_checkpoint(engine, ckpt, 0, {"step": 10, "world_size": 1, "zero_stage": 0,
                                           "method": "full", "optim": "lomo"})
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


def replay(template: Path, run_dir: Path, checkpoints: int, keep: int, shared: bool
           ) -> dict[str, float]:
    """Checkpoints arrive, each pruned after; then a group start. Seconds of each part."""
    from elastic_ft.core.checkpoint import checkpoint_dir_name, find_latest_valid, prune_checkpoints

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    hashed: dict[str, str] | None = {} if shared else None
    prune_s = 0.0
    for i in range(checkpoints):
        step = 10 * (i + 1)
        ckpt = run_dir / checkpoint_dir_name(step, 1000 + step)
        shutil.copytree(template, ckpt)
        t0 = time.perf_counter()
        prune_checkpoints(run_dir, keep, hashed=hashed)
        prune_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = find_latest_valid(run_dir, hashed=hashed)
    start_s = time.perf_counter() - t0
    assert chosen is not None and chosen.path.endswith(ckpt.name)
    return {"prune_s_total": prune_s, "group_start_verify_s": start_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "assets" / "medium" / "model"))
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from elastic_ft.bench.hardware import hardware_record, hardware_tag

    work = Path(tempfile.mkdtemp(prefix="eft_verify_"))
    try:
        template = work / "template"
        size = write_checkpoint(Path(args.model), template)
        trials: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine state
            for mode in ("before", "after"):
                trials[mode].append(replay(template, work / "run", args.checkpoints,
                                           args.keep, shared=mode == "after"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {mode: {k: round(statistics.median(t[k] for t in runs), 3) for k in runs[0]}
               for mode, runs in trials.items()}
    hardware = hardware_record()
    result = {"benchmark": "checkpoint_verify", "hardware": hardware,
              "checkpoint_bytes": size, "model": args.model, "checkpoints": args.checkpoints,
              "keep": args.keep, "repeats": args.repeats, "median": medians, "trials": trials}
    out = ROOT / "benchmarks" / "results" / hardware_tag(hardware) / "checkpoint_verify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"checkpoint_bytes": size, "median": medians}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
