"""Run a fuselabel process that stops, or dawdles, at a named point, for the tests that kill it there.

``python tests/pausing.py -m fuselabel.cli train ...`` or ``python tests/pausing.py -c CODE ARGS`` runs the
command with :func:`pause` in place of ``fuselabel.writers.reached`` (which does nothing in normal use):

- ``FUSELABEL_TEST_PAUSE_AT=stage`` or ``stage:N`` (the N-th time this process reaches it), several joined by
  commas: the process announces the pause on stderr and sleeps, for the test to kill it;
- ``FUSELABEL_TEST_DELAY_S=seconds``: every point is a short wait instead, to widen the windows in which
  concurrent processes could get in each other's way.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import fuselabel.writers

_seen: dict[str, int] = {}


def pause(stage: str) -> None:
    delay = os.environ.get("FUSELABEL_TEST_DELAY_S")
    if delay:
        time.sleep(float(delay))
    wanted = os.environ.get("FUSELABEL_TEST_PAUSE_AT")
    if not wanted:
        return
    _seen[stage] = _seen.get(stage, 0) + 1
    for item in wanted.split(","):
        name, _, nth = item.strip().partition(":")
        if name == stage and _seen[stage] == int(nth or 1):
            sys.stderr.write(f"FUSELABEL_TEST_PAUSE_AT: paused at {stage} (pid {os.getpid()})\n")
            sys.stderr.flush()
            time.sleep(3600)


def main(argv: list[str]) -> None:
    fuselabel.writers.reached = pause
    how, what, *rest = argv
    if how == "-m":
        sys.argv = [what, *rest]
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    elif how == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"usage: {__file__} -m MODULE ARGS | -c CODE ARGS")


if __name__ == "__main__":
    main(sys.argv[1:])
