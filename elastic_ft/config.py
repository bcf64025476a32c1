"""Run configuration: one YAML file, validated before anything starts.

Every section forbids unknown keys, so a typo fails with the field named instead of being
silently ignored. `load_config` turns pydantic's errors into one `ConfigError` whose lines read
`section.field: what is wrong (allowed: ...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad field."""


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


class DataConfig(_Section):
    paths: list[str] = Field(min_length=1)
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
    template: Literal["default", "chat_template"] = "default"
    max_reject_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    shuffle: bool = True


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
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

    @model_validator(mode="after")
    def _range(self) -> WorkersConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(default=50, gt=0)
    keep: int = Field(default=2, ge=1)
    upload: Literal["async", "sync"] = Field(
        default="async", description="periodic checkpoints; just-in-time ones are always sync")


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


class RunConfig(_Section):
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    output_dir: str
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (local dir, NFS, s3://, gs://)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.method.kind == "qlora" and self.deepspeed.zero_stage == 3:
            raise ValueError("method.kind qlora cannot be sharded with zero_stage 3")
        return self

    def with_absolute_paths(self) -> RunConfig:
        """Local paths made absolute: Ray workers do not share the driver's working dir."""

        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path and Path(path).exists() else path

        model = self.model.model_copy(update={"name_or_path": absolute(self.model.name_or_path),
                                              "tokenizer": absolute(self.model.tokenizer)})
        data = self.data.model_copy(update={"paths": [
            str(Path(p).resolve()) if Path(p).exists() else p for p in self.data.paths]})
        storage = self.storage_path
        if storage and "://" not in storage:
            storage = str(Path(storage).resolve())
        return self.model_copy(update={"model": model, "data": data,
                                       "output_dir": str(Path(self.output_dir).resolve()),
                                       "storage_path": storage})

    def resolved_storage_path(self) -> str:
        return self.storage_path or str(Path(self.output_dir).resolve() / "ray_storage")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the model along `loc` (minus the bad key) to list the keys that would be accepted."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        current = field.annotation
    return sorted(current.model_fields) if hasattr(current, "model_fields") else []


def format_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, loc))
            lines.append(f"{field}: unknown key (allowed: {allowed})")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{field}: {item['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, RunConfig)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config; relative paths in it stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_config(raw)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.max_steps=20` -> ("train.max_steps", 20); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
