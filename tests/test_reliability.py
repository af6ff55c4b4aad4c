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
    inproc: bool = False  # run reap_vlm's entry point in this process (no interpreter start-up: fast)


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
        "is inside the model folder",
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
    # ---- outputs: data loss, concurrency, runaway copies, custom code (reap_vlm.outputs) ----
    Case(
        "report-into-model",
        "data loss",
        "test",
        "--report-path is the original model's folder (the report replaces its folder)",
        "overlaps the input",
        args=["--model-path", "{model}", "--pruned-model-path", "{tmp}/x", "--report-path", "{model}"],
        inproc=True,
    ),
    Case(
        "report-is-home",
        "data loss",
        "test",
        "--report-path ~ (the home folder)",
        "is the home folder",
        args=["--model-path", "{model}", "--pruned-model-path", "{tmp}/x", "--report-path", "~"],
        env={"HOME": "{tmp}/home"},
        setup="home",
        inproc=True,
    ),
    Case(
        "report-holds-metadata",
        "data loss",
        "test",
        "--report-path is the folder of the metadata the run reads",
        "which this run reads",
        args=[
            "--pruned-model-path",
            "{tmp}/x",
            "--metadata-path",
            "{tmp}/runs/reap_metadata.json",
            "--report-path",
            "{tmp}/runs",
        ],
        setup="runs",
        inproc=True,
    ),
    Case(
        "demo-into-user-folder",
        "data loss",
        "demo",
        "demo --output-path is a folder with the user's files",
        "no .reap-vlm-output marker",
        args=["--output-path", "{tmp}/busy"],
        setup="busy",
        inproc=True,
    ),
    Case(
        "overwrite-user-folder",
        "data loss",
        "prune",
        "--overwrite into a folder the tool did not write",
        "never replaces it (not even with --overwrite)",
        args=[
            "--model-path",
            "{model}",
            "--metadata-path",
            "{meta}",
            "--pruned-model-path",
            "{tmp}/busy",
            "--overwrite",
        ],
        setup="busy",
        inproc=True,
    ),
    Case(
        "overwrite-holds-metadata",
        "data loss",
        "prune",
        "--overwrite into the folder that holds the run's own reap_metadata.json",
        "which this run reads",
        args=[
            "--model-path",
            "{model}",
            "--metadata-path",
            "{tmp}/runs/reap_metadata.json",
            "--pruned-model-path",
            "{tmp}/runs",
            "--overwrite",
        ],
        setup="runs",
        inproc=True,
    ),
    Case(
        "settings-into-model",
        "data loss",
        "prune",
        "--output-path is the model folder (prune_settings.json would go into the source)",
        "is inside the model folder",
        args=[
            "--model-path",
            "{model}",
            "--metadata-path",
            "{meta}",
            "--output-path",
            "{model}",
            "--pruned-model-path",
            "{tmp}/out",
        ],
        inproc=True,
    ),
    Case(
        "metadata-into-home",
        "data loss",
        "reap",
        "reap --output-path ~ (metadata, settings and plots into the home folder)",
        "would be written into the home folder",
        args=["--model-path", "{model}", "--output-path", "~"],
        env={"HOME": "{tmp}/home"},
        setup="home",
        inproc=True,
    ),
    Case(
        "target-locked",
        "concurrency and crash leftovers",
        "prune",
        "a second run on a target another run is writing (its lock is held)",
        "another reap-vlm run",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="locked",
        inproc=True,
    ),
    Case(
        "model-file-to-dev-zero",
        "hangs and runaway copies",
        "prune",
        "tokenizer.model -> /dev/zero in the model folder",
        "links to /dev/zero, outside the model folder",
        args=["--model-path", "{tmp}/zero", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="dev_zero",
        inproc=True,
    ),
    Case(
        "model-file-fifo",
        "hangs and runaway copies",
        "prune",
        "a FIFO in the model folder",
        "is not a regular file",
        args=["--model-path", "{tmp}/fifo", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="fifo",
        inproc=True,
    ),
    Case(
        "model-folder-link-loop",
        "hangs and runaway copies",
        "prune",
        "a symlink loop in the model folder (loop -> .)",
        "is a link to a folder",
        args=["--model-path", "{tmp}/loop", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="link_loop",
        inproc=True,
    ),
    Case(
        "model-file-link-loop",
        "hangs and runaway copies",
        "prune",
        "a file symlink that points at itself",
        "is a broken link or a link loop",
        args=["--model-path", "{tmp}/selflink", "--metadata-path", "{meta}", "--pruned-model-path", "{tmp}/out"],
        setup="self_link",
        inproc=True,
    ),
    Case(
        "custom-code-unknown-type",
        "security",
        "reap",
        "config.json with auto_map for a model type transformers does not have",
        "REAP_TRUST_REMOTE_CODE is off",
        args=["--model-path", "{tmp}/custom"],
        setup="custom_code",
        inproc=True,
    ),
    Case(
        "unknown-option",
        "unclear messages",
        "prune",
        "a misspelt option (--prune-ration)",
        "unknown option --prune-ration: did you mean --prune-ratio?",
        args=["--prune-ration", "0.3"],
        inproc=True,
    ),
    Case(
        "verify-unknown-option",
        "unclear messages",
        "verify",
        "a misspelt verify option",
        "unknown option --prune-rato: did you mean --prune-ratio?",
        args=["{model}", "--prune-rato", "0.3"],
        inproc=True,
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
        code=143,
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
    Case(
        "config-list",
        "malformed input",
        "reap",
        "config.json is a JSON list",
        "is not a JSON object",
        args=["--model-path", "{tmp}/m"],
        setup="config_list",
        inproc=True,
    ),
    Case(
        "topk-string",
        "malformed input",
        "prune",
        'a string top-k ("two")',
        "num_experts_per_tok is 'two'",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="topk_string",
        inproc=True,
    ),
    Case(
        "n-group-too-large",
        "malformed input",
        "reap",
        "n_group larger than the expert count",
        "n_group=16 does not divide the 8 experts",
        args=["--model-path", "{tmp}/m"],
        setup="n_group_16",
        inproc=True,
    ),
    Case(
        "header-shape-int",
        "malformed input",
        "prune",
        "a safetensors header shape that is an int",
        "shape is 5",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="header_shape_int",
        inproc=True,
    ),
    Case(
        "index-list",
        "malformed input",
        "prune",
        "model.safetensors.index.json is a list",
        "model.safetensors.index.json: the top level is list",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="index_list",
        inproc=True,
    ),
    Case(
        "index-values-lists",
        "malformed input",
        "prune",
        "index weight_map values are lists",
        "weight_map.",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="index_values_lists",
        inproc=True,
    ),
    Case(
        "metadata-layers-list",
        "malformed input",
        "prune",
        "metadata whose layers are a list",
        "layers is list",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_layers_list",
        inproc=True,
    ),
    Case(
        "metadata-blocks-int",
        "malformed input",
        "prune",
        "metadata whose model.blocks is an int",
        "model.blocks is 3",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_blocks_int",
        inproc=True,
    ),
    Case(
        "metadata-block-no-key",
        "malformed input",
        "prune",
        "metadata block without its key",
        "model.blocks.0.key",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_block_no_key",
        inproc=True,
    ),
    Case(
        "metadata-blocks-lists",
        "malformed input",
        "prune",
        "metadata whose blocks are lists",
        "model.blocks.0 is list",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_blocks_lists",
        inproc=True,
    ),
    Case(
        "metadata-layers-int",
        "malformed input",
        "prune",
        "metadata whose layers is an int",
        "layers is 7",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_layers_int",
        inproc=True,
    ),
    Case(
        "provenance-kept-string",
        "malformed input",
        "test",
        "a pruned config whose reap_pruning.kept holds a string",
        "reap_pruning.kept.0.experts is 'all'",
        args=["--pruned-model-path", "{tmp}/m"],
        setup="provenance_string",
        inproc=True,
    ),
    Case(
        "deep-config",
        "malformed input",
        "reap",
        "config.json nested 100 000 deep",
        "nests JSON too deeply",
        args=["--model-path", "{tmp}/m"],
        setup="deep_config",
        inproc=True,
    ),
    Case(
        "deep-index",
        "malformed input",
        "prune",
        "index nested 100 000 deep",
        "nests JSON too deeply",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="deep_index",
        inproc=True,
    ),
    Case(
        "deep-header",
        "malformed input",
        "prune",
        "safetensors header nested 100 000 deep",
        "nests JSON too deeply",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="deep_header",
        inproc=True,
    ),
    Case(
        "deep-metadata",
        "malformed input",
        "prune",
        "metadata nested 100 000 deep",
        "nests JSON too deeply",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="deep_meta",
        inproc=True,
    ),
    Case(
        "deep-jsonl",
        "malformed input",
        "reap",
        "a calibration JSONL line nested 100 000 deep",
        "nests JSON too deeply",
        args=["--model-path", "{model}", "--calibration", "{tmp}/deep.jsonl"],
        setup="deep_jsonl",
        inproc=True,
    ),
    Case(
        "deep-metadata-verify",
        "malformed input",
        "verify",
        "metadata nested 100 000 deep, checked by verify",
        "nests JSON too deeply",
        args=["{model}", "--metadata-path", "{tmp}/x.json"],
        setup="deep_meta",
        inproc=True,
    ),
    Case(
        "jsonl-content-strings",
        "malformed input",
        "reap",
        "a JSONL content that is a list of strings",
        "messages.0.content.0 is 'hello'",
        args=["--model-path", "{model}", "--calibration", "{tmp}/strings.jsonl"],
        setup="content_strings",
        inproc=True,
    ),
    Case(
        "prompt-not-utf8",
        "malformed input",
        "reap",
        "a prompt.txt that is not UTF-8",
        "is not UTF-8 text",
        args=["--model-path", "{model}", "--calibration", "{tmp}/imgs"],
        setup="prompt_latin1",
        inproc=True,
    ),
    Case(
        "png-bomb",
        "malformed input",
        "reap",
        "a 20000 x 20000 PNG (decompression bomb)",
        "is too large to decode safely",
        args=["--model-path", "{model}", "--calibration", "{tmp}/imgs"],
        setup="png_bomb",
        inproc=True,
    ),
    Case(
        "max-shard-size-unit",
        "malformed input",
        "prune",
        "--max-shard-size 5XB",
        "REAP_MAX_SHARD_SIZE='5XB' is not a size",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--max-shard-size", "5XB"],
        inproc=True,
    ),
    Case(
        "verify-ratio-nan",
        "malformed input",
        "verify",
        "verify --prune-ratio nan",
        "--prune-ratio nan is out of range",
        args=["{model}", "--prune-ratio", "nan"],
        inproc=True,
    ),
    Case(
        "demo-family-bogus",
        "malformed input",
        "demo",
        "demo --family bogus",
        "unknown tiny family 'bogus'",
        args=["--family", "bogus"],
        inproc=True,
    ),
    Case(
        "resume-garbage",
        "malformed input",
        "reap",
        "a garbage accumulator file with --resume",
        "is unreadable",
        args=["--model-path", "{model}", "--resume"],
        setup="acc_garbage",
        inproc=True,
    ),
    Case(
        "min-agreement-nan",
        "silent wrong results",
        "test",
        "--min-agreement nan (switched the gate off)",
        "REAP_MIN_AGREEMENT=nan is out of range",
        args=["--pruned-model-path", "{model}", "--min-agreement", "nan"],
        inproc=True,
    ),
    Case(
        "max-kl-inf",
        "silent wrong results",
        "test",
        "REAP_MAX_KL=inf (switched the gate off)",
        "REAP_MAX_KL=inf is out of range",
        args=["--pruned-model-path", "{model}"],
        env={"REAP_MAX_KL": "inf"},
        inproc=True,
    ),
    Case(
        "min-agreement-above-1",
        "silent wrong results",
        "test",
        "REAP_MIN_AGREEMENT=1.5 (can never pass)",
        "REAP_MIN_AGREEMENT=1.5 is out of range",
        args=["--pruned-model-path", "{model}"],
        env={"REAP_MIN_AGREEMENT": "1.5"},
        inproc=True,
    ),
    Case(
        "no-topk",
        "silent wrong results",
        "prune",
        "config.json without num_experts_per_tok (transformers' default is 8)",
        "fewer than top_k=8",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="no_topk",
        inproc=True,
    ),
    Case(
        "header-shape-bytes",
        "silent wrong results",
        "prune",
        "a header shape that does not match its bytes",
        "but its data_offsets hold",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="header_shape_bytes",
        inproc=True,
    ),
    Case(
        "header-shared-bytes",
        "silent wrong results",
        "prune",
        "two tensors sharing bytes",
        "share bytes",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="header_shared",
        inproc=True,
    ),
    Case(
        "num-keep-all",
        "silent wrong results",
        "prune",
        "--num-keep 100 (>= the experts)",
        "keeps all 8 experts: nothing would be pruned",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--num-keep", "100"],
        inproc=True,
    ),
    Case(
        "ratio-rounds-to-nothing",
        "silent wrong results",
        "prune",
        "--prune-ratio 1e-9 (removes nothing)",
        "keeps all 8 experts: nothing would be pruned",
        args=["--model-path", "{model}", "--metadata-path", "{meta}", "--prune-ratio", "1e-9"],
        inproc=True,
    ),
    Case(
        "verify-ratio-3",
        "silent wrong results",
        "verify",
        "verify --prune-ratio 3 (reported -16 experts kept)",
        "--prune-ratio 3.0 is out of range",
        args=["{model}", "--prune-ratio", "3"],
        inproc=True,
    ),
    Case(
        "keep-bool",
        "silent wrong results",
        "prune",
        "a boolean in a keep list",
        "kept.0 is True",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_kept_bool",
        inproc=True,
    ),
    Case(
        "other-expert-shapes",
        "silent wrong results",
        "prune",
        "metadata of a same-architecture model with other expert shapes",
        "weights each",
        args=["--model-path", "{model}", "--metadata-path", "{tmp}/x.json"],
        setup="meta_other_shapes",
        inproc=True,
    ),
    Case(
        "count-string",
        "unclear messages",
        "prune",
        "a string expert count (was: 'no expert count')",
        "num_experts is 'eight'",
        args=["--model-path", "{tmp}/m", "--metadata-path", "{meta}"],
        setup="count_string",
        inproc=True,
    ),
    Case(
        "bad-attention",
        "unclear messages",
        "reap",
        "an unknown attention implementation (was: 'check the checkpoint is complete')",
        "REAP_ATTN_IMPLEMENTATION='bogus' cannot be used",
        args=["--model-path", "{model}", "--attn-implementation", "bogus"],
        inproc=True,
    ),
    Case(
        "resume-truncated",
        "unclear messages",
        "reap",
        "a truncated accumulator file with --resume (was: 'Invalid argument')",
        ".reap_accumulators.pt is unreadable: it is truncated",
        args=["--model-path", "{model}", "--resume"],
        setup="acc_truncated",
        inproc=True,
    ),
    Case(
        "image-fifo",
        "hangs and runaway copies",
        "reap",
        "a calibration image path that is a FIFO",
        "is not a regular file: it is a FIFO",
        args=["--model-path", "{model}", "--calibration", "{tmp}/fifo.jsonl"],
        setup="image_fifo",
        inproc=True,
    ),
    Case(
        "folder-fifo",
        "hangs and runaway copies",
        "reap",
        "a FIFO named like an image in an image folder",
        "is not a regular file: it is a FIFO",
        args=["--model-path", "{model}", "--calibration", "{tmp}/imgs"],
        setup="folder_fifo",
        inproc=True,
    ),
    Case(
        "jsonl-fifo",
        "hangs and runaway copies",
        "reap",
        "a calibration JSONL that is a FIFO",
        "is not a regular file: it is a FIFO",
        args=["--model-path", "{model}", "--calibration", "{tmp}/pipe.jsonl"],
        setup="jsonl_fifo",
        inproc=True,
    ),
    # ---- recipes (--config): the same rules as every file the tool reads ------------------------------------
    *[
        Case(
            f"recipe-{name}",
            group,
            "reap",
            what,
            message,
            args=["--config", "{tmp}/r.yaml"],
            setup=f"recipe_{name}",
            inproc=True,
        )
        for name, group, what, message in (
            ("missing", "paths", "--config names no file", "does not exist"),
            ("not-yaml", "malformed input", "a recipe that is not YAML", "is not valid YAML (line 2)"),
            ("list", "malformed input", "a recipe that is a list, not a mapping", "is a list, not a mapping of keys"),
            ("unknown-key", "settings", "a misspelt key", "unknown setting REAP_PRUNE_RATO in recipe"),
            ("bare-key", "settings", "a key without the REAP_ prefix", "did you mean REAP_PRUNE_RATIO?"),
            ("nested", "malformed input", "a value that is a mapping", "is a dict, not a single value"),
            ("date", "malformed input", "a value YAML reads as a date", "is a date, not a single value"),
            ("duplicate", "silent wrong results", "a key set twice (YAML would keep the last)", "sets REAP_SEED twice"),
            ("bad-value", "settings", "a value of the wrong type", "REAP_PRUNE_RATIO='half' (recipe"),
            ("nan", "silent wrong results", "a NaN threshold", "REAP_SUPER_EXPERT_FACTOR=nan is out of range"),
            ("runner-key", "unclear messages", "a run.sh key, read before any recipe", "cannot be set in a recipe"),
            ("two-documents", "malformed input", "two YAML documents", "but found another document"),
            ("deep", "malformed input", "5000 nested lists", "nests too deeply"),
            ("alias-bomb", "malformed input", "an alias expansion bomb", "is a list, not a single value"),
            ("binary", "malformed input", "bytes that are not UTF-8", "is not UTF-8 text"),
            ("too-big", "malformed input", "a 2 MiB recipe", "more than the 1 MiB"),
            ("fifo", "hangs and runaway copies", "a FIFO named as the recipe", "it is a FIFO"),
            ("dir", "hangs and runaway copies", "a folder named as the recipe", "it is a directory"),
        )
    ],
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
        print("working", flush=True)
        time.sleep(0.4)
        return original(self, m)
    o.Observer.set_modality = slow
    from reap_vlm.reap import run
else:
    import reap_vlm.checkpoint.write as w
    original = w._copy_range
    def slow(*a):
        print("working", flush=True)
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


_HELD: list[int] = []  # lock files held by the test process (the "locked" setup)


def _setup_outputs(name: str, tmp: Path, model: Path, meta: Path) -> None:
    """Setups of the output cases: user folders, a held lock, special files in a model folder, custom code."""
    import fcntl
    import shutil

    if name == "home":
        (tmp / "home").mkdir()
        (tmp / "home" / "notes.txt").write_text("mine")
    elif name == "runs":
        (tmp / "runs").mkdir()
        shutil.copy(meta, tmp / "runs" / "reap_metadata.json")
        (tmp / "runs" / "notes.txt").write_text("mine")
    elif name == "locked":
        fd = os.open(tmp / ".out.reap-lock", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"4242")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _HELD.append(fd)
    elif name in ("dev_zero", "fifo", "link_loop", "self_link", "custom_code"):
        folder = tmp / {"dev_zero": "zero", "link_loop": "loop", "self_link": "selflink", "custom_code": "custom"}.get(
            name, name
        )
        shutil.copytree(model, folder)
        if name == "dev_zero":
            (folder / "tokenizer.model").symlink_to("/dev/zero")
        elif name == "fifo":
            os.mkfifo(folder / "tokenizer.model")
        elif name == "link_loop":
            (folder / "loop").symlink_to(".")
        elif name == "self_link":
            (folder / "vocab.txt").symlink_to("vocab.txt")
        else:
            config = json.loads((folder / "config.json").read_text())
            config.update(model_type="my_custom_moe", auto_map={"AutoModelForCausalLM": "custom.CustomModel"})
            (folder / "config.json").write_text(json.dumps(config))
            (folder / "custom.py").write_text("raise SystemExit('the custom code ran')\n")


def _setup(name: str, tmp: Path, model: Path, meta: Path) -> None:
    import shutil

    _setup_outputs(name, tmp, model, meta)
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


# ---- setups of the malformed-input cases: a copy of the model at {tmp}/m, or a file under {tmp} -----------

DEEP = "[" * 100_000 + "]" * 100_000


def _copy(model: Path, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model, tmp / "m"))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_header(shard: Path, change) -> None:
    """Rewrite a safetensors shard's header (the data is kept byte for byte)."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    blob = change(header)
    blob = blob if isinstance(blob, bytes) else json.dumps(header).encode()
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def _first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def _expert_shard(model: Path) -> tuple[Path, list[str]]:
    """A shard and two expert tensors in it with the same shape and dtype."""
    for shard in sorted(model.glob("model-*.safetensors")):
        raw = shard.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        by_shape: dict = {}
        for k, v in header.items():
            if k != "__metadata__" and ".experts." in k:
                by_shape.setdefault((v["dtype"], tuple(v["shape"])), []).append(k)
        names = next((v for v in by_shape.values() if len(v) >= 2), [])
        if names:
            return shard, names[:2]
    raise AssertionError("no shard with two expert tensors of one shape")


def _meta_copy(meta: Path, tmp: Path, change) -> None:
    if isinstance(change, str):
        (tmp / "x.json").write_text(change)
        return
    data = json.loads(meta.read_text())
    change(data)
    (tmp / "x.json").write_text(json.dumps(data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (Pillow reads the size before any pixel)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _images(tmp: Path, n: int = 6) -> Path:
    from PIL import Image

    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 10, 200)).save(folder / f"ok{i}.png")
    return folder


def _accumulators(tmp: Path) -> Path:
    (tmp / "outputs").mkdir(exist_ok=True)
    return tmp / "outputs" / ".reap_accumulators.pt"


def _truncated_accumulators(tmp: Path) -> None:
    import torch

    path = _accumulators(tmp)
    torch.save({"batch": 1, "state": {"0.experts": {"acc": torch.zeros(8, 7)}}, "settings_hash": "x"}, path)
    path.write_bytes(path.read_bytes()[:300])


def _jsonl_rows(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r | {"n": i}) + "\n" for i, r in enumerate(rows)))


def _image_rows(image: str) -> list:
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": image}]}]}] * 10


RECIPES = {
    "not-yaml": "REAP_SEED: [1, 2\n",
    "list": "- REAP_SEED: 1\n",
    "unknown-key": "REAP_PRUNE_RATO: 0.5\n",
    "bare-key": "prune_ratio: 0.5\n",
    "nested": "REAP_SEED: {a: 1}\n",
    "date": "REAP_SEED: 2024-01-01\n",
    "duplicate": "REAP_SEED: 1\nREAP_SEED: 2\n",
    "bad-value": "REAP_PRUNE_RATIO: half\n",
    "nan": "REAP_SUPER_EXPERT_FACTOR: .nan\n",
    "runner-key": "REAP_RUNTIME: docker\n",
    "two-documents": "REAP_SEED: 1\n---\nREAP_SEED: 2\n",
    "deep": "REAP_SEED: " + "[" * 5000 + "]" * 5000 + "\n",
    "alias-bomb": "REAP_SEED: &a [x, x, x, x, x, x, x, x, x]\nREAP_MAX_SAMPLES: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n",
    "too-big": "#" * (2 << 20) + "\n",
}


def _recipe(name: str, tmp: Path) -> None:
    path = tmp / "r.yaml"
    if name in RECIPES:
        path.write_text(RECIPES[name])
    elif name == "binary":
        path.write_bytes(b"\xff\xfeREAP_SEED: 1\n")
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "dir":
        path.mkdir()


SETUPS = {
    **{
        f"recipe_{name}": (lambda tmp, model, meta, name=name: _recipe(name, tmp))
        for name in (*RECIPES, "missing", "binary", "fifo", "dir")
    },
    "config_list": lambda tmp, model, meta: (_copy(model, tmp) / "config.json").write_text("[1, 2]"),
    "topk_string": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "config.json", lambda c: c.update(num_experts_per_tok="two")
    ),
    "n_group_16": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "config.json", lambda c: c.update(n_group=16, topk_group=1)
    ),
    "count_string": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "config.json", lambda c: c.update(num_experts="eight")
    ),
    "no_topk": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "config.json", lambda c: c.pop("num_experts_per_tok")
    ),
    "deep_config": lambda tmp, model, meta: (_copy(model, tmp) / "config.json").write_text(DEEP),
    "index_list": lambda tmp, model, meta: (_copy(model, tmp) / "model.safetensors.index.json").write_text("[1]"),
    "index_values_lists": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "model.safetensors.index.json",
        lambda i: i.update(weight_map={k: [v] for k, v in i["weight_map"].items()}),
    ),
    "deep_index": lambda tmp, model, meta: (_copy(model, tmp) / "model.safetensors.index.json").write_text(DEEP),
    "header_shape_int": lambda tmp, model, meta: _edit_header(
        _first_shard(_copy(model, tmp)), lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=5)
    ),
    "header_shape_bytes": lambda tmp, model, meta: _edit_header(
        _first_shard(_copy(model, tmp)),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[3, 5]),
    ),
    "deep_header": lambda tmp, model, meta: _edit_header(_first_shard(_copy(model, tmp)), lambda h: DEEP.encode()),
    "meta_layers_list": lambda tmp, model, meta: _meta_copy(meta, tmp, lambda m: m.update(layers=[])),
    "meta_blocks_lists": lambda tmp, model, meta: _meta_copy(
        meta, tmp, lambda m: m["model"].update(blocks=[list(b.values()) for b in m["model"]["blocks"]])
    ),
    "meta_layers_int": lambda tmp, model, meta: _meta_copy(meta, tmp, lambda m: m.update(layers=7)),
    "provenance_string": lambda tmp, model, meta: _edit_json(
        _copy(model, tmp) / "config.json", lambda c: c.update(reap_pruning={"kept": {"0.experts": "all"}})
    ),
    "meta_blocks_int": lambda tmp, model, meta: _meta_copy(meta, tmp, lambda m: m["model"].update(blocks=3)),
    "meta_block_no_key": lambda tmp, model, meta: _meta_copy(meta, tmp, lambda m: m["model"]["blocks"][0].pop("key")),
    "meta_kept_bool": lambda tmp, model, meta: _meta_copy(
        meta, tmp, lambda m: m["layers"][next(iter(m["layers"]))]["kept"].__setitem__(0, True)
    ),
    "deep_meta": lambda tmp, model, meta: _meta_copy(meta, tmp, DEEP),
    "deep_jsonl": lambda tmp, model, meta: (tmp / "deep.jsonl").write_text(('{"a": ' + DEEP + "}\n") * 3),
    "content_strings": lambda tmp, model, meta: _jsonl_rows(
        tmp / "strings.jsonl", [{"messages": [{"role": "user", "content": ["hello", "world"]}]}] * 10
    ),
    "prompt_latin1": lambda tmp, model, meta: (_images(tmp) / "prompt.txt").write_bytes("Décris".encode("latin-1")),
    "png_bomb": lambda tmp, model, meta: (_images(tmp, 0) / "bomb.png").write_bytes(_png_header(20000, 20000)),
    "acc_garbage": lambda tmp, model, meta: _accumulators(tmp).write_bytes(os.urandom(4096)),
    "acc_truncated": lambda tmp, model, meta: _truncated_accumulators(tmp),
    "image_fifo": lambda tmp, model, meta: (
        os.mkfifo(tmp / "x.png"),
        _jsonl_rows(tmp / "fifo.jsonl", _image_rows("x.png")),
    ),
    "folder_fifo": lambda tmp, model, meta: [
        os.mkfifo(folder / f"p{i}.png") for folder in [_images(tmp, 0)] for i in range(6)
    ],
    "jsonl_fifo": lambda tmp, model, meta: os.mkfifo(tmp / "pipe.jsonl"),
}


def _header_shared(tmp: Path, model: Path, meta: Path) -> None:
    shard, (a, b) = _expert_shard(_copy(model, tmp))
    _edit_header(shard, lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))


def _meta_other_shapes(tmp: Path, model: Path, meta: Path) -> None:
    """The metadata of a Qwen3-MoE with twice the expert width: same architecture and expert counts."""

    def wider(m):
        m["model"]["config_sha256"] = "0" * 64
        for block in m["model"]["blocks"]:
            block["expert_shapes"] = {k: [v[0], v[1] * 2, *v[2:]] for k, v in block["expert_shapes"].items()}

    _meta_copy(meta, tmp, wider)


SETUPS["header_shared"] = _header_shared
SETUPS["meta_other_shapes"] = _meta_other_shapes


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (not folders) with its content hash; FIFOs and devices by kind, never read."""
    import stat

    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            rel = str(path.relative_to(root))
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else f"mode {mode:o}"
    return out


STAGE_ENTRY = {"reap": "reap_vlm.reap", "prune": "reap_vlm.prune", "test": "reap_vlm.evaluate"}


def _run_inprocess(case: Case, args: list[str], tmp: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The stage's own entry point, as the script calls it, in this process."""
    import importlib

    for key in [k for k in os.environ if k.startswith("REAP_")]:
        monkeypatch.delenv(key)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(tmp=str(tmp)))  # e.g. HOME={tmp}/home
    monkeypatch.chdir(tmp)
    previous = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        if case.stage in STAGE_ENTRY:
            from reap_vlm.cli import main

            code = main(case.stage, importlib.import_module(STAGE_ENTRY[case.stage]).run, args)
        else:
            code = importlib.import_module(f"reap_vlm.{case.stage}").main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, capsys.readouterr().err


def _args(case: Case, tmp: Path, model: Path, meta: Path) -> list[str]:
    """The arguments the stage itself sees."""
    fill = {"model": str(model), "meta": str(meta), "tmp": str(tmp)}
    args = [a.format(**fill) for a in case.args]
    if case.stage in ("run.sh", "verify", "demo"):  # their own flags, no stage settings
        return args
    extra = [] if "--output-path" in args else ["--output-path", str(tmp / "outputs")]
    return [*STAGE_BASE[case.stage], *extra, *args]


def _command(case: Case, args: list[str]) -> list[str]:
    if case.stage == "run.sh":
        return [str(ROOT / "run.sh"), *args]
    if case.stage in ("verify", "demo"):
        return [sys.executable, "-m", f"reap_vlm.{case.stage}", *args]
    if case.setup == "signal":
        return [sys.executable, "-c", SLOW_CHILD, case.stage, *args]
    return [sys.executable, str(ROOT / SCRIPTS[case.stage]), *args]


def _run_child(case: Case, cmd: list[str], tmp: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update({"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    env.update({k: v.format(tmp=str(tmp)) for k, v in case.env.items()})  # e.g. HOME={tmp}/home
    kwargs = dict(cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kwargs["text"] = True  # with no stdin, nothing may prompt
    if case.setup == "fsize":
        import resource

        def limit():  # a full disk, as the writer sees it: writes beyond 64 KiB fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

        kwargs["preexec_fn"] = limit
    child = subprocess.Popen(cmd, **kwargs)
    if case.setup == "signal":
        assert child.stdout.readline().strip() == "started"
        while child.stdout.readline().strip() != "working":  # the model is loaded, the work under way
            assert child.poll() is None, child.stderr.read()
        time.sleep(1.0)
        child.send_signal(signal.SIGINT if case.stage == "reap" else signal.SIGTERM)
    _, stderr = child.communicate(timeout=300)
    return child.returncode, stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world, tmp_path, monkeypatch, capsys):
    model, meta = world
    if case.setup in SETUPS:
        SETUPS[case.setup](tmp_path, model, meta)
    else:
        _setup(case.setup, tmp_path, model, meta)
    before, files_before = _digest(model), _tree(tmp_path)
    args = _args(case, tmp_path, model, meta)
    if case.inproc:
        code, stderr = _run_inprocess(case, args, tmp_path, monkeypatch, capsys)
    else:
        code, stderr = _run_child(case, _command(case, args), tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("Loading", "Writing"))]
    errors = [line for line in lines if line.startswith(("error:", "run.sh:"))]
    assert code == case.code, stderr[-2000:]
    assert len(errors) == 1 and case.message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert _digest(model) == before  # the source checkpoint is untouched
    for target in (tmp_path / "out", tmp_path / "outputs" / "pruned", tmp_path / "outputs" / "reap_metadata.json"):
        assert not target.exists(), target
    assert not list(tmp_path.glob(".*reap-tmp-*")) and not list((tmp_path / "outputs").glob(".*reap-tmp-*"))
    if case.setup == "busy":
        assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    if case.code == 2:  # refused: not one file written, changed or removed anywhere under the test's folder
        assert _tree(tmp_path) == files_before
    if case.setup in ("home", "runs"):  # the user's files, and the metadata the run reads, are untouched
        assert sorted(p.name for p in (tmp_path / case.setup).iterdir()) == sorted(
            ["notes.txt", *(["reap_metadata.json"] if case.setup == "runs" else [])]
        )
        assert (tmp_path / case.setup / "notes.txt").read_text() == "mine"
    if case.setup == "runs":
        assert (tmp_path / "runs" / "reap_metadata.json").read_bytes() == meta.read_bytes()
    if case.setup == "custom_code":
        assert not (tmp_path / "outputs").exists()  # the lock's folder is removed again
    while _HELD:
        os.close(_HELD.pop())


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
        "130 interrupted (SIGINT), 143 stopped (SIGTERM).",
        "",
        "Beyond these tables: a SIGKILL at 20 points during writing leaves the target absent or complete "
        "(`tests/test_prune.py::test_killed_writer_leaves_nothing_and_rerun_succeeds`); the next run on a target "
        "resolves what a killed run left (a kill between the two renames of --overwrite: the finished output is "
        "put in place; unfinished folders are removed, each with a message), a second run on a target another "
        "run is writing stops at once, `reap` leaves no metadata, settings or plots when it fails, and a bug "
        "exits 3 with its traceback (`tests/test_outputs_safety.py`); an interrupted scoring run continues with "
        "`--resume` to the same metadata (`tests/test_scoring.py`); `trust_remote_code` is passed explicitly and "
        "is off unless `REAP_TRUST_REMOTE_CODE=1` (nothing prompts; `verify` reports `auto_map`); "
        "the container runs as uid 1000; JSON and JSONL inputs are parsed strictly (no NaN/Infinity) and "
        "size-limited; calibration image paths are confined to their JSONL's folder; nothing downloads unless "
        "a `hf:` calibration source is asked for.",
        "",
        "Every file the tool reads goes through one reading layer (`reap_vlm/validate.py`): only regular files "
        "are opened (a FIFO, a device or a symlink loop is refused, never read); each kind of file has a size "
        "limit; JSON is strict UTF-8 without NaN/Infinity and at most 64 levels deep; config.json, the "
        "safetensors index and headers, reap_metadata.json, the `--resume` accumulators and calibration rows are "
        'checked against schemas with strict types (a boolean is not an integer, "2" is not a number) and '
        "cross-checks (a tensor's shape × dtype equals its bytes, no two tensors share bytes, top-k ≤ experts, "
        "n_group divides them, kept experts unique and in range). Where config.json has no top-k, the default "
        "of transformers' config class for the model type is used, as transformers does when it loads the "
        "model. A property test (`tests/test_fuzz.py`) feeds randomly mutated config, index, header, metadata "
        "and JSONL files to reap, prune, test and verify and checks the same contract: exit 0 or 2 (1 only for "
        "the test stage's verdict), one line, no traceback, the inputs byte-identical, nothing partial.",
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
