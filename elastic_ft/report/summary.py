"""`summary.json`: what a finished run did, from its metrics and events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.events import read_events, read_steps, redact


def eval_scores(events: list[dict[str, Any]]) -> dict[int, float]:
    """Eval loss by step (the newest eval of a step redone after a restart)."""
    return {int(e["step"]): float(e["eval_loss"]) for e in events if e["event"] == "eval"}


def eval_summary(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    evals = [e for e in events if e["event"] == "eval"]
    if not evals:
        return None
    last = max(evals, key=lambda e: (e["step"], e["t"]))
    best = min(evals, key=lambda e: e["eval_loss"])
    return {"final_eval_loss": last["eval_loss"], "final_perplexity": last["perplexity"],
            "final_step": last["step"], "best_eval_loss": best["eval_loss"],
            "best_step": best["step"], "evals": len(evals)}


def write_summary(cfg: RunConfig, out: Path, report: Any, wall_s: float) -> dict[str, Any]:
    metrics = read_steps(out / "metrics.jsonl")
    events = read_events(out / "events.jsonl")
    ends = [e for e in events if e["event"] == "end"]
    plans = [e for e in events if e["event"] == "plan"]
    end = ends[-1] if ends else {}
    by_step = {m["step"]: m for m in metrics}  # a step redone after a restart replaces the lost one
    steps = sorted(by_step)
    tokens = sum(by_step[s]["trained_real_tokens"] for s in steps)
    step_s = sorted(by_step[s]["step_s"] for s in steps)
    summary = {
        "initial_loss": by_step[steps[0]]["loss"],
        "final_loss": by_step[steps[-1]]["loss"],
        "steps": steps[-1],
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "world_size": end.get("world_size"),
        "peak_mem_bytes": end.get("peak_mem_bytes"),
        "median_step_s": step_s[len(step_s) // 2],
        "tokens_per_s": tokens / max(1e-9, sum(step_s)),
        # wall clock over the trained span: includes checkpoints, restarts and reports
        "wall_tokens_per_s": _wall_tokens_per_s(metrics),
        "padding_ratio": report.padding_tokens / max(1, report.blocks * cfg.data.seq_len),
        "data_wait_share": sum(m["data_wait_s"] for m in metrics) / max(
            1e-9, sum(m["step_s"] for m in metrics)),
        "restarts": len([e for e in events if e["event"] == "resume"]),
        "eval": eval_summary(events),
        "plan": plans[-1] if plans else None,
        "data": {"rows": report.rows, "kept": report.kept, "rejected": report.rejected,
                 "packing_efficiency": report.packing_efficiency},
        "config": redact(cfg.to_dict()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _wall_tokens_per_s(metrics: list[dict[str, Any]]) -> float:
    if len(metrics) < 2:
        return 0.0
    span_s = metrics[-1]["t"] - metrics[0]["t"]
    return sum(m["trained_real_tokens"] for m in metrics[1:]) / max(1e-9, span_s)
