"""DeepSpeed without two imports a training worker never uses.

Every group start is new worker processes, and each pays its imports again, on the restart's
path (`recovery` events: `imported`, `engine_built`). Two of DeepSpeed's imports do nothing for
elastic_ft and cost about 3 s of CPU per process on the benchmark machine:
- mlflow (~0.9 s, with fastapi and scipy.sparse): DeepSpeed's autotuner imports it whenever it
  is installed. A worker never autotunes, and elastic_ft's MLflow tracker lives in the driver.
- DeepSpeed's Muon optimizer module (~2 s): ZeRO imports it at engine build and in each
  gradient reduction, only to test `isinstance(optimizer, MuonWithAuxAdam)`; the module wraps
  two kernels in `torch.compile`, which imports torch's inductor compiler. elastic_ft never
  builds a Muon optimizer (AdamW, SGD or LOMO), so those kernels are never called: the module
  is imported once with `torch.compile` as the identity, and every later import of it (and the
  isinstance tests) get that module. `torch.compile` is itself again right after.

Both only where the module is not imported yet: a process that already has mlflow or the Muon
module keeps them as they are.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextmanager
def imports_refused(*names: str) -> Iterator[None]:
    """Inside the block `import NAME` raises ImportError (what a library's `try: import NAME`
    expects when NAME is not installed), for each NAME not imported yet."""
    refused = [name for name in names if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's "import halted"
    try:
        yield
    finally:
        for name in refused:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextmanager
def torch_compile_as_identity() -> Iterator[None]:
    import torch

    original = torch.compile

    def identity(model: Any = None, **_: Any) -> Any:
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original


def import_deepspeed() -> ModuleType:
    """`import deepspeed` as a training worker needs it (module docstring)."""
    with imports_refused("mlflow"):
        import deepspeed
    if MUON_MODULE not in sys.modules:
        with torch_compile_as_identity():
            importlib.import_module(MUON_MODULE)
    return deepspeed
