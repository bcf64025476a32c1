"""`elastic-ft validate CONFIG`: everything that can be checked before any compute is spent.

Each check returns findings: an error is one line naming what is wrong and how to fix it; an
ok or info line says what was found. `train` and `submit` run the same checks first (without
reading every data row) and stop on any error, so a mistake costs seconds, not a retried
worker group.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig


@dataclass(frozen=True)
class Finding:
    area: str  # model | data | storage | memory | cluster
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok   ' if self.ok else 'ERROR'} {self.area:<8} {self.message}"


class PreflightError(RuntimeError):
    """The run cannot start; the message lists every problem, one per line."""


def check_model(cfg: RunConfig, cuda_where_workers_run: bool, method: bool = True
                ) -> list[Finding]:
    """The model and tokenizer exist (or are hub names) and the architecture is a causal
    LM; with `method`, also what the method needs (QLoRA: CUDA and bitsandbytes)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from elastic_ft.data.sources import is_hub_name

    found: list[Finding] = []
    for what, name in (("model.name_or_path", cfg.model.name_or_path),
                       ("model.tokenizer", cfg.model.tokenizer)):
        if name is None:
            continue
        path = Path(name)
        if path.exists() and not (path / "config.json").exists() and what.endswith("path"):
            found.append(Finding("model", False, f"{what} {name} exists but holds no "
                                 "config.json: point it at a Hugging Face model folder"))
        elif not path.exists() and not is_hub_name(name):
            found.append(Finding("model", False, f"{what} {name} not found: give a local "
                                 "folder that exists, or a hub name such as org/model"))
        elif not path.exists():
            found.append(Finding("model", True, f"{what} {name}: a hub name, downloaded by "
                                 "each worker (set HF_TOKEN for gated models)"))
    if any(not f.ok for f in found):
        return found
    if Path(cfg.model.name_or_path).exists():
        config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                            trust_remote_code=cfg.model.trust_remote_code)
        if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                and not cfg.model.trust_remote_code):
            found.append(Finding("model", False, f"architecture {config.model_type!r} is not a "
                                 "causal LM transformers knows; set model.trust_remote_code: "
                                 "true only if you trust the model's code"))
        else:
            found.append(Finding("model", True, f"{config.model_type} at "
                                 f"{cfg.model.name_or_path}"))
    if method and cfg.method.kind == "qlora":
        import importlib.util

        if not cuda_where_workers_run:
            found.append(Finding("model", False, "method.kind qlora needs CUDA GPUs where the "
                                 "workers run and there are none: use method.kind lora"))
        elif importlib.util.find_spec("bitsandbytes") is None:
            found.append(Finding("model", False, "method.kind qlora needs bitsandbytes: pip "
                                 "install 'elastic_ft[qlora]'"))
    return found


def check_data(cfg: RunConfig, count_rows: bool) -> tuple[list[Finding], str | None]:
    """Each source detected (and counted), the chat template checked on a real row, and one
    rendered sample with its trained tokens in [[...]]."""
    from elastic_ft.core.model import tokenizer_path
    from elastic_ft.data.chat_spans import TemplateError, TemplateRefused
    from elastic_ft.data.formats import FormatError, apply_columns, normalise
    from elastic_ft.data.pipeline import resolve_formats
    from elastic_ft.data.readers import SourceError, read_source, sample_records
    from elastic_ft.data.tokenize import load_tokenizer, resolve_template, tokenize_rows
    from elastic_ft.data.validate import RowError

    try:
        formats = resolve_formats(cfg.data)
    except (SourceError, FormatError) as error:
        return [Finding("data", False, str(error))], None
    found = []
    for source, fmt in formats.items():
        rows = sum(1 for _ in read_source(source)) if count_rows else None
        counted = f", {rows} rows" if rows is not None else ""
        found.append(Finding("data", True, f"{source}: {fmt}{counted}"))
    try:
        tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    except (OSError, ValueError) as error:  # a hub name with no network or no access
        return found + [Finding("data", False, f"cannot load the tokenizer "
                                f"{tokenizer_path(cfg)} ({str(error).splitlines()[0][:160]}): "
                                "check the name, the network, or HF_TOKEN")], None
    template = resolve_template(cfg.data.template, tokenizer)
    source, fmt = next(iter(formats.items()))
    refusal = ""
    for record in sample_records(source, limit=20):
        try:
            row = normalise(apply_columns(record, cfg.data.columns), fmt)
            ((ids, labels),) = tokenize_rows([row], tokenizer, cfg.data.train_on,
                                             cfg.data.template, tuple(cfg.data.roles_to_train))
        except RowError:
            continue
        except TemplateRefused as error:  # this row would be quarantined
            refusal = f": {error}"
            continue
        except TemplateError as error:
            return found + [Finding("data", False, str(error))], None
        found.append(Finding("data", True, f"rendered with {template.replace('_', ' ')}"))
        return found, marked_sample(ids, labels, tokenizer)
    return found + [Finding("data", False, f"{source}: none of its first rows can be "
                            f"trained{refusal}; run elastic-ft validate-data on it")], None


