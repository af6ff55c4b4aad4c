"""Typed settings, one object per stage. The only module that reads environment variables.

Precedence, highest first: command-line flag > environment variable (REAP_*) > recipe file
(`--config recipe.yaml` or REAP_CONFIG: YAML with the same REAP_* keys as .env) > .env file
(python-dotenv; another file with REAP_ENV_FILE) > the stage's default. An empty value (`KEY=`) in
the environment, a recipe or .env means "not set": the stage's own default applies. Every REAP_* key
found in the environment, a recipe or the .env file must belong to a settings class below; an unknown
key is an error that names the closest valid one. `.env.example` and the README's configuration table
are generated from these classes (`python -m reap_vlm.settings sync-docs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import SettingsError

PREFIX = "REAP_"
ENV_FILE_KEY = "REAP_ENV_FILE"
CONFIG_KEY = "REAP_CONFIG"
MAX_RECIPE_BYTES = 1 << 20
LOG_LEVELS = ("quiet", "info", "verbose")
CHAT_TEMPLATE_POLICIES = ("always", "auto")
CHAT_TEMPLATE_HELP = (
    "How samples meet the checkpoint's chat template: always (every sample as a user turn, the way the shipped "
    "sets and the demo VLM were measured), auto (rows with messages through the template, plain {'text': ...} "
    "rows as plain text, the way pretraining text looks)."
)

SCORING_MODES = ("full", "routed", "router")
CRITERIA = (
    "reap",
    "reap_sum",
    "soft_reap",
    "ean_sum",
    "ean_mean",
    "frequency",
    "weighted_frequency",
    "max_activation",
)
MODALITY_POLICIES = ("balanced", "joint", "text", "image", "either")
DEVICES_HELP = "auto (all visible GPUs via accelerate, else CPU), cpu, cuda, cuda:N"
DTYPES = ("auto", "bfloat16", "float16", "float32")
METHODS = ("prune", "merge")
MERGE_GROUPINGS = ("ream", "hcsmoe")  # reap_vlm.methods.merge.GROUPINGS
MERGE_ROUTERS = ("centroid", "average")
EXECUTION_MODES = ("auto", "memory", "stream")
GENERATION_MODES = ("auto", "memory", "offload", "skip")


def opt(default: Any, help: str, *, choices: tuple | None = None, env: str | None = None, group: str = ""):
    """A settings field. `help` becomes --help and the .env.example comment."""
    meta = {"help": help, "choices": choices, "env": env, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Base: keys shared by every stage."""

    stage: ClassVar[str] = ""
    description: ClassVar[str] = ""

    model_path: Path | None = opt(
        None,
        "Model directory (Hugging Face layout: config.json + safetensors), or a Hub repo id org/name[@revision] "
        "read from the local Hugging Face cache (downloaded there first unless HF_HUB_OFFLINE=1).",
    )
    output_path: Path = opt(Path("outputs"), "Root folder for reap_metadata.json, the pruned model and reports.")
    device: str = opt("auto", f"Device: {DEVICES_HELP}.")
    dtype: str = opt("auto", "Weights dtype when the model is loaded.", choices=DTYPES)
    trust_remote_code: bool = opt(
        False, "Allow custom modelling code shipped with the checkpoint. Off unless you trust it."
    )
    attn_implementation: str = opt(
        "", "Attention kernel (sdpa, eager, flash_attention_2); empty = the model's default."
    )
    seed: int = opt(42, "Random seed for data order and any sampling.")
    config: Path | None = opt(
        None,
        "Recipe file (YAML) with the same REAP_* keys as .env; flags and the environment win over it, it wins "
        "over .env.",
    )
    log_level: str = opt(
        "info",
        "Messages on stderr: quiet (warnings, errors and the result line only), info (progress bars and "
        "results), verbose (also every step, each line with a timestamp). Flags: --quiet, --verbose.",
        choices=LOG_LEVELS,
    )
    json: bool = opt(False, "Print one JSON line on stdout at the end: paths written, key numbers, verdict.")

    # ---- derived paths --------------------------------------------------------------------
    @property
    def metadata_file(self) -> Path:
        path = getattr(self, "metadata_path", None)
        return Path(path) if path else Path(self.output_path) / "reap_metadata.json"

    @property
    def pruned_dir(self) -> Path:
        path = getattr(self, "pruned_model_path", None)
        return Path(path) if path else Path(self.output_path) / "pruned"

    def validate(self) -> None:
        """Cross-field checks that need no I/O beyond existence of inputs."""
        if self.seed < 0:
            raise SettingsError("REAP_SEED must be >= 0", f"got {self.seed}", "Set a non-negative integer")
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise SettingsError(
                f"REAP_DEVICE={self.device!r} is not a device", f"expected {DEVICES_HELP}", "Fix REAP_DEVICE"
            )

    def check_finite(self) -> None:
        """No number setting is NaN or infinite (NaN compares false with everything: a NaN threshold is a
        gate that never fires). Runs after validate(), whose range checks name the setting's meaning."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = env_key(f.name)
                raise SettingsError(
                    f"{key}={value} is out of range", "NaN and infinity are not valid values", f"Fix {key}"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


SIZE_UNITS = (
    ("GIB", 1 << 30),
    ("MIB", 1 << 20),
    ("KIB", 1 << 10),
    ("GB", 10**9),
    ("MB", 10**6),
    ("KB", 10**3),
    ("B", 1),
)


def parse_size(text: str, key: str = "size") -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (> 0)."""
    upper = text.strip().upper()
    unit, mult = next(((u, m) for u, m in SIZE_UNITS if upper.endswith(u)), ("", 1))
    number = upper[: len(upper) - len(unit)].strip()
    try:
        value = float(number) * mult
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise SettingsError(
            f"{key}={text!r} is not a size",
            "expected a positive number with an optional unit: B, KB, MB, GB, KiB, MiB, GiB",
            f"Set {key} to e.g. 5GB",
        )
    return int(value)


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def _check_range(name: str, value: float, low: float | None, high: float | None, meaning: str = "") -> None:
    """low <= value <= high (either bound may be None), and finite."""
    if math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high):
        return
    key = PREFIX + name.upper()
    bounds = f"within [{low}, {high}]" if high is not None else f">= {low}"
    raise SettingsError(
        f"{key}={value} is out of range", f"it must be {bounds}" + (f" ({meaning})" if meaning else ""), f"Fix {key}"
    )


