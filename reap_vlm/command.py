"""`reap-vlm <command>` (the console script of the installed package) and `python -m reap_vlm <command>`.

The same commands as ./run.sh, run in the current Python environment: reap, prune, test, all, verify, demo.
Each goes through the same entry point as the stage scripts (reap_vlm.cli), so settings, messages and exit
codes are the same. `all` runs reap, prune and test one after the other, each in its own process (as run.sh
does: every stage starts with a fresh GPU), and stops at the first that does not exit 0; its flags become
settings for every stage (--prune-ratio 0.3 -> REAP_PRUNE_RATIO=0.3, --no-plots -> REAP_PLOTS=false).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from .errors import EXIT_USAGE, SettingsError

USAGE = """usage: reap-vlm <command> [args...]

commands:
  reap     score the experts (writes reap_metadata.json)          reap-vlm reap --help
  prune    write the pruned model                                 reap-vlm prune --help
  test     test the pruned model against the original             reap-vlm test --help
  all      reap, then prune, then test; its flags become settings for every stage
  verify   a checkpoint's MoE layout without loading weights      reap-vlm verify MODEL
  demo     the whole pipeline on a small demo VLM (CPU, offline)  reap-vlm demo --help

Settings come from flags, then REAP_* environment variables, then the .env file of the working folder.
Exit codes: 0 ok, 1 the test stage's verdict is fail, 2 bad input, 3 a bug, 130/143 interrupted.
"""
STAGE_COMMANDS = ("reap", "prune", "test")
COMMANDS = (*STAGE_COMMANDS, "all", "verify", "demo")
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(=.*)?", re.DOTALL)


def flags_to_settings(args: list[str]) -> dict[str, str]:
    """`all`'s flags as REAP_* settings: --key value, --key=value, --flag (true) and --no-flag (false)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        match = _FLAG.fullmatch(args[i])
        if not match:
            raise SettingsError(f"all takes --option [value] pairs, not {args[i]!r}", "", "Pass e.g. --prune-ratio 0.3")
        name, value = match.group(1), match.group(2)
        i += 1
        if value is not None:
            value = value[1:]
        elif i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        elif name.startswith("no-"):
            name, value = name[3:], "false"
        else:
            value = "true"
        if name in ("quiet", "verbose") and value == "true":  # the stages' --quiet / --verbose
            name, value = "log-level", name
        out["REAP_" + name.replace("-", "_").upper()] = value
    return out


def _child(argv: list[str], env: dict[str, str]) -> int:
    """Run one stage in a child process. Ctrl-C reaches the child through the terminal's process group (the
    parent ignores it meanwhile, so the child can clean up); SIGTERM is passed on to the child."""
    proc = subprocess.Popen(argv, env=env)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum)),
    }
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_all(args: list[str]) -> int:
    from .cli import guarded

    settings: dict[str, str] = {}

    def parse() -> int:
        settings.update(flags_to_settings(args))
        return 0

    code = guarded("all", parse)
    if code:
        return code
    env = {**os.environ, **settings}
    for stage in STAGE_COMMANDS:
        print(f"== reap-vlm {stage}", file=sys.stderr, flush=True)
        code = _child([sys.executable, "-m", "reap_vlm", stage], env)
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] == "--version":
        from .provenance import tool_version

        print(f"reap-vlm {tool_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGE_COMMANDS:
        from .cli import main as stage_main

        if command == "reap":
            from .reap import run
        elif command == "prune":
            from .prune import run
        else:
            from .evaluate import run
        return stage_main(command, run, rest, prog=f"reap-vlm {command}")
    if command == "all":
        if rest[:1] in (["-h"], ["--help"]):
            print(USAGE, end="")
            return 0
        return run_all(rest)
    if command == "verify":
        from .verify import main as verify_main

        return verify_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    import difflib

    close = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    print(f"error: unknown command {command!r}: {hint}use one of {', '.join(COMMANDS)}.", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
