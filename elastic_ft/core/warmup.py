"""Build DeepSpeed's JIT ops once (cached in TORCH_EXTENSIONS_DIR) before any run or test.

On CPU the first engine init compiles `deepspeed_shm_comm` (~30 s); doing it here keeps it off
every test's and every worker's critical path. On GPU nothing needs compiling for our path.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch

    if torch.cuda.is_available():
        print("[warmup] CUDA present: no CPU comm op to build")
        return
    from deepspeed.ops.op_builder import ShareMemCommBuilder

    from elastic_ft.core.build_locks import release_stale_build_locks

    t0 = time.time()
    for lock in release_stale_build_locks():
        print(f"[warmup] removed a stale build lock: {lock}")
    try:
        ShareMemCommBuilder().load(verbose=False)
        print(f"[warmup] deepspeed_shm_comm ready in {time.time() - t0:.1f}s")
    except Exception as error:  # DeepSpeed falls back to plain gloo without it
        print(f"[warmup] deepspeed_shm_comm not built ({error}); gloo fallback")


if __name__ == "__main__":
    main()
