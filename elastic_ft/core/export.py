"""Export: the LoRA adapter in peft format and a merged Hugging Face model, where the memory is.

The merge holds the whole base model. In the shipped cluster layouts the driver is a CPU head
node, so it never merges: `export_on_cluster` runs `export_outputs` as a Ray task that asks for
the memory the merge needs (from the model's shape and its saved dtype), on the node that holds
`OUTPUT/final` (rank 0's) when that node has room, and the driver only records where the
export went. `export.merge: false` keeps the adapter alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.model import tokenizer_path

LIBRARIES_BYTES = 1 << 30  # torch + transformers + peft in the task's process


def merge_bytes(cfg: RunConfig) -> int:
    """What the export task needs: the base model once in its saved dtype (the merge is in
    place), the adapter, and the libraries."""
    from transformers import AutoConfig

    from elastic_ft.core.memory import shape_from_config

    if cfg.method.kind in ("lora", "qlora") and not cfg.export.merge:
        return LIBRARIES_BYTES
    config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                        trust_remote_code=cfg.model.trust_remote_code)
    dtype = str(getattr(config, "dtype", None) or "")  # transformers 5 maps torch_dtype here
    per_param = 2 if ("bfloat16" in dtype or "float16" in dtype) else 4
    return int(shape_from_config(config).total_params * per_param * 1.25) + LIBRARIES_BYTES


def export_outputs(cfg: RunConfig) -> dict[str, str]:
    """In this process: OUTPUT/adapter and, unless `export.merge` is off, OUTPUT/merged."""
    import socket

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cfg.output_dir)
    final = out / "final"
    if not final.exists():
        raise FileNotFoundError(
            f"{final} not found on {socket.gethostname()}: train the run to the end first; on "
            f"a cluster, put output_dir on storage every node sees (NFS, a shared volume)")
    paths: dict[str, str] = {"host": socket.gethostname()}
    merged = out / "merged"
    lora = cfg.method.kind in ("lora", "qlora")
    if lora:
        adapter = out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(final, adapter)
        paths["adapter"] = str(adapter)
    if lora and not cfg.export.merge:
        return paths
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(cfg),
                                              trust_remote_code=cfg.model.trust_remote_code)
    shutil.rmtree(merged, ignore_errors=True)
    if lora:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
            dtype="auto")
        model = PeftModel.from_pretrained(base, paths["adapter"]).merge_and_unload()
        model.save_pretrained(str(merged), safe_serialization=True)
    else:  # full fine-tuning: final/ is the model already; no need to load it
        shutil.copytree(final, merged)
    tokenizer.save_pretrained(str(merged))
    paths["merged"] = str(merged)
    return paths


def _export_task(run: dict[str, Any]) -> dict[str, str]:
    import ray

    paths = export_outputs(RunConfig.model_validate(run))
    return dict(paths, node_id=ray.get_runtime_context().get_node_id())


def export_on_cluster(cfg: RunConfig, node_id: str | None = None) -> dict[str, str]:
    """`export_outputs` as a Ray task with the memory the merge needs; `node_id`: where
    OUTPUT/final was written (rank 0's node), preferred when it has that memory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    need = merge_bytes(cfg)
    room = {n["NodeID"]: n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]}
    if not room or max(room.values()) < need:
        raise RuntimeError(
            f"elastic_ft: the export needs {need / 2**30:.1f} GiB on one node and the largest "
            f"node has {max(room.values(), default=0) / 2**30:.1f} GiB of Ray memory; add a "
            f"node with more memory and run `elastic-ft export CONFIG`, or set "
            f"export.merge: false to keep the adapter only")
    strategy: Any = "DEFAULT"
    if node_id is not None and room.get(node_id, 0) >= need:
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=True)
    task = ray.remote(_export_task).options(num_cpus=1, memory=need,
                                            scheduling_strategy=strategy)
    return ray.get(task.remote(cfg.to_dict()))
