"""What the ML commands (``enroll``, ``add-kinds``, ``generate``, ``personalize``) say while
they work, on stderr, so that none of them is silent for long: what is loading, and how far
each long phase has got.

``--progress`` picks the form (``docs/cli.md``, "Progress"):

* ``auto`` (default): on a terminal, a line per load and a bar per phase with the time
  left; otherwise (a log, a pipe) one line per load, one when a phase starts and one when
  it ends, a line with the expected time after a fit's first steps, and a line at most
  every :data:`LINE_EVERY` seconds during a long phase;
* ``json``: one JSON object per line, per load and per step (for scripts and UIs);
* ``none``: nothing.

stdout stays the command's result (text or ``--json``), whatever the mode.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

import click

__all__ = ["LINE_EVERY", "PROGRESS_MODES", "Phase", "Progress", "duration", "progress_option"]

PROGRESS_MODES = ("auto", "json", "none")
# Seconds between two progress lines of one phase when stderr is not a terminal: a log
# shows the job is alive without a line per step.
LINE_EVERY = 30.0
PROGRESS_HELP = ("How to report progress on stderr: auto (a bar on a terminal, else a line "
                 "per phase), json (one JSON object per line) or none.")


def duration(seconds: float) -> str:
    """``41.2 s``, ``3 min``, ``1 h 35 min``: as precise as a reader needs."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """One command's reporter: :meth:`say` what is loading, :meth:`phase` a long step."""

    def __init__(self, command: str, mode: str = "auto", stream: TextIO | None = None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(PROGRESS_MODES)}")
        self.command, self.mode = command, mode
        self.stream = stream if stream is not None else sys.stderr
        self.tty = mode == "auto" and bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()

    def say(self, message: str, *, phase: str = "load") -> None:
        """One event: ``loading torch...``; ``json`` mode adds the phase and the time."""
        if self.mode == "none":
            return
        if self.mode == "json":
            self.json({"phase": phase, "message": message})
        else:
            self.line(message)

    def line(self, text: str) -> None:
        print(f"{self.command}: {text}", file=self.stream, flush=True)

    def json(self, doc: dict) -> None:
        doc = {"command": self.command, **doc}
        doc.setdefault("elapsed_s", round(time.monotonic() - self.start, 3))
        print(json.dumps(doc), file=self.stream, flush=True)

    def phase(self, name: str, *, start: str, done: str, unit: str = "step",
              estimate: bool = False) -> Phase:
        """A ``progress(done, total)`` callback for a phase of ``total`` steps.

        ``start`` (``denoising {total} steps``) is said at the first call, ``done``
        (``denoised``) with the time taken by :meth:`Phase.close`. ``estimate``: say the
        expected time once the first two steps were timed (fits)."""
        return Phase(self, name, start=start, done=done, unit=unit, estimate=estimate)


class Phase:
    """A phase's progress: a bar, lines or JSON per :class:`Progress`'s mode. Time left comes
    from the rate since the first step seen (a resumed fit or model loading does not skew it)."""

    def __init__(self, report: Progress, name: str, *, start: str, done: str, unit: str,
                 estimate: bool) -> None:
        self.report, self.name, self.unit = report, name, unit
        self.start_text, self.done_text, self.estimate = start, done, estimate
        self.started: float | None = None
        self.first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self.last_line = 0.0
        self.estimated = False
        self.step, self.total = 0, 0
        self.bar = None

    # -- the callback ---------------------------------------------------------------------
    def __call__(self, done: int, total: int) -> None:
        if self.started is not None and (done, total) == (self.step, self.total) and done:
            return  # nothing new (a poller may see a step twice)
        now = time.monotonic()
        report = self.report
        self.step, self.total = done, total
        if self.started is None:
            self.begin(total, now=now)
        if self.first is None or done < self.first[1]:
            self.first = (now, done)
        eta = self.eta(now)
        if report.mode == "json":
            report.json({"phase": self.name, "step": done, "total": total,
                         "eta_s": None if eta is None else round(eta, 1)})
        elif self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            if eta is not None:
                self.bar.set_postfix_str(f"{duration(eta)} left", refresh=False)
            self.bar.refresh()
        elif report.mode == "auto":
            rate = self.rate(now)
            if self.estimate and not self.estimated and rate is not None \
                    and done - self.first[1] >= 2 and done < total:
                self.estimated = True
                self.last_line = now
                report.line(f"{self.name}: {rate:.2f} s a {self.unit}; {total} {self.unit}s "
                            f"take about {duration(rate * total)}, "
                            f"{duration(eta)} left")
            elif now - self.last_line >= LINE_EVERY and done < total:
                self.last_line = now
                left = "" if eta is None else f", about {duration(eta)} left"
                report.line(f"{self.name}: {self.unit} {done}/{total}{left}")

    def begin(self, total: int, *, now: float | None = None) -> None:
        """Say the phase starts (the first step's call does, unless this came first)."""
        if self.started is not None:
            return
        self.started = self.last_line = time.monotonic() if now is None else now
        self.total = total
        report = self.report
        text = self.start_text.format(total=total)
        if report.mode == "json":
            report.json({"phase": self.name, "message": text, "total": total, "step": 0})
        elif report.mode == "auto":
            report.line(text + "...")
            if report.tty:
                from tqdm import tqdm

                self.bar = tqdm(desc=self.name, total=total, unit=self.unit,
                                file=report.stream, leave=False)

    def rate(self, now: float) -> float | None:
        """Seconds a step, from the steps timed so far (None before two were seen)."""
        if self.first is None or self.step <= self.first[1]:
            return None
        return (now - self.first[0]) / (self.step - self.first[1])

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(time.monotonic() if now is None else now)
        return None if rate is None else rate * max(self.total - self.step, 0)

    # -- the end --------------------------------------------------------------------------
    def close(self, *, completed: bool = True, took: float | None = None) -> None:
        """End the phase; say it is done, and in how long (``took``: the caller's own
        measure; default: since it began), when it ``completed``."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.started is None or not completed:
            return
        took = time.monotonic() - self.started if took is None else took
        if self.report.mode == "json":
            self.report.json({"phase": self.name, "message": self.done_text, "done": True,
                              "step": self.step, "total": self.total,
                              "took_s": round(took, 3)})
        elif self.report.mode == "auto":
            self.report.line(f"{self.done_text} in {duration(took)}")
        self.started = None

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(completed=exc_type is None)


def progress_option(command: str) -> Callable[[Callable], Callable]:
    """Add ``--progress auto|json|none``; the command gets ``progress``, a :class:`Progress`."""

    def decorate(fn: Callable) -> Callable:
        @click.option("--progress", "progress_mode", type=click.Choice(PROGRESS_MODES),
                      default="auto", show_default=True, help=PROGRESS_HELP)
        @functools.wraps(fn)
        def wrapper(*args, progress_mode: str, **kwargs):
            return fn(*args, progress=Progress(command, progress_mode), **kwargs)

        return wrapper

    return decorate