def _check_ratio(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or math.isnan(value) or not 0.0 < value < 1.0:
        raise SettingsError(
            f"{name}={value} is out of range",
            "the fraction of experts to remove must be strictly between 0 and 1",
            f"Set {name} to a value such as 0.5",
        )


@dataclass
class ReapSettings(Settings):
    stage: ClassVar[str] = "reap"
    description: ClassVar[str] = (
        "Score every expert of every MoE layer on calibration data through the model's own forward, "
        "and write reap_metadata.json (raw sums, scores, keep plan)."
    )

    scoring_mode: str = opt(
        "full",
        "full: every expert on every token (all criteria incl. soft_reap); routed: only the experts the model "
        "picked (exact REAP, about one extra forward); router: routing statistics only.",
        choices=SCORING_MODES,
    )
    calibration: str = opt(
        "combined",
        "Calibration source: a built-in set (general, code, math, writing, vision, tasks, combined), a JSONL file, "
        "an image folder, or a mix 'name:count,name:count'.",
    )
    eval_data: str = opt(
        "",
        "Held-out data the candidate plans are measured on. Empty: the evaluation split of REAP_CALIBRATION (a "
        "built-in set's evaluation file; of a JSONL file or folder the rows whose content hash puts them there, 1 "
        "in 5, which calibration then does not use). A JSONL file or folder here is read whole, and then "
        "REAP_CALIBRATION's own files and folders are scored whole too; a built-in set or mix is read from its "
        "evaluation split.",
    )
    chat_template: str = opt("always", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_POLICIES)
    max_samples: int = opt(64, "Calibration samples to score (a mix divides them in proportion).")
    max_seq_len: int = opt(512, "Maximum tokens per sample; longer samples are truncated.")
    batch_size: int = opt(
        4,
        "Samples per forward pass; scoring batches hold up to batch_size x max_seq_len tokens, so more of "
        "the shorter samples.",
    )
    image_share: float = opt(0.3, "Share of image+text samples in the 'combined' set (0..1).")
    min_pixels: int = opt(3136, "Smallest image area (pixels) given to the processor.")
    max_pixels: int = opt(401408, "Largest image area (pixels) given to the processor; bounds calibration memory.")
    shuffle: bool = opt(True, "Shuffle calibration samples (with REAP_SEED).")
    packing: bool = opt(False, "Pack text samples into full-length sequences instead of padding.")
    prune_ratio: float = opt(0.5, "Fraction of experts to remove in every MoE layer (0 < r < 1).")
    num_keep: int = opt(0, "Experts to keep per layer; overrides REAP_PRUNE_RATIO when > 0.")
    criterion: str = opt(
        "auto",
        "Saliency criterion for the keep plan; auto = the measured candidate plan (criteria x modality policies, "
        "a greedy search) with the best held-out fidelity, equal weight per modality and source.",
        choices=("auto", *CRITERIA),
    )
    modality: str = opt(
        "balanced",
        "Which tokens rank experts in a VLM: balanced (text and image count equally, whatever their token "
        "counts), joint (every token counts once: text usually outnumbers images), text, image, or either "
        "(keep experts ranked high by either). With REAP_CRITERION=auto the policies are measured too and this "
        "one is kept unless another plan is measurably better.",
        choices=MODALITY_POLICIES,
    )
    round_to: int = opt(1, "Round the kept count per layer down to a multiple of this (kernel-friendly sizes).")
    protect_super_experts: bool = opt(True, "Never remove super experts (outlier max activation).")
    super_expert_factor: float = opt(
        10.0, "An expert is 'super' when its max |activation| exceeds this multiple of the layer's median."
    )
    chunk_memory_mb: int = opt(768, "Extra memory budget (MiB) for the all-expert computation in full mode.")
    checkpoint_every: int = opt(0, "Save the accumulators every N batches for --resume (0 = off).")
    resume: bool = opt(False, "Resume from the accumulator checkpoint in the output folder.")
    metadata_path: Path | None = opt(None, "Where to write reap_metadata.json (default: <output>/reap_metadata.json).")
    eval_samples: int = opt(
        96,
        "Most held-out samples in the plan-selection slice that measures candidate plans (0 = skip the "
        "measurement); the slice is drawn from the selection portion of the evaluation split, which the test "
        "stage never uses.",
    )
    eval_per_task: int = opt(8, "Plan-selection slice: held-out questions per image task (rows with answers).")
    eval_per_source: int = opt(4, "Plan-selection slice: held-out samples per source without answers (text).")
    eval_ratios: str = opt(
        "0.25,0.5,0.75", "Extra prune ratios measured for every criterion (comma-separated; none = no extra ratios)."
    )
    greedy_search: bool = opt(
        True,
        "With REAP_CRITERION=auto also run the greedy add-back search among the candidate plans (streamed "
        "execution: one more pass over the weights per search step, and one for its plan).",
    )
    objective: str = opt(
        "kl",
        "Per-target measure of the fidelity objective that REAP_CRITERION=auto, the greedy and the swap search "
        "minimise: kl (KL(original ‖ pruned) on every target) or tv_answers (on the answer tokens of samples with "
        "a reference answer the total variation 1 − Σ min(p_original, p_pruned), bounded; KL on the other targets).",
        choices=("kl", "tv_answers"),
    )
    search_slice: float = opt(
        0.5,
        "Size of the greedy and swap searches' slice (drawn from the calibration split) relative to the "
        "plan-selection slice: this share of REAP_EVAL_PER_TASK, REAP_EVAL_PER_SOURCE and REAP_EVAL_SAMPLES "
        "(each at least 1); the cost of every search evaluation grows with it.",
    )
    greedy_budget: int = opt(
        1000,
        "With REAP_CRITERION=auto and the greedy search on: most masked evaluations (one plan over the search slice; "
        "each step's unpruned reference counts one) the greedy search may spend; a search that needs more (it grows "
        "with blocks x kept experts: ~2,700 for 4 real-width Qwen3-VL-30B-A3B layers, ~32,000 for all 48) is skipped "
        "with a note in the candidate table (0 = no limit).",
    )
    search_budget: int = opt(
        200,
        "With REAP_CRITERION=auto and the greedy search on: most masked evaluations (one plan over the search "
        "slice; each measurement's unpruned reference counts one) the swap search from the greedy plan may spend "
        "(0 = no swap search; streamed execution: one more pass over the weights per measurement, two per block step).",
    )
    plots: bool = opt(True, "Write heatmap and candidate-plan PNGs next to the metadata.")
    eval_merge: bool = opt(
        True,
        "Also measure expert merging (REAP_MERGE_GROUPING, REAP_MERGE_GROUP_SIZE, REAP_MERGE_ROUTER) at the "
        "requested ratio beside the pruning plans (full mode with merge statistics; streamed execution measures it "
        "in the statistics' pass); with "
        "REAP_CRITERION=auto it is chosen only when measurably better than every pruning plan, and the prune "
        "stage then merges by default.",
    )
    merge_grouping: str = opt(
        "ream",
        "Merge grouping of the measured merge plan (recorded for the prune stage): ream (the top experts as "
        "centroids, pseudo-pruning) or hcsmoe (average-linkage clustering).",
        choices=MERGE_GROUPINGS,
    )
    merge_group_size: int = opt(
        16,
        "REAM's C of the measured merge plan (recorded for the prune stage): a centroid absorbs at most C-1 "
        "experts (0 = every expert joins its nearest centroid).",
    )
    merge_router: str = opt(
        "centroid",
        "Router row of a merged expert in the measured merge plan (recorded for the prune stage): the centroid's, "
        "or the group's rows averaged by saliency.",
        choices=MERGE_ROUTERS,
    )
    merge_stats_mb: int = opt(
        512,
        "Size bound (MiB) of reap_merge_stats.safetensors, the statistics expert merging needs (full mode; "
        "sets how many tokens' neuron activations are kept for alignment; 0 = do not write it).",
    )
    execution: str = opt(
        "auto",
        "How the model is driven: memory (whole model loaded), stream (one decoder layer at a time, read from "
        "the shards), auto (stream when weights + scoring memory do not fit one GPU's free memory, even with several "
        "GPUs visible; memory keeps accelerate's device_map over them).",
        choices=EXECUTION_MODES,
    )
    stream_cache_gb: float = opt(
        32.0, "Streamed execution: GiB of hidden states kept in RAM; the rest goes to a spill folder."
    )

    def validate(self) -> None:
        super().validate()
        if not self.stream_cache_gb >= 0:
            raise SettingsError(
                "REAP_STREAM_CACHE_GB must be >= 0", f"got {self.stream_cache_gb}", "Set e.g. 32 (0 = spill all)"
            )
        if self.num_keep < 0:
            raise SettingsError("REAP_NUM_KEEP must be >= 0", f"got {self.num_keep}", "Use 0 to prune by ratio")
        if self.num_keep == 0:
            _check_ratio("REAP_PRUNE_RATIO", self.prune_ratio)
        if self.merge_stats_mb < 0:
            raise SettingsError("REAP_MERGE_STATS_MB must be >= 0", f"got {self.merge_stats_mb}", "Use 0 to skip it")
        if self.merge_group_size < 0:
            raise SettingsError(
                "REAP_MERGE_GROUP_SIZE must be >= 0", f"got {self.merge_group_size}", "Use 16 (REAM) or 0"
            )
        for name in ("max_samples", "max_seq_len", "batch_size", "round_to", "chunk_memory_mb"):
            if getattr(self, name) <= 0:
                key = PREFIX + name.upper()
                raise SettingsError(
                    f"{key} must be > 0", f"got {getattr(self, name)}", f"Set {key} to a positive integer"
                )
        if not 0.0 <= self.image_share <= 1.0:
            raise SettingsError("REAP_IMAGE_SHARE must be within [0, 1]", f"got {self.image_share}", "Set e.g. 0.3")
        _check_range("super_expert_factor", self.super_expert_factor, 1.0, None, "a multiple of the median")
        _check_range("min_pixels", self.min_pixels, 1, None)
        if self.checkpoint_every < 0 or self.eval_samples < 0:
            raise SettingsError("REAP_CHECKPOINT_EVERY and REAP_EVAL_SAMPLES must be >= 0", "", "Fix the value")
        if self.eval_per_task < 0 or self.eval_per_source < 0:
            raise SettingsError("REAP_EVAL_PER_TASK and REAP_EVAL_PER_SOURCE must be >= 0", "", "Fix the value")
        if not 0 < self.search_slice < math.inf:
            why = f"got {self.search_slice}"
            raise SettingsError("REAP_SEARCH_SLICE must be a finite number > 0", why, "Set e.g. 0.5")
        if self.greedy_budget < 0:
            raise SettingsError("REAP_GREEDY_BUDGET must be >= 0", f"got {self.greedy_budget}", "Fix the value")
        if self.search_budget < 0:
            raise SettingsError("REAP_SEARCH_BUDGET must be >= 0", f"got {self.search_budget}", "Fix the value")
        if self.min_pixels > self.max_pixels:
            raise SettingsError("REAP_MIN_PIXELS exceeds REAP_MAX_PIXELS", "", "Raise REAP_MAX_PIXELS")
        for r in self.candidate_ratios:
            _check_ratio("REAP_EVAL_RATIOS", r)

    @property
    def candidate_ratios(self) -> list[float]:
        try:
            if self.eval_ratios.strip().lower() == "none":
                return []
            return [float(x) for x in self.eval_ratios.split(",") if x.strip()]
        except ValueError:
            raise SettingsError(
                f"REAP_EVAL_RATIOS={self.eval_ratios!r} is not a list of numbers", "", "Use e.g. 0.25,0.5,0.75"
            ) from None


@dataclass
class PruneSettings(Settings):
    stage: ClassVar[str] = "prune"
    description: ClassVar[str] = (
        "Rewrite config.json and the safetensors shards from reap_metadata.json without loading the model; "
        "write the pruned checkpoint atomically."
    )

    metadata_path: Path | None = opt(None, "reap_metadata.json to prune from (default: <output>/reap_metadata.json).")
    pruned_model_path: Path | None = opt(None, "Where to write the pruned checkpoint (default: <output>/pruned).")
    prune_ratio: float | None = opt(
        None, "Re-cut the plan at this ratio from the metadata's raw sums (empty = the metadata's plan)."
    )
    num_keep: int = opt(0, "Re-cut to keep this many experts per layer (0 = by ratio / the metadata's plan).")
    criterion: str = opt(
        "auto", "Criterion for a re-cut; auto = the one the metadata chose.", choices=("auto", *CRITERIA)
    )
    modality: str = opt("", "Modality policy for a re-cut; empty = the metadata's.", choices=("", *MODALITY_POLICIES))
    round_to: int = opt(0, "Round the kept count for a re-cut (0 = the metadata's).")
    overwrite: bool = opt(False, "Replace an existing non-empty output directory.")
    dry_run: bool = opt(False, "Print the layout, the plan and the output size; write nothing.")
    max_shard_size: str = opt("", "Re-balance shards to at most this size (e.g. 5GB); empty = keep the source shards.")
    collapse_groups: bool = opt(
        False, "For group-routed models with an unbalanced plan: set n_group = topk_group = 1 (routing changes)."
    )
    hash_check_mb: int = opt(256, "Hash-compare every copied non-expert tensor up to this size (MiB) after writing.")
    hash_check_all: bool = opt(False, "Hash-compare every copied tensor whatever its size.")
    method: str = opt(
        "auto",
        "prune: remove the least salient experts; merge: fold every removed expert into a kept one (REAM: "
        "grouped, neuron-aligned, saliency-weighted) from the merge statistics of full-mode scoring; auto: the "
        "method the reap stage chose (its metadata's plan; prune when it records none).",
        choices=("auto", *METHODS),
    )
    merge_grouping: str = opt(
        "",
        "Merge grouping (ream, hcsmoe); empty = the one the reap stage measured (its metadata's plan), else ream.",
        choices=("", *MERGE_GROUPINGS),
    )
    merge_group_size: int | None = opt(
        None,
        "REAM's C; empty = the one the reap stage measured, else 16.",
    )
    merge_router: str = opt(
        "",
        "Router row of a merged expert (centroid, average); empty = the one the reap stage measured, else centroid.",
        choices=("", *MERGE_ROUTERS),
    )
    merge_stats_path: Path | None = opt(
        None, "Merge statistics to read (default: reap_merge_stats.safetensors beside the metadata)."
    )
    base_model: str = opt(
        "",
        "Hub id of the source model, written as base_model in the pruned model card (default: the repo id when "
        "REAP_MODEL_PATH is a Hub id or a snapshot of the Hugging Face cache; else none).",
    )

    @property
    def merge_stats_file(self) -> Path:
        if self.merge_stats_path:
            return Path(self.merge_stats_path)
        return self.metadata_file.parent / "reap_merge_stats.safetensors"

    def validate(self) -> None:
        super().validate()
        if self.merge_group_size is not None and self.merge_group_size < 0:
            raise SettingsError(
                "REAP_MERGE_GROUP_SIZE must be >= 0", f"got {self.merge_group_size}", "Use 16 (REAM) or 0"
            )
        if self.num_keep < 0:
            raise SettingsError("REAP_NUM_KEEP must be >= 0", f"got {self.num_keep}", "Use 0 to prune by ratio")
        _check_ratio("REAP_PRUNE_RATIO", self.prune_ratio, allow_none=True)
        if self.round_to < 0 or self.hash_check_mb < 0:
            raise SettingsError("REAP_ROUND_TO and REAP_HASH_CHECK_MB must be >= 0", "", "Fix the value")
        if self.max_shard_size:
            parse_size(self.max_shard_size, "REAP_MAX_SHARD_SIZE")


@dataclass
class TestSettings(Settings):
    __test__: ClassVar[bool] = False  # not a pytest test class
    stage: ClassVar[str] = "test"
    description: ClassVar[str] = (
        "Load the pruned model, generate on held-out text and image prompts, detect degenerate output, "
        "compare with the original, and write a report with a pass/fail verdict."
    )

    pruned_model_path: Path | None = opt(None, "Pruned checkpoint to test (default: <output>/pruned).")
    original_model_path: Path | None = opt(
        None, "Original checkpoint (a folder or a Hub repo id) to compare against (default: REAP_MODEL_PATH)."
    )
    metadata_path: Path | None = opt(None, "reap_metadata.json of the run (default: <output>/reap_metadata.json).")
    eval_data: str = opt(
        "builtin",
        "Held-out prompts: 'builtin' (the test portion of the built-in sets' evaluation split, disjoint from the "
        "portion the reap stage chooses its plan on), a JSONL file (every row), or a built-in set or mix read "
        "from that test portion (e.g. 'tasks:35,code:5,writing:5').",
    )
    eval_samples: int = opt(24, "Held-out samples for agreement, KL and perplexity.")
    chat_template: str = opt("always", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_POLICIES)
    image_share: float = opt(0.3, "Share of image+text samples in the 'combined' set (0..1).")
    max_seq_len: int = opt(512, "Maximum tokens per held-out sample.")
    batch_size: int = opt(4, "Samples per forward pass.")
    max_new_tokens: int = opt(32, "Tokens generated per prompt (greedy).")
    report_path: Path | None = opt(None, "Folder for report.json / report.md / PNGs (default: <output>/report).")
    min_agreement: float = opt(0.5, "Fail when next-token top-1 agreement with the original is below this.")
    max_kl: float = opt(2.0, "Fail when mean KL(original || pruned) in nats exceeds this.")
    max_ppl_ratio: float = opt(
        2.0, "Fail when pruned perplexity / original perplexity exceeds this, overall or on any text domain."
    )
    max_accuracy_drop: float = opt(
        15.0,
        "Fail when any task's exact-match accuracy of greedy answers (held-out questions with a reference "
        "answer) drops by more than this many percentage points below the original's (0..100).",
    )
    max_repeat_ratio: float = opt(0.6, "Flag a generation as degenerate when its repeated 4-gram ratio exceeds this.")
    max_degenerate_share: float = opt(
        0.25,
        "Fail when more than this share of generations is degenerate (with the original: degenerate for the "
        "pruned model but not for the original).",
    )
    execution: str = opt(
        "auto",
        "How the comparison with the original runs: memory (both models loaded), stream (each model one decoder "
        "layer at a time, read from its own shards), auto (stream when both models' weights + the comparison's "
        "logits do not fit one GPU's free memory).",
        choices=EXECUTION_MODES,
    )
    stream_cache_gb: float = opt(
        32.0,
        "Streamed execution: GiB of hidden states kept in RAM (the rest goes to a spill folder); offloaded "
        "generation: GiB of weights kept in RAM (the rest is read from disk).",
    )
    generation: str = opt(
        "auto",
        "Greedy generation: memory (each model loaded whole, every held-out prompt), offload (accelerate's "
        "offload to RAM and disk, REAP_OFFLOAD_PROMPTS prompts), skip (none: the report says so and per-task "
        "exact match is judged teacher-forced), auto (memory, or offload when the comparison is streamed).",
        choices=GENERATION_MODES,
    )
    offload_prompts: int = opt(
        4, "Prompts generated under REAP_GENERATION=offload (spread over the tasks and sources), each model."
    )

    @property
    def report_dir(self) -> Path:
        return Path(self.report_path) if self.report_path else Path(self.output_path) / "report"

    def validate(self) -> None:
        super().validate()
        if not self.stream_cache_gb >= 0:
            raise SettingsError(
                "REAP_STREAM_CACHE_GB must be >= 0", f"got {self.stream_cache_gb}", "Set e.g. 32 (0 = spill all)"
            )
        _check_range("offload_prompts", self.offload_prompts, 1, None)
        if self.max_new_tokens <= 0 or self.eval_samples < 0:
            raise SettingsError("REAP_MAX_NEW_TOKENS must be > 0 and REAP_EVAL_SAMPLES >= 0", "", "Fix the value")
        if not 0.0 <= self.image_share <= 1.0:
            raise SettingsError("REAP_IMAGE_SHARE must be within [0, 1]", f"got {self.image_share}", "Set e.g. 0.3")
        if not 0.0 <= self.max_accuracy_drop <= 100.0:  # also refuses nan
            raise SettingsError(
                "REAP_MAX_ACCURACY_DROP must be a number of percentage points within [0, 100]",
                f"got {self.max_accuracy_drop}",
                "Set e.g. 15 (fail when a task loses more than 15 points of exact-match accuracy)",
            )
        for name in ("max_seq_len", "batch_size"):
            _check_range(name, getattr(self, name), 1, None)
        _check_range("min_agreement", self.min_agreement, 0.0, 1.0, "a share of tokens")
        _check_range("max_kl", self.max_kl, 0.0, None, "a KL divergence in nats")
        _check_range("max_ppl_ratio", self.max_ppl_ratio, 1.0, None, "pruned / original perplexity")
        _check_range("max_repeat_ratio", self.max_repeat_ratio, 0.0, 1.0, "a share of repeated 4-grams")
        _check_range("max_degenerate_share", self.max_degenerate_share, 0.0, 1.0, "a share of generations")


@dataclass
class RunnerSettings:
    """Keys read by run.sh (documented here so they are known and listed in .env.example)."""

    runtime: str = opt(
        "auto",
        "run.sh: auto (docker when `docker info` works, else local), docker, or local.",
        choices=("auto", "docker", "local"),
    )
    venv: str = opt(".venv", "run.sh local mode: virtual environment folder.")
    gpus: str = opt("all", "run.sh docker mode: GPUs to reserve (all, or a count).")
    image: str = opt("reap-vlm:latest", "run.sh docker mode: image name to build and run.")
    env_file: str = opt(".env", "The .env file to read (only from the environment or run.sh --env-file).")


STAGES: dict[str, type[Settings]] = {"reap": ReapSettings, "prune": PruneSettings, "test": TestSettings}
SCHEMAS: tuple[type, ...] = (ReapSettings, PruneSettings, TestSettings, RunnerSettings)


def env_key(name: str) -> str:
    return PREFIX + name.upper()


def known_keys() -> dict[str, dataclasses.Field]:
    """Every REAP_* key of every schema -> its (first) field."""
    keys: dict[str, dataclasses.Field] = {}
    for schema in SCHEMAS:
        for f in dataclasses.fields(schema):
            keys.setdefault(env_key(f.name), f)
    return keys


# ---- parsing -------------------------------------------------------------------------------


def _field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) from the annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return base, optional


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(key: str, raw: str, base: type, optional: bool, choices: tuple | None, where: str = "") -> Any:
    text = raw.strip()
    if optional and text == "":
        return None
    try:
        if base is bool:
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            value: Any = low in _TRUE
        elif base is int:
            value = int(text)
        elif base is float:
            value = float(text)
        elif base is Path:
            value = Path(text).expanduser()
        else:
            value = text
    except ValueError:
        kind = {bool: "true/false", int: "an integer", float: "a number"}.get(base, base.__name__)
        raise SettingsError(f"{key}={raw!r}{where} is not {kind}", "", f"Set {key} to {kind}") from None
    if choices and value not in choices:
        raise SettingsError(
            f"{key}={raw!r}{where} is not a valid choice",
            "expected one of " + ", ".join(repr(c) for c in choices),
            f"Set {key} to one of them",
        )
    return value


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(known_keys()), n=1, cutoff=0.0)
    return match[0] if match else ""


