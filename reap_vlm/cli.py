"""The one entry point every stage script goes through: parse -> validate -> run -> exit code.

Known errors print one line on stderr and exit with their code; a BugError or any other
exception keeps its traceback (it is a bug, not a user mistake)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from .errors import EXIT_INTERRUPTED, EXIT_OK, Interrupted, ReapError
from .settings import STAGES, Settings, load


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(stage: str, run: Callable[[Settings], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Resolve the stage's settings, call `run(settings)` and turn the outcome into an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        settings = load(STAGES[stage], argv, prog=prog)
        code = run(settings)
        return EXIT_OK if code is None else int(code)
    except ReapError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        reason = str(err) or "SIGINT"
        print(
            f"error: {stage} interrupted ({reason}): nothing partial was left at the target path. "
            + Interrupted("").fix
            + "Run the same command again (reap: add --resume to continue from the last accumulator checkpoint).",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
