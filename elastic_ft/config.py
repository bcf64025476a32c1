"""Run configuration: one YAML file, validated before anything starts.

Every section forbids unknown keys, so a typo fails with the field named instead of being
silently ignored. `load_config` turns pydantic's errors into one `ConfigError` whose lines read
`section.field: what is wrong (allowed: ...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from elastic_ft.config_sections import (  # noqa: F401  (re-exported)
    CheckpointConfig,
    CostConfig,
    DataConfig,
    DataSource,
    DeepSpeedConfig,
    ElasticConfig,
    EvalConfig,
    ExportConfig,
    LoggingConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    WorkersConfig,
    _Section,
)


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad field."""


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
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output_dir: str
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (local dir, NFS, s3://, gs://)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.method.kind == "qlora" and self.deepspeed.zero_stage == 3:
            raise ValueError("method.kind qlora cannot be sharded with zero_stage 3 (ZeRO-3 "
                             "does not partition 4-bit weights): set deepspeed.zero_stage: 2, "
                             "or use method.kind lora")
        if self.optim.name == "lomo":
            if self.method.kind != "full":
                raise ValueError("optim.name lomo is full fine-tuning (it updates every weight "
                                 "inside the backward): set method.kind: full, or use adamw")
            ds = self.deepspeed
            if ds.zero_stage != 0 or ds.offload_optimizer or ds.offload_params:
                raise ValueError("optim.name lomo runs without DeepSpeed (each gradient is "
                                 "all-reduced and applied inside the backward): set "
                                 "deepspeed.zero_stage: 0 and no offload")
        if self.checkpoint.keep_best:
            every = self.eval.every_steps
            if not self.eval.enabled or every is None or self.checkpoint.every_steps % every:
                raise ValueError(
                    "checkpoint.keep_best needs eval (eval.paths or eval.holdout_fraction) "
                    "with eval.every_steps dividing checkpoint.every_steps, so that every "
                    "checkpoint has an eval loss")
        return self

    def with_absolute_paths(self) -> RunConfig:
        """Local paths made absolute: Ray workers do not share the driver's working dir."""

        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path and Path(path).exists() else path

        model = self.model.model_copy(update={"name_or_path": absolute(self.model.name_or_path),
                                              "tokenizer": absolute(self.model.tokenizer)})
        def absolute_all(paths: list[Any]) -> list[Any]:
            return [p.model_copy(update={"path": absolute(p.path)}) if isinstance(p, DataSource)
                    else absolute(p) for p in paths]

        data = self.data.model_copy(update={"paths": absolute_all(self.data.paths)})
        prompts = self.eval.prompts
        if isinstance(prompts, str):
            prompts = absolute(prompts)
        evaluation = self.eval.model_copy(update={"paths": absolute_all(self.eval.paths),
                                                  "prompts": prompts})
        storage = self.storage_path
        if storage and "://" not in storage:
            storage = str(Path(storage).resolve())
        return self.model_copy(update={"model": model, "data": data, "eval": evaluation,
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
