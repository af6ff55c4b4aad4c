"""The one entry point every stage script, `verify` and the demo go through: parse -> validate -> run -> exit code.

Known errors print one line on stderr and exit with their code (2: bad input); a BugError or any other
unexpected exception prints its traceback and a "bug, please report" line and exits 3; SIGINT exits 130 and
SIGTERM 143 (128 + the signal number, as a shell reports a killed command). With --json, the stage's one
result line goes to stdout whatever the outcome (reap_vlm.console.result)."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable

from . import console
from .errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, BugError, ReapError
from .settings import STAGES, Settings, load


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def guarded(stage: str, body: Callable[[], int | None]) -> int:
    """Run `body` and turn its outcome into the documented exit code, with one line on stderr for an error;
    with --json, one result line on stdout: the stage's payload (console.set_result) or the error."""
    console.set_result(None)
    code, error = _run(stage, body)
    if console.json_enabled():
        payload = console.take_result() if error is None else {"error": error}
        console.result(stage, {"exit_code": code, **(payload or {})})
    return code


def _run(stage: str, body: Callable[[], int | None]) -> tuple[int, str | None]:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = body()
        return (EXIT_OK if code is None else int(code)), None
    except ReapError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code, str(err)
    except OSError as err:  # the file system said no: full disk, read-only folder, missing permission
        where = f" {err.filename}" if err.filename else ""
        line = (
            f"error: {stage} could not read or write{where}: {err.strerror or err}. Check the path, free space "
            "and permissions; nothing partial was left at the target path."
        )
        print(line, file=sys.stderr)
        return EXIT_USAGE, line[len("error: ") :]
    except KeyboardInterrupt as err:
        reason = str(err) or "SIGINT"
        line = (
            f"error: {stage} interrupted ({reason}): nothing partial was left at the target path. Run the same "
            "command again (reap: add --resume to continue from the last accumulator checkpoint)."
        )
        print(line, file=sys.stderr)
        return (EXIT_TERMINATED if reason == "SIGTERM" else EXIT_INTERRUPTED), line[len("error: ") :]
    except Exception as err:  # anything unexpected is a bug of this tool: keep the traceback
        traceback.print_exc()
        if isinstance(err, BugError):
            text = str(err)
        else:
            first = (str(err).splitlines() or [""])[0][:200]
            text = f"bug in reap-vlm (please report it with this traceback): {type(err).__name__}: {first}"
        print(f"error: {stage}: {text}", file=sys.stderr)
        return EXIT_BUG, f"{stage}: {text}"


def main(stage: str, run: Callable[[Settings], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Resolve the stage's settings, call `run(settings)` and turn the outcome into an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # before the settings are read, so that a bad setting is a JSON line too when --json is asked for
    console.configure("info", "--json" in args)

    def body() -> int:
        settings = load(STAGES[stage], args, prog=prog)
        console.configure(settings.log_level, settings.json)
        return run(settings)

    return guarded(stage, body)
