"""What the terminal shows: one progress bar, one line per decision, errors; nothing else.

`quiet_terminal` sends file descriptors 1 and 2 of the driver, and so of every process it
starts (Ray's, and the worker logs Ray forwards to the driver), to `OUTPUT/logs/run.log`:
Python warnings, DeepSpeed's and transformers' notices, Ray's internal lines. The console
keeps a handle on the real terminal and is the only writer to it. `--verbose` skips this.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOG_FILE = "run.log"


class Console:
    """A live bar on a terminal; on a pipe or a job log (no carriage returns), a progress
    line at every tenth of the run instead."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.total = 0
        self.next_line_step = 0
        self.log_path: Path | None = None

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def start(self, total_steps: int, done_steps: int = 0) -> None:
        self.total = total_steps
        self.next_line_step = done_steps
        if self.tty:
            from tqdm import tqdm

            # a terminal that reports no size (some CI ptys) would get a bar 0 wide
            sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            self.bar = tqdm(total=total_steps, initial=done_steps, file=self.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, unit="step",
                            leave=True)

    def progress(self, step: int, loss: float, eval_loss: float | None, tokens_per_s: float,
                 world_size: int, eta_s: float | None) -> None:
        shown = (f"loss {loss:.4f}" + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
                 + f" tok/s {tokens_per_s:.0f} world {world_size}")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.refresh()
            return
        if step >= self.next_line_step or step == self.total:
            eta = f" ETA {eta_s:.0f}s" if eta_s is not None else ""
            self.line(f"[elastic_ft] step {step}/{self.total} {shown}{eta}")
            self.next_line_step = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_CONSOLE = Console()


def get_console() -> Console:
    return _CONSOLE


@contextlib.contextmanager
def quiet_terminal(log_dir: Path, verbose: bool = False) -> Iterator[Console]:
    """Everything but the console into log_dir/run.log (appended), for the block's length."""
    global _CONSOLE
    if verbose:
        yield _CONSOLE
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    log = open(log_dir / LOG_FILE, "a", buffering=1)
    log.write(f"==== elastic_ft {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    previous = _CONSOLE
    _CONSOLE = Console(terminal)
    _CONSOLE.log_path = log_dir / LOG_FILE
    try:
        yield _CONSOLE
    finally:
        _CONSOLE.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
        log.close()
        _CONSOLE = previous
