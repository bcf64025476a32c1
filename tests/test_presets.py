"""Every preset in configs/examples/ against its real architecture: a `config.json` written
here from the model's published hyper-parameters (no weights), through `plan`: the preset's
own method, ZeRO stage, checkpointing and offload fit the hardware its comment names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from elastic_ft.core.planner import parse_inventory, plan_table
from tests.conftest import ROOT

# published config.json values (Hugging Face model cards of each model)
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
         "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": False, "hidden_act": "silu"}
ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(LLAMA, hidden_size=4096, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8,
                                             intermediate_size=14336),
    "meta-llama/Llama-3.1-70B-Instruct": dict(LLAMA, hidden_size=8192, num_hidden_layers=80,
                                              num_attention_heads=64, num_key_value_heads=8,
                                              intermediate_size=28672),
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32768,
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
        "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-14B-Instruct": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
        "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
        "num_key_value_heads": 8, "intermediate_size": 13824, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": False},
}
PRESETS = sorted((ROOT / "configs" / "examples").glob("*.yaml"))
PARAMS_B = {"meta-llama/Llama-3.1-8B-Instruct": 8.0, "meta-llama/Llama-3.1-70B-Instruct": 70.6,
            "mistralai/Mistral-7B-Instruct-v0.3": 7.2, "Qwen/Qwen2.5-7B-Instruct": 7.6,
            "Qwen/Qwen2.5-14B-Instruct": 14.8}


def test_the_presets_cover_what_people_run() -> None:
    names = {p.stem for p in PRESETS}
    assert {"llama3.1-8b-lora-8gpu", "llama3.1-8b-lora-spot", "llama3.1-70b-qlora",
            "mistral-7b-lora", "qwen2.5-7b-lora", "qwen2.5-14b-full-zero3"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_fits_the_hardware_its_comment_names(preset: Path, tmp_path) -> None:
    text = preset.read_text()
    hardware = re.search(r"^# hardware: (\S+)$", text, re.MULTILINE).group(1)
    hub_name = re.search(r"name_or_path: (\S+)", text).group(1)
    folder = tmp_path / "arch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ARCHITECTURES[hub_name]))
    cfg = load_config(preset, {"model.name_or_path": str(folder)})
    devices = parse_inventory(hardware)
    assert sum(d.count for d in devices) >= cfg.workers.min
    table = plan_table(cfg, devices)
    # the architecture is the real one: its parameter count is the published size
    assert table["parameters"] / 1e9 == pytest.approx(PARAMS_B[hub_name], rel=0.03)
    mine = (cfg.method.kind, cfg.deepspeed.zero_stage, cfg.model.gradient_checkpointing,
            cfg.deepspeed.offload_optimizer)
    row = next(r for r in table["rows"] if (r["method"], r["zero_stage"],
                                            r["gradient_checkpointing"], r["offload"]) == mine)
    assert row["fits"], (preset.name, row["per_worker_bytes_mb1"] / 2**30)
    # and the preset is not trivially loose: the same run without any memory saving (full,
    # ZeRO-0, no checkpointing) would not fit those GPUs
    naive = next(r for r in table["rows"] if (r["method"], r["zero_stage"],
                                              r["gradient_checkpointing"], r["offload"]) == (
        "full", 0, False, False))
    assert not naive["fits"]
