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
def test_bench_matrix_with_lomo_end_to_end(tmp_path, tiny_assets, ray_local) -> None:
    from elastic_ft.cli import main

    out = tmp_path / "matrix"
    done = CliRunner().invoke(main, [
        "bench", "matrix", str(ROOT / "configs" / "tiny-lora-cpu.yaml"), "--methods", "full",
        "--zero", "2", "--ckpt", "off", "--attn", "sdpa", "--steps", "3", "--out", str(out),
        "--set", f"model.name_or_path={tiny_assets}", "--set", f"output_dir={tmp_path / 'o'}"])
    assert done.exit_code == 0, done.output + repr(done.exception)
    result = json.loads((out / "matrix.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["full", "lomo"]
    for row in result["rows"]:
        assert "error" not in row and row["peak_mem_bytes"] > 0 and row["median_step_s"] > 0
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lomo | - | off | sdpa | 1 |" in (out / "matrix.md").read_text()


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
    assert set(result["tokens_per_s"]) == {"elastic_ft", "plain_deepspeed", "hf_trainer"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert result["elastic_ft_vs_plain"] > 0 and "| hf_trainer |" in done.output
