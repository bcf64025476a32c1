from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _config(model: Path, method: str, checkpointing: bool):
    from elastic_ft.config import load_config

    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(model), "method.kind": method,
        "model.gradient_checkpointing": checkpointing})


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loaded_model_trains_and_checkpoints_when_asked(tiny_assets, method, checkpointing) -> None:
    """from_pretrained hands back eval mode, where Hugging Face skips gradient checkpointing
    without a word: a checkpointed decoder layer must run its forward again in the backward."""
    import torch

    from elastic_ft.core.model import load_model

    model = load_model(_config(tiny_assets, method, checkpointing))
    assert model.training
    layer = model.get_base_model().model.layers[0] if method == "lora" else model.model.layers[0]
    calls = []
    # The layer's first submodule: the layer's own hooks sit outside the checkpointed forward,
    # and the recompute stops early once the tensors the backward needs are back.
    layer.input_layernorm.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == (2 if checkpointing else 1)
