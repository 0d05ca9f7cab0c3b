"""Benchmark children: run one in its own interpreter, passing its stderr through and keeping the end of it.

A child that fails (an abort at interpreter teardown, an out-of-memory kill, a traceback) becomes an error row; the
row carries the last lines the child wrote to stderr, so the reason reaches the results file and not only a
console that may be gone (CI logs, a nohup'd chain).
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

TAIL_CHARACTERS = 2000  # about the last 20 lines: a traceback's end, or the abort message and the lines before it


@dataclass(frozen=True)
class Finished:
    """How a child ended: `returncode` (negative: killed by that signal), or past its `timeout` (seconds, or None:
    none given); and its stderr's tail."""

    returncode: int
    timeout: float | None
    timed_out: bool
    tail: str

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def describe(self) -> str:
        """The error text of a failed child's row."""
        if self.timed_out:
            return f"timed out after {self.timeout:g} s (--timeout)"
        signal = f" (signal {-self.returncode}; 9: killed, e.g. out of memory)" if self.returncode < 0 else ""
        return f"exit status {self.returncode}{signal}"


def run_child(command: list[str], *, cwd, env=None, timeout: float | None = None) -> Finished:
    """Run `command`; its stdout goes straight to ours, its stderr is copied to ours as it comes (progress bars
    included) while the last `TAIL_CHARACTERS` are kept. A child past `timeout` seconds is killed."""
    with subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE) as child:
        kept: list[str] = [""]

        def pump():  # raw reads: a progress bar's carriage-return updates pass through without waiting for a newline
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while chunk := os.read(child.stderr.fileno(), 65536):
                    text = decoder.decode(chunk)
                    sys.stderr.write(text)
                    sys.stderr.flush()
                    kept[0] = (kept[0] + text)[-TAIL_CHARACTERS:]
            except (OSError, ValueError):  # the pipe closed under us after a kill: what was read is kept
                pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode, timed_out = child.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            child.kill()
            returncode, timed_out = child.wait(), True
        reader.join(timeout=10)  # the pipe closes with the child (and any grandchild holding it)
    return Finished(returncode, timeout, timed_out, kept[0])
