from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_ft.config import ConfigError, load_config
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "tiny-lora-cpu.yaml"


def test_demo_config_loads() -> None:
    cfg = load_config(DEMO)
    assert cfg.method.kind == "lora" and cfg.deepspeed.zero_stage == 2
    assert cfg.workers.min == 2


def test_unknown_key_names_field_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, {"train.max_stepz": 3})
    assert "train.max_stepz: unknown key" in str(err.value)
    assert "max_steps" in str(err.value)


def test_bad_value_names_field_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, {"deepspeed.zero_stage": 4, "workers.min": 3})
    text = str(err.value)
    assert "deepspeed.zero_stage" in text and "0, 1, 2 or 3" in text
    assert "workers" in text and "min (3) must be <= max (2)" in text


def test_lomo_needs_full_fine_tuning_without_deepspeed() -> None:
    with pytest.raises(ConfigError, match="optim.name lomo is full fine-tuning"):
        load_config(DEMO, {"optim.name": "lomo"})  # the demo is LoRA
    with pytest.raises(ConfigError, match="set deepspeed.zero_stage: 0 and no offload"):
        load_config(DEMO, {"optim.name": "lomo", "method.kind": "full"})  # ZeRO-2
    cfg = load_config(DEMO, {"optim.name": "lomo", "method.kind": "full",
                             "deepspeed.zero_stage": 0})
    assert cfg.optim.name == "lomo"


def test_qlora_with_zero_3_is_refused_by_the_config_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="qlora cannot be sharded with zero_stage 3.*set "
                                          "deepspeed.zero_stage: 2"):
        load_config(DEMO, {"method.kind": "qlora", "deepspeed.zero_stage": 3})
    assert load_config(DEMO, {"method.kind": "qlora"}).deepspeed.zero_stage == 2


def test_cli_rejects_bad_config_before_ray_starts(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("zero_stage: 2", "zero_stage: 7"))
    done = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "train", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "deepspeed.zero_stage" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def test_secrets_never_reach_saved_config() -> None:
    from elastic_ft.events import redact

    assert redact({"hf_token": "abc", "nested": {"api_key": "x", "ok": 1}}) == {
        "hf_token": "<redacted>", "nested": {"api_key": "<redacted>", "ok": 1}}
    uri = "s3://AKIAXYZ:s3cr3t@bucket/runs?region=us-east-1"
    assert redact({"storage_path": uri}) == {
        "storage_path": "s3://<redacted>@bucket/runs?region=us-east-1"}
    assert redact({"storage_path": "s3://bucket/runs"}) == {"storage_path": "s3://bucket/runs"}


@pytest.mark.parametrize("key", ["HF_TOKEN", "hf_token", "token", "WANDB_API_KEY", "apikey",
                                 "aws_secret_access_key", "password", "db.credentials"])
def test_secret_keys_are_redacted(key: str) -> None:
    from elastic_ft.events import redact, redact_text

    assert redact({key: "abc"}) == {key: "<redacted>"}
    assert redact_text(f"{key}=abc and more") == f"{key}=<redacted> and more"


@pytest.mark.parametrize("key", ["tokenizer", "pad_token_id", "max_new_tokens", "tokens_per_s",
                                 "trained_real_tokens", "n_tokens", "key", "monkey"])
def test_settings_that_mention_tokens_are_kept(key: str) -> None:
    from elastic_ft.events import redact, redact_text

    assert redact({key: "assets/tiny/tokenizer"}) == {key: "assets/tiny/tokenizer"}
    assert redact_text(f"{key}: 12") == f"{key}: 12"


def test_token_shaped_values_are_redacted_under_any_key() -> None:
    from elastic_ft.events import redact

    hf = "hf_" + "a1B2" * 8
    assert redact({"note": f"use {hf} here", "commit": "0" * 40}) == {
        "note": "use <redacted> here", "commit": "0" * 40}
