"""Checkpoint loads that cannot run code.

DeepSpeed 0.19 reads its checkpoint files with `torch.load(weights_only=False)`, a full unpickle
that runs whatever a crafted file asks. Every DeepSpeed load and universal conversion in
elastic_ft runs inside `weights_only_loads()`, which forces `weights_only=True` and allows only
the plain-data DeepSpeed types its files hold. The list was found by loading real ZeRO-0/1/2/3
checkpoints, LoRA and full, directly and after `ds_to_universal` (tests/core/test_safe_load.py).
`convert_to_universal` runs DeepSpeed's `ds_to_universal` converter the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    import torch

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def convert_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's `ds_to_universal`, in this process, weights-only, one worker (no process
    pool). In a training worker torch and DeepSpeed are imported already: a subprocess paid
    a fresh interpreter and those imports, 3-5 s of every resume at another world size on
    2 cores. Its prints and progress bars go nowhere; a failure raises."""
    import contextlib
    import io
    import sys

    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", input_folder, "--output_folder",
            output_folder, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    saved_argv, sys.argv = sys.argv, argv  # its own parser, with its own defaults
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = saved_argv
    quiet = io.StringIO()
    with weights_only_loads(), contextlib.redirect_stdout(quiet), \
            contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)
