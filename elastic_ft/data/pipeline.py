"""The data pipeline: read -> normalise -> validate -> tokenise (Ray Data) -> dedup -> pack.

The per-row stages run in Ray Data tasks, one per byte range (1-8 MiB) of a JSON Lines file
(`readers.read_tasks`), so a single large file is tokenised on every core; a task reads its
rows and processes them in the same process (`row_tasks`), and returns Arrow tables. The
tables come back to the driver in source order and are deduplicated, counted
(`ReportBuilder`), packed (`BlockPacker`) and written (`BlockWriter`) as they arrive, on their
columns: no token becomes a Python object in the driver. The driver's memory does not grow
with the rows, except for one digest per kept row (exact dedup) and the eval set. The result
is materialised once in `OUTPUT/prepared/` before the trainer starts, so data tasks never
compete with training workers for the CPUs of a small box (Ray Data otherwise deadlocks
there: ../shared/FACTS.md)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elastic_ft.config import DataConfig, EvalConfig
from elastic_ft.data.eval_data import EVAL_DIR, clear_eval, is_held_out, write_eval
from elastic_ft.data.formats import FormatError, apply_columns, detect_format
from elastic_ft.data.pack import BlockPacker, Blocks, Samples
from elastic_ft.data.prepared import BlockWriter, PreparedData
from elastic_ft.data.readers import expand_sources, read_tasks, sample_records
from elastic_ft.data.report import DataQualityError, DataReport, ReportBuilder
from elastic_ft.data.row_tasks import process_local, process_ray, ray_cpus
from elastic_ft.data.tokenize import load_tokenizer
from elastic_ft.data.validate import Quarantine, Reason

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


def _quarantine_rejects(table: pa.Table, reasons: list[str], details: dict[int, str],
                        quarantine: Quarantine) -> None:
    """The rejected rows of a batch (reason set), with their original row or raw line."""
    rejected = [i for i, reason in enumerate(reasons) if reason]
    if not rejected:
        return
    rows = table.select(["source", "row", "payload", "detail"]).take(
        pa.array(rejected, pa.int64())).to_pylist()
    for i, row in zip(rejected, rows, strict=True):
        payload = row["payload"]
        try:
            original: Any = json.loads(payload) if reasons[i] not in (
                Reason.INVALID_JSON.value, Reason.INVALID_UTF8.value) else payload
        except json.JSONDecodeError:
            original = payload
        quarantine.add(row["source"], row["row"], reasons[i], details.get(i, row["detail"]),
                       original)


def screened_samples(cfg: DataConfig, formats: dict[str, str], tokenizer_path: str,
                     quarantine_path: Path, engine: str, trust_remote_code: bool,
                     report: ReportBuilder) -> Iterator[tuple[Samples, list[str]]]:
    """The kept samples of `cfg.paths`, read, validated and tokenised, in source order, a batch
    at a time with each sample's content hash. Every row is counted in `report`; rejects and
    duplicates go to the quarantine file with their reason. The driver holds one batch, and
    the digests of the kept rows (for exact dedup: ~150 bytes a row)."""
    run = process_ray if engine == "ray" else process_local
    chunks = [dict(task, fmt=formats[task["source"]]) for task in read_tasks(
        list(formats), ray_cpus() if engine == "ray" else 1)]
    seen: set[bytes] = set()
    with Quarantine(quarantine_path) as quarantine:
        for table in run(chunks, tokenizer_path, cfg.model_dump_json(), trust_remote_code):
            reasons = table.column("reason").to_pylist()
            hashes = table.column("content_hash").to_pylist()
            duplicates: dict[int, str] = {}
            for i, (reason, content_hash) in enumerate(zip(reasons, hashes, strict=True)):
                if reason:
                    continue
                digest = bytes.fromhex(content_hash)
                if digest in seen:
                    reasons[i] = Reason.DUPLICATE.value
                    duplicates[i] = "exact duplicate of an earlier row"
                else:
                    seen.add(digest)
            report.add_rows(table.column("source"), reasons,
                            table.column("n_tokens").to_numpy(),
                            table.column("truncated").to_numpy(zero_copy_only=False))
            _quarantine_rejects(table, reasons, duplicates, quarantine)
            kept = [i for i, reason in enumerate(reasons) if not reason]
            if not kept:
                continue
            rows = table.select(["source", "row", "input_ids", "labels"])
            if len(kept) < len(reasons):  # most batches keep every row: no copy of the tokens
                rows = rows.take(pa.array(kept, pa.int64()))
            rows = rows.append_column("sample_id", pc.binary_join_element_wise(
                rows.column("source"), pc.cast(rows.column("row"), pa.string()), ":"))
            yield Samples.from_arrow(rows), [hashes[i] for i in kept]


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
    held: list[Samples] = []  # the eval set: a held-out fraction, or the eval paths' rows

    def add(blocks: Blocks | None) -> None:
        if blocks is not None:
            builder.add_blocks(blocks)
            if writer is not None:
                writer.add(blocks)

    try:
        for samples, hashes in screened_samples(cfg, formats, tokenizer_path,
                                                out / "quarantine.jsonl", engine,
                                                trust_remote_code, builder):
            if holdout > 0:
                out_of_training = np.array([is_held_out(h, holdout) for h in hashes], bool)
                held.append(samples.where(out_of_training))
                samples = samples.where(~out_of_training)
            add(packer.add(samples))
        add(packer.finish())
        report = builder.build(formats)
        eval_counts: dict[str, Any] = {}
        if holdout > 0:
            eval_counts = {"source": "holdout", "holdout_fraction": holdout}
        elif evaluation is not None:
            eval_cfg = cfg.model_copy(update={"paths": evaluation.paths, "max_reject_rate": 1.0})
            eval_report = ReportBuilder(cfg.seq_len)
            held = [samples for samples, _ in screened_samples(
                eval_cfg, resolve_formats(eval_cfg), tokenizer_path,
                out / "eval_quarantine.jsonl", engine, trust_remote_code, eval_report)]
            eval_counts = {"source": "paths", "rows": eval_report.rows,
                           "kept": eval_report.kept, "rejected": eval_report.rows - eval_report.kept}
        eval_set = Samples.concat(held)
        if evaluation is not None and not len(eval_set):
            raise DataQualityError("eval has no samples: raise eval.holdout_fraction or check "
                                   "eval.paths (rejects are in eval_quarantine.jsonl)")
        if write_blocks_file and evaluation is not None:
            eval_counts.update(write_eval(eval_set, out / EVAL_DIR, cfg.seq_len,
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
