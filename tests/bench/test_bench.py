from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from elastic_ft.bench.flops import flops_per_token, measure_matmul_peak, mfu
from elastic_ft.bench.scaling import add_efficiency
from elastic_ft.core.memory import ModelShape
from tests.conftest import ROOT


def test_mfu_arithmetic_by_hand() -> None:
    shape = ModelShape(total_params=10_000, largest_layer_params=1_000, hidden=10,
                       intermediate=20, layers=2, heads=2, kv_heads=2, vocab=100,
                       lora_params=100)
    # non-embedding 10_000 - 100*10 = 9_000; attention fwd 2*2*2 layers*8 seq*10 = 640, x3
    assert flops_per_token(shape, 8, "full") == 6 * 9_000 + 3 * 640 == 55_920
    assert flops_per_token(shape, 8, "lora") == 4 * 9_000 + 6 * 100 + 3 * 640 == 38_520
    # 1000 tokens/s on 2 devices of 1 GFLOP/s each
    assert mfu(1000, 55_920, 1e9, 2) == pytest.approx(0.02796)


def test_efficiency_against_one_worker() -> None:
    rows = [{"mode": "strong", "workers": 1, "tokens_per_s": 100.0},
            {"mode": "strong", "workers": 2, "tokens_per_s": 150.0},
            {"mode": "weak", "workers": 1, "tokens_per_s": 100.0},
            {"mode": "weak", "workers": 4, "tokens_per_s": 360.0}]
    add_efficiency(rows)
    assert [r["efficiency"] for r in rows] == [1.0, 0.75, 1.0, 0.9]


def test_overhead_rates_by_hand(tmp_path) -> None:
    """100 tokens a step, 1 s a step, but step 4 stalls 5 s: the span rate drops, the median
    of the steps' rates does not; warm-up steps 1-2 are left out of both."""
    from elastic_ft.bench.overhead import _throughput, summarise_rounds

    times = [0.0, 10.0, 11.0, 12.0, 17.0, 18.0, 19.0]  # steps 1..7 end at these times
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps({"step": i + 1, "t": t, "trainable_tokens": 100})
                               + "\n" for i, t in enumerate(times)))
    rates = _throughput(metrics, warmup_steps=2)
    assert rates == {"span": pytest.approx(500 / 9), "median_step": pytest.approx(100.0),
                     "step_s": pytest.approx(1.0)}
    rounds = [{"elastic_ft": {"span": 90.0, "median_step": 97.0, "step_s": 1.03},
               "plain_deepspeed": {"span": 100.0, "median_step": 100.0, "step_s": 1.0},
               "hf_trainer": {"span": 30.0, "median_step": 50.0, "step_s": 2.0}},
              {"elastic_ft": {"span": 99.0, "median_step": 99.0, "step_s": 1.01},
               "plain_deepspeed": {"span": 100.0, "median_step": 100.0, "step_s": 1.0},
               "hf_trainer": {"span": 30.0, "median_step": 33.0, "step_s": 3.0}}]
    summary = summarise_rounds(rounds)
    assert summary["elastic_ft_vs_plain"] == pytest.approx(0.98)
    assert summary["elastic_ft_vs_plain_range"] == pytest.approx([0.97, 0.99])
    assert summary["ratios"]["span"]["plain_deepspeed"] == pytest.approx(0.945)
    assert summary["elastic_ft_vs_hf_trainer"] == pytest.approx((97 / 50 + 99 / 33) / 2)
    assert summary["extra_s_per_step"] == pytest.approx(0.02)
    assert summary["step_s"] == pytest.approx(
        {"elastic_ft": 1.02, "plain_deepspeed": 1.0, "hf_trainer": 2.5})


def test_matmul_peak_is_measured_and_says_so() -> None:
    peak = measure_matmul_peak(128, repeats=3)
    assert peak.flops_per_s > 1e6 and peak.source.startswith("measured:")


