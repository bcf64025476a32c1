"""Read tasks of JSON Lines files: line-aligned byte ranges that cover every line once, with
each range's first line number, sized by the bytes still to cut (large first, small last)."""

from __future__ import annotations

import json
from pathlib import Path

from elastic_ft.data.readers import read_chunk, read_tasks


def _jsonl(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"row {i} " + "x" * (i % 37)}) + "\n"
                            for i in range(rows)))
    return path


def test_ranges_cover_every_line_once_in_order_across_files(tmp_path) -> None:
    files = [str(_jsonl(tmp_path / "a.jsonl", 900)), str(_jsonl(tmp_path / "b.jsonl", 300))]
    tasks = read_tasks(files, parallelism=2, min_chunk_bytes=2_000, max_chunk_bytes=9_000)
    rows = [(raw["source"], raw["row"], raw["record"]["text"])
            for task in tasks for raw in read_chunk(task)]
    expected = [(f, i + 1, json.loads(line)["text"]) for f in files
                for i, line in enumerate(Path(f).read_text().splitlines())]
    assert rows == expected
    for f in files:  # contiguous, line-aligned ranges from 0 to the end of each file
        ranges = [(t["start"], t["end"]) for t in tasks if t["source"] == f]
        assert ranges[0][0] == 0 and ranges[-1][1] == Path(f).stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_sizes_shrink_toward_the_end_within_the_bounds(tmp_path) -> None:
    corpus = _jsonl(tmp_path / "big.jsonl", 6_000)
    size = corpus.stat().st_size
    tasks = read_tasks([str(corpus)], parallelism=2, min_chunk_bytes=4_000,
                       max_chunk_bytes=40_000)
    sizes = [t["end"] - t["start"] for t in tasks]
    line = 80  # a range ends at the end of the line its read stopped in
    assert max(sizes) <= 40_000 + line and min(sizes[:-1]) >= 4_000
    assert sizes[:3] == [s for s in sizes[:3] if s > 39_000]  # the max while much is left
    assert all(a >= b - line for a, b in zip(sizes, sizes[1:], strict=False))  # then shrinking
    assert sizes[-2] < 4_000 + line  # to the minimum at the end
    # a 2 * parallelism-th of what is left: half of the file first with one CPU, more tasks
    # with more CPUs
    fewer = read_tasks([str(corpus)], parallelism=1, min_chunk_bytes=4_000,
                       max_chunk_bytes=10**9)
    assert fewer[0]["end"] - fewer[0]["start"] >= size // 2 - line
    assert len(read_tasks([str(corpus)], parallelism=8, min_chunk_bytes=4_000,
                          max_chunk_bytes=10**9)) > len(fewer)


def test_other_sources_and_empty_files_are_one_task(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    table = tmp_path / "rows.json"
    table.write_text(json.dumps([{"text": "a"}]))
    assert read_tasks([str(empty), str(table)]) == [
        {"source": str(empty), "start": 0, "end": 0, "first_row": 1}, {"source": str(table)}]
