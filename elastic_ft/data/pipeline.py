"""The data pipeline: read -> normalise -> validate -> tokenise (Ray Data) -> dedup -> pack.

The per-row stages run as Ray Data `map_batches` tasks. Dedup and packing need a global order
and run on the driver over the (small) token lists. The result is materialised once in
`OUTPUT/prepared/` before the trainer starts, so data tasks never compete with training workers
for the CPUs of a small box (Ray Data otherwise deadlocks there: ../shared/FACTS.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elastic_ft.config import DataConfig, EvalConfig
from elastic_ft.data.eval_data import EVAL_DIR, clear_eval, is_held_out, write_eval
from elastic_ft.data.formats import FormatError, apply_columns, detect_format, normalise
from elastic_ft.data.pack import pack_samples
from elastic_ft.data.prepared import PreparedData, write_blocks
from elastic_ft.data.readers import expand_sources, read_source, sample_records
from elastic_ft.data.report import DataQualityError, DataReport, build_report
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
    for raw in read_source(item["source"]):
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
    for source, fmt in formats.items():
        raws = [dict(r, fmt=fmt) for r in read_source(source)]
        for start in range(0, len(raws), batch_size):
            chunk = raws[start: start + batch_size]
            batch = {k: [r[k] for r in chunk] for k in chunk[0]}
            done = process_batch(batch, tokenizer_path, cfg_json, trust_remote_code)
            yield from ({k: done[k][i] for k in done} for i in range(len(chunk)))


def _process_ray(formats: dict[str, str], tokenizer_path: str, cfg_json: str,
                 trust_remote_code: bool, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    import ray

    ds = ray.data.from_items([{"source": s, "fmt": f} for s, f in formats.items()])
    ds = ds.flat_map(_read_task).map_batches(
        process_batch, batch_size=batch_size, batch_format="numpy",
        fn_kwargs={"tokenizer_path": tokenizer_path, "cfg_json": cfg_json,
                   "trust_remote_code": trust_remote_code})
    for row in ds.iter_rows():
        yield {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}


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


def validated_samples(cfg: DataConfig, tokenizer_path: str, quarantine_path: Path, engine: str,
                      trust_remote_code: bool) -> tuple[list[dict[str, Any]], list[Any],
                                                        dict[str, str]]:
    """Read, validate and tokenise every row of `cfg.paths`; rejects and duplicates go to the
    quarantine file with their reason. Returns (every row, kept rows, formats)."""
    formats = resolve_formats(cfg)
    run = _process_ray if engine == "ray" else _process_local
    rows = list(run(formats, tokenizer_path, cfg.model_dump_json(), trust_remote_code))
    order = {source: i for i, source in enumerate(formats)}
    rows.sort(key=lambda r: (order[r["source"]], r["row"]))
    kept: list[dict[str, Any]] = []
    seen_hashes: set[str] = set()
    with Quarantine(quarantine_path) as quarantine:
        for row in rows:
            if not row["reason"] and row["content_hash"] in seen_hashes:
                row["reason"], row["detail"] = Reason.DUPLICATE.value, "exact duplicate of an earlier row"
            if row["reason"]:
                payload = row["payload"]
                try:
                    original: Any = json.loads(payload) if row["reason"] not in (
                        Reason.INVALID_JSON.value, Reason.INVALID_UTF8.value) else payload
                except json.JSONDecodeError:
                    original = payload
                quarantine.add(row["source"], row["row"], row["reason"], row["detail"], original)
                continue
            seen_hashes.add(row["content_hash"])
            kept.append(row)
    return rows, kept, formats


def _sample(row: dict[str, Any]) -> tuple[str, list[int], list[int]]:
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

    rows, kept, formats = validated_samples(cfg, tokenizer_path, out / "quarantine.jsonl",
                                            engine, trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    held: list[dict[str, Any]] = []
    eval_counts: dict[str, Any] = {}
    if evaluation is not None and evaluation.holdout_fraction > 0:
        held = [r for r in kept if is_held_out(r["content_hash"], evaluation.holdout_fraction)]
        kept = [r for r in kept if not is_held_out(r["content_hash"],
                                                   evaluation.holdout_fraction)]
        eval_counts = {"source": "holdout", "holdout_fraction": evaluation.holdout_fraction}
    elif evaluation is not None:
        eval_cfg = cfg.model_copy(update={"paths": evaluation.paths, "max_reject_rate": 1.0})
        eval_rows, held, _ = validated_samples(eval_cfg, tokenizer_path,
                                               out / "eval_quarantine.jsonl", engine,
                                               trust_remote_code)
        eval_counts = {"source": "paths", "rows": len(eval_rows), "kept": len(held),
                       "rejected": len(eval_rows) - len(held)}
    blocks = pack_samples([_sample(r) for r in kept], cfg.seq_len, tokenizer.pad_token_id,
                          cfg.packing)
    report = build_report(rows, blocks, cfg.seq_len, formats)
    if evaluation is not None and not held:
        raise DataQualityError("eval has no samples: raise eval.holdout_fraction or check "
                               "eval.paths (rejects are in eval_quarantine.jsonl)")
    if write_blocks_file and evaluation is not None:
        eval_counts.update(write_eval([_sample(r) for r in held], out / EVAL_DIR, cfg.seq_len,
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
            f"{cfg.max_reject_rate:.1%} ({report.rejected_by_reason}); see {out / 'quarantine.jsonl'}")
    if not write_blocks_file:
        return None, report
    prepared = write_blocks(blocks, prepared_dir)
    stamp_file.write_text(json.dumps(stamp))
    return prepared, report
