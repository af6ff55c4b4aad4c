"""Hostile input and faults: every case ends in one actionable line on stderr, a documented exit code, no
traceback, the source checkpoint byte-identical, and nothing partial at the target path.

docs/reliability.md is generated from CASES: `python tests/test_reliability.py` rewrites it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


# The classes of bad input and faults, in the order docs/reliability.md shows them, each with the promise the
# cases of that class test. Every case names one of these.
GROUPS = {
    "settings": "A setting that is unknown, of the wrong type or out of range is refused before any work, "
    "naming the setting.",
    "plans": "A pruning plan the model cannot run (too few experts for its top-k, unbalanced routing groups) is "
    "refused before a tensor moves.",
    "paths": "A missing input, or an output that overlaps the input or already holds something, is refused.",
    "devices": "A device or dtype this machine does not have is refused before the model loads.",
    "checkpoint": "A model folder that is incomplete or not an MoE checkpoint is refused, naming the file.",
    "metadata": "reap_metadata.json that is corrupt, of another schema or for another model is refused.",
    "data": "Calibration and evaluation data that is missing, empty, undecodable or escapes its folder is refused.",
    "malformed input": "A file of the right name but the wrong shape (types, ranges, cross-checks, nesting, size, "
    "encoding) gives one line naming the file and the field, never a traceback.",
    "silent wrong results": "Input that would make the tool finish with a wrong or meaningless result (a pruning that "
    "removes nothing, a gate switched off by NaN, a checkpoint that cannot run) is refused instead.",
    "unclear messages": "The line names the actual cause, not a plausible-looking other one.",
    "hangs and runaway copies": "A FIFO, a device file or a symlink loop where a regular file belongs is refused "
    "instead of read forever.",
    "data loss": "The tool never deletes or overwrites what it did not create, and never writes into the input.",
    "security": "Custom code in a checkpoint never runs unless asked for, and never behind a prompt.",
    "concurrency and crash leftovers": "Two runs on one target, and the leftovers of a killed run, end in one "
    "complete output or a clear refusal, never a lost one.",
    "faults": "A full disk or a signal mid-way leaves nothing partial at the target path.",
    "run.sh": "The container wrapper refuses an unknown command or runtime.",
}


@dataclass
class Case:
    id: str
    group: str  # a key of GROUPS
    stage: str  # reap, prune, test, verify, demo, run.sh
    what: str  # the bad input, in words
    message: str  # a substring of the one line on stderr
    code: int = 2
    args: list[str] = field(default_factory=list)  # {model}, {meta}, {tmp} are filled in
    env: dict[str, str] = field(default_factory=dict)
    setup: str = ""  # name of a fixture-like function below


CASES = [
    Case(
        "missing-model",
        "paths",
        "reap",
        "model path does not exist",
        "does not exist",
        args=["--model-path", "{tmp}/nope"],
    ),
    Case(
        "model-is-file",
        "paths",
        "reap",
        "model path is a file",
        "is not a directory",
        args=["--model-path", "{tmp}/file"],
        setup="file",
    ),
    Case(
        "no-config",
        "checkpoint",
        "reap",
        "folder without config.json",
        "has no config.json",
        args=["--model-path", "{tmp}"],
    ),
    Case(
        "corrupt-config",
        "checkpoint",
        "reap",
        "config.json is not JSON",
        "is not valid JSON",
        args=["--model-path", "{tmp}/bad"],
        setup="bad_config",
    ),
    Case(
        "dense-model",
        "checkpoint",
        "reap",
        "a dense (non-MoE) model",
        "no MoE layers found",
        args=["--model-path", "{tmp}/dense"],
        setup="dense",
    ),
    Case(
        "unknown-key",
        "settings",
        "reap",
        "unknown REAP_* key",
        "did you mean REAP_PRUNE_RATIO?",
        env={"REAP_PRUNE_RATO": "0.3"},
    ),
    Case(
        "wrong-type",
        "settings",
        "reap",
        "wrong type for a setting",
        "REAP_BATCH_SIZE='four' is not an integer",
        env={"REAP_BATCH_SIZE": "four"},
    ),
    Case(
        "ratio-0", "settings", "reap", "ratio 0", "REAP_PRUNE_RATIO=0.0 is out of range", env={"REAP_PRUNE_RATIO": "0"}
    ),
    Case(
        "ratio-1", "settings", "reap", "ratio 1", "REAP_PRUNE_RATIO=1.0 is out of range", env={"REAP_PRUNE_RATIO": "1"}
    ),
    Case("ratio-negative", "settings", "reap", "negative ratio", "is out of range", env={"REAP_PRUNE_RATIO": "-0.5"}),
    Case(
        "ratio-nan",
        "settings",
        "reap",
        "NaN ratio",
        "REAP_PRUNE_RATIO=nan is out of range",
        env={"REAP_PRUNE_RATIO": "nan"},
    ),
    Case(
        "keep-below-topk",
        "plans",
        "reap",
        "keep fewer experts than top_k",
        "fewer than the model's top_k=2",
        args=["--model-path", "{model}", "--num-keep", "1"],
    ),
    Case(
        "unknown-mode",
        "settings",
        "reap",
        "unknown scoring mode",
        "REAP_SCORING_MODE='fast' is not a valid choice",
        env={"REAP_SCORING_MODE": "fast"},
    ),
    Case(
        "unknown-criterion",
        "settings",
        "reap",
        "unknown criterion",
        "REAP_CRITERION='best' is not a valid choice",
        env={"REAP_CRITERION": "best"},
    ),
    Case(
        "cuda-without-gpu",
        "devices",
        "reap",
        "CUDA requested without a GPU",
        "no CUDA GPU is visible",
        args=["--model-path", "{model}", "--device", "cuda"],
    ),
    Case(
        "fp16-on-cpu",
        "devices",
        "reap",
        "dtype unsupported on the device",
        "float16 is not supported on the CPU",
        args=["--model-path", "{model}", "--device", "cpu", "--dtype", "float16"],
    ),
    Case(
        "empty-calibration",
        "data",
        "reap",
        "empty calibration set",
        "is empty",
        args=["--model-path", "{model}", "--calibration", "{tmp}/empty.jsonl"],
        setup="empty_jsonl",
    ),
    Case(
        "images-undecodable",
        "data",
        "reap",
        "all images undecodable",
        "every image failed to decode",
        args=["--model-path", "{model}", "--calibration", "{tmp}/broken_images"],
        setup="broken_images",
    ),
    Case(
        "image-escapes",
        "data",
        "reap",
        "image path escaping its folder",
        "leaves the folder of the JSONL file",
        args=["--model-path", "{model}", "--calibration", "{tmp}/escape.jsonl"],
        setup="escape_jsonl",
    ),
    Case(
        "unknown-calibration",
        "data",
        "reap",
        "unknown calibration set",
        "unknown calibration source 'wikipedia'",
        args=["--model-path", "{model}", "--calibration", "wikipedia"],
    ),
    Case(
        "metadata-in-model",
        "paths",
        "reap",
        "output inside the model folder",
        "inside the model directory",
        args=["--model-path", "{model}", "--metadata-path", "{model}/reap_metadata.json"],
    ),
    Case(
        "unwritable-output",
        "paths",
        "reap",
        "read-only output folder",
        "could not read or write",
        args=["--model-path", "{model}", "--output-path", "/proc/reap-vlm-test"],
    ),
    Case(
        "no-metadata",
        "metadata",
        "prune",
        "metadata file missing",
        "does not exist",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/none.json"],
    ),
    Case(
        "corrupt-metadata",
        "metadata",
        "prune",
        "corrupt JSON metadata",
        "is not valid JSON",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/corrupt.json"],
        setup="corrupt_meta",
    ),
    Case(
        "future-schema",
        "metadata",
        "prune",
        "metadata of a future schema version",
        "has schema version 99",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/future.json"],
        setup="future_meta",
    ),
    Case(
        "other-model-metadata",
        "metadata",
        "prune",
        "metadata from another model",
        "the metadata was made for",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/other.json"],
        setup="other_meta",
    ),
    Case(
        "output-is-input",
        "paths",
        "prune",
        "output = input",
        "overlaps the input",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{model}"],
    ),
    Case(
        "output-inside-input",
        "paths",
        "prune",
        "output inside input",
        "overlaps the input",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{model}/pruned"],
    ),
    Case(
        "output-exists",
        "paths",
        "prune",
        "output exists and is not empty",
        "already exists and is not empty",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/busy"],
        setup="busy",
    ),
    Case(
        "truncated-header",
        "checkpoint",
        "prune",
        "truncated safetensors header",
        "is not a readable safetensors file",
        args=["--model-path", "{tmp}/trunc", "--metadata-path", "{meta}"],
        setup="truncated",
    ),
    Case(
        "missing-shard",
        "checkpoint",
        "prune",
        "index names a missing shard",
        "the index names shard",
        args=["--model-path", "{tmp}/noshard", "--metadata-path", "{meta}"],
        setup="missing_shard",
    ),
    Case(
        "unlisted-tensor",
        "checkpoint",
        "prune",
        "shard holds a tensor the index does not list",
        "the index does not list",
        args=["--model-path", "{tmp}/unlisted", "--metadata-path", "{meta}"],
        setup="unlisted",
    ),
    Case(
        "group-unbalanced",
        "plans",
        "prune",
        "plan unbalanced over routing groups",
        "routing groups",
        args=["--model-path", "{tmp}/dsv3", "--metadata-path", "{tmp}/dsv3.json"],
        setup="unbalanced",
    ),
    Case(
        "disk-full",
        "faults",
        "prune",
        "disk full during write (file size limit)",
        "failed: OSError: File too large",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="fsize",
    ),
    Case(
        "pruned-missing",
        "paths",
        "test",
        "pruned model missing",
        "pruned model",
        args=["--pruned-model-path", "{tmp}/x"],
    ),
    Case(
        "eval-data-missing",
        "data",
        "test",
        "evaluation JSONL missing",
        "does not exist",
        args=["--pruned-model-path", "{model}", "--eval-data", "{tmp}/none.jsonl"],
    ),
    Case(
        "sigint-scoring",
        "faults",
        "reap",
        "SIGINT during scoring",
        "reap interrupted (SIGINT)",
        code=130,
        args=["--model-path", "{model}", "--max-samples", "64", "--batch-size", "1"],
        setup="signal",
    ),
    Case(
        "sigterm-pruning",
        "faults",
        "prune",
        "SIGTERM during pruning",
        "prune interrupted (SIGTERM)",
        code=130,
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="signal",
    ),
    Case(
        "runsh-unknown-command",
        "run.sh",
        "run.sh",
        "unknown run.sh command",
        "unknown command 'frobnicate'",
        args=["frobnicate"],
    ),
    Case(
        "runsh-bad-runtime",
        "run.sh",
        "run.sh",
        "invalid REAP_RUNTIME",
        "REAP_RUNTIME=podman is not valid",
        args=["reap"],
        env={"REAP_RUNTIME": "podman"},
    ),
]

SCRIPTS = {"reap": "reap.py", "prune": "prune_model.py", "test": "test_pruned_model.py"}
BASE = ["--device", "cpu", "--max-samples", "8", "--max-seq-len", "64", "--eval-samples", "0", "--no-plots"]
STAGE_BASE = {"reap": BASE, "prune": [], "test": ["--device", "cpu"]}

# A child that slows one step down, so a signal lands mid-way, and then runs the real CLI.
SLOW_CHILD = """
import sys, time
stage = sys.argv[1]
if stage == "reap":
    import reap_vlm.observe.observer as o
    original = o.Observer.set_modality
    def slow(self, m):
        time.sleep(0.4)
        return original(self, m)
    o.Observer.set_modality = slow
    from reap_vlm.reap import run
