"""`./run.sh demo`: the whole pipeline on a generated tiny Qwen3-VL-MoE, on the CPU, offline.

make_tiny → reap (full mode, built-in `combined` calibration: text + real images) → prune (50 %)
→ test against the original. Every stage runs through the same `run(settings)` as the scripts.
Extra flags are passed to every stage (e.g. `--scoring-mode routed`); the defaults below keep
the demo under a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import outputs
from .cli import guarded
from .cli import main as stage_main
from .errors import EXIT_OK, SettingsError
from .settings import Parser


def _run_stage(name: str, run, argv: list[str]) -> int:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    return stage_main(name, run, argv, prog=f"demo {name}")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="./run.sh demo",
        description="Run reap -> prune -> test on a generated tiny Qwen3-VL-MoE (CPU, no downloads).",
    )
    parser.add_argument("--output-path", default="outputs/demo", help="Folder for the demo's model and artifacts.")
    parser.add_argument("--family", default="qwen3_vl_moe", help="Tiny family to generate (qwen3_vl_moe, qwen3_moe).")
    parser.add_argument("--scoring-mode", default="full", choices=("full", "routed", "router"))
    parser.add_argument("--prune-ratio", default="0.5")
    parser.add_argument("--max-samples", default="64")

    def demo() -> int:
        args = parser.parse_args(argv)
        out = Path(args.output_path)
        from .tiny import _builder

        if _builder(args.family) is None:  # before anything is created or removed
            raise SettingsError(
                f"unknown tiny family {args.family!r}",
                "the demo builds one of the model types listed in docs/supported-models.md",
                "Pass e.g. --family qwen3_vl_moe",
            )
        # A folder of the user's is refused; an earlier demo folder (it carries the marker) is replaced.
        outputs.guard_dir(out, what="demo folder", setting="--output-path", replace=True)
        with outputs.locked(out):
            if outputs.is_own(out):
                shutil.rmtree(out)  # start clean so every artifact is from this run
            out.mkdir(parents=True, exist_ok=True)
            outputs.write_marker(out, "demo folder")
            return _demo(args, out)

    return guarded("demo", demo)


def _demo(args: argparse.Namespace, out: Path) -> int:
    from . import evaluate, prune, reap
    from .tiny import make_tiny

    model_dir = out / "model"
    started = time.perf_counter()
    make_tiny(args.family, model_dir)
    print(f"tiny {args.family} checkpoint written to {model_dir}")

    common = ["--model-path", str(model_dir), "--output-path", str(out), "--device", "cpu", "--dtype", "float32"]
    stages = [
        (
            "reap",
            reap.run,
            [
                *common,
                "--scoring-mode",
                args.scoring_mode,
                "--calibration",
                "combined",
                "--max-samples",
                args.max_samples,
                "--max-seq-len",
                "256",
                "--batch-size",
                "4",
                "--prune-ratio",
                args.prune_ratio,
                "--eval-samples",
                "8",
            ],
        ),
        ("prune", prune.run, [*common, "--overwrite"]),
        (
            "test",
            evaluate.run,
            [*common, "--original-model-path", str(model_dir), "--eval-samples", "16", "--max-new-tokens", "12"],
        ),
    ]
    for name, run, stage_argv in stages:
        code = _run_stage(name, run, stage_argv)
        if code != EXIT_OK:
            print(f"\ndemo stopped: the {name} stage exited with code {code}", file=sys.stderr)
            return code

    seconds = time.perf_counter() - started
    print(f"\nDemo finished in {seconds:.0f} s. Artifacts:")
    for label, path in [
        ("tiny original model", model_dir),
        ("scores and keep plan", out / "reap_metadata.json"),
        ("pruned model", out / "pruned"),
        ("test report", out / "report" / "report.md"),
    ]:
        print(f"  {label:22s} {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
