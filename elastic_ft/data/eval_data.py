"""Eval data: samples held out of the training set, or separate eval paths, packed into blocks.

The held-out split is by sample content (the row's content hash), before packing: the same
rows are held out whatever the order of the sources, the world size or a re-run, and no
sample is in both sets. Quarantined and duplicate rows never reach either set.

`OUTPUT/prepared_eval/` holds the blocks (the same layout as `prepared/`) and `samples.json`:
the first few eval samples split at their first trained token into a prompt and a reference,
the prompts the workers generate from when `eval.prompts` is not set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from elastic_ft.data.pack import Samples, pack_samples
from elastic_ft.data.prepared import BLOCKS_FILE, write_blocks
from elastic_ft.data.tokenize import IGNORE_INDEX

EVAL_DIR = "prepared_eval"
SAMPLES_FILE = "samples.json"
MAX_SAMPLE_PROMPTS = 16


def is_held_out(content_hash: str, fraction: float) -> bool:
    """A deterministic `fraction` of samples, chosen by their content hash (hex sha1)."""
    return fraction > 0 and int(content_hash[:8], 16) < fraction * 0x1_0000_0000


def prompt_and_reference(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The tokens before the first trained one (rendered as in training), and the trained
    tokens after them. With `train_on: all` every token is trained: the first half prompts."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first = trained[0] if trained else len(ids)
    if first <= 1:  # the first token is always masked: all of the rest is trained
        first = max(1, len(ids) // 2)
    return ids[:first], [x for x in labels[first:] if x != IGNORE_INDEX]


def write_eval(samples: Samples, out_dir: Path, seq_len: int, pad_id: int,
               packing: bool) -> dict[str, Any]:
    """Pack and write the eval set; returns its counts for data_report.json."""
    blocks = pack_samples(samples, seq_len, pad_id, packing)
    write_blocks(blocks, out_dir)
    prompts = []
    first = samples.take(0, min(MAX_SAMPLE_PROMPTS, len(samples)))
    for k, sample_id in enumerate(first.sample_ids):
        lo, hi = int(first.offsets[k]), int(first.offsets[k + 1])
        prompt, reference = prompt_and_reference(first.ids[lo:hi].tolist(),
                                                 first.labels[lo:hi].tolist())
        prompts.append({"sample_id": sample_id, "prompt_ids": prompt,
                        "reference_ids": reference})
    (out_dir / SAMPLES_FILE).write_text(json.dumps(prompts))
    return {"samples": len(samples), "blocks": len(blocks),
            "trainable_tokens": int(blocks.trainable_tokens.sum())}


@dataclass
class EvalSet:
    """What the workers evaluate on: the blocks and the prompts of the first samples."""

    table: pa.Table
    prompts: list[dict[str, Any]]

    @classmethod
    def open(cls, out_dir: str | Path) -> EvalSet | None:
        folder = Path(out_dir) / EVAL_DIR
        if not (folder / BLOCKS_FILE).exists():
            return None
        table = pa.ipc.open_file(pa.memory_map(str(folder / BLOCKS_FILE))).read_all()
        return cls(table, json.loads((folder / SAMPLES_FILE).read_text()))


def clear_eval(out_dir: Path) -> None:
    """A run without eval (or whose eval source changed) must not read an old eval set."""
    folder = out_dir / EVAL_DIR
    for name in (BLOCKS_FILE, SAMPLES_FILE):
        (folder / name).unlink(missing_ok=True)
