"""Export: the LoRA adapter in peft format and a merged Hugging Face model."""

from __future__ import annotations

import shutil
from pathlib import Path

from elastic_ft.config import RunConfig
from elastic_ft.core.model import tokenizer_path


def export_outputs(cfg: RunConfig) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cfg.output_dir)
    final = out / "final"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: train the run to the end first")
    merged = out / "merged"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(cfg),
                                              trust_remote_code=cfg.model.trust_remote_code)
    paths = {"merged": str(merged)}
    if cfg.method.kind in ("lora", "qlora"):
        from peft import PeftModel

        adapter = out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(final, adapter)
        base = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        paths["adapter"] = str(adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(final))
    model.save_pretrained(str(merged), safe_serialization=True)
    tokenizer.save_pretrained(str(merged))
    return paths
