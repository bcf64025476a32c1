"""The terminal gets the console only; everything written to the process's stdout/stderr file
descriptors (libraries, warnings, Ray's forwarded worker logs) goes to OUTPUT/logs/run.log,
unless --verbose."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, sys, warnings
from pathlib import Path
from elastic_ft.report.console import quiet_terminal
with quiet_terminal(Path(sys.argv[1]), verbose=sys.argv[2] == "1") as console:
    print("library chatter")
    warnings.warn("a library warning")
    os.write(2, b"C-level stderr\\n")
    console.line("[elastic_ft] step 1/1")
print("after the block")
"""


def _run(tmp_path, verbose: bool) -> tuple[str, str]:
    logs = tmp_path / ("v" if verbose else "q") / "logs"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(logs), "1" if verbose else "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (logs / "run.log").read_text() if (logs / "run.log").exists() else ""
    return done.stdout + done.stderr, log


def test_only_the_console_reaches_the_terminal(tmp_path) -> None:
    terminal, log = _run(tmp_path, verbose=False)
    assert terminal.splitlines() == ["[elastic_ft] step 1/1", "after the block"]
    for noise in ("library chatter", "a library warning", "C-level stderr"):
        assert noise in log


def test_verbose_leaves_the_terminal_alone(tmp_path) -> None:
    terminal, log = _run(tmp_path, verbose=True)
    for line in ("library chatter", "a library warning", "C-level stderr",
                 "[elastic_ft] step 1/1"):
        assert line in terminal
    assert log == ""