else:
    import reap_vlm.checkpoint.write as w
    original = w._copy_range
    def slow(*a):
        time.sleep(0.05)
        return original(*a)
    w._copy_range = slow
    from reap_vlm.prune import run
from reap_vlm.cli import main
print("started", flush=True)
sys.exit(main(stage, run, sys.argv[2:]))
"""


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and metadata for it, made once."""
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load
    from reap_vlm.tiny import make_tiny

    base = tmp_path_factory.mktemp("world")
    model = make_tiny("qwen3_moe", base / "model")
    score(load(ReapSettings, ["--model-path", str(model), "--output-path", str(base / "meta"), *BASE], {}))
    return model, base / "meta" / "reap_metadata.json"


def _setup(name: str, tmp: Path, model: Path, meta: Path) -> None:
    import shutil

    if name == "file":
        (tmp / "file").write_text("not a model")
    elif name == "bad_config":
        (tmp / "bad").mkdir()
        (tmp / "bad" / "config.json").write_text("{not json")
    elif name == "dense":
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        ).save_pretrained(tmp / "dense")
        shutil.copy(model / "tokenizer.json", tmp / "dense")
        shutil.copy(model / "tokenizer_config.json", tmp / "dense")
    elif name == "empty_jsonl":
        (tmp / "empty.jsonl").write_text("")
    elif name == "broken_images":
        (tmp / "broken_images").mkdir()
        for i in range(6):
            (tmp / "broken_images" / f"x{i}.png").write_bytes(b"not a png")
    elif name == "escape_jsonl":
        row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "../../etc/hostname"}]}]}
        (tmp / "escape.jsonl").write_text("\n".join(json.dumps(row | {"n": i}) for i in range(10)) + "\n")
    elif name == "corrupt_meta":
        (tmp / "corrupt.json").write_text('{"schema_version": 1,')
    elif name == "future_meta":
        data = json.loads(meta.read_text())
        data["schema_version"] = 99
        (tmp / "future.json").write_text(json.dumps(data))
    elif name == "other_meta":
        data = json.loads(meta.read_text())
        data["model"]["architecture"] = "MixtralForCausalLM"
        (tmp / "other.json").write_text(json.dumps(data))
    elif name == "busy":
        (tmp / "busy").mkdir()
        (tmp / "busy" / "keep.txt").write_text("mine")
    elif name == "truncated":
        shutil.copytree(model, tmp / "trunc")
        shard = sorted((tmp / "trunc").glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:12])
    elif name == "missing_shard":
        shutil.copytree(model, tmp / "noshard")
        sorted((tmp / "noshard").glob("model-*.safetensors"))[-1].unlink()
    elif name == "unlisted":
        shutil.copytree(model, tmp / "unlisted")
        index_path = tmp / "unlisted" / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"].pop(next(iter(index["weight_map"])))
        index_path.write_text(json.dumps(index))
    elif name == "unbalanced":
        from reap_vlm.checkpoint import inspect_checkpoint
        from reap_vlm.tiny import make_tiny

        make_tiny("deepseek_v3", tmp / "dsv3")
        layout = inspect_checkpoint(tmp / "dsv3")
        data = json.loads(meta.read_text())
        data["model"]["architecture"] = (layout.config["architectures"])[0]
        data["model"]["blocks"] = [
            {"key": f"{k[0]}.{k[1]}", "layer": k[0], "expert_set": k[1], "num_experts": 8, "top_k": 2, "n_group": 2}
            for k in sorted(layout.counts())
        ]
        data["layers"] = {b["key"]: {"stats": {}, "kept": [0, 1, 2, 3, 4, 5]} for b in data["model"]["blocks"]}
        (tmp / "dsv3.json").write_text(json.dumps(data))


