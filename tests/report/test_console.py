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


BAR_SCRIPT = """
import sys, warnings
from pathlib import Path
from elastic_ft.report.console import quiet_terminal
with quiet_terminal(Path(sys.argv[1])) as console:
    console.start(10)
    for step in range(1, 11):
        warnings.warn("a library warning")
        console.progress(step, 2.0 - step / 10, 1.5 if step > 5 else None, 123.0, 2, 10.0 - step)
        if step == 5:
            console.line("[elastic_ft] resize: 2 -> 1 workers")
"""


def test_a_terminal_gets_one_live_bar_and_each_decision_once(tmp_path) -> None:
    """On a real terminal (a pty): tqdm's bar, redrawn in place, with loss, eval loss, tok/s
    and world size; a decision line printed once above it; no library output."""
    import os
    import pty

    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", BAR_SCRIPT, str(tmp_path / "logs")],
                             stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert child.wait(timeout=60) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "\r" in shown and "10/10" in shown  # a bar redrawn in place, to the end
    assert "loss 1.0000 eval 1.5000 tok/s 123 world 2" in shown
    assert shown.count("[elastic_ft] resize: 2 -> 1 workers") == 1
    assert "[elastic_ft] step" not in shown  # the bar replaces the progress lines of a pipe
    assert "warning" not in shown.lower()
    assert "a library warning" in (tmp_path / "logs" / "run.log").read_text()
