"""`prepare` as a stream (issue 21, point 3): a large JSON Lines file is read in parallel byte
ranges by Ray Data and comes back in file order; the driver packs and writes blocks as rows
arrive, so its memory does not grow with the row count."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import psutil
import pyarrow as pa
import pytest

from elastic_ft.config import DataConfig
from elastic_ft.data.pack import BlockPacker, Samples, pack_samples
from elastic_ft.data.pipeline import prepare_data
from elastic_ft.data.prepared import BLOCKS_FILE, BlockWriter, PreparedData, write_blocks
from elastic_ft.data.readers import MIN_CHUNK_BYTES, read_tasks

ROOT = Path(__file__).resolve().parents[2]


def _corpus(path: Path, rows: int) -> Path:
    """Alpaca rows made unique, with a bad line, a blank line and a duplicate every so often."""
    base = [json.loads(x) for x in (ROOT / "data" / "sample" / "alpaca.jsonl").read_text()
            .splitlines()]
    with open(path, "wb") as f:
        for i in range(rows):
            row = dict(base[i % len(base)], input=f"{base[i % len(base)].get('input', '')} #{i}")
            f.write(json.dumps(row).encode() + b"\n")
            if i % 997 == 0:
                f.write(b'{"instruction": "cut short\n\n')
            if i % 1499 == 0:
                f.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.mark.ray
def test_parallel_read_tasks_give_the_local_result_in_file_order(tmp_path, tiny_assets,
                                                                   ray_local) -> None:
    corpus = _corpus(tmp_path / "big.jsonl", 16_000)
    assert corpus.stat().st_size > MIN_CHUNK_BYTES
    assert len(read_tasks([str(corpus)], parallelism=2)) == 2  # read as 2 parallel tasks
    cfg = DataConfig(paths=[str(corpus)], seq_len=128)
    tokenizer = str(tiny_assets.parent / "tokenizer")
    by_ray, ray_report = prepare_data(cfg, tokenizer, tmp_path / "ray", engine="ray")
    by_local, local_report = prepare_data(cfg, tokenizer, tmp_path / "local", engine="local")
    # the read tasks ran without the fast tokenizer's own threads (one task per CPU already)
    assert any((p.info["environ"] or {}).get("TOKENIZERS_PARALLELISM") == "false"
               for p in psutil.process_iter(["cmdline", "environ"])
               if "ray::" in " ".join(p.info["cmdline"] or []))
    assert ray_report == local_report
    assert ray_report.rejected_by_reason == {"duplicate": 11, "invalid_json": 17}
    assert by_ray.table.equals(by_local.table)  # same blocks, same order
    quarantined = [(q["row"], q["reason"]) for q in map(
        json.loads, (tmp_path / "ray" / "quarantine.jsonl").read_text().splitlines())]
    assert quarantined == [(q["row"], q["reason"]) for q in map(
        json.loads, (tmp_path / "local" / "quarantine.jsonl").read_text().splitlines())]
    lines = corpus.read_bytes().split(b"\n")  # each quarantined row names its own line
    assert all(lines[row - 1].startswith(b'{"instruction": "cut short')
               for row, reason in quarantined if reason == "invalid_json")


def test_driver_memory_grows_by_a_digest_per_row_not_by_the_rows(tmp_path, tiny_assets) -> None:
    """Python allocations at their peak while preparing 2k and 8k rows. Before the stream every
    row (payload, ids and labels as Python lists: ~8 KB here) was held to the end; now only
    exact dedup's digest of each kept row stays (~140 bytes, measured 137-240 per extra row)."""
    tokenizer = str(tiny_assets.parent / "tokenizer")
    prepare_data(DataConfig(paths=[str(_corpus(tmp_path / "warm.jsonl", 600))]), tokenizer,
                 tmp_path / "warm", engine="local")  # the tokenizer's caches, once
    peaks = {}
    for rows in (2000, 8000):
        corpus = _corpus(tmp_path / f"c{rows}.jsonl", rows)
        tracemalloc.start()
        prepare_data(DataConfig(paths=[str(corpus)], seq_len=128), tokenizer,
                     tmp_path / f"o{rows}", engine="local")
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (peaks[8000] - peaks[2000]) / 6000 < 500, peaks


def test_block_writer_streams_record_batches_and_aborts_cleanly(tmp_path) -> None:
    samples = [(f"s{i}", [i + 1] * (3 + i % 5), [-100] + [i + 1] * (2 + i % 5))
               for i in range(40)]
    blocks = pack_samples(Samples.from_lists(samples), seq_len=8, pad_id=0, packing=True)
    reference = write_blocks(blocks, tmp_path / "whole")
    packer = BlockPacker(8, pad_id=0, packing=True)
    writer = BlockWriter(tmp_path / "stream", batch_blocks=4)
    for start in range(0, len(samples), 3):  # blocks arrive 0, 1 or 2 at a time
        filled = packer.add(Samples.from_lists(samples[start:start + 3]))
        if filled is not None:
            writer.add(filled)
    writer.add(packer.finish())
    streamed = writer.close()
    assert streamed.table.equals(reference.table)
    with pa.memory_map(str(tmp_path / "stream" / BLOCKS_FILE)) as source:
        reader = pa.ipc.open_file(source)
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    assert sizes == [4] * (len(blocks) // 4) + ([len(blocks) % 4] if len(blocks) % 4 else [])
    at_once = BlockWriter(tmp_path / "at_once", batch_blocks=4)  # many blocks in one add
    at_once.add(blocks)
    assert at_once.close().table.equals(reference.table)
    # a failed prepare leaves the earlier blocks as they were, and no partial file
    failed = BlockWriter(tmp_path / "stream", batch_blocks=4)
    failed.add(blocks)
    failed.abort()
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == [BLOCKS_FILE]
    assert PreparedData.open(tmp_path / "stream").table.equals(reference.table)


def test_a_data_worker_takes_its_long_lived_objects_out_of_the_collectors_reach(
        tmp_path, tiny_assets) -> None:
    """A read task freezes what its process holds once the tokenizer is loaded (`gc.freeze`),
    so tokenising millions of short-lived lists does not rescan it on every full collection.
    In a child process: a freeze is for the life of the process that makes it."""
    corpus = _corpus(tmp_path / "c.jsonl", 300)
    code = """
import gc, sys
import pyarrow as pa
from elastic_ft.config import DataConfig
from elastic_ft.data.readers import read_tasks
from elastic_ft.data.row_tasks import _chunk_task
before = gc.get_freeze_count()
chunk = dict(read_tasks([sys.argv[1]])[0], fmt="alpaca")
cfg_json = DataConfig(paths=[sys.argv[1]]).model_dump_json()
rows = sum(len(t) for t in _chunk_task(pa.Table.from_pylist([chunk]), sys.argv[2], cfg_json,
                                       False))
print(before, gc.get_freeze_count(), rows)
"""
    out = subprocess.run([sys.executable, "-c", code, str(corpus),
                          str(tiny_assets.parent / "tokenizer")], capture_output=True,
                         text=True, check=True).stdout.split()
    before, frozen, rows = map(int, out)
    assert rows == 300 + 1 + 1  # every line, the cut-short one and the duplicate included
    assert before == 0 and frozen > 50_000, (before, frozen)
