"""The data pipeline: read -> normalise -> validate -> tokenise (Ray Data) -> dedup -> pack.

The per-row stages run as Ray Data `map_batches` tasks, one read task per ~1 MiB of a JSON
Lines file (`readers.source_chunks`), so a single large file is tokenised on every core. The
rows come back to the driver in source order, a block at a time, and are deduplicated, counted
(`ReportBuilder`), packed (`BlockPacker`) and written (`BlockWriter`) as they arrive: the
driver's memory does not grow with the rows, except for one digest per kept row (exact dedup)
and the eval set. The result is materialised once in `OUTPUT/prepared/` before the trainer
starts, so data tasks never compete with training workers for the CPUs of a small box (Ray
Data otherwise deadlocks there: ../shared/FACTS.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elastic_ft.config import DataConfig, EvalConfig
from elastic_ft.data.eval_data import EVAL_DIR, Sample, clear_eval, is_held_out, write_eval
from elastic_ft.data.formats import FormatError, apply_columns, detect_format, normalise
from elastic_ft.data.pack import Block, BlockPacker
from elastic_ft.data.prepared import BlockWriter, PreparedData
from elastic_ft.data.readers import expand_sources, read_chunk, sample_records, source_chunks
from elastic_ft.data.report import DataQualityError, DataReport, ReportBuilder
from elastic_ft.data.tokenize import count_trainable, load_tokenizer, tokenize_rows
from elastic_ft.data.validate import Quarantine, Reason, RowError

FINGERPRINT_FILE = "fingerprint.json"


def resolve_formats(cfg: DataConfig) -> dict[str, str]:
    """Format per source; fails before any work if one is unknown or ambiguous."""
    formats = {}
    for source in expand_sources(cfg.paths):
        if cfg.format != "auto":
            formats[source] = cfg.format
            continue
        records = [apply_columns(r, cfg.columns) for r in sample_records(source)]
        if not records:
            raise FormatError(f"{source}: no readable rows to detect the format from")
        formats[source] = detect_format(source, records)
    return formats


def _read_task(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for raw in read_chunk(item):
        yield dict(raw, fmt=item["fmt"])


def process_batch(batch: dict[str, Any], tokenizer_path: str, cfg_json: str,
                  trust_remote_code: bool = False) -> dict[str, list[Any]]:
    """Normalise, validate and tokenise a batch of raw rows; rejects keep their reason."""
    cfg = DataConfig.model_validate_json(cfg_json)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    n = len(batch["source"])
    out: dict[str, list[Any]] = {k: [] for k in (
        "source", "row", "payload", "reason", "detail", "input_ids", "labels", "n_tokens",
        "truncated", "content_hash")}
    canonical: list[dict[str, Any] | None] = []
    reasons: list[tuple[str, str]] = []
    for i in range(n):
        reason = str(batch["parse_error"][i] or "")
        detail = str(batch["parse_detail"][i] or "")
        row = None
        if not reason:
            try:
                record = apply_columns(json.loads(batch["payload"][i]), cfg.columns)
                row = normalise(record, str(batch["fmt"][i]))
            except RowError as error:
                reason, detail = error.reason.value, error.detail
        canonical.append(row)
        reasons.append((reason, detail))
    ok_rows = [row for row in canonical if row is not None]
    refused: dict[int, str] = {}
    tokenized = iter(tokenize_rows(ok_rows, tokenizer, cfg.train_on, cfg.template,
                                   tuple(cfg.roles_to_train), refused))
    ok_index = iter(range(len(ok_rows)))
    for i, row in enumerate(canonical):
        reason, detail = reasons[i]
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
        out["source"].append(str(batch["source"][i]))
        out["row"].append(int(batch["row"][i]))
        out["payload"].append(str(batch["payload"][i]))
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["input_ids"].append(ids if not reason else [])
        out["labels"].append(labels if not reason else [])
        out["n_tokens"].append(n_tokens)
        out["truncated"].append(truncated)
        out["content_hash"].append(
            hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest() if row else "")
    return out


def _process_local(formats: dict[str, str], tokenizer_path: str, cfg_json: str,
                   trust_remote_code: bool, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """The same rows as `_process_ray`, in this process, a batch at a time."""
    for source, fmt in formats.items():
        raws = (dict(r, fmt=fmt) for chunk in source_chunks(source) for r in read_chunk(chunk))
        while chunk := list(itertools.islice(raws, batch_size)):
            batch = {k: [r[k] for r in chunk] for k in chunk[0]}
            done = process_batch(batch, tokenizer_path, cfg_json, trust_remote_code)
            yield from ({k: done[k][i] for k in done} for i in range(len(chunk)))


def _process_ray(formats: dict[str, str], tokenizer_path: str, cfg_json: str,
                 trust_remote_code: bool, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """The rows in source order: one read task per chunk of each source (a JSON Lines file in
    byte ranges, so its rows are validated and tokenised in parallel), streamed back to the
    driver a Ray Data block at a time."""
    import ray

    chunks = [dict(chunk, fmt=fmt) for source, fmt in formats.items()
              for chunk in source_chunks(source)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds.context.execution_options.preserve_order = True  # quarantine and packing follow the file
    ds = ds.flat_map(_read_task).map_batches(
        process_batch, batch_size=batch_size, batch_format="numpy",
        fn_kwargs={"tokenizer_path": tokenizer_path, "cfg_json": cfg_json,
                   "trust_remote_code": trust_remote_code})
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def fingerprint(cfg: DataConfig, tokenizer_path: str, evaluation: EvalConfig | None = None
                ) -> str:
    files = []
    sources = expand_sources(cfg.paths) + (expand_sources(evaluation.paths)
                                           if evaluation and evaluation.paths else [])
    for source in sources:
        p = Path(source)
        files.append([source, p.stat().st_size, p.stat().st_mtime] if p.exists() else [source])
    split = ([evaluation.paths, evaluation.holdout_fraction] if evaluation else None)
    blob = json.dumps([cfg.model_dump(mode="json"), tokenizer_path, files, split], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def screened_rows(cfg: DataConfig, formats: dict[str, str], tokenizer_path: str,
                  quarantine_path: Path, engine: str, trust_remote_code: bool,
                  report: ReportBuilder) -> Iterator[dict[str, Any]]:
    """Every row of `cfg.paths`, read, validated and tokenised, in source order: each is
    counted in `report`, rejects and duplicates go to the quarantine file with their reason,
    and the kept rows are yielded. The driver holds a Ray Data block of rows at a time, and
    the digests of the kept rows (for exact dedup: ~150 bytes a row)."""
    run = _process_ray if engine == "ray" else _process_local
    seen: set[bytes] = set()
    with Quarantine(quarantine_path) as quarantine:
        for row in run(formats, tokenizer_path, cfg.model_dump_json(), trust_remote_code):
            if not row["reason"]:
                digest = bytes.fromhex(row["content_hash"])
                if digest in seen:
                    row["reason"] = Reason.DUPLICATE.value
                    row["detail"] = "exact duplicate of an earlier row"
                else:
                    seen.add(digest)
            report.add_row(row)
            if not row["reason"]:
                yield row
                continue
            payload = row["payload"]
            try:
                original: Any = json.loads(payload) if row["reason"] not in (
                    Reason.INVALID_JSON.value, Reason.INVALID_UTF8.value) else payload
            except json.JSONDecodeError:
                original = payload
            quarantine.add(row["source"], row["row"], row["reason"], row["detail"], original)


def _sample(row: dict[str, Any]) -> Sample:
    return f"{row['source']}:{row['row']}", row["input_ids"], row["labels"]


def prepare_data(cfg: DataConfig, tokenizer_path: str, out_dir: str | Path,
                 engine: str = "ray", trust_remote_code: bool = False,
                 write_blocks_file: bool = True, evaluation: EvalConfig | None = None
                 ) -> tuple[PreparedData | None, DataReport]:
    """Run the pipeline into `out_dir` (quarantine.jsonl, data_report.json, prepared/, and
    with eval prepared_eval/ and, for eval paths, eval_quarantine.jsonl)."""
    out = Path(out_dir)
    prepared_dir = out / "prepared"
    evaluation = evaluation if evaluation is not None and evaluation.enabled else None
    stamp = fingerprint(cfg, tokenizer_path, evaluation)
    stamp_file = prepared_dir / FINGERPRINT_FILE
    if write_blocks_file and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return PreparedData.open(prepared_dir), DataReport.load(out / "data_report.json")

    formats = resolve_formats(cfg)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    if write_blocks_file:  # stale until the new blocks are complete: a crash re-prepares
        stamp_file.unlink(missing_ok=True)
    builder = ReportBuilder(cfg.seq_len)
    packer = BlockPacker(cfg.seq_len, tokenizer.pad_token_id, cfg.packing)
    writer = BlockWriter(prepared_dir) if write_blocks_file else None
    holdout = evaluation.holdout_fraction if evaluation is not None else 0.0
    held: list[Sample] = []  # the eval set: a held-out fraction, or the eval paths' rows

    def add(block: Block | None) -> None:
        if block is not None:
            builder.add_block(block)
            if writer is not None:
                writer.add(block)

    try:
        for row in screened_rows(cfg, formats, tokenizer_path, out / "quarantine.jsonl",
                                 engine, trust_remote_code, builder):
            if holdout > 0 and is_held_out(row["content_hash"], holdout):
                held.append(_sample(row))
            else:
                add(packer.add(*_sample(row)))
        add(packer.finish())
        report = builder.build(formats)
        eval_counts: dict[str, Any] = {}
        if holdout > 0:
            eval_counts = {"source": "holdout", "holdout_fraction": holdout}
        elif evaluation is not None:
            eval_cfg = cfg.model_copy(update={"paths": evaluation.paths, "max_reject_rate": 1.0})
            eval_report = ReportBuilder(cfg.seq_len)
            held = [_sample(r) for r in screened_rows(
                eval_cfg, resolve_formats(eval_cfg), tokenizer_path,
                out / "eval_quarantine.jsonl", engine, trust_remote_code, eval_report)]
            eval_counts = {"source": "paths", "rows": eval_report.rows, "kept": len(held),
                           "rejected": eval_report.rows - len(held)}
        if evaluation is not None and not held:
            raise DataQualityError("eval has no samples: raise eval.holdout_fraction or check "
                                   "eval.paths (rejects are in eval_quarantine.jsonl)")
        if write_blocks_file and evaluation is not None:
            eval_counts.update(write_eval(held, out / EVAL_DIR, cfg.seq_len,
                                          tokenizer.pad_token_id, cfg.packing))
        elif write_blocks_file:
            clear_eval(out)
        report.eval = eval_counts
        report.save(out / "data_report.json")
        if report.kept == 0:
            raise DataQualityError(f"no rows survived validation; see {out / 'quarantine.jsonl'}")
        if report.reject_rate > cfg.max_reject_rate:
            raise DataQualityError(
                f"reject rate {report.reject_rate:.1%} exceeds data.max_reject_rate "
                f"{cfg.max_reject_rate:.1%} ({report.rejected_by_reason}); "
                f"see {out / 'quarantine.jsonl'}")
    except BaseException:
        if writer is not None:
            writer.abort()  # an earlier prepare's blocks stay as they were
        raise
    if writer is None:
        return None, report
    prepared = writer.close()
    stamp_file.write_text(json.dumps(stamp))
    return prepared, report
