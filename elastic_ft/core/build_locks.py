"""Stale build locks of torch's JIT extensions, which would stall every later worker for ever.

A process that loads a DeepSpeed JIT op (on CPU, `deepspeed_shm_comm` at engine init) first
takes torch's build lock: it creates the file `lock` in the op's build directory, keeps it
open while ninja checks or builds the op (every new process does, ~1 s; a first build ~30 s),
and removes it after. A worker killed meanwhile (its group restarted by a resize, its node
drained) leaves the file behind, and torch's `FileBaton.wait` waits for it with no timeout:
every later worker on that node then stops at engine init and the run never takes another
step (found in `benchmarks/sim_vs_real.py`, a join then a drain).

Torch's holder keeps the lock file open for as long as it holds it, so a lock that no process
has open is stale. Before an engine is built, `release_stale_build_locks` waits for a lock a
live process holds and removes one nobody holds. Processes are seen through /proc: on
another system a lock is never removed. A build directory shared by several machines (a
network home) could hide a live holder; TORCH_EXTENSIONS_DIR on a local disk avoids that.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("elastic_ft")


def lock_holders(path: Path) -> list[int] | None:
    """Pids of this machine's processes with `path` open; None when it cannot be known."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = os.path.realpath(path)
    holders = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(pid_dir.name))
                    break
            except OSError:
                continue
    return holders


def release_stale_lock(build_dir: Path, poll_s: float = 0.5) -> bool:
    """Wait while a live process holds `build_dir`'s torch build lock; remove it when none
    does. True when a stale lock was removed."""
    lock = build_dir / "lock"
    unheld_before = False
    while lock.exists():
        holders = lock_holders(lock)
        if holders is None:
            return False  # cannot tell a stale lock here: torch's own wait decides
        # unheld at two looks `poll_s` apart: a holder between closing the file and
        # removing it (torch's release) is not taken for a dead one
        if not holders and unheld_before:
            try:
                lock.unlink()
            except FileNotFoundError:  # its holder finished, or another waiter removed it
                continue
            log.warning("elastic_ft: removed %s, a build lock left by a process that died "
                        "while loading the op; the op is checked and rebuilt if needed", lock)
            return True
        unheld_before = not holders
        time.sleep(poll_s)
    return False


def deepspeed_jit_ops() -> list[str]:
    """The JIT ops DeepSpeed's engine init loads on this accelerator (its comm op)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):
        return []
    return [builder.name]


def release_stale_build_locks(names: list[str] | None = None) -> list[str]:
    """For each JIT op (default: what engine init loads), wait for or remove its build lock.
    Returns the stale locks removed."""
    from torch.utils.cpp_extension import _get_build_directory

    removed = []
    for name in deepspeed_jit_ops() if names is None else names:
        build_dir = Path(_get_build_directory(name, verbose=False))
        if release_stale_lock(build_dir):
            removed.append(str(build_dir / "lock"))
    return removed
