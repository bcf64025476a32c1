"""`elastic-ft bench overhead`: elastic_ft against a plain loop and against Ray Train + HF Trainer.

Same model, data, global batch, world size and steps, measured in one run:
  - `elastic_ft`: the real recipe (controller, metrics, checkpoints at the end);
  - `plain_deepspeed`: a hand-written loop over the same DeepSpeed engine and the same packed
    blocks, launched by the same TorchTrainer, with nothing else: the floor;
  - `hf_trainer`: what a user would pick instead: TorchTrainer running `transformers.Trainer`
    on the same samples unpacked and padded per batch (no packing).
Throughput counts trainable (loss-bearing) tokens per wall second after `warmup_steps`, so
packing's gain over padding shows up as tokens/s rather than as samples/s.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig


def _throughput(path: Path, warmup_steps: int) -> dict[str, float]:
    """Trainable tokens/s after `warmup_steps`, two ways: over the whole timed span (what a
    user waits), and the median of the steps' own rates, which a stall of the shared machine
    during one step moves no more than any other step."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    timed = [r for r in rows if r["step"] > warmup_steps]
    first = rows[warmup_steps - 1] if warmup_steps else timed[0]
    steps = timed if warmup_steps else timed[1:]  # each step's time runs from the one before
    step_s = [r["t"] - p["t"] for p, r in zip([first, *steps[:-1]], steps, strict=True)]
    step_rates = [r["trainable_tokens"] / s for r, s in zip(steps, step_s, strict=True) if s > 0]
    return {"span": sum(r["trainable_tokens"] for r in steps) / (steps[-1]["t"] - first["t"]),
            "median_step": statistics.median(step_rates), "step_s": statistics.median(step_s)}


def plain_deepspeed_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch

    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.model import load_model
    from elastic_ft.data.prepared import DataPosition, PreparedData, rank_slots
    from elastic_ft.resources.planning import plan_batches

    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    data = PreparedData(ray.get(config["blocks_ref"]))
    g, steps = cfg.train.global_batch, config["steps"]
    plan = plan_batches(g, world, int(cfg.train.micro_batch))
    engine, _ = build_engine(cfg, load_model(cfg), plan, steps, False, rank)
    position = DataPosition()
    for step in range(1, steps + 1):
        indices, position = data.global_batch(position, g, cfg.train.seed, cfg.data.shuffle)
        n = max(1, data.trainable_tokens(indices))
        for slot in rank_slots(indices, plan.micro_batches, rank, plan.grad_accum):
            batch = {k: v.to(engine.device) for k, v in data.batch(slot).items()}
            out = engine(**batch, use_cache=False, num_items_in_batch=torch.tensor(
                n / (world * plan.grad_accum)))
            engine.backward(out.loss)
            engine.step()
        if rank == 0:
            with open(config["metrics"], "a") as f:
                f.write(json.dumps({"step": step, "t": time.time(), "trainable_tokens": n}) + "\n")


def unpack_samples(table: Any) -> list[dict[str, list[int]]]:
    """The packed blocks back into samples: a sample starts where position ids restart."""
    samples = []
    for ids, labels, pos in zip(table.column("input_ids").to_pylist(),
                                table.column("labels").to_pylist(),
                                table.column("position_ids").to_pylist(), strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            if any(label != -100 for label in labels[a:b]):
                samples.append({"input_ids": ids[a:b], "labels": labels[a:b]})
    return samples


def hf_trainer_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    from datasets import Dataset
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from elastic_ft.core.model import load_model, tokenizer_path
    from elastic_ft.resources.planning import plan_batches

    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    samples = unpack_samples(ray.get(config["blocks_ref"]))
    tokens_per_sample = sum(sum(x != -100 for x in s["labels"]) for s in samples) / len(samples)
    plan = plan_batches(cfg.train.global_batch, world, int(cfg.train.micro_batch))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics_path, global_samples = config["metrics"], cfg.train.global_batch

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "t": time.time(),
                                        "trainable_tokens": tokens_per_sample * global_samples})
                            + "\n")

    args = TrainingArguments(
        output_dir=config["out_dir"], per_device_train_batch_size=plan.micro_batch(rank),
        gradient_accumulation_steps=plan.grad_accum, max_steps=config["steps"],
        learning_rate=cfg.optim.lr, lr_scheduler_type="cosine", logging_steps=10**6,
        save_strategy="no", report_to=[], use_cpu=not config["use_gpu"],
        bf16=cfg.train.precision == "bf16", dataloader_num_workers=0, seed=cfg.train.seed)
    trainer = Trainer(model=load_model(cfg), args=args, train_dataset=Dataset.from_list(samples),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                      callbacks=[StepTimes()])
    prepare_trainer(trainer).train()