def _command(case: Case, tmp: Path, model: Path, meta: Path) -> list[str]:
    fill = {"model": str(model), "meta": str(meta), "tmp": str(tmp)}
    args = [a.format(**fill) for a in case.args]
    if case.stage == "run.sh":
        return [str(ROOT / "run.sh"), *args]
    if case.stage in ("verify", "demo"):  # tools with their own flags, no stage settings
        return [sys.executable, "-m", f"reap_vlm.{case.stage}", *args]
    extra = [] if "--output-path" in args else ["--output-path", str(tmp / "outputs")]
    if case.setup == "signal":
        return [sys.executable, "-c", SLOW_CHILD, case.stage, *STAGE_BASE[case.stage], *extra, *args]
    return [sys.executable, str(ROOT / SCRIPTS[case.stage]), *STAGE_BASE[case.stage], *extra, *args]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world, tmp_path):
    model, meta = world
    _setup(case.setup, tmp_path, model, meta)
    before = _digest(model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update({"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **case.env})
    cmd = _command(case, tmp_path, model, meta)
    kwargs = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if case.setup == "fsize":
        import resource

        def limit():  # a full disk, as the writer sees it: writes beyond 64 KiB fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

        kwargs["preexec_fn"] = limit
    child = subprocess.Popen(cmd, **kwargs)
    if case.setup == "signal":
        assert child.stdout.readline().strip() == "started"
        time.sleep(6 if case.stage == "reap" else 3.5)  # model loaded, work under way
        child.send_signal(signal.SIGINT if case.stage == "reap" else signal.SIGTERM)
    _, stderr = child.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("Loading", "Writing"))]
    errors = [line for line in lines if line.startswith(("error:", "run.sh:"))]
    assert child.returncode == case.code, stderr[-2000:]
    assert len(errors) == 1 and case.message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert _digest(model) == before  # the source checkpoint is untouched
    for target in (tmp_path / "out", tmp_path / "outputs" / "pruned", tmp_path / "outputs" / "reap_metadata.json"):
        assert not target.exists(), target
    assert not list(tmp_path.glob(".*reap-tmp-*")) and not list((tmp_path / "outputs").glob(".*reap-tmp-*"))
    if case.setup == "busy":
        assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def render_doc() -> str:
    lines = [
        "# Reliability: bad input and faults",
        "",
        "Every case below is a test in `tests/test_reliability.py` (this page is generated from it with "
        "`python tests/test_reliability.py`). In each, the stage prints one line on stderr and exits with the "
        "code shown; no traceback; the source checkpoint stays byte-identical; nothing partial is left at the "
        "target path (outputs are written to a temporary folder or file beside the target and renamed into "
        "place when complete).",
        "",
        "Exit codes: 0 success, 1 the test stage's verdict is fail, 2 bad input, 3 a bug (with traceback), "
        "130 interrupted.",
        "",
        "Beyond these tables: a SIGKILL at 20 points during writing leaves the target absent or complete "
        "(`tests/test_prune.py::test_killed_writer_leaves_nothing_and_rerun_succeeds`); the next run removes "
        "stale temporary folders with a message; an interrupted scoring run continues with `--resume` to the "
        "same metadata (`tests/test_scoring.py`); `trust_remote_code` is off unless `REAP_TRUST_REMOTE_CODE=1`; "
        "the container runs as uid 1000; JSON and JSONL inputs are parsed strictly (no NaN/Infinity) and "
        "size-limited; calibration image paths are confined to their JSONL's folder; nothing downloads unless "
        "a `hf:` calibration source is asked for.",
        "",
    ]
    for group, promise in GROUPS.items():
        cases = [c for c in CASES if c.group == group]
        if not cases:
            continue
        lines += [f"## {group[0].upper()}{group[1:]}", "", promise, ""]
        lines += ["| case | stage | bad input | exit code | the line says |", "|---|---|---|---|---|"]
        lines += [f"| `{c.id}` | {c.stage} | {c.what} | {c.code} | …{c.message}… |" for c in cases]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def test_every_case_has_a_known_class_and_a_unique_id():
    assert [c for c in CASES if c.group not in GROUPS] == []
    assert len({c.id for c in CASES}) == len(CASES)


def test_reliability_doc_is_generated_from_the_cases():
    assert len(CASES) >= 30
    assert DOC.read_text() == render_doc(), "regenerate: python tests/test_reliability.py"


if __name__ == "__main__":
    DOC.write_text(render_doc())
