"""Memory model: peak bytes per worker from `config.json` alone (meta-device shapes, no weights).

Model states follow the ZeRO paper (Rajbhandari et al. 2020): mixed-precision Adam keeps
2 (fp16 params) + 2 (fp16 grads) + K=12 (fp32 master, momentum, variance) bytes per parameter,
partitioned by stage over N workers. `fp32_grad_partition=True` adds the 4-byte fp32 gradient
partition DeepSpeed really allocates (its estimators count it). Activations follow Korthikanti
et al. 2022, written out for Llama blocks (GQA attention, SwiGLU MLP), plus the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    largest_layer_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    lora_params: int = 0


def shape_from_config(config: Any, lora_r: int = 0, lora_targets: tuple[str, ...] = ()) -> ModelShape:
    """Parameter counts by instantiating the architecture on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora = 0
    if lora_r:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in lora_targets:
                lora += lora_r * (module.in_features + module.out_features)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return ModelShape(total, largest, hidden, getattr(config, "intermediate_size", 4 * hidden),
                      config.num_hidden_layers, heads,
                      getattr(config, "num_key_value_heads", None) or heads, config.vocab_size, lora)


def reduce_bucket_elems(hidden: int) -> int:
    """DeepSpeed's gradient bucket, in elements, as the engine configures it.

    Hugging Face's "auto" value (hidden^2), at least 4M elements so that a small model is not
    reduced in hundreds of latency-bound collectives. DeepSpeed's own default, 5e8 elements, is
    a 1 GB bf16 buffer per worker whatever the model: for LoRA or a small model it can be most
    of the peak (+0.55 GiB measured on the H100 with a 268M model at micro-batch 1).
    """
    return max(hidden * hidden, 2**22)


@dataclass(frozen=True)
class EngineBuffers:
    """The DeepSpeed settings that decide buffer memory (elements), and the optimizer's path."""

    reduce_bucket: int
    max_live_params: int = 10**9  # stage3_max_live_parameters (DeepSpeed's default)
    foreach_step: bool = True  # torch's AdamW on CUDA: one temporary as large as its tensors

    @classmethod
    def for_shape(cls, shape: ModelShape, cuda: bool = True) -> EngineBuffers:
        return cls(reduce_bucket=reduce_bucket_elems(shape.hidden), foreach_step=cuda)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-worker bytes. The peak is the larger of two moments that never overlap: the
    backward's (activations and the gradient bucket) and the optimizer step's (fp32 gradients
    and Adam's temporaries)."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    overhead_bytes: int
    cpu_offload_bytes: int
    backward_bytes: int = 0
    step_bytes: int = 0

    @property
    def model_states_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return (self.model_states_bytes + self.overhead_bytes
                + max(self.activations_bytes, self.backward_bytes, self.step_bytes))

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), model_states_bytes=self.model_states_bytes,
                    total_bytes=self.total_bytes)