def _check_known(source: str, mapping: dict[str, str]) -> None:
    known = known_keys()
    for key in mapping:
        if key.startswith(PREFIX) and key not in known:
            raise SettingsError(
                f"unknown setting {key} in {source}",
                f"did you mean {_closest(key)}?",
                "Fix the name, or see .env.example for every valid key",
            )


def read_env_file(environ: dict[str, str]) -> tuple[Path | None, dict[str, str]]:
    """The .env file named by REAP_ENV_FILE (default ./.env), parsed with python-dotenv."""
    from dotenv import dotenv_values

    named = environ.get(ENV_FILE_KEY)
    path = Path(named) if named else Path(".env")
    if not path.is_file():
        if named:
            raise SettingsError(f"{ENV_FILE_KEY}={named} does not exist", "", "Point it at an existing .env file")
        return None, {}
    values = {k: (v if v is not None else "") for k, v in dotenv_values(path).items()}
    return path, values


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one SettingsError line (exit 2 through reap_vlm.cli), not the usage text,
    and an unknown option names the closest valid one."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            word = next((e for e in extra if e.startswith("-")), extra[0])
            if not word.startswith("-"):
                raise SettingsError(
                    f"unexpected argument {word!r}", "options take the form --name value", f"Run {self.prog} --help"
                )
            name = word.split("=", 1)[0]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            raise SettingsError(
                f"unknown option {name}",
                f"did you mean {close[0]}?" if close else "",
                f"Run {self.prog} --help to list every option",
            )
        return parsed

    def error(self, message: str):  # type: ignore[override]
        raise SettingsError(message, "", f"Run {self.prog} --help")