@pytest.mark.ray
def test_bench_scaling_and_compare_end_to_end(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.cli import main

    out = tmp_path / "results"
    runner = CliRunner()
    done = runner.invoke(main, [
        "bench", "scaling", str(ROOT / "configs" / "tiny-lora-cpu.yaml"), "--workers", "1,2",
        "--steps", "4", "--warmup-steps", "1", "--out", str(out), "--mode", "weak",
        "--set", f"model.name_or_path={tiny_assets}", "--set", f"output_dir={tmp_path / 'o'}"])
    assert done.exit_code == 0, done.output + repr(done.exception)
    result = json.loads((out / "scaling.json").read_text())
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "| weak | 2 |" in (out / "scaling.md").read_text()
    # strong mode runs the same trial with a fixed global batch (the demo run in the README)
    assert {(r["mode"], r["workers"]) for r in result["rows"]} == {("weak", 1), ("weak", 2)}
    weak2 = next(r for r in result["rows"] if r["mode"] == "weak" and r["workers"] == 2)
    assert weak2["global_batch"] == 16  # weak scaling doubles the global batch
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["efficiency"] > 0
    assert result["peak_source"].startswith("measured:")
    assert result["hardware"]["cpu_cores"] >= 1 and result["hardware"]["commit"]

    second = tmp_path / "other.json"
    other = dict(result, hardware=dict(result["hardware"], cpu_cores=64))
    second.write_text(json.dumps(other))
    compared = runner.invoke(main, ["bench", "compare", str(out / "scaling.json"),
                                    str(second), "--png", str(tmp_path / "cmp.png")])
    assert compared.exit_code == 0, compared.output
    assert "cpu-64core" in compared.output and (tmp_path / "cmp.png").exists()


@pytest.mark.ray
def test_bench_matrix_with_lomo_end_to_end(tmp_path, ray_local) -> None:
    """LOMO is a `train` row beside full AdamW at ZeRO-0, on a model (3.7M parameters) whose
    gradients and Adam moments (12 bytes each in fp32: 44 MB) stand above a CPU's RSS noise.
    Measured once: 310 MB full AdamW, 238 MB LOMO per worker."""
    from elastic_ft.cli import main
    from elastic_ft.core.tiny_assets import make_tiny_assets

    make_tiny_assets(tmp_path / "assets", hidden_size=256, num_layers=4)
    model = tmp_path / "assets" / "model"
    out = tmp_path / "matrix"
    done = CliRunner().invoke(main, [
        "bench", "matrix", str(ROOT / "configs" / "tiny-lora-cpu.yaml"), "--methods", "full",
        "--zero", "0", "--ckpt", "off", "--attn", "sdpa", "--steps", "3", "--out", str(out),
        "--set", f"model.name_or_path={model}", "--set", f"output_dir={tmp_path / 'o'}"])
    assert done.exit_code == 0, done.output + repr(done.exception)
    result = json.loads((out / "matrix.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["full", "lomo"]
    for row in result["rows"]:
        assert "error" not in row and row["peak_mem_bytes"] > 0 and row["median_step_s"] > 0
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lomo | 0 | off | sdpa | 2 |" in (out / "matrix.md").read_text()
    full, lomo = result["rows"]  # both `train` under Ray Train at 2 workers
    states_bytes = 12 * 3_676_416  # what LOMO does not hold: fp32 gradients and Adam moments
    assert full["peak_mem_bytes"] - lomo["peak_mem_bytes"] > states_bytes / 2, result["rows"]


@pytest.mark.ray
def test_bench_overhead_end_to_end(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.cli import main

    out = tmp_path / "overhead"
    done = CliRunner().invoke(main, [
        "bench", "overhead", str(ROOT / "configs" / "tiny-lora-cpu.yaml"), "--steps", "8",
        "--warmup-steps", "2", "--out", str(out),
        "--set", f"model.name_or_path={tiny_assets}", "--set", f"output_dir={tmp_path / 'o'}"])
    assert done.exit_code == 0, done.output + repr(done.exception)
    result = json.loads((out / "overhead.json").read_text())
    for way in ("median_step", "span"):
        rates = result["tokens_per_s"][way]
        assert set(rates) == {"elastic_ft", "plain_deepspeed", "hf_trainer"}
        assert all(v > 0 for v in rates.values())
    low, high = result["elastic_ft_vs_plain_range"]
    assert 0 < low <= result["elastic_ft_vs_plain"] <= high and "| hf_trainer |" in done.output
