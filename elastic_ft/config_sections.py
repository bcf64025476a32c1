"""The sections of a run config, one pydantic model each (`config.py` puts them together).

Every section forbids unknown keys, so a typo fails with the field named instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(description="local directory or Hugging Face hub name")
    tokenizer: str | None = Field(default=None, description="defaults to name_or_path")
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


class LoraConfig(_Section):
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class MethodConfig(_Section):
    kind: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataSource(_Section):
    """A hub dataset (or a local folder `datasets.load_dataset` reads), or a `save_to_disk`
    folder and the split to read."""

    path: str = Field(description="hub name (namespace/name) or local folder")
    subset: str | None = Field(default=None, description="the dataset's config name")
    split: str | None = Field(default=None, description="None: train")
    revision: str | None = None
    data_files: list[str] | None = None


class DataConfig(_Section):
    paths: list[Union[str, DataSource]] = Field(min_length=1)
    format: Literal[
        "auto", "alpaca", "chat", "sharegpt", "completion", "text", "tokenized"
    ] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="canonical field -> column name in the source"
    )
    seq_len: int = Field(default=512, ge=8)
    packing: bool = True
    too_long: Literal["drop", "truncate"] = "truncate"
    train_on: Literal["completion", "all"] = "completion"
    template: Literal["auto", "default", "chat_template"] = Field(default="auto", description=(
        "auto: the model's chat template when its tokenizer has one, else the default layout"))
    roles_to_train: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["assistant"], min_length=1,
        description="with train_on: completion, the turns whose tokens are trained")
    max_reject_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    shuffle: bool = True


class OptimConfig(_Section):
    name: Literal["adamw", "sgd", "lomo"] = Field(
        default="adamw", description="lomo: the fused low-memory update (full fine-tuning, "
        "deepspeed.zero_stage 0; core/lomo.py)")
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)


class TrainConfig(_Section):
    global_batch: int = Field(default=8, gt=0)
    micro_batch: Union[Literal["auto"], int] = "auto"
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    mem_cap_bytes: int | None = Field(
        default=None, gt=0, description="per-worker memory cap for planning; None = device"
    )
    mem_fraction: float = Field(default=0.9, gt=0, le=1.0)
    log_sample_ids: bool = Field(
        default=False, description="write each step's sample ids to metrics.jsonl (audits)")

    @field_validator("micro_batch")
    @classmethod
    def _positive_micro_batch(cls, value: Union[str, int]) -> Union[str, int]:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be 'auto' or a positive integer")
        return value

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        return self


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class WorkersConfig(_Section):
    min: int = Field(default=1, ge=1)
    max: int = Field(default=1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    resize_interval_s: float = Field(default=10.0, gt=0)
    max_failures: int = Field(default=3, ge=-1)
    start_timeout_s: float = Field(
        default=20.0, gt=0, description="worker-group start timeout; Ray's default is 60 s"
    )
    warm_spares: bool | None = Field(default=None, description=(
        "keep an idle worker process per rank slot on each node, with a rank's imports done, "
        "for the next group to start in (resources/warm_pool.py); None: on when min < max"))

    @model_validator(mode="after")
    def _range(self) -> WorkersConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(default=50, gt=0)
    keep: int = Field(default=2, ge=1)
    upload: Literal["async", "sync"] = Field(
        default="async", description=(
            "periodic checkpoints, at most one upload in flight per rank (a save waits for the "
            "previous upload); just-in-time ones are always sync"))
    keep_best: bool = Field(default=False, description=(
        "also keep the checkpoint with the best eval loss (needs eval)"))


class ElasticConfig(_Section):
    monitor_interval_s: float = Field(default=1.0, gt=0)
    jit_checkpoint_on_join: bool = True
    # how long Ray Train's resize waits for the workers' just-in-time checkpoint: a step plus
    # a save; after it the group restarts from the newest checkpoint (a jit_checkpoint_timeout)
    jit_checkpoint_timeout_s: float = Field(default=120.0, gt=0)
    # after a drain's checkpoint the workers idle this long for Ray Train's restart
    restart_wait_s: float = Field(default=45.0, gt=0)
    preemption_urls: list[str] = Field(
        default_factory=list,
        description="cloud metadata endpoints to poll for a spot notice: 'aws', 'gcp' or URLs")
    preemption_poll_s: float = Field(default=2.0, gt=0)
    # re-split the global batch by measured speed when the slowest rank's compute per step
    # exceeds the fastest's by more than this (0.1 = 10%); null turns balancing off
    rebalance_threshold: float | None = Field(default=0.1, gt=0)
    rebalance_window_steps: int = Field(default=10, ge=1, description=(
        "steps of each rank's speed, after a group's first two, before a rebalance decision"))
    # a rebalance restarts the group: it is made only when its predicted saving over the
    # steps left exceeds what a restart costs, this until one has been measured in the run
    restart_estimate_s: float = Field(default=30.0, ge=0)


class EvalConfig(_Section):
    """Held-out loss and generated samples; off unless `paths` or `holdout_fraction` is set."""

    paths: list[Union[str, DataSource]] = Field(default_factory=list, description=(
        "eval data, read like data.paths"))
    holdout_fraction: float = Field(default=0.0, ge=0.0, le=0.5, description=(
        "share of the training samples held out for eval (by sample id, before packing)"))
    every_steps: int | None = Field(default=None, gt=0, description="None: only at the end")
    batch_size: int = Field(default=8, gt=0, description="blocks per eval batch, all ranks")
    max_batches: int | None = Field(default=None, gt=0, description=(
        "cap: the first max_batches x batch_size eval blocks (None: all)"))
    prompts: list[str] | str | None = Field(default=None, description=(
        "prompts to generate from at each eval: a list, or a file with one per line (or a "
        "JSONL of {prompt}); None: the first `num_samples` held-out rows' prompts"))
    num_samples: int = Field(default=2, ge=0)
    max_new_tokens: int = Field(default=32, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.paths) or self.holdout_fraction > 0

    @model_validator(mode="after")
    def _one_source(self) -> EvalConfig:
        if self.paths and self.holdout_fraction > 0:
            raise ValueError("set eval.paths or eval.holdout_fraction, not both")
        return self


class LoggingConfig(_Section):
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="besides metrics.jsonl and events.jsonl")
    project: str = Field(default="elastic_ft", description="MLflow experiment / W&B project")
    run_name: str | None = Field(default=None, description="None: the output_dir's name")


class ExportConfig(_Section):
    merge: bool = Field(default=True, description=(
        "LoRA/QLoRA: also write OUTPUT/merged (the adapter merged into the base model, on a "
        "node with the memory for it); false: OUTPUT/adapter only"))


class PriceEntry(_Section):
    """USD per hour of one instance type (per node) or accelerator type (per device)."""

    on_demand: float | None = Field(default=None, ge=0)
    spot: float | None = Field(default=None, ge=0)
    source: str | None = Field(default=None, description="where the figures come from")
    date: str | None = None


class CostConfig(_Section):
    prices: dict[str, dict[str, PriceEntry]] | str | None = Field(default=None, description=(
        "laid over the shipped table (elastic_ft/report/prices.yaml): {instances: {TYPE: "
        "{on_demand, spot}}, accelerators: {TYPE: ...}}, or a YAML file of that form"))
    market: Literal["spot", "on-demand"] = Field(default="on-demand", description=(
        "the market of a node without the ray.io/market-type label"))

    @field_validator("prices")
    @classmethod
    def _tables(cls, value: object) -> object:
        if isinstance(value, dict) and set(value) - {"instances", "accelerators"}:
            raise ValueError("cost.prices takes the keys 'instances' and 'accelerators'")
        return value
