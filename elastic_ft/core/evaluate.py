"""Evaluation inside the worker group: held-out loss over every eval token, and samples.

All ranks evaluate together: block i of the eval set goes to rank i mod W, each rank sums
its blocks' token losses and counts their tokens, and one all-reduce gives the mean over all
eval tokens, the same figure at any world size. Every rank runs the same number of forward
passes (an empty share is a fully masked block): ZeRO-3 gathers parameters collectively.

Eval never touches the training data stream, the RNG or the optimizer, so a run with eval
trains exactly as one without. It runs after a step's checkpoint; when a restart follows
that checkpoint (a just-in-time one) the eval is left to the new group, which runs any eval
due at the step it resumes from that has not been recorded yet: an eval cut by a restart is
redone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from elastic_ft.config import RunConfig
from elastic_ft.data.prepared import PAD_SLOT, take_blocks


def eval_due(step: int, every_steps: int | None, total_steps: int) -> bool:
    """At the configured interval and at the end."""
    return step > 0 and (step == total_steps or bool(every_steps) and step % every_steps == 0)


def eval_block_count(n_blocks: int, batch_size: int, max_batches: int | None) -> int:
    """The first max_batches x batch_size blocks (all when uncapped): the same set at every
    world size."""
    return n_blocks if max_batches is None else min(n_blocks, batch_size * max_batches)


def eval_slots(n_blocks: int, world: int, rank: int, micro_batch: int) -> list[list[int]]:
    """This rank's eval micro-batches: blocks rank, rank + W, ...; as many rounds on every
    rank (padded with PAD_SLOT), so collective forwards stay in step."""
    mine = list(range(rank, n_blocks, world))
    per_rank = -(-n_blocks // world)
    rounds = max(1, -(-per_rank // micro_batch))
    mine += [PAD_SLOT] * (rounds * micro_batch - len(mine))
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(rounds)]


@dataclass(frozen=True)
class EvalResult:
    step: int
    eval_loss: float
    perplexity: float
    eval_tokens: int
    eval_blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_loss(engine: Any, table: Any, n_blocks: int, micro_batch: int, rank: int,
              world: int) -> tuple[float, int]:
    """(mean token loss over the first n_blocks eval blocks, their trainable tokens)."""
    import torch
    import torch.distributed as dist

    device = engine.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    one = torch.tensor(1.0, device=device)  # HF divides the summed loss by this: a sum
    was_training = engine.module.training
    engine.eval()
    try:
        with torch.no_grad():
            for slots in eval_slots(n_blocks, world, rank, micro_batch):
                arrays = take_blocks(table, np.asarray(slots, dtype=np.int64))
                batch = {k: torch.tensor(v, device=device) for k, v in arrays.items()}
                out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             labels=batch["labels"], use_cache=False, num_items_in_batch=one)
                # HF shifts labels by one: the first token of a block is never a target
                tokens = int((arrays["labels"][:, 1:] != -100).sum())
                totals[0] += out.loss.detach().double() if tokens else 0.0
                totals[1] += tokens
    finally:
        engine.train(was_training)
    dist.all_reduce(totals)
    loss_sum, tokens = float(totals[0]), int(totals[1])
    return loss_sum / max(1, tokens), tokens


def generate(engine: Any, prompt_ids: list[list[int]], max_new_tokens: int, synced: bool,
             pad_id: int) -> list[list[int]]:
    """Greedy completions (new tokens only). `synced`: every rank calls this with the same
    prompts (ZeRO-3, whose forward gathers parameters across ranks)."""
    import torch

    was_training = engine.module.training
    engine.eval()
    completions = []
    try:
        with torch.no_grad():
            for ids in prompt_ids:
                inputs = torch.tensor([ids], device=engine.device)
                out = engine.module.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs),
                    max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                    pad_token_id=pad_id, use_cache=True)
                completions.append(out[0, len(ids):].tolist())
    finally:
        engine.train(was_training)
    return completions


class Evaluator:
    """The eval set, the prompts and the schedule of one worker; `run` is collective."""

    def __init__(self, cfg: RunConfig, table: Any, prompts: list[dict[str, Any]],
                 total_steps: int) -> None:
        from elastic_ft.core.model import tokenizer_path
        from elastic_ft.data.tokenize import load_tokenizer

        self.cfg, self.table, self.total_steps = cfg, table, total_steps
        self.tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
        self.n_blocks = eval_block_count(len(table), cfg.eval.batch_size, cfg.eval.max_batches)
        self.prompts = prompts[:cfg.eval.num_samples] if cfg.eval.num_samples else []

    def due(self, step: int) -> bool:
        return eval_due(step, self.cfg.eval.every_steps, self.total_steps)

    def run(self, engine: Any, step: int, micro_batch: int, rank: int, world: int,
            controller: Any) -> EvalResult:
        t0 = time.time()
        loss, tokens = eval_loss(engine, self.table, self.n_blocks, micro_batch, rank, world)
        samples: list[dict[str, Any]] = []
        zero3 = self.cfg.deepspeed.zero_stage == 3
        if self.prompts and (rank == 0 or zero3):
            completions = generate(engine, [p["prompt_ids"] for p in self.prompts],
                                   self.cfg.eval.max_new_tokens, zero3,
                                   self.tokenizer.pad_token_id)
            decode = self.tokenizer.decode
            samples = [{"step": step, "prompt": decode(p["prompt_ids"]),
                        "completion": decode(c, skip_special_tokens=True),
                        "reference": decode(p["reference_ids"], skip_special_tokens=True)
                        if p.get("reference_ids") else None}
                       for p, c in zip(self.prompts, completions, strict=True)]
        result = EvalResult(step, loss, math.exp(min(loss, 50.0)), tokens, self.n_blocks,
                            round(time.time() - t0, 3))
        if rank == 0:
            controller.evaluated.remote(result.to_dict(), samples)
        return result


def prompt_records(cfg: RunConfig, held_out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What to generate from: `eval.prompts` rendered as training renders a user turn, or
    the held-out samples' own prompts (already rendered and tokenised by the pipeline)."""
    from pathlib import Path

    from elastic_ft.core.model import tokenizer_path
    from elastic_ft.data.tokenize import load_tokenizer, render_prompt

    prompts = cfg.eval.prompts
    if prompts is None:
        return held_out
    if isinstance(prompts, str):
        import json

        lines = [x for x in Path(prompts).read_text().splitlines() if x.strip()]
        prompts = [json.loads(x)["prompt"] if x.lstrip().startswith("{") else x for x in lines]
    tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    return [{"sample_id": f"prompt:{i}", "prompt_ids": render_prompt(text, tokenizer,
                                                                     cfg.data.template),
             "reference_ids": []} for i, text in enumerate(prompts)]
