from __future__ import annotations

import pytest

from elastic_ft.core.checkpoint import CheckpointError, check_resumable

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 1000}


def test_same_model_and_method_resume() -> None:
    check_resumable({"method": "lora", "model": dict(TINY)}, "lora", dict(TINY), "ckpt")
    check_resumable({"method": "lora"}, "lora", dict(TINY), "ckpt")  # written before the field


def test_another_models_checkpoint_is_named_not_loaded() -> None:
    other = dict(TINY, hidden_size=512, vocab_size=32000)
    with pytest.raises(CheckpointError) as error:
        check_resumable({"method": "lora", "model": dict(TINY)}, "lora", other, "runs/x/ckpt")
    message = str(error.value)
    assert "runs/x/ckpt" in message and "another model" in message
    assert "'hidden_size': (64, 512)" in message and "'vocab_size': (1000, 32000)" in message
    assert "num_hidden_layers" not in message  # only what differs


def test_another_methods_checkpoint_is_named_not_loaded() -> None:
    with pytest.raises(CheckpointError, match="checkpoint is a full run, the config asks for lora"):
        check_resumable({"method": "full", "model": dict(TINY)}, "lora", dict(TINY), "c")
