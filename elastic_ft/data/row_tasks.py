"""What a data task does with its rows: read, normalise, validate, tokenise, into Arrow.

One read task (`readers.read_tasks`) reads its rows and processes them in the same
process, so the parsed records never cross a process; the result is Arrow tables of
`ROW_SCHEMA`, a batch of rows each, whose reason column is empty for a kept row. The same
tables come from Ray Data tasks (`process_ray`, in source order) and from this process
(`process_local`).
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from functools import cache
from typing import Any

import pyarrow as pa

from elastic_ft.config import DataConfig
from elastic_ft.data.formats import apply_columns, normalise
from elastic_ft.data.readers import read_chunk
from elastic_ft.data.tokenize import count_trainable, load_tokenizer, tokenize_rows
from elastic_ft.data.validate import Reason, RowError

ROW_SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("payload", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("truncated", pa.bool_()),
    ("content_hash", pa.string())])
OUTPUT_BLOCK_BYTES = 8 << 20
# Ray Data already runs a task per CPU; the fast tokenizer's own thread pool in each would
# only take the other tasks' cores (a worker spent ~20% more CPU per row with it). The same
# as `datasets.map(num_proc=...)`, whose forked processes turn it off.
TASK_RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
# `json.dumps(row, sort_keys=True)`, without building an encoder per row: a row's content hash
# (exact dedup, and which rows the eval split holds out)
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True)


def process_batch(raws: list[dict[str, Any]], fmt: str, tokenizer: Any, cfg: DataConfig
                  ) -> pa.Table:
    """Normalise, validate and tokenise a batch of raw rows (`ROW_SCHEMA`); rejects keep
    their reason, and every row its payload (a kept row may still be found a duplicate)."""
    canonical: list[dict[str, Any] | None] = []
    reasons: list[tuple[str, str]] = []
    for raw in raws:
        reason, detail = raw["parse_error"], raw["parse_detail"]
        row = None
        if not reason:
            try:
                row = normalise(apply_columns(raw["record"], cfg.columns), fmt)
            except RowError as error:
                reason, detail = error.reason.value, error.detail
        canonical.append(row)
        reasons.append((reason, detail))
    ok_rows = [row for row in canonical if row is not None]
    refused: dict[int, str] = {}
    tokenized = iter(tokenize_rows(ok_rows, tokenizer, cfg.train_on, cfg.template,
                                   tuple(cfg.roles_to_train), refused))
    ok_index = iter(range(len(ok_rows)))
    final_reasons: list[str] = []
    details: list[str] = []
    hashes: list[str] = []
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    all_n_tokens: list[int] = []
    all_truncated: list[bool] = []
    for row, (reason, detail) in zip(canonical, reasons, strict=True):
        ids: list[int] = []
        labels: list[int] = []
        truncated = False
        n_tokens = 0
        if row is not None:
            ids, labels = next(tokenized)
            k = next(ok_index)
            if k in refused:
                reason, detail = Reason.TEMPLATE_REFUSED.value, refused[k]
            n_tokens = len(ids)
            if n_tokens > cfg.seq_len:
                if cfg.too_long == "drop":
                    reason, detail = Reason.TOO_LONG.value, f"{n_tokens} tokens > {cfg.seq_len}"
                else:
                    ids, labels, truncated = ids[: cfg.seq_len], labels[: cfg.seq_len], True
            if not reason and count_trainable(labels) == 0:
                reason, detail = Reason.NO_TRAINABLE_TOKENS.value, "every label is masked"
        final_reasons.append(reason)
        details.append(detail)
        all_ids.append(ids if not reason else [])
        all_labels.append(labels if not reason else [])
        all_n_tokens.append(n_tokens)
        all_truncated.append(truncated)
        hashes.append(hashlib.sha1(_CANONICAL_JSON.encode(row).encode()).hexdigest()
                      if row else "")
    return pa.table([
        [raw["source"] for raw in raws], [raw["row"] for raw in raws],
        [raw["payload"] for raw in raws], final_reasons, details, all_ids, all_labels,
        all_n_tokens, all_truncated, hashes], schema=ROW_SCHEMA)


def process_chunk(chunk: dict[str, Any], tokenizer_path: str, cfg_json: str,
                  trust_remote_code: bool, batch_rows: int = 512) -> Iterator[pa.Table]:
    """One read task (`readers.read_tasks`): its rows read and processed in batches, in
    the process that reads them (the parsed records never cross a process)."""
    cfg = DataConfig.model_validate_json(cfg_json)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    raws = read_chunk(chunk)
    while part := list(itertools.islice(raws, batch_rows)):
        yield process_batch(part, chunk["fmt"], tokenizer, cfg)


def process_local(chunks: list[dict[str, Any]], tokenizer_path: str, cfg_json: str,
                   trust_remote_code: bool) -> Iterator[pa.Table]:
    """The same tables as `process_ray`, in this process."""
    for chunk in chunks:
        yield from process_chunk(chunk, tokenizer_path, cfg_json, trust_remote_code)


@cache
def settle_data_worker(tokenizer_path: str, trust_remote_code: bool) -> None:
    """Once per data worker process (and tokenizer): load the tokenizer, then take every
    object alive now (Ray, transformers, jinja, the tokenizer: ~250k) out of the cyclic
    garbage collector's reach. Tokenising allocates millions of short-lived lists, and every
    full collection would rescan all of them: 9% of the tasks' time (200k rows, 17.5 s
    against 16.0 s). These processes run only data tasks (`TASK_RUNTIME_ENV` gives them a
    worker pool of their own), so what is frozen lives as long as they do anyway."""
    load_tokenizer(tokenizer_path, trust_remote_code)
    gc.collect()
    gc.freeze()


def _chunk_task(batch: pa.Table, tokenizer_path: str, cfg_json: str,
                trust_remote_code: bool) -> Iterator[pa.Table]:
    settle_data_worker(tokenizer_path, trust_remote_code)
    for chunk in batch.to_pylist():
        yield from process_chunk(chunk, tokenizer_path, cfg_json, trust_remote_code)


def ray_cpus() -> int:
    """The CPUs Ray Data's read tasks share: the cluster's, or this machine's when Ray is not
    started yet (Ray Data then starts a local one)."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def process_ray(chunks: list[dict[str, Any]], tokenizer_path: str, cfg_json: str,
                 trust_remote_code: bool) -> Iterator[pa.Table]:
    """The processed rows in source order, one Ray Data task per read chunk (a JSON Lines
    file in byte ranges, so its rows are validated and tokenised in parallel), streamed back
    to the driver a block at a time as Arrow tables."""
    import ray

    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds.context.execution_options.preserve_order = True  # quarantine and packing follow the file
    # a read task's output leaves it in blocks of this size as it goes, not as one block at
    # its end: the driver holds one small block at a time (1M rows: 160 MB over its start
    # against 570 MB with Ray Data's 128 MiB default)
    ds.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    ds = ds.map_batches(_chunk_task, batch_size=1, batch_format="pyarrow", fn_kwargs={
        "tokenizer_path": tokenizer_path, "cfg_json": cfg_json,
        "trust_remote_code": trust_remote_code}, runtime_env=TASK_RUNTIME_ENV)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