def zero_model_states(params: int, stage: int, world: int, mixed: bool = True,
                      fp32_grad_partition: bool = False) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per worker for full fine-tuning with Adam."""
    p_bytes, g_bytes = (2, 2) if mixed else (4, 4)
    k = (12 if mixed else 8) + (4 if fp32_grad_partition and mixed and stage >= 2 else 0)
    p, g, o = p_bytes * params, g_bytes * params, k * params
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    return p, g, o


def activation_parts(shape: ModelShape, micro_batch: int, seq_len: int, act_bytes: int,
                     checkpointing: bool, attn: str) -> tuple[int, int]:
    """(decoder layers, logits) bytes saved for the backward of one micro-batch."""
    sb = micro_batch * seq_len
    h, i = shape.hidden, shape.intermediate
    kv = h * shape.kv_heads // shape.heads
    attn_layer = act_bytes * sb * (h + h + (h + 2 * kv) + h + h)
    if attn == "eager":  # scores and softmax kept: the 5as/h term of Korthikanti et al.
        attn_layer += 2 * act_bytes * micro_batch * shape.heads * seq_len * seq_len
    mlp_layer = act_bytes * sb * (2 * h + 4 * i)
    norms = 4 * sb * h * 2  # RMSNorm upcasts to fp32
    per_layer = attn_layer + mlp_layer + norms
    logits = sb * shape.vocab * (act_bytes + 4 + 4)  # logits, fp32 upcast, its gradient
    layers = (shape.layers * act_bytes * sb * h + per_layer if checkpointing
              else shape.layers * per_layer)
    return layers, logits


def estimate_memory(shape: ModelShape, method: str, zero_stage: int, world: int,
                    micro_batch: int, seq_len: int, precision: str = "bf16",
                    checkpointing: bool = False, offload_optimizer: bool = False,
                    offload_params: bool = False, attn: str = "sdpa",
                    buffers: EngineBuffers | None = None) -> MemoryEstimate:
    """Per-worker device memory for one configuration (CPU bytes reported separately).

    Written from DeepSpeed 0.19's code paths and checked against allocation counts
    (`benchmarks/memory_accuracy.py`): below, T is the trainable parameters, /W a partition.
    - resident: 16-bit params (2T, /W at stage 3), 16-bit grads (2T; /W from stage 2), fp32
      master + Adam moments (12T, /W from stage 1); a LoRA base adds its frozen weights.
    - optimizer step: an fp32 copy of the gradients (4T/W), and Adam's temporaries: torch's
      AdamW on CUDA runs foreach (one fp32 temporary as large as all its tensors), on CPU
      tensor by tensor (two, as large as the largest). Stages 1-2 free the 16-bit gradients
      once they are copied; stage 0 (DeepSpeed's unfused 16-bit optimizer) keeps them.
    - gradient bucket (`reduce_bucket`, 16-bit): stage 3 allocates it at start-up; stages 1-2
      at the first gradient of the backward, when the logits' part of the activations is gone
      but every decoder layer's is still held (for LoRA, all but the last block's).
    - LOMO (`method="lomo"`): the weights in the training precision, one parameter's gradient
      and its fp32 copy, the activations; nothing else.
    - stage 3 at W > 1 keeps gathered parameters live from forward to backward (DeepSpeed's
      default reuse distance) up to `max_live_params`.
    """
    buffers = buffers or EngineBuffers.for_shape(shape)
    mixed = precision != "fp32"
    act = DTYPE_BYTES[precision]
    if method == "lomo":  # core/lomo.py: no DeepSpeed, no optimizer state, no master copy
        layers, logits = activation_parts(shape, micro_batch, seq_len, act, checkpointing, attn)
        # one gradient alive (the largest), its fp32 copy and, in 16-bit, an fp32 copy of
        # the weight it updates (in fp32: the norm pass's square instead)
        largest = shape.largest_layer_params
        return MemoryEstimate(
            params_bytes=int(act * shape.total_params),
            grads_bytes=int((act + 4 + (4 if mixed else 0)) * largest),
            optimizer_bytes=0, activations_bytes=layers + logits, overhead_bytes=0,
            cpu_offload_bytes=0, backward_bytes=0, step_bytes=0)
    if method == "full":
        trainable, frozen_bytes = shape.total_params, 0.0
        first_grad_layers = shape.layers
    else:
        trainable = shape.lora_params
        base_bytes = 0.55 if method == "qlora" else act  # nf4 + double-quant constants
        frozen_bytes = shape.total_params * base_bytes / (world if zero_stage == 3 else 1)
        first_grad_layers = shape.layers - 1
    p, g, o = zero_model_states(trainable, zero_stage, world, mixed)
    opt_tensors = trainable / world if zero_stage >= 1 else trainable
    fp32_grads = 4 * opt_tensors if (mixed or zero_stage >= 1) else 0.0
    largest = min(opt_tensors, shape.largest_layer_params) if zero_stage == 0 else opt_tensors
    adam_temps = 4 * opt_tensors if buffers.foreach_step else 8 * largest
    step = fp32_grads + adam_temps - (g if zero_stage in (1, 2) else 0.0)
    cpu = 0.0
    if offload_optimizer:
        cpu += o + fp32_grads
        o, step = 0.0, 0.0
    if offload_params:
        cpu += p + frozen_bytes
        p, frozen_bytes = 0.0, 0.0
    layers, logits = activation_parts(shape, micro_batch, seq_len, act, checkpointing, attn)
    bucket = buffers.reduce_bucket * (act if mixed else 4) if zero_stage >= 1 else 0
    overhead = 0.0
    backward = 0.0
    if zero_stage == 3:
        gathered = min(shape.total_params, buffers.max_live_params) * act * (1 - 1 / world)
        overhead = bucket + gathered + 2 * shape.largest_layer_params * act  # + prefetch
    elif zero_stage in (1, 2):
        held = layers * first_grad_layers / shape.layers
        logits_grad = shape.vocab * micro_batch * seq_len * act if method == "full" else 0
        backward = bucket + held + logits_grad
    return MemoryEstimate(
        params_bytes=int(p + frozen_bytes), grads_bytes=int(g), optimizer_bytes=int(o),
        activations_bytes=layers + logits, overhead_bytes=int(overhead),
        cpu_offload_bytes=int(cpu), backward_bytes=int(backward), step_bytes=int(step))


def max_micro_batch(shape: ModelShape, budget_bytes: int, limit: int = 1024, **kwargs: Any) -> int:
    """Largest micro-batch whose estimate fits `budget_bytes` (0 when even 1 does not)."""
    best = 0
    m = 1
    while m <= limit and estimate_memory(shape, micro_batch=m, **kwargs).total_bytes <= budget_bytes:
        best, m = m, m * 2
    lo, hi = best, min(limit, m)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_memory(shape, micro_batch=mid, **kwargs).total_bytes <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo
