"""Read sources into raw rows: `{"source", "row", "payload", "parse_error", "parse_detail"}`.

`payload` is the record as JSON text (or the undecodable raw line), so every source has the same
Arrow schema in the Ray Data pipeline. A line that is not JSON or not UTF-8 is kept as a raw row
with its parse error, to be quarantined downstream, never dropped here.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from elastic_ft.data.sources import EXTENSIONS, SourceError, expand_sources, load_remote
from elastic_ft.data.validate import Reason

__all__ = ["SourceError", "expand_sources", "read_chunk", "read_source", "read_tasks",
           "sample_records"]
MIN_CHUNK_BYTES = 1 << 20  # a read task of a JSON Lines file: ~12k short alpaca rows
# bounds what a task holds and, as output keeps the file's order, the output (~7x the range)
# that waits in the object store behind an earlier, longer task
MAX_CHUNK_BYTES = 8 << 20

_PLAIN_TYPES = frozenset({str, int, bool, list, dict, type(None)})  # JSON's: nothing to clean


def _clean(value: Any) -> Any:
    if type(value) in _PLAIN_TYPES:  # exact types: numpy's str_ and float64 still convert
        return value
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _row(source: str, row: int, record: Any = None, raw: str = "", error: str = "",
         detail: str = "") -> dict[str, Any]:
    """A raw row; a parsed one also carries its `record`, so the task that reads it does not
    parse its payload again (`raw`: the source's own JSON text of it, when it has one)."""
    if error:
        return {"source": source, "row": row, "payload": raw, "parse_error": error,
                "parse_detail": detail}
    payload = raw or json.dumps(record, ensure_ascii=False, default=str)
    return {"source": source, "row": row, "payload": payload, "parse_error": "",
            "parse_detail": "", "record": record}


def _record_row(source: str, row: int, record: Any, text: str = "") -> dict[str, Any]:
    if not isinstance(record, dict):
        return _row(source, row, raw=json.dumps(record, default=str),
                    error=Reason.WRONG_TYPE.value,
                    detail=f"row is a {type(record).__name__}, not an object")
    return _row(source, row, {k: _clean(v) for k, v in record.items()}, raw=text)


def _records(source: str, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for row, record in enumerate(records, start=1):
        yield _record_row(source, row, record)


def read_source(source: str) -> Iterator[dict[str, Any]]:
    if source.startswith(("hf://", "disk://")):
        yield from _records(source, iter(load_remote(source)))
        return
    path = Path(source)
    kind = EXTENSIONS[path.suffix]
    if kind == "jsonl":
        with open(path, "rb") as f:
            yield from _jsonl_rows(source, f, 1)
    elif kind == "json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SourceError(f"{source}: not a valid JSON document ({error})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        yield from _records(source, iter(data))
    else:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.feather as feather
        import pyarrow.parquet as pq

        if kind == "csv":
            # csv has no types: read every column as text so "19" stays the answer, not an int
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
                strings_can_be_null=True))
            table = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema]))
        elif kind == "parquet":
            table = pq.read_table(path)
        else:
            table = _read_arrow(path, feather)
        yield from _records(source, iter(table.to_pylist()))


def _jsonl_rows(source: str, lines: Iterable[bytes], first_row: int) -> Iterator[dict[str, Any]]:
    for row, line in enumerate(lines, start=first_row):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield _row(source, row, raw=line.decode("utf-8", "replace").rstrip("\n"),
                       error=Reason.INVALID_UTF8.value, detail=str(error))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            yield _row(source, row, raw=text.rstrip("\n"), error=Reason.INVALID_JSON.value,
                       detail=str(error))
            continue
        yield _record_row(source, row, record, text.rstrip("\r\n"))


def _is_jsonl_file(source: str) -> bool:
    return not source.startswith(("hf://", "disk://")) and \
        EXTENSIONS.get(Path(source).suffix) == "jsonl"


def read_tasks(sources: list[str], parallelism: int = 1,
               min_chunk_bytes: int = MIN_CHUNK_BYTES,
               max_chunk_bytes: int = MAX_CHUNK_BYTES) -> list[dict[str, Any]]:
    """The sources as read tasks, in source order: a local JSON Lines file as line-aligned
    byte ranges (each with its first line's number, so quarantined rows keep their line),
    read in parallel; any other source as one task.

    Range sizes are guided by the bytes still to cut over all files: a `2 * parallelism`-th
    of them, within [min, max]. Early ranges are large, so a run has few tasks (each task
    boundary leaves a core idle for ~0.15 s while Ray Data dispatches the next); late ranges
    are small, so the cores finish together instead of one waiting on the last long task.
    The max bounds what a task holds, and the output that waits behind an earlier task (the
    output keeps the file's order). Lines are counted a buffer at a time, holding one range."""
    remaining = sum(Path(s).stat().st_size for s in sources if _is_jsonl_file(s))
    tasks: list[dict[str, Any]] = []
    for source in sources:
        if not _is_jsonl_file(source):
            tasks.append({"source": source})
            continue
        start, first_row = 0, 1
        with open(source, "rb") as f:
            while data := f.read(max(min_chunk_bytes, min(
                    max_chunk_bytes, remaining // (2 * max(1, parallelism))))):
                data += f.readline()  # to the end of the line the read stopped in
                tasks.append({"source": source, "start": start, "end": start + len(data),
                              "first_row": first_row})
                start, first_row = start + len(data), first_row + data.count(b"\n")
                remaining -= len(data)
        if not start:  # an empty file: one empty range, as before
            tasks.append({"source": source, "start": 0, "end": 0, "first_row": 1})
    return tasks


def read_chunk(chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The raw rows of one read task of `read_tasks`."""
    if chunk.get("start") is None:  # a whole source (Ray Data fills absent keys with None)
        yield from read_source(chunk["source"])
        return
    with open(chunk["source"], "rb") as f:
        f.seek(chunk["start"])
        data = f.read(chunk["end"] - chunk["start"])
    # split as iterating the file does (on b"\n" only), so line numbers agree with read_source
    yield from _jsonl_rows(chunk["source"], io.BytesIO(data), chunk["first_row"])


def _read_arrow(path: Path, feather: Any) -> Any:
    import pyarrow as pa

    try:
        return feather.read_table(path)
    except pa.ArrowInvalid:  # the streaming IPC format `datasets` writes
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()


def sample_records(source: str, limit: int = 50) -> list[dict[str, Any]]:
    """Parsed records from the head of a source, for format detection."""
    records = []
    for raw in read_source(source):
        if not raw["parse_error"]:
            records.append(raw["record"])
        if len(records) >= limit:
            break
    return records