def run_overhead(cfg: RunConfig, out_dir: Path, steps: int = 30, warmup_steps: int = 5,
                 repeats: int = 1) -> dict[str, Any]:
    """tokens/s of the three loops, `repeats` rounds interleaved (the order rotates each round,
    so drift on a shared machine hits every loop alike). Ratios are elastic_ft over each loop,
    per round, then the median of rounds; the headline uses the steps' median rates."""
    import ray

    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.core.model import tokenizer_path
    from elastic_ft.core.trainer import ensure_ray, resolve_use_gpu
    from elastic_ft.data.pipeline import prepare_data

    cfg = cfg.with_absolute_paths()
    if cfg.train.micro_batch == "auto":
        raise ValueError("bench overhead needs a fixed train.micro_batch (the same on all sides)")
    out_dir = out_dir.resolve()
    started = ensure_ray()
    try:
        world = cfg.workers.max
        use_gpu = resolve_use_gpu(cfg)
        prepared, _ = prepare_data(cfg.data, tokenizer_path(cfg), out_dir / "data")
        blocks_ref = ray.put(prepared.table)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(repeats):
            order = LOOPS[r % 3:] + LOOPS[:r % 3]
            round_dir = out_dir / f"round{r}"
            # a round measures fresh runs: elastic_ft would otherwise resume a previous round
            shutil.rmtree(round_dir, ignore_errors=True)
            rounds.append({name: _one_loop(name, cfg, round_dir, blocks_ref, world, use_gpu,
                                           steps, warmup_steps) for name in order})
        hardware = hardware_record()
    finally:
        if started:
            ray.shutdown()
    return {"benchmark": "overhead", "hardware": hardware, "world_size": world, "steps": steps,
            "warmup_steps": warmup_steps, "global_batch": cfg.train.global_batch,
            "repeats": repeats, "rounds": rounds, **summarise_rounds(rounds)}


LOOPS = ["elastic_ft", "plain_deepspeed", "hf_trainer"]


def summarise_rounds(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians over rounds of each loop's rates and of elastic_ft's per-round ratios."""
    out: dict[str, Any] = {"tokens_per_s": {}, "ratios": {}, "step_s": {
        name: statistics.median(r[name]["step_s"] for r in rounds) for name in LOOPS}}
    for way in ("median_step", "span"):
        out["tokens_per_s"][way] = {
            name: statistics.median(r[name][way] for r in rounds) for name in LOOPS}
        out["ratios"][way] = {name: statistics.median(
            r["elastic_ft"][way] / r[name][way] for r in rounds) for name in LOOPS[1:]}
    per_round = [r["elastic_ft"]["median_step"] / r["plain_deepspeed"]["median_step"]
                 for r in rounds]
    out["elastic_ft_vs_plain"] = out["ratios"]["median_step"]["plain_deepspeed"]
    out["elastic_ft_vs_plain_range"] = [min(per_round), max(per_round)]
    # elastic_ft and the plain loop train the same batches: the difference of their median
    # step times is elastic_ft's own cost per step, whatever the model's step costs
    out["extra_s_per_step"] = statistics.median(
        r["elastic_ft"]["step_s"] - r["plain_deepspeed"]["step_s"] for r in rounds)
    out["elastic_ft_vs_hf_trainer"] = out["ratios"]["median_step"]["hf_trainer"]
    return out


def _one_loop(name: str, cfg: RunConfig, out_dir: Path, blocks_ref: Any, world: int,
              use_gpu: bool, steps: int, warmup_steps: int) -> dict[str, float]:
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from elastic_ft.core.trainer import run_training

    metrics = out_dir / f"{name}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.unlink(missing_ok=True)
    if name == "elastic_ft":
        ours = cfg.model_copy(update={
            "output_dir": str(out_dir / "elastic_ft"), "storage_path": None,
            "train": cfg.train.model_copy(update={"max_steps": steps}),
            "workers": cfg.workers.model_copy(update={"min": world, "max": world}),
            "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": steps})})
        run_training(ours, export=False)
        rows = [json.loads(x) for x in (out_dir / "elastic_ft" / "metrics.jsonl").read_text()
                .splitlines()]
        metrics.write_text("".join(json.dumps(
            {"step": r["step"], "t": r["t"], "trainable_tokens": r["trained_real_tokens"]}) + "\n"
            for r in rows))
        return _throughput(metrics, warmup_steps)
    loop = plain_deepspeed_loop if name == "plain_deepspeed" else hf_trainer_loop
    TorchTrainer(loop, train_loop_config={
        "run": cfg.to_dict(), "blocks_ref": blocks_ref, "steps": steps,
        "metrics": str(metrics), "out_dir": str(out_dir / name), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu),
        run_config=RayRunConfig(name=name, storage_path=str(out_dir / "ray"))).fit()
    return _throughput(metrics, warmup_steps)
