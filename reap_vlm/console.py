"""What a stage tells its user: human output on stderr, one JSON result line on stdout.

Levels (REAP_LOG_LEVEL, --quiet / --verbose): `quiet` shows warnings, errors and the result line only;
`info` (default) adds progress bars, tables and results; `verbose` adds every step, and each line starts
with the wall-clock time, so a log shows where time went. Progress bars are rich's on a terminal; where
stderr is a file or a pipe (docker logs, CI), a bar would only print its last frame, so progress becomes
plain lines instead: one per step at `verbose` (at most two a second), one summary line at `info`.

With REAP_JSON / --json, each stage prints exactly one line on stdout when it ends: a JSON object with the
stage, its exit code, the paths it wrote and its key numbers (or the error line). Nothing else is written to
stdout, so `reap.py --json | jq` works."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console

LEVELS = ("quiet", "info", "verbose")
_state: dict[str, Any] = {"level": "info", "json": False, "console": None, "result": None}


def configure(level: str = "info", json_result: bool = False) -> None:
    """Set the level and the result line for this process (the stage entry point calls it once)."""
    _state.update(level=level, json=json_result, console=None)
    package = logging.getLogger("reap_vlm")
    package.setLevel(logging.DEBUG if level == "verbose" else logging.WARNING)
    # one handler of ours (configure may run once per stage in one process); records still propagate, so a
    # handler on the root logger (pytest's caplog) sees them too, and Python's last-resort printer does not
    package.handlers = [h for h in package.handlers if not isinstance(h, _Handler)] + [_Handler()]


def console() -> Console:
    """The stderr console (made on first use, so tests that swap sys.stderr see their stream)."""
    if _state["console"] is None or _state["console"].file is not sys.stderr:
        _state["console"] = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    return _state["console"]


def level() -> str:
    return _state["level"]


def verbose() -> bool:
    return _state["level"] == "verbose"


def _stamp() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3] + " " if verbose() else ""


def _emit(text: str) -> None:
    out = console()
    stamp = _stamp()
    for line in str(text).splitlines() or [""]:
        out.print(stamp + line, markup=False, highlight=False, soft_wrap=True)


def info(text: str) -> None:
    """A result or a note the user reads (not at --quiet)."""
    if _state["level"] != "quiet":
        _emit(text)


def step(text: str) -> None:
    """The start of a step (only at --verbose): with the timestamps, the log shows how long each took."""
    if verbose():
        _emit(text)


def warn(text: str) -> None:
    """Shown at every level."""
    _emit(text)


def table(renderable, width: int | None = None) -> None:
    """A rich table on stderr (not at --quiet)."""
    if _state["level"] == "quiet":
        return
    out = console()
    if verbose():
        _emit(f"{getattr(renderable, 'title', '') or 'table'}:")
    out.print(renderable, width=max(out.width, width) if width else None)


class _Handler(logging.Handler):
    """The package's `logging` warnings (calibration's skipped samples, ...) as console lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string must not hide the run's output
            text = str(record.msg)
        (warn if record.levelno >= logging.WARNING else step)(("warning: " if record.levelno >= 30 else "") + text)


class Progress:
    """Counts done of a known total, with the rate; see the module docstring for where it goes."""

    def __init__(self, label: str, total: int, unit: str, bar, task, rate_scale: float = 1.0):
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self._bar, self._task, self._scale = bar, task, rate_scale
        self.started = self._last = time.perf_counter()

    def rate(self) -> float:
        return self.done * self._scale / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.update(**fields)

    def update(self, completed: int | None = None, total: int | None = None, **fields) -> None:
        if completed is not None:
            self.done = completed
        if total is not None:
            self.total = total
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total, **fields)
            return
        now = time.perf_counter()
        if verbose() and (now - self._last >= 0.5 or self.done >= self.total):
            self._last = now
            _emit(f"{self.label}: {self.counts()} ({self.rate():.1f} {self.unit}/s)")

    def counts(self) -> str:
        if self._scale == 1.0:
            return f"{self.done}/{self.total} {self.unit}"
        return f"{self.done * self._scale:.1f}/{self.total * self._scale:.1f} {self.unit}"


@contextmanager
def progress(label: str, total: int, unit: str = "items", **fields) -> Iterator[Progress]:
    """A progress bar of `total` steps: `with progress("scoring", n, "batches") as p: ... p.advance()`.
    `fields` are extra columns' start values (e.g. tps=0.0 for the scoring bar's tokens per second)."""

    def columns():
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        rate = TextColumn("{task.fields[tps]:>8.0f} tok/s") if "tps" in fields else _rate_column(unit)
        head = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
        return [*head, rate, TimeElapsedColumn(), TimeRemainingColumn()]

    with _live(label, total, unit, f"{total} {unit}", columns, **fields) as p:
        yield p


@contextmanager
def _live(label: str, total: int, unit: str, size: str, columns, rate_scale: float = 1.0, **fields):
    """The one mechanism behind progress() and bytes_progress(): a rich bar on a terminal (columns() makes
    its columns), else a summary line at the end; nothing at --quiet."""
    level_now = _state["level"]
    out = console()
    step(f"{label}: {size}")
    bar = task = None
    if level_now != "quiet" and out.is_terminal:
        from rich.progress import Progress as Bar

        # rich redraws from a thread that holds the GIL meanwhile: at its default 10 Hz that delays the kernel
        # launches of a host-bound forward (a few % of a run); twice a second is enough to read
        bar = Bar(*columns(), console=out, transient=False, refresh_per_second=2)
        bar.start()
        task = bar.add_task(label, total=total, **fields)
    p = Progress(label, total, unit, bar, task, rate_scale=rate_scale)
    try:
        yield p
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - p.started
    if bar is None and level_now != "quiet":  # the bar stays on a terminal; elsewhere one summary line
        _emit(f"{label}: {p.counts()} in {seconds:.1f} s ({p.rate():.1f} {unit}/s)")


class _Steps:
    """A bar opened at the first report(done, total) and closed when done reaches total (so that several
    can follow each other inside one call: rich shows one live display at a time)."""

    def __init__(self, label: str, unit: str):
        self.label, self.unit = label, unit
        self._context = self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._context = progress(self.label, total, self.unit)
            self._bar = self._context.__enter__()
        self._bar.update(completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._context is not None:
            context, self._context, self._bar = self._context, None, None
            context.__exit__(None, None, None)


@contextmanager
def steps(label: str, unit: str = "steps") -> Iterator[_Steps]:
    """A progress callback `(done, total)` for code that learns its total as it goes."""
    bar = _Steps(label, unit)
    try:
        yield bar
    finally:
        bar.close()


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s")

    return Rate()


@contextmanager
def bytes_progress(label: str, total: int) -> Iterator[Progress]:
    """A progress bar over bytes (the prune stage's writing, hash verification)."""

    def columns():
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

        return [TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]

    with _live(label, total, "MiB", f"{total / 2**20:.1f} MiB", columns, rate_scale=1 / 2**20) as p:
        yield p


def result(stage: str, payload: dict) -> None:
    """The stage's one JSON line on stdout (with --json); nothing otherwise."""
    if _state["json"]:
        sys.stdout.write(json.dumps({"stage": stage, **payload}, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()


def set_result(payload: dict | None) -> None:
    """The stage's key numbers and paths, printed as its JSON line when it ends (reap_vlm.cli.guarded)."""
    _state["result"] = payload


def take_result() -> dict | None:
    payload, _state["result"] = _state["result"], None
    return payload


def json_enabled() -> bool:
    return bool(_state["json"])
