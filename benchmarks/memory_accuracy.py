"""Predicted vs measured peak memory per training step (issue: performance optimizer).

Measures one worker (ZeRO stage 0 == any stage at world size 1) for a Llama of a few hundred
million parameters: full and LoRA, checkpointing on/off, several micro-batches. On GPU the
measure is `torch.cuda.max_memory_allocated` of two full steps (bf16 weights for LoRA's frozen
base; fp32 master weights + bf16 autocast for full, which is 16 bytes/param like mixed Adam).
Writes benchmarks/results/<hardware>/memory_accuracy.json.

    python benchmarks/memory_accuracy.py [--hidden 1024 --layers 16 --seq 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from elastic_ft.core.memory import estimate_memory, shape_from_config  # noqa: E402


def measure(model, micro_batch: int, seq: int, full: bool) -> int | None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=full):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError:
        return None
    finally:
        del opt
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", default="1,2,4")
    args = ap.parse_args()
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    results = []
    for method in ("lora", "full"):
        for ckpt in (False, True):
            torch.manual_seed(0)
            dtype = torch.float32 if method == "full" else torch.bfloat16
            model = LlamaForCausalLM(config).to(device="cuda", dtype=dtype)
            if ckpt:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            if method == "lora":
                from peft import LoraConfig, get_peft_model

                if ckpt:
                    model.enable_input_require_grads()
                model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
            shape = shape_from_config(config, 8 if method == "lora" else 0, ("q_proj", "v_proj"))
            for m in [int(x) for x in args.micro.split(",")]:
                measured = measure(model, m, args.seq, full=method == "full")
                est = estimate_memory(shape, method, 0, 1, m, args.seq, "bf16", ckpt)
                err = None if measured is None else (est.total_bytes - measured) / measured
                results.append({"method": method, "checkpointing": ckpt, "micro_batch": m,
                                "seq_len": args.seq, "predicted_bytes": est.total_bytes,
                                "measured_bytes": measured, "error": err,
                                "parts": est.to_dict()})
                print(json.dumps({k: results[-1][k] for k in (
                    "method", "checkpointing", "micro_batch", "predicted_bytes",
                    "measured_bytes", "error")}), flush=True)
            del model
            torch.cuda.empty_cache()
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
    out = Path(__file__).parent / "results" / tag
    out.mkdir(parents=True, exist_ok=True)
    errors = [abs(r["error"]) for r in results if r["error"] is not None]
    doc = {"params": shape.total_params, "hardware": tag, "python": platform.python_version(),
           "torch": torch.__version__, "results": results,
           "median_abs_error": sorted(errors)[len(errors) // 2] if errors else None,
           "max_abs_error": max(errors) if errors else None}
    (out / "memory_accuracy.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: doc[k] for k in ("params", "median_abs_error", "max_abs_error")}))
    import os

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory_accuracy.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