def marked_sample(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """The sample's text with trained stretches in [[...]]."""
    out, run, trained = [], [], False
    for token, label in zip(ids, labels, strict=True):
        if (label != -100) != trained and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        trained = label != -100
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def check_storage(cfg: RunConfig) -> list[Finding]:
    from elastic_ft.core.checkpoint import storage_fs

    found = []
    for what, where in (("output_dir", cfg.output_dir), ("storage_path", cfg.storage_path)):
        if where is None:
            continue
        probe = f".elastic_ft_probe_{uuid.uuid4().hex[:8]}"
        try:
            fs, root = storage_fs(where if "://" in where else str(Path(where).resolve()))
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{root}/{probe}")
            found.append(Finding("storage", True, f"{what} {where} is writable"))
        except Exception as error:  # permissions, missing bucket, no credentials
            found.append(Finding("storage", False, f"{what} {where} is not writable "
                                 f"({str(error).splitlines()[0][:160]}): fix the path or its "
                                 "credentials"))
    return found


def check_memory(cfg: RunConfig, gpus: str | None, gpu_mem: str) -> list[Finding]:
    from elastic_ft.core.optimizer import memory_method
    from elastic_ft.core.planner import parse_inventory, plan_table

    if gpus is None:
        import torch

        if not torch.cuda.is_available():
            return [Finding("memory", True, "no GPU here and none given (--gpus): the workers "
                            "measure their own memory at start")]
        props = torch.cuda.get_device_properties(0)
        gpus, gpu_mem = str(torch.cuda.device_count()), f"{props.total_memory}B"
    devices = parse_inventory(gpus, gpu_mem)
    table = plan_table(cfg, devices)
    wanted = (memory_method(cfg), cfg.deepspeed.zero_stage, cfg.model.gradient_checkpointing,
              cfg.deepspeed.offload_optimizer)
    row = next(r for r in table["rows"] if (r["method"], r["zero_stage"],
                                            r["gradient_checkpointing"], r["offload"]) == wanted)
    where = ", ".join(f"{d.count} x {d.name}" for d in devices)
    if not row["fits"]:
        rec = table["recommendation"]
        hint = (f"try {rec['method']} + ZeRO-{rec['zero_stage']}"
                f"{' + gradient checkpointing' if rec['gradient_checkpointing'] else ''}"
                if rec else "add GPUs or shorten data.seq_len")
        return [Finding("memory", False, f"{memory_method(cfg)} + ZeRO-{cfg.deepspeed.zero_stage} "
                        f"does not fit {where} at micro-batch 1 "
                        f"({row['per_worker_bytes_mb1'] / 2**30:.1f} GiB per worker): {hint}")]
    return [Finding("memory", True, f"fits {where}: up to micro-batch "
                    f"{row['max_micro_batch']} per worker")]


def check_cluster(cfg: RunConfig) -> tuple[list[Finding], bool]:
    """(findings, whether the workers have CUDA): the cluster at RAY_ADDRESS, else this host."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        import torch

        return [Finding("cluster", True, "no RAY_ADDRESS: an embedded Ray on this machine")], \
            torch.cuda.is_available()
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as error:
        return [Finding("cluster", False, f"RAY_ADDRESS={address} is not reachable "
                        f"({str(error).splitlines()[0][:160]})")], False
    try:
        need = dict(cfg.workers.resources_per_worker) or {"CPU": 1}
        hosts = 0
        for node in ray.nodes():
            if node.get("Alive"):
                res = node.get("Resources", {})
                hosts += int(min(res.get(k, 0) / v for k, v in need.items() if v > 0))
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    finally:
        ray.shutdown()
    if hosts < cfg.workers.min:
        return [Finding("cluster", False, f"the cluster fits {hosts} workers of {need}, "
                        f"workers.min is {cfg.workers.min}: add nodes or lower workers.min")], \
            has_gpu
    return [Finding("cluster", True, f"{address}: room for {hosts} workers of {need}")], has_gpu


def validate(cfg: RunConfig, count_rows: bool = True, gpus: str | None = None,
             gpu_mem: str = "80GiB") -> tuple[list[Finding], str | None]:
    cluster, cuda = check_cluster(cfg)
    model = check_model(cfg, cuda)
    data, sample = check_data(cfg, count_rows) if all(f.ok for f in model) else ([], None)
    memory = check_memory(cfg, gpus, gpu_mem) if all(f.ok for f in model) else []
    return model + data + check_storage(cfg) + memory + cluster, sample


def require_valid(cfg: RunConfig) -> None:
    """`train` and `submit`: stop before any compute when a check fails."""
    findings, _ = validate(cfg, count_rows=False)
    errors = [f.line() for f in findings if not f.ok]
    if errors:
        raise PreflightError("pre-flight checks failed:\n  " + "\n  ".join(errors))
