"""The error hierarchy. Every user mistake is a ReapError: one line that says what went
wrong, why, and what to do. Each error also inherits the matching builtin so callers can
catch it the usual way. A broken invariant is a BugError and keeps its traceback."""

from __future__ import annotations

# Exit codes of the stage scripts and of run.sh.
EXIT_OK = 0
EXIT_FAILED = 1  # the stage ran and its verdict is "fail" (test stage thresholds)
EXIT_USAGE = 2  # bad input: settings, paths, checkpoint, metadata, data
EXIT_BUG = 3  # an invariant broke: a bug in this tool
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2, as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM (docker stop, a scheduler): 128 + 15


class ReapError(Exception):
    """A known, user-facing failure. `str(err)` is the one line shown to the user."""

    exit_code = EXIT_USAGE

    def __init__(self, what: str, why: str = "", fix: str = ""):
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        line = self.what.rstrip(".")
        if self.why:
            line += ": " + self.why.rstrip(".")
        if not line.endswith(("?", "!")):
            line += "."
        if self.fix:
            line += " " + self.fix.rstrip(".") + "."
        return line


class SettingsError(ReapError, ValueError):
    """A setting is unknown, has the wrong type or an invalid value."""


class InputNotFoundError(ReapError, FileNotFoundError):
    """A path the user gave does not exist or is not readable."""


class CheckpointError(ReapError, ValueError):
    """A model checkpoint on disk is incomplete, corrupt or of an unsupported layout."""


class UnsupportedModelError(ReapError, ValueError):
    """The model has no MoE layers this tool can find, or a family that cannot be pruned exactly."""


class MetadataError(ReapError, ValueError):
    """reap_metadata.json is corrupt, of another schema version, or from another model."""


class PlanError(ReapError, ValueError):
    """The requested pruning plan is infeasible (ratio, top_k, routing groups)."""


class CalibrationError(ReapError, ValueError):
    """Calibration or evaluation data is missing, empty or unreadable."""


class OutputError(ReapError, OSError):
    """The output path is unusable: exists, overlaps the input, is read-only, or the disk is full."""


class DeviceError(ReapError, RuntimeError):
    """The requested device or dtype is not available on this machine."""


class BugError(RuntimeError):
    """An invariant of this tool broke. Not the user's fault: report it with the traceback."""

    def __init__(self, message: str):
        super().__init__(f"bug in reap-vlm (please report it with this traceback): {message}")