def read_recipe(path: Path) -> dict[str, str]:
    """A recipe: a YAML mapping of REAP_* keys to single values, the same keys as .env. Values become the text
    .env would hold (true/false, numbers as written; null or an empty string = not set). run.sh's own keys and
    REAP_CONFIG / REAP_ENV_FILE are refused: they are read before any recipe is."""
    import yaml

    from .validate import read_text

    fix = f"Fix {path}: a YAML mapping of REAP_* keys to values, as in .env.example"
    if not path.exists():
        raise SettingsError(f"recipe {path} does not exist", "", "Point --config (REAP_CONFIG) at a YAML file")
    text = read_text(path, SettingsError, fix, MAX_RECIPE_BYTES)

    class Loader(yaml.SafeLoader):  # a mapping that names a key twice is refused, not silently the last value
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        pairs = loader.construct_pairs(node, deep=True)
        keys = [k for k, _ in pairs]
        for k in keys:
            if not isinstance(k, str):
                raise SettingsError(f"recipe {path} has a key that is not a name: {k!r}"[:200], "", fix)
            if keys.count(k) > 1:
                raise SettingsError(f"recipe {path} sets {k} twice", "only one value can apply", "Keep one")
        return dict(pairs)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        data = yaml.load(text, Loader=Loader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise SettingsError(f"recipe {path} is not valid YAML{where}", str(problem)[:200], fix) from None
    except RecursionError:
        raise SettingsError(f"recipe {path} nests too deeply", "a recipe is a flat mapping of keys", fix) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"recipe {path} is a {type(data).__name__}, not a mapping of keys", "", fix)
    runner = {env_key(f.name) for f in dataclasses.fields(RunnerSettings)} | {CONFIG_KEY}
    values: dict[str, str] = {}
    for key, value in data.items():
        if not key.startswith(PREFIX):
            close = _closest(PREFIX + key.upper())
            hint = f"did you mean {close}?" if close else ""
            raise SettingsError(f"{key!r} in recipe {path} is not a REAP_* setting"[:200], hint, fix)
        if key in runner:
            raise SettingsError(
                f"{key} cannot be set in a recipe",
                "it is read before any recipe is (run.sh, the recipe's own name)",
                "Set it in the environment or .env",
            )
        if isinstance(value, bool):
            text_value = "true" if value else "false"
        elif value is None:
            text_value = ""
        elif isinstance(value, (int, float, str)):
            text_value = str(value)
        else:
            raise SettingsError(
                f"{key} in recipe {path} is a {type(value).__name__}, not a single value", "", f"Give {key} one value"
            )
        if any(ord(c) < 32 for c in text_value):
            raise SettingsError(f"{key} in recipe {path} holds control characters", "", f"Give {key} one line")
        values[key] = text_value
    _check_known(f"recipe {path}", values)
    return values


