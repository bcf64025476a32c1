from __future__ import annotations

import subprocess
import sys
import time


def test_process_started_t_is_the_start_to_the_tick_not_the_boot_second() -> None:
    """A spare counts as warm when its process started before Ray Train asked for the group
    (warm_pool.py), and the recovery timeline marks the start: psutil's figure was up to a
    whole second early (measured 0.37 s here)."""
    code = ("import time; from elastic_ft.core.worker_env import process_started_t; "
            "print(process_started_t(), time.time())")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    started, first_line = float(out[0]), float(out[1])
    assert before - 0.02 <= started <= first_line  # a clock tick is 10 ms
