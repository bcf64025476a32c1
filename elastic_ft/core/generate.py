"""Try a fine-tuned model: `elastic-ft generate RUN_DIR_OR_MODEL --prompt ...`.

A run's output dir gives `merged/` (a full Hugging Face model), or else the base model named
in its `config.yaml` plus `adapter/` (peft). The prompt is rendered the way that run rendered
a user turn in training (`data.template`); a bare model dir as `auto` does: its
tokenizer's chat template when it has one, else the default layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    template: str  # "auto", "chat_template" or "default" (data.template)

    def complete(self, prompt: str, max_new_tokens: int) -> str:
        import torch

        from elastic_ft.data.tokenize import render_prompt

        ids = torch.tensor([render_prompt(prompt, self.tokenizer, self.template)])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load_for_generation(path: Path) -> Generator:
    from transformers import AutoModelForCausalLM

    from elastic_ft.data.tokenize import load_tokenizer

    run_config = path / "config.yaml"
    if not run_config.exists():  # a model dir
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: neither a run's output dir (config.yaml) nor a "
                                    "Hugging Face model dir (config.json)")
        return Generator(AutoModelForCausalLM.from_pretrained(path).eval(),
                         load_tokenizer(str(path)), "auto")
    cfg = yaml.safe_load(run_config.read_text())
    template = cfg["data"].get("template", "auto")
    trust = bool(cfg["model"].get("trust_remote_code", False))
    if (path / "merged" / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path / "merged", trust_remote_code=trust)
        return Generator(model.eval(), load_tokenizer(str(path / "merged"), trust), template)
    adapter = next((path / d for d in ("adapter", "final")
                    if (path / d / "adapter_config.json").exists()), None)
    if adapter is None:
        raise FileNotFoundError(f"{path}: no merged/ or adapter/ yet; finish the run, or "
                                "`elastic-ft export CONFIG`")
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"],
                                                trust_remote_code=trust)
    tokenizer = load_tokenizer(cfg["model"].get("tokenizer") or cfg["model"]["name_or_path"],
                               trust)
    return Generator(PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer, template)
