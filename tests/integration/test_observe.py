"""What a user watches: `elastic-ft train` in a terminal (a subprocess, as a user runs it)
with eval, samples, TensorBoard and keep-best, against the same run without any of them;
then `elastic-ft generate` on the finished run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from elastic_ft.events import read_events
from tests.conftest import LOSS_TOLERANCE, ROOT, losses_by_step

pytestmark = pytest.mark.ray

STEPS = 8
COMMON = {"train.max_steps": STEPS, "train.global_batch": 4, "train.micro_batch": 1,
          "checkpoint.every_steps": 4, "optim.lr": 0.02}
# what a clean terminal must not show: warnings, tracebacks, Ray's and DeepSpeed's lines
NOISE = re.compile(r"warn|traceback|\(RayTrainWorker|\(raylet|\(pid=|ray\.|deepspeed|"
                   r"INFO|TrainingReport|Setting accelerator|deduplicat", re.IGNORECASE)


def _files(tmp_path: Path) -> tuple[Path, Path]:
    lines = (ROOT / "data" / "sample" / "alpaca.jsonl").read_text().splitlines()
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(lines[:300]) + "\n")
    held.write_text("\n".join(lines[1500:1540]) + "\n")
    return train, held


def test_terminal_trackers_eval_and_generate(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.core.trainer import run_training

    train, held = _files(tmp_path)
    base = {"model.name_or_path": str(tiny_assets), "data.paths": [str(train)], **COMMON}
    plain = tmp_path / "plain"
    run_training(load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        **base, "output_dir": str(plain)}), export=False)
    ray_local.shutdown()  # the command below starts its own Ray, as a user's would

    out = tmp_path / "watched"
    sets = {**base, "output_dir": str(out), "eval.paths": [str(held)], "eval.every_steps": 2,
            "eval.max_new_tokens": 4, "logging.trackers": ["tensorboard"],
            "checkpoint.keep_best": True, "checkpoint.keep": 1}
    cmd = [sys.executable, "-m", "elastic_ft.cli", "train", "configs/tiny-lora-cpu.yaml"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    terminal = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert not [x for x in terminal if NOISE.search(x)], terminal
    assert len(terminal) == len(set(terminal)), terminal  # no line printed twice
    assert any(x.startswith(f"[elastic_ft] step {STEPS}/{STEPS} loss") for x in terminal)
    assert sum("[elastic_ft] eval at step" in x for x in terminal) == 4
    assert terminal[-1] == f"summary: {out / 'summary.json'}"
    assert (out / "logs" / "run.log").stat().st_size > 0  # the noise went here instead

    # eval and the trackers do not move training: the same losses as the plain run
    reference, watched = losses_by_step(plain), losses_by_step(out)
    assert sorted(watched) == list(range(1, STEPS + 1))
    assert max(abs(watched[s] - reference[s]) for s in reference) <= LOSS_TOLERANCE

    evals = [e for e in read_events(out / "events.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    eval_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in x]
    assert [(r["step"], r["eval_loss"]) for r in eval_rows] == [
        (e["step"], e["eval_loss"]) for e in evals]
    report = json.loads((out / "data_report.json").read_text())
    assert all(e["eval_tokens"] == report["eval"]["trainable_tokens"] for e in evals)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert samples[0]["prompt"].rstrip().endswith("### Assistant:")
    summary = json.loads((out / "summary.json").read_text())
    best = min(evals, key=lambda e: e["eval_loss"])
    assert summary["eval"]["best_step"] == best["step"]
    assert summary["eval"]["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["config"]["model"]["tokenizer"] is None  # not "<redacted>"
    # keep 1 plus the best: the newest, and whichever of the checkpoints (4, 8) evaluated best
    kept = sorted(int(p.name.split("_")[1]) for p in (out / "ray_storage" / "train").glob(
        "checkpoint_0*"))
    loss_at = {e["step"]: e["eval_loss"] for e in evals}
    assert kept == sorted({STEPS, min((4, 8), key=loss_at.__getitem__)})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [s.step for s in board.Scalars("eval/loss")] == [2, 4, 6, 8]
    assert [s.step for s in board.Scalars("train/loss")] == list(range(1, STEPS + 1))

    # `generate` on the run renders the prompt as training did and continues greedily
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "Reverse the word.\ncat"
    shown = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "generate", str(out),
                            "--prompt", prompt, "--max-new-tokens", "5"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    # the tiny tokenizer has a chat template: training rendered with it (data.template auto)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert shown.stdout.rstrip("\n") == (
        text if text.strip() else "(no text: the model ended its answer at once)")
    # without merged/: the base model named in the run's config plus adapter/, same answer
    (out / "merged").rename(out / "merged.moved")
    again = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "generate", str(out),
                            "--prompt", prompt, "--max-new-tokens", "5"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == shown.stdout, again.stderr[-2000:]


def test_an_error_reaches_the_terminal_with_where_the_full_log_is(tmp_path, tiny_assets) -> None:
    bad = tmp_path / "bad.jsonl"  # alpaca, but 5 of its 6 rows have a number as the output
    bad.write_text('{"instruction": "Say hi.", "output": "hi"}\n'
                   + "".join(f'{{"instruction": "Count {i}.", "output": {i}}}\n'
                             for i in range(5)))
    out = tmp_path / "failed"
    done = subprocess.run(
        [sys.executable, "-m", "elastic_ft.cli", "train", "configs/tiny-lora-cpu.yaml",
         "--set", f"model.name_or_path={tiny_assets}", "--set", f"data.paths=[{bad}]",
         "--set", f"output_dir={out}"], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    shown = done.stdout + done.stderr
    assert done.returncode == 1, shown
    terminal = shown.strip().splitlines()
    assert terminal[0].startswith("error: reject rate 83.3% exceeds data.max_reject_rate"), shown
    assert terminal[-1] == f"full log: {out / 'logs' / 'run.log'}", shown
    assert "Traceback" not in done.stdout + done.stderr  # the trace is in the log, in full
    assert "DataQualityError" in (out / "logs" / "run.log").read_text()
