"""`./run.sh demo`: the whole pipeline on a small vision-language MoE, on the CPU, offline.

The model (`--model`): `trained` (default) is the shipped demo VLM (reap_vlm/demo_vlm/, a small Qwen3-VL-MoE
trained on the four text domains and seven image tasks; its card says how), copied into the demo folder; `tiny`
generates a random-weight tiny checkpoint of `--family` (reap_vlm.tiny). Then reap (full mode, built-in
`combined` calibration: text + images) → prune (TRAINED_RATIO of the trained model's experts, half of the tiny
one's) → test against the original on the test portion of the held-out data (per-domain perplexity, per-task
exact match and answer loss, before → after). Every stage runs through the same `run(settings)` as the scripts;
the demo's exit code is the test stage's (1: the verdict failed; the report says what was lost).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import console, outputs
from .cli import guarded
from .cli import main as stage_main
from .errors import EXIT_FAILED, EXIT_OK, SettingsError
from .settings import Parser

DEMO_VLM = Path(__file__).resolve().parent / "demo_vlm"
# the test stage's held-out mix for the trained model: about 10 questions per image task of the `tasks` set
# (7 tasks), and each text domain
TRAINED_EVAL = "tasks:70,general:3,code:3,math:3,writing:3"
# the share of experts the demo removes from the trained model: a quarter (4 of 16 per layer). At 1/8, 1/4 and 1/2
# the plan the demo's reap stage chooses fails the test stage's verdict on the position task (README, "Two
# commands", has the measurements), so no smaller ratio would pass either; the report shows what was lost.
TRAINED_RATIO = "0.25"
TINY_RATIO = "0.5"


def _run_stage(name: str, run, argv: list[str]) -> int:
    console.info(f"\n=== {name}: {' '.join(argv)}")
    return stage_main(name, run, argv, prog=f"demo {name}")


def stage_argvs(
    model_dir: Path, out: Path, *, trained: bool, scoring_mode: str = "full", prune_ratio="0.5", max_samples="64"
) -> dict[str, list[str]]:
    """The demo's flags for each stage (tests run the test stage with the same ones)."""
    common = ["--model-path", str(model_dir), "--output-path", str(out), "--device", "cpu", "--dtype", "float32"]
    if trained:
        held_out = ["--eval-data", TRAINED_EVAL, "--max-new-tokens", "16", "--batch-size", "8"]
        # the image sizes the model was trained at (its processor's own bounds: 32 x 32 to 128 x 128), and the
        # candidate plans measured at the requested ratio only, to keep the demo short
        pixels, ratios = ["--min-pixels", "1024", "--max-pixels", "16384"], ["--eval-ratios", ""]
    else:
        held_out = ["--eval-samples", "16", "--max-new-tokens", "12"]
        pixels, ratios = [], []
    return {
        "reap": [
            *common,
            "--scoring-mode",
            scoring_mode,
            "--calibration",
            "combined",
            "--max-samples",
            str(max_samples),
            "--max-seq-len",
            "256",
            "--batch-size",
            "4",
            "--prune-ratio",
            str(prune_ratio),
            "--eval-samples",
            "8",
            *pixels,
            *ratios,
        ],
        "prune": [*common, "--overwrite"],
        "test": [*common, "--original-model-path", str(model_dir), "--max-seq-len", "256", *held_out],
    }


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="./run.sh demo",
        description="Run reap -> prune -> test on the shipped demo VLM or a generated tiny MoE (CPU, no downloads).",
    )
    parser.add_argument("--output-path", default="outputs/demo", help="Folder for the demo's model and artifacts.")
    parser.add_argument(
        "--model",
        default="trained",
        choices=("trained", "tiny"),
        help="trained: the shipped demo VLM (reap_vlm/demo_vlm); tiny: a generated random-weight model of --family.",
    )
    parser.add_argument(
        "--family", default="qwen3_vl_moe", help="Tiny family to generate with --model tiny (qwen3_vl_moe, qwen3_moe)."
    )
    parser.add_argument("--scoring-mode", default="full", choices=("full", "routed", "router"))
    parser.add_argument(
        "--prune-ratio",
        default=None,
        help=f"Share of experts removed (default: {TRAINED_RATIO} with --model trained, {TINY_RATIO} with tiny).",
    )
    parser.add_argument("--max-samples", default="64")
    parser.add_argument("--log-level", default="info", choices=console.LEVELS, help="Passed to every stage.")
    for short, level in (("-q", "quiet"), ("-v", "verbose")):
        parser.add_argument(short, f"--{level}", dest="log_level", action="store_const", const=level)
    parser.add_argument("--json", action="store_true", help="A JSON result line per stage on stdout, then the demo's.")

    def demo() -> int:
        args = parser.parse_args(argv)
        console.configure(args.log_level, args.json)
        out = Path(args.output_path)
        from .tiny import _builder

        if _builder(args.family) is None:  # before anything is created or removed
            raise SettingsError(
                f"unknown tiny family {args.family!r}",
                "the demo builds one of the model types listed in docs/supported-models.md",
                "Pass e.g. --family qwen3_vl_moe",
            )
        if args.model == "trained" and not (DEMO_VLM / "config.json").is_file():
            raise SettingsError(
                "the trained demo model is not in this checkout",
                f"{DEMO_VLM} has no config.json",
                "Restore it from git, or run the demo with --model tiny",
            )
        # A folder of the user's is refused; an earlier demo folder (it carries the marker) is replaced.
        # The shipped demo VLM is a model folder like any other: the demo never writes into, over or around it.
        outputs.guard_dir(out, what="demo folder", setting="--output-path", models=[DEMO_VLM], replace=True)
        with outputs.locked(out):
            if outputs.is_own(out):
                shutil.rmtree(out)  # start clean so every artifact is from this run
            out.mkdir(parents=True, exist_ok=True)
            outputs.write_marker(out, "demo folder")
            return _demo(args, out)

    return guarded("demo", demo)