def _config_flag(argv: list[str]) -> str | None:
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


def sources(argv: list[str], environ: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Where a value can come from besides the command line, highest precedence first, as (name, values):
    the environment, the recipe (--config, else REAP_CONFIG from the environment or .env), the .env file."""
    _check_known("the environment", environ)
    env_path, file_values = read_env_file(environ)
    _check_known(str(env_path), file_values)
    named = _config_flag(argv) or environ.get(CONFIG_KEY, "").strip() or file_values.get(CONFIG_KEY, "").strip()
    layers = [("the environment", environ)]
    if named:
        layers.append((f"recipe {named}", read_recipe(Path(named).expanduser())))
    if env_path is not None:
        layers.append((str(env_path), file_values))
    return layers


def _set(values: dict[str, str], key: str) -> bool:
    return values.get(key) is not None and values[key].strip() != ""


def effective(f: dataclasses.Field, layers: list[tuple[str, dict[str, str]]]) -> tuple[str, str]:
    """(the value that applies without a flag, as text; where it comes from, "" for the stage's default)."""
    key = env_key(f.name)
    for name, values in layers:
        if _set(values, key):
            return values[key].strip(), name
    return _default_text(f), ""


def build_parser(
    cls: type[Settings], prog: str | None = None, layers: list[tuple[str, dict[str, str]]] | None = None
) -> argparse.ArgumentParser:
    """The stage's options; each one's help ends with its environment key and the default that applies
    (from the environment, a recipe or .env when set there, else the stage's own)."""
    parser = Parser(
        prog=prog or f"{cls.stage}",
        description=cls.description
        + " Every option can also be set as an environment variable, in a recipe (--config) or in .env (the key"
        " is in brackets); flags win over the environment, which wins over the recipe, which wins over .env.",
    )
    for f in dataclasses.fields(cls):
        base, optional = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        value, origin = effective(f, layers or [])
        shown = value if value != "" else ("not set" if optional else "empty")
        choices = f.metadata["choices"]
        listed = f" Choices: {', '.join(c or 'empty' for c in choices)}." if choices else ""
        help_text = f"{f.metadata['help']}{listed} [{env_key(f.name)}; default: {shown}"
        help_text = (help_text + (f", from {origin}]" if origin else "]")).replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "{" + ",".join(c or "''" for c in choices) + "}" if choices else f.name.upper()
            # choices are validated by _convert, with the key in the message
            parser.add_argument(flag, default=None, metavar=metavar, help=help_text)
        if f.name == "log_level":
            for short, level in (("-q", "quiet"), ("-v", "verbose")):
                parser.add_argument(
                    short,
                    f"--{level}",
                    dest="log_level",
                    action="store_const",
                    const=level,
                    help=f"--log-level {level}",
                )
    return parser


def load(
    cls: type[Settings],
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    *,
    prog: str | None = None,
) -> Settings:
    """Resolve a stage's settings: default < .env < recipe < environment < CLI. Validates everything."""
    environ = dict(os.environ if environ is None else environ)
    argv = list(argv if argv is not None else sys.argv[1:])
    layers = sources(argv, environ)
    args = build_parser(cls, prog, layers).parse_args(argv)

    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        base, optional = _field_type(cls, f)
        key = env_key(f.name)
        cli_value = getattr(args, f.name)
        where = ""
        if cli_value is not None:
            label, raw = "--" + f.name.replace("_", "-"), str(cli_value)
            if base is bool:
                raw = "true" if cli_value else "false"
        else:
            name = next((name for name, layer in layers if _set(layer, key)), None)
            if name is None:
                continue
            label, raw = key, dict(layers)[name][key]
            where = f" ({name})" if name.startswith("recipe ") else ""
        values[f.name] = _convert(label, raw, base, optional, f.metadata["choices"], where)
    settings = cls(**values)
    settings.validate()
    settings.check_finite()
    return resolve_models(settings)


def resolve_models(settings: Settings) -> Settings:
    """Model paths that name a Hub repo (`org/name[@revision]`, no such local folder) become their snapshot in
    the local Hugging Face cache (reap_vlm.hub; HF_HUB_OFFLINE=1: the cache only)."""
    from .hub import resolve

    changes = {}
    for name in ("model_path", "original_model_path"):
        value = getattr(settings, name, None)
        resolved = resolve(value, env_key(name))
        if resolved is not value:
            changes[name] = resolved
    return dataclasses.replace(settings, **changes) if changes else settings


def launcher_environment(environ: dict[str, str] | None = None) -> dict[str, int]:
    """The data-parallel launcher's variables (torchrun, accelerate launch, SLURM wrappers that set the
    same names): world size, this process' global rank and its rank on the node. A single process: 1, 0, 0."""
    environ = os.environ if environ is None else environ
    out = {}
    for key, name, default in (("world_size", "WORLD_SIZE", 1), ("rank", "RANK", 0), ("local_rank", "LOCAL_RANK", 0)):
        raw = environ.get(name, "")
        try:
            out[key] = int(raw) if raw.strip() else default
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer", "the launcher sets it", "Unset it") from None
    return out


# ---- generated documentation ---------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def _per_stage(what) -> dict[str, dict[str, str]]:
    """key -> {stage: what(field)} over every schema (run.sh's keys under "run.sh")."""
    out: dict[str, dict[str, str]] = {}
    for schema in SCHEMAS:
        stage = getattr(schema, "stage", "") or "run.sh"
        for f in dataclasses.fields(schema):
            out.setdefault(env_key(f.name), {})[stage] = what(f)
    return out


def schema_rows() -> list[tuple[str, dict[str, str], str]]:
    """(key, {stage: default}, help) for every key, in schema order; a key whose meaning differs between
    stages has each stage's help, one after the other."""
    defaults = _per_stage(_default_text)
    helps = _per_stage(lambda f: f.metadata["help"])
    rows = []
    for key in known_keys():
        by_stage = helps[key]
        text = next(iter(by_stage.values()))
        if not _same(by_stage):
            text = " ".join(f"{stage}: {h}" for stage, h in by_stage.items())
        rows.append((key, defaults[key], text))
    return rows


def _same(defaults: dict[str, str]) -> bool:
    return len(set(defaults.values())) == 1


def env_example() -> str:
    lines = [
        "# REAP-VLM configuration. Copy to .env and edit; command-line flags override these values,",
        "# and so do environment variables and a recipe (--config). An empty value means the stage's own",
        "# default. Generated from reap_vlm/settings.py (python -m reap_vlm.settings sync-docs); a test",
        "# keeps the two in sync.",
        "",
    ]
    for key, defaults, help_text in schema_rows():
        stages = ", ".join(defaults)
        if _same(defaults):
            lines.append(f"# {help_text} (stages: {stages})")
            lines.append(f"{key}={next(iter(defaults.values()))}")
        else:  # one value here would apply to every stage: leave it empty, so each keeps its own default
            per_stage = "; ".join(f"{stage} {value or 'empty'}" for stage, value in defaults.items())
            lines.append(f"# {help_text} (stages: {stages}; defaults: {per_stage})")
            lines.append(f"{key}=")
        lines.append("")
    return "\n".join(lines)


def readme_table() -> str:
    out = ["| key | default | stages | meaning |", "|---|---|---|---|"]
    for key, defaults, help_text in schema_rows():
        if _same(defaults):
            default = f"`{next(iter(defaults.values()))}`"
        else:
            default = "<br>".join(
                f"{stage}: `{value}`" if value else f"{stage}: empty" for stage, value in defaults.items()
            )
        out.append(f"| `{key}` | {default} | {', '.join(defaults)} | {help_text.replace('|', '/')} |")
    return "\n".join(out)


def dump(settings: Settings, path: Path) -> None:
    """Write the resolved settings and package versions next to an output."""
    from .provenance import versions

    payload = {"stage": settings.stage, "settings": settings.to_dict(), "versions": versions()}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


RECIPE_NAME = "reap_recipe.yaml"
_NOT_RECIPE = ("config", "log_level", "json")  # how a run was asked for and shown, not what it did


def recipe_values(settings: Settings) -> dict[str, Any]:
    """The resolved settings as recipe keys (REAP_* -> value; paths as text, None = not set)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        if f.name not in _NOT_RECIPE:
            value = getattr(settings, f.name)
            if f.name == "eval_ratios" and not str(value).strip():
                value = "none"  # an empty value in a recipe means the default
            out[env_key(f.name)] = str(value) if isinstance(value, Path) else value
    return out


def combined_recipe(reap_settings: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The recipe of a pruned checkpoint: the reap stage's resolved settings (as recorded in the metadata),
    then this stage's keys. A key both stages read keeps the reap stage's value unless this stage set it to
    something other than its own default (a re-cut at another ratio, say)."""
    out = {env_key(k): v for k, v in reap_settings.items() if k not in _NOT_RECIPE}
    if "REAP_EVAL_RATIOS" in out and not str(out["REAP_EVAL_RATIOS"]).strip():
        out["REAP_EVAL_RATIOS"] = "none"  # an empty value in a recipe means the default
    defaults = {f.name: _default_text(f) for f in dataclasses.fields(settings)}
    for key, value in recipe_values(settings).items():
        name = key[len(PREFIX) :].lower()
        own = "" if value is None else ("true" if value is True else "false" if value is False else str(value))
        if key not in out or own != defaults[name]:
            out[key] = value
    return out


def recipe_text(values: dict[str, Any], header: str) -> str:
    """YAML a later run takes with --config (the same keys as .env); `header` becomes comment lines."""
    import yaml

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def sync_docs(root: Path) -> None:
    """Rewrite .env.example and the README's table (between the markers) from the schema."""
    (root / ".env.example").write_text(env_example())
    readme = root / "README.md"
    text = readme.read_text()
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(f"{head}{TABLE_START}\n{readme_table()}\n{TABLE_END}{tail}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "env-example":
        print(env_example(), end="")
    elif what == "readme-table":
        print(readme_table())
    elif what == "sync-docs":
        sync_docs(Path(__file__).resolve().parents[1])
    else:
        print("usage: python -m reap_vlm.settings env-example|readme-table|sync-docs", file=sys.stderr)
        sys.exit(2)
