"""Model FLOPs per token, the hardware's peak, and MFU.

FLOPs per trained token (Kaplan et al. 2020; Chinchilla's accounting): each weight costs
2 FLOPs forward; backward costs 2 more for the activation gradient and 2 for the weight
gradient. So full fine-tuning is 6 x N (+ attention); LoRA skips the frozen weights' weight
gradients: 4 x N_frozen + 6 x N_trainable. Attention scores and values add
2 x 2 x layers x seq x hidden forward (causal halves it; we count the full square as the
PaLM paper's MFU does), x3 with backward. Gradient checkpointing's recomputation is not
counted: MFU measures useful model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from elastic_ft.core.memory import ModelShape

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
DATASHEET_PEAK_FLOPS = {
    "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12,
    "L4": 121e12, "A10G": 125e12, "L40S": 362e12, "RTX 4090": 165e12,
}


@dataclass(frozen=True)
class PeakFlops:
    flops_per_s: float
    source: str  # "datasheet: <name>" or "measured: <how>"


def flops_per_token(shape: ModelShape, seq_len: int, method: str) -> float:
    non_embedding = shape.total_params - shape.vocab * shape.hidden  # the input embedding
    attention_fwd = 2 * 2 * shape.layers * seq_len * shape.hidden
    if method == "full":
        dense = 6 * non_embedding
    else:  # lora / qlora: frozen base gets no weight gradient
        dense = 4 * non_embedding + 6 * shape.lora_params
    return float(dense + 3 * attention_fwd)


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops_per_s: float,
        devices: int) -> float:
    return tokens_per_s * flops_per_token_ / (peak_flops_per_s * devices)


def datasheet_peak(device_name: str) -> PeakFlops | None:
    # the longest name first: "L40S" must not be read as an "L4"
    for key, peak in sorted(DATASHEET_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in device_name.lower():
            return PeakFlops(peak, f"datasheet: {key} dense bf16")
    return None


def measure_matmul_peak(size: int = 1024, repeats: int = 10, device: str = "cpu",
                        dtype_name: str = "float32") -> PeakFlops:
    """Best of `repeats` square matmuls on this device: the achievable peak, measured."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return PeakFlops(2 * size**3 / best,
                     f"measured: best of {repeats} {size}x{size} {dtype_name} matmuls on {device}")