def _demo(args: argparse.Namespace, out: Path) -> int:
    # Imported before the first line: the stages' libraries (transformers' Qwen-VL image processor pulls in
    # torchvision, about 3 s on two cores) load at start-up instead of inside a step.
    from transformers import Qwen2VLImageProcessor  # noqa: F401

    from . import evaluate, prune, reap
    from .tiny import make_tiny

    model_dir = out / "model"
    started = time.perf_counter()
    trained = args.model == "trained"
    if trained:
        shutil.copytree(DEMO_VLM, model_dir)  # a copy: the stages read it, and the shipped files stay untouched
        console.info(f"trained demo VLM copied from {DEMO_VLM} to {model_dir}")
    else:
        console.step(f"writing a tiny {args.family} checkpoint")
        make_tiny(args.family, model_dir)
        console.info(f"tiny {args.family} checkpoint written to {model_dir}")
    stages = stage_argvs(
        model_dir,
        out,
        trained=trained,
        scoring_mode=args.scoring_mode,
        prune_ratio=args.prune_ratio or (TRAINED_RATIO if trained else TINY_RATIO),
        max_samples=args.max_samples,
    )
    runs = {"reap": reap.run, "prune": prune.run, "test": evaluate.run}
    shown = ["--log-level", args.log_level, *(["--json"] if args.json else [])]
    code = EXIT_OK
    for name, stage_argv in stages.items():
        code = _run_stage(name, runs[name], [*stage_argv, *shown])
        console.configure(args.log_level, args.json)  # the demo's own level again
        if code == EXIT_FAILED and name == "test":  # the verdict: the report is complete, and says what was lost
            console.info("\nThe pruned model failed the test stage's verdict (the failing checks above, in the report)")
        elif code != EXIT_OK:
            console.warn(f"\ndemo stopped: the {name} stage exited with code {code}")
            return code

    seconds = time.perf_counter() - started
    console.info(f"\nDemo finished in {seconds:.0f} s ({'PASS' if code == EXIT_OK else 'FAIL'}). Artifacts:")
    artifacts = [
        ("original model", model_dir),
        ("scores and keep plan", out / "reap_metadata.json"),
        ("pruned model", out / "pruned"),
        ("test report", out / "report" / "report.md"),
    ]
    for label, path in artifacts:
        console.info(f"  {label:22s} {path}")
    verdict = "pass" if code == EXIT_OK else "fail"
    console.set_result({"seconds": round(seconds, 1), "verdict": verdict, **{k: str(p) for k, p in artifacts}})
    return code


if __name__ == "__main__":
    sys.exit(main())
