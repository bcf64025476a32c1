"""Load a Hugging Face causal LM the way the config asks: full, LoRA or QLoRA."""

from __future__ import annotations

from typing import Any

from elastic_ft.config import RunConfig

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def tokenizer_path(cfg: RunConfig) -> str:
    return cfg.model.tokenizer or cfg.model.name_or_path


def load_model(cfg: RunConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": cfg.model.attn_implementation,
    }
    if cfg.method.kind == "qlora":
        if not torch.cuda.is_available():
            raise RuntimeError("method.kind qlora needs a CUDA GPU (4-bit bitsandbytes kernels)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    elif cfg.method.kind == "lora" and cfg.train.precision != "fp32":
        # A frozen base needs no fp32 master copy: keep it in the training precision.
        kwargs["dtype"] = getattr(torch, PRECISION_DTYPE[cfg.train.precision])
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method.kind in ("lora", "qlora"):
        model = apply_lora(model, cfg)
    # from_pretrained returns eval mode, where Hugging Face silently skips gradient
    # checkpointing and dropout; every caller of load_model trains.
    model.train()
    return model


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method.kind == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    lora = cfg.method.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
