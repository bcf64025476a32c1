"""Torch's JIT build lock left by a killed process no longer stalls the next engine build.

Real processes hold and leave the locks (a child that opens the file as torch's `FileBaton`
does, then is SIGKILLed); the last test loads DeepSpeed's real comm op past such a lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from elastic_ft.core.build_locks import lock_holders, release_stale_lock

HOLD = textwrap.dedent("""
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)  # as torch's FileBaton.try_acquire
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(lock: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def _killed_holder(lock: Path) -> None:
    child = _holder(lock)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert lock.exists()  # what a worker killed in the middle of a build leaves


def test_a_lock_whose_holder_was_killed_is_removed(tmp_path: Path) -> None:
    _killed_holder(tmp_path / "lock")
    assert lock_holders(tmp_path / "lock") == []
    assert release_stale_lock(tmp_path, poll_s=0.05)
    assert not (tmp_path / "lock").exists()


def test_a_live_holder_is_waited_for_until_it_dies(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    child = _holder(lock)
    assert lock_holders(lock) == [child.pid]
    killed_at: list[float] = []

    def kill_later() -> None:
        time.sleep(1.0)
        killed_at.append(time.time())
        child.send_signal(signal.SIGKILL)
        child.wait()

    threading.Thread(target=kill_later, daemon=True).start()
    assert release_stale_lock(tmp_path, poll_s=0.05)
    assert killed_at and time.time() >= killed_at[0]  # not removed while its holder lived
    assert not lock.exists()


def test_a_lock_released_by_its_holder_is_not_counted_as_stale(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    child = _holder(lock)
    threading.Timer(0.5, lambda: (lock.unlink(), child.kill())).start()
    assert not release_stale_lock(tmp_path, poll_s=0.05)
    child.wait()
    assert not release_stale_lock(tmp_path)  # no lock at all


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="holders are found through /proc")
def test_deepspeed_comm_op_loads_past_a_killed_builders_lock(tmp_path: Path) -> None:
    """Without the release, torch's FileBaton.wait on the stale lock never returns (the
    child's timeout fails the test)."""
    from torch.utils.cpp_extension import _get_build_directory

    from elastic_ft.core.build_locks import deepspeed_jit_ops

    names = deepspeed_jit_ops()
    if not names:
        pytest.skip("this accelerator's engine init loads no JIT op")
    build_dir = Path(_get_build_directory(names[0], verbose=False))
    release_stale_lock(build_dir)  # one some earlier run left
    _killed_holder(build_dir / "lock")
    load = textwrap.dedent("""
        from elastic_ft.core.build_locks import release_stale_build_locks
        from deepspeed.accelerator import get_accelerator
        print("removed", release_stale_build_locks())
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
        print("loaded")
    """)
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removed ['{build_dir / 'lock'}']" in done.stdout and "loaded" in done.stdout
    assert not (build_dir / "lock").exists()
