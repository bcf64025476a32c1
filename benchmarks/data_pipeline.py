"""Data pipeline throughput: elastic_ft (Ray Data) against `datasets.map`, same file, one run.

Both sides tokenise the same rows with the same template and tokenizer. elastic_ft's figure is
the whole `prepare_data`: read, detect, normalise, validate, tokenise, dedup, pack, write
blocks, quarantine and report; `datasets.map` only normalises and tokenises. A second
`datasets.map` side freezes each worker's heap (`gc.freeze`) as our read tasks do, so the
ratio shows what that one setting is worth. Also reported: the trainer's time waiting for
data as a share of step time, from a short real training run.

    python benchmarks/data_pipeline.py [--rows 100000] [--repeats 3] [--name NAME]
Writes benchmarks/results/<hardware>/NAME.json (default data_pipeline), with the driver's
peak resident memory during each `prepare` (the row count's effect on it: --rows 100000 and
--rows 1000000).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
# DataConfig's default: the tokenizer's chat template when it has one (the tiny one does), as
# `prepare` renders the rows; both sides render and tokenise the same text
TEMPLATE = "auto"


def make_corpus(path: Path, rows: int) -> None:
    base = [json.loads(x) for x in (ROOT / "data" / "sample" / "alpaca.jsonl").read_text()
            .splitlines()]
    with open(path, "w") as f:
        for i in range(rows):
            row = dict(base[i % len(base)])
            row["input"] = f"{row.get('input', '')} #{i}"  # unique: nothing deduplicated
            f.write(json.dumps(row) + "\n")


class PeakRss:
    """The driver's resident memory at its highest while the block runs (sampled every 20 ms),
    and before it."""

    def __enter__(self) -> PeakRss:
        import psutil

        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def time_elastic_ft(corpus: Path, tokenizer: Path, work: Path, engine: str
                    ) -> tuple[float, PeakRss]:
    from elastic_ft.config import DataConfig
    from elastic_ft.data.pipeline import prepare_data

    out = work / f"eft-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        prepare_data(DataConfig(paths=[str(corpus)], seq_len=128), str(tokenizer), out,
                     engine=engine)
        seconds = time.perf_counter() - t0
    return seconds, rss


def time_datasets_map(corpus: Path, tokenizer_path: Path, work: Path, num_proc: int,
                      gc_frozen: bool = False) -> float:
    """`gc_frozen`: each worker also freezes its heap on its first batch with elastic_ft's
    read tasks' own `row_tasks.settle_data_worker`: what a user of `datasets.map` could add
    by hand, measured so the ratio is not read as more than it is."""
    import datasets

    from elastic_ft.data.formats import normalise
    from elastic_ft.data.row_tasks import TASK_RUNTIME_ENV, settle_data_worker
    from elastic_ft.data.tokenize import load_tokenizer, tokenize_rows

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(str(tokenizer_path))

    def tokenise(batch: dict) -> dict:
        if gc_frozen:  # once per process (cached); not `gc.get_freeze_count()`, which walks
            settle_data_worker(str(tokenizer_path), False)  # every frozen object per call
        rows = [normalise(dict(zip(batch, values, strict=True)), "alpaca")
                for values in zip(*batch.values(), strict=True)]
        pairs = tokenize_rows(rows, tokenizer, "completion", TEMPLATE)  # as prepare does
        return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}

    # in the environment elastic_ft's read tasks get: one process per core, without the fast
    # tokenizer's own thread pool in each
    with patch.dict(os.environ, TASK_RUNTIME_ENV["env_vars"]):
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(corpus), split="train",
                                   cache_dir=str(work / "hf-cache"))
        ds.map(tokenise, batched=True, batch_size=1000, remove_columns=ds.column_names,
               num_proc=num_proc if num_proc > 1 else None)
        return time.perf_counter() - t0


def data_wait_share(tiny_model: Path, work: Path) -> dict:
    from elastic_ft.config import load_config
    from elastic_ft.core.trainer import run_training

    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tiny_model), "output_dir": str(work / "train"),
        "train.max_steps": 40, "checkpoint.every_steps": 40})
    summary = run_training(cfg, export=False)
    return {"data_wait_share": summary["data_wait_share"], "steps": summary["steps"],
            "median_step_s": summary["median_step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="data_pipeline", help="results file name")
    parser.add_argument("--ray-only", action="store_true",
                        help="only elastic_ft's Ray Data prepare (its memory at 1M rows)")
    parser.add_argument("--parallel-only", action="store_true",
                        help="skip the one-process sides (the local engine, datasets.map "
                             "with one process): the headline ratio alone")
    parser.add_argument("--no-training", action="store_true",
                        help="skip the data-wait share of a short training run")
    args = parser.parse_args()
    import ray

    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.bench.report import save_benchmark
    from elastic_ft.core.tiny_assets import make_tiny_assets

    work = Path(tempfile.mkdtemp(prefix="eft_databench_"))
    make_tiny_assets(work / "assets")
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.rows)
    cores = os.cpu_count() or 1
    from elastic_ft.core.trainer import ensure_ray

    ensure_ray()  # as `elastic-ft prepare/train` start it: one logical CPU per core
    ray.data.DataContext.get_current().enable_progress_bars = False
    times: dict[str, list[float]] = {"elastic_ft_ray": [], "elastic_ft_local": [],
                                     "datasets_map": [], "datasets_map_gc_frozen": [],
                                     "datasets_map_1proc": []}
    rss: dict[str, list[dict[str, int]]] = {"elastic_ft_ray": [], "elastic_ft_local": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every side alike
        for engine in ("ray", "local")[:1 if args.ray_only or args.parallel_only else 2]:
            seconds, peak = time_elastic_ft(corpus, work / "assets" / "tokenizer", work, engine)
            times[f"elastic_ft_{engine}"].append(seconds)
            rss[f"elastic_ft_{engine}"].append({"before_bytes": peak.before,
                                                "peak_bytes": peak.peak})
        if args.ray_only:
            continue
        times["datasets_map"].append(time_datasets_map(corpus, work / "assets" / "tokenizer",
                                                       work, cores))
        times["datasets_map_gc_frozen"].append(time_datasets_map(
            corpus, work / "assets" / "tokenizer", work, cores, gc_frozen=True))
        if not args.parallel_only:
            times["datasets_map_1proc"].append(time_datasets_map(
                corpus, work / "assets" / "tokenizer", work, 1))
    times = {k: v for k, v in times.items() if v}
    rss = {k: v for k, v in rss.items() if v}
    rows_per_s = {k: args.rows / statistics.median(v) for k, v in times.items()}

    def ratio(ours: str, theirs: str) -> float | None:
        return rows_per_s[ours] / rows_per_s[theirs] if theirs in rows_per_s else None

    wait = None if args.no_training else data_wait_share(work / "assets" / "model", work)
    ray_cpus = ray.cluster_resources().get("CPU")
    ray.shutdown()
    hardware = hardware_record()
    result = {
        "benchmark": args.name, "rows": args.rows, "repeats": args.repeats,
        "hardware": hardware, "seconds": times, "median_rows_per_s": rows_per_s,
        "template": TEMPLATE, "ray_logical_cpus": ray_cpus,
        "ratio_ray_vs_datasets_map": ratio("elastic_ft_ray", "datasets_map"),
        "ratio_ray_vs_datasets_map_gc_frozen": ratio("elastic_ft_ray", "datasets_map_gc_frozen"),
        "ratio_local_vs_datasets_map_1proc": ratio("elastic_ft_local", "datasets_map_1proc"),
        "training": wait,
        "driver_rss": rss,
        "driver_peak_rss_mib": {k: round(statistics.median(r["peak_bytes"] for r in v) / 2**20)
                                for k, v in rss.items()},
        "note": "elastic_ft includes validation, dedup, packing and writing; datasets.map "
                "only normalises and tokenises",
    }
    save_benchmark(result, {k: result[k] for k in (
        "median_rows_per_s", "ratio_ray_vs_datasets_map", "ratio_ray_vs_datasets_map_gc_frozen",
        "ratio_local_vs_datasets_map_1proc",
        "driver_peak_rss_mib", "training")})


if __name__ == "__main__":
    main()
