"""Export where the memory is (issue 22): the merge runs in a Ray task, never in the driver.

A ~70M-parameter Llama (280 MB in fp32) with a LoRA adapter whose B matrices are not zero, so
the merge changes the weights. The driver's resident memory is sampled every 10 ms through the
export: the task's way must leave it near its idle level, and the same export done in the
driver's own process (the old way, run after it as the control) must not.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from tests.conftest import ROOT

pytestmark = pytest.mark.ray


_MAKE = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from elastic_ft.core.tiny_assets import make_tiny_assets
info = make_tiny_assets(sys.argv[1], hidden_size=512, num_layers=8, model_vocab_size=32000)
model = AutoModelForCausalLM.from_pretrained(info["model"])
peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
with torch.no_grad():
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.02)
peft_model.save_pretrained(sys.argv[1] + "/run/final")
print(info["parameters"])
"""


@pytest.fixture(scope="module")
def medium_run(tmp_path_factory) -> tuple[Path, int]:
    """A model of ~60M parameters and a run dir whose final/ holds a non-zero LoRA adapter,
    made in a child process: this one (the driver) must never have held the model."""
    import subprocess
    import sys

    assets = tmp_path_factory.mktemp("medium")
    done = subprocess.run([sys.executable, "-c", _MAKE, str(assets)], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    return assets / "model", int(done.stdout.strip().splitlines()[-1])


def _cfg(model: Path, out: Path, **overrides):
    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(model), "output_dir": str(out), **overrides})


def _peak_rss_during(fn) -> tuple[int, object]:
    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()
    base = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return peak[0] - base, result


def test_the_merge_runs_in_a_task_and_the_driver_stays_at_its_idle_memory(
        medium_run, ray_local) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    from elastic_ft.core.export import export_on_cluster, export_outputs, merge_bytes

    model, params = medium_run
    cfg = _cfg(model, model.parent / "run")
    model_bytes = 4 * params
    assert merge_bytes(cfg) >= model_bytes  # the task asks Ray for the whole model's memory
    grown, paths = _peak_rss_during(lambda: export_on_cluster(cfg))
    assert paths["node_id"] and Path(paths["merged"], "model.safetensors").exists()
    merged = load_file(str(Path(paths["merged"]) / "model.safetensors"))
    base = load_file(str(model / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(merged[name], base[name])  # the adapter went into the weights
    np.testing.assert_array_equal(merged["model.layers.0.mlp.up_proj.weight"],
                                  base["model.layers.0.mlp.up_proj.weight"])
    assert grown < model_bytes / 4, (grown, model_bytes)
    # the control: the same export in this process holds the whole model here
    grown_here, _ = _peak_rss_during(lambda: export_outputs(cfg))
    assert grown_here > model_bytes / 2, (grown_here, model_bytes)


def test_merge_false_keeps_the_adapter_only_and_a_missing_final_says_why(
        medium_run, ray_local, tmp_path) -> None:
    from elastic_ft.core.export import export_on_cluster

    model, _ = medium_run
    out = tmp_path / "adapter_only"
    (out / "final").parent.mkdir(parents=True)
    import shutil

    shutil.copytree(model.parent / "run" / "final", out / "final")
    paths = export_on_cluster(_cfg(model, out, **{"export.merge": False}))
    assert Path(paths["adapter"], "adapter_model.safetensors").exists()
    assert "merged" not in paths and not (out / "merged").exists()
    with pytest.raises(FileNotFoundError, match="train the run to the end first"):
        export_on_cluster(_cfg(model, tmp_path / "never_trained"))
