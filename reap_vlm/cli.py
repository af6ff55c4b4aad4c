"""The one entry point every stage script, `verify` and the demo go through: parse -> validate -> run -> exit code.

Known errors print one line on stderr and exit with their code (2: bad input); a BugError or any other
unexpected exception prints its traceback and a "bug, please report" line and exits 3; SIGINT exits 130 and
SIGTERM 143 (128 + the signal number, as a shell reports a killed command)."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable

from .errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, BugError, ReapError
from .settings import STAGES, Settings, load


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def guarded(stage: str, body: Callable[[], int | None]) -> int:
    """Run `body` and turn its outcome into the documented exit code, with one line on stderr for an error."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = body()
        return EXIT_OK if code is None else int(code)
    except ReapError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the file system said no: full disk, read-only folder, missing permission
        where = f" {err.filename}" if err.filename else ""
        print(
            f"error: {stage} could not read or write{where}: {err.strerror or err}. Check the path, free space "
            "and permissions; nothing partial was left at the target path.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        reason = str(err) or "SIGINT"
        print(
            f"error: {stage} interrupted ({reason}): nothing partial was left at the target path. Run the same "
            "command again (reap: add --resume to continue from the last accumulator checkpoint).",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if reason == "SIGTERM" else EXIT_INTERRUPTED
    except Exception as err:  # anything unexpected is a bug of this tool: keep the traceback
        traceback.print_exc()
        if isinstance(err, BugError):
            text = str(err)
        else:
            first = (str(err).splitlines() or [""])[0][:200]
            text = f"bug in reap-vlm (please report it with this traceback): {type(err).__name__}: {first}"
        print(f"error: {stage}: {text}", file=sys.stderr)
        return EXIT_BUG


def main(stage: str, run: Callable[[Settings], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Resolve the stage's settings, call `run(settings)` and turn the outcome into an exit code."""
    return guarded(stage, lambda: run(load(STAGES[stage], argv, prog=prog)))
