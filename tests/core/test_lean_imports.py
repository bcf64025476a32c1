"""A training worker's DeepSpeed without mlflow and torch's inductor (core/lean_imports.py).

Each case runs in a fresh interpreter, as a new worker process starts: what a process imports
is the point. ZeRO-2 and ZeRO-3 engines train and save a checkpoint, so every path of a
worker's step that imports the Muon module runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys
    LEAN = sys.argv[3] == "lean"
    if LEAN:
        from elastic_ft.core.lean_imports import import_deepspeed
        import_deepspeed()
    else:  # what a ZeRO engine's build imports first, without the helper
        import deepspeed
        import deepspeed.runtime.zero.muon.muon_optimizer
    import torch
    compile_fn = torch.compile
    def seen():
        found = {"mlflow": "mlflow" in sys.modules,
                 "inductor": "torch._inductor.compile_fx" in sys.modules,
                 "compile_restored": torch.compile is compile_fn}
        import mlflow  # still there for whoever wants it
        found["mlflow_importable"] = callable(getattr(mlflow, "start_run", None))
        print("SEEN " + json.dumps(found))
    if not LEAN:
        seen()
        sys.exit(0)
    from elastic_ft.config import load_config
    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.model import load_model
    from elastic_ft.core.probe import local_process_group
    from elastic_ft.resources.planning import WorkerPlan

    local_process_group()
    plan = WorkerPlan((2,), 1, 2, 2, 1.0, "test")
    for stage, method in ((2, "lora"), (3, "full")):
        cfg = load_config(sys.argv[1] + "/configs/tiny-lora-cpu.yaml", {
            "model.name_or_path": sys.argv[2], "method.kind": method,
            "deepspeed.zero_stage": stage})
        engine, _ = build_engine(cfg, load_model(cfg), plan, 4, False)
        for _ in range(2):
            ids = torch.randint(0, 100, (2, 16))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.save_checkpoint(sys.argv[4] + f"/z{stage}", tag="t")
    seen()
""")


def _worker(tiny_assets: Path, tmp_path: Path, mode: str) -> dict[str, bool]:
    done = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), str(tiny_assets), mode,
                           str(tmp_path / mode)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SEEN ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][5:])


def test_a_worker_trains_zero_2_and_3_without_mlflow_or_the_inductor(tmp_path,
                                                                      tiny_assets) -> None:
    # Without the helper DeepSpeed imports both (if it ever stops, the helper can go); with it,
    # two ZeRO engines train and save without either
    assert _worker(tiny_assets, tmp_path, "plain") == {
        "mlflow": True, "inductor": True, "compile_restored": True, "mlflow_importable": True}
    assert _worker(tiny_assets, tmp_path, "lean") == {
        "mlflow": False, "inductor": False, "compile_restored": True, "mlflow_importable": True}


def test_a_module_already_imported_is_left_as_it_is() -> None:
    from elastic_ft.core.lean_imports import imports_refused

    json_module = sys.modules["json"]
    with imports_refused("json", "elastic_ft_no_such_module"):
        import json as again

        assert again is json_module
        try:
            import elastic_ft_no_such_module  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("a refused import succeeded")
    assert "elastic_ft_no_such_module" not in sys.modules
