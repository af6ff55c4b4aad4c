"""reap_metadata.json: the contract between scoring and pruning (schema in docs/design.md).

Raw sums come first, so any ratio or criterion can be re-cut without re-scoring. This module
builds, writes (atomically), reads and validates the file, and checks it against a checkpoint."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter

from .errors import MetadataError
from .provenance import sha256_json, versions, write_json_atomic
from .settings import SCORING_MODES
from .validate import Count, Positive, check, read_json

SCHEMA_VERSION = 1
MAX_BYTES = 512 * 1024 * 1024  # a metadata file of a 1000-layer, 1000-expert model is far below this
MODALITIES = ("all", "text", "image")
STAT_FIELDS = ("count", "gate_sum", "gate_norm_sum", "norm_sum", "max_abs", "prob_sum", "soft_norm_sum")
# Keys that differ between a model and its quantized sibling; not part of the structural fingerprint.
_VOLATILE_CONFIG_KEYS = (
    "quantization_config",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "reap_pruning",
)


def config_hash(config: dict) -> str:
    return sha256_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS})


def model_fingerprint(
    config: dict, blocks: list, expert_shapes: dict[str, dict[str, list[int]]], path: str = ""
) -> dict:
    """Architecture, config hash and per-block expert counts and shapes."""
    return {
        "path": path,
        "architecture": (config.get("architectures") or [""])[0],
        "model_type": config.get("model_type", ""),
        "config_sha256": config_hash(config),
        "blocks": [
            {
                "key": b.key,
                "layer": b.layer,
                "expert_set": b.expert_set,
                "num_experts": b.num_experts,
                "top_k": b.top_k,
                "n_group": b.n_group,
                "topk_group": b.topk_group,
                "block": b.block,
                "score_fn": b.score_fn,
                "expert_shapes": expert_shapes.get(b.key, {}),
            }
            for b in blocks
        ],
    }


def new(model: dict, scoring: dict, calibration: dict, settings: dict) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "model": model,
        "scoring": scoring,
        "calibration": calibration,
        "settings": settings,
        "layers": {},
        "plan": {},
        "candidates": {},
    }


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as null (an undefined mean, e.g. EAN mean of a never-routed expert)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write(path: Path, meta: dict) -> None:
    data = json.loads(json.dumps(_clean(meta)))  # validated as the next stage will read it
    validate(data, source=str(path))
    write_json_atomic(Path(path), data)


FIX = "Re-run ./run.sh reap to write it again"


def read(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MetadataError(
            f"metadata file {path} does not exist",
            "",
            "Run ./run.sh reap first, or point --metadata-path at reap_metadata.json",
        )
    meta = read_json(path, MetadataError, FIX, MAX_BYTES)
    validate(meta, source=str(path))
    return meta


Number = StrictFloat | StrictInt | None  # null: an undefined mean (see _clean)


class _Stats(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokens: Count = 0
    count: list[Number] | None = None
    gate_sum: list[Number] | None = None
    gate_norm_sum: list[Number] | None = None
    norm_sum: list[Number] | None = None
    max_abs: list[Number] | None = None
    prob_sum: list[Number] | None = None
    soft_norm_sum: list[Number] | None = None


class _Layer(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    stats: dict[Literal[MODALITIES], _Stats] = {}  # type: ignore[valid-type]
    scores: dict[StrictStr, list[Number] | None] = {}  # None: the criterion needs another scoring mode
    kept: list[Count] | None = None
    protected: dict[StrictStr, Any] = {}


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    key: StrictStr
    layer: Count
    expert_set: StrictStr
    num_experts: Positive
    top_k: Positive = 1
    n_group: Positive = 1
    topk_group: Positive = 1
    expert_shapes: dict[StrictStr, list[Count]] = {}


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    architecture: StrictStr = ""
    model_type: StrictStr = ""
    config_sha256: StrictStr = ""
    blocks: Annotated[list[_Block], Field(min_length=1)]


class _Plan(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    criterion: StrictStr | None = None
    ratio: Annotated[StrictFloat, Field(gt=0, lt=1)] | None = None
    num_keep: Positive | None = None
    modality: StrictStr = "joint"
    round_to: Positive = 1
    protect_super_experts: StrictBool = True
    super_expert_factor: Annotated[StrictFloat | StrictInt, Field(gt=0)] = 10.0


class _Scoring(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    mode: Literal[SCORING_MODES]  # type: ignore[valid-type]


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    schema_version: StrictInt
    model: _Model
    scoring: _Scoring
    calibration: dict[StrictStr, Any]
    layers: dict[StrictStr, _Layer]
    plan: _Plan


SCHEMA = TypeAdapter(_Metadata)


def validate(meta: Any, source: str = "metadata") -> None:
    """Structure (types and ranges: the schema above) and internal consistency; raises MetadataError
    with the file, the field and what is wrong."""

    def bad(what: str, fix: str = FIX):
        raise MetadataError(f"{source}: {what}", "", fix)

    if not isinstance(meta, dict):
        bad("the top level is not a JSON object")
    version = meta.get("schema_version")
    if type(version) is not int:
        bad("schema_version is missing")
    if version > SCHEMA_VERSION:
        raise MetadataError(
            f"{source} has schema version {version}",
            f"this reap-vlm reads up to version {SCHEMA_VERSION}",
            "Upgrade reap-vlm",
        )
    if version < 1:
        bad(f"schema_version {version} is invalid")
    parsed = check(SCHEMA, meta, source, MetadataError, FIX)
    keys = [b.key for b in parsed.model.blocks]
    if len(set(keys)) != len(keys) or len({(b.layer, b.expert_set) for b in parsed.model.blocks}) != len(keys):
        bad("model.blocks lists a block twice")
    for block in parsed.model.blocks:
        key, n = block.key, block.num_experts
        if block.top_k > n:
            bad(f"block {key}: top_k={block.top_k} exceeds its {n} experts")
        if block.n_group > 1 and n % block.n_group:
            bad(f"block {key}: n_group={block.n_group} does not divide its {n} experts")
        layer = parsed.layers.get(key)
        if layer is None:
            if parsed.layers:
                bad(f"block {key} has no entry in 'layers'")
            continue
        for modality, stats in layer.stats.items():
            for name in STAT_FIELDS:
                values = getattr(stats, name)
                if values is not None and len(values) != n:
                    bad(f"layers[{key}].stats.{modality}.{name} does not have {n} entries")
        for name, values in layer.scores.items():
            if values is not None and len(values) != n:
                bad(f"layers[{key}].scores.{name} does not have {n} entries")
        kept = layer.kept
        if kept is not None:
            if len(set(kept)) != len(kept) or any(i >= n for i in kept):
                bad(f"layers[{key}].kept has duplicate or out-of-range indices")
            if len(kept) < block.top_k:
                bad(f"layers[{key}] keeps {len(kept)} experts, fewer than top_k={block.top_k}")
    extra = sorted(set(parsed.layers) - set(keys))
    if extra:
        bad(f"layers has an entry {extra[0]!r} that model.blocks does not list")


def keep_plan(meta: dict) -> dict[tuple[int, str], list[int]]:
    """(layer, expert_set) -> kept original expert indices, ascending."""
    plan = {}
    for block in meta["model"]["blocks"]:
        kept = meta["layers"].get(block["key"], {}).get("kept")
        if kept is None:
            raise MetadataError(
                f"metadata has no keep plan for block {block['key']}",
                "",
                "Re-cut it: prune_model.py --prune-ratio R (or re-run ./run.sh reap)",
            )
        plan[(block["layer"], block["expert_set"])] = sorted(kept)
    return plan


def check_against(
    meta: dict,
    config: dict,
    counts: dict[tuple[int, str], int],
    source: str = "checkpoint",
    per_expert: dict[tuple[int, str], int] | None = None,
) -> list[str]:
    """Refuse metadata of another model. A quantized sibling (same architecture and expert counts, other
    dtypes or quantization_config) is accepted. `per_expert`: the checkpoint's weights per expert and block
    (Layout.params_per_expert), compared with the scored model's expert shapes when the configs differ.
    Returns warnings (e.g. config hash differs)."""
    model = meta["model"]
    arch = (config.get("architectures") or [""])[0]
    if model.get("architecture") and arch and model["architecture"] != arch:
        raise MetadataError(
            f"the metadata was made for {model['architecture']}, but {source} is {arch}",
            "",
            "Use the metadata of this model, or re-run ./run.sh reap on it",
        )
    expected = {(b["layer"], b["expert_set"]): b["num_experts"] for b in model["blocks"]}
    if expected != counts:
        missing = sorted(set(expected) ^ set(counts))
        differing = sorted(k for k in set(expected) & set(counts) if expected[k] != counts[k])
        detail = (
            f"MoE layers differ: {missing[:4]}"
            if missing
            else f"expert counts differ at {differing[:4]} ({[expected[k] for k in differing[:4]]} vs "
            f"{[counts[k] for k in differing[:4]]})"
        )
        raise MetadataError(
            f"the metadata does not match {source}",
            detail,
            "Use the metadata written for this model (was it already pruned?)",
        )
    warnings = []
    if model.get("config_sha256") and model["config_sha256"] != config_hash(config) and per_expert:
        for b in model["blocks"]:
            key, shapes = (b["layer"], b["expert_set"]), b.get("expert_shapes") or {}
            if key not in per_expert or not shapes or any(s[0] < b["num_experts"] for s in shapes.values() if s):
                continue  # nothing comparable: experts as a module list, or not expert-major
            scored = sum(math.prod(s[1:]) for s in shapes.values() if s)
            if scored != per_expert[key]:
                raise MetadataError(
                    f"the metadata does not match {source}",
                    f"block {b['key']}: the scored model's experts have {scored} weights each, this "
                    f"checkpoint's {per_expert[key]} (another model of the same architecture)",
                    "Use the metadata written for this model, or re-run ./run.sh reap on it",
                )
    if model.get("config_sha256") and model["config_sha256"] != config_hash(config):
        warnings.append(
            "config.json differs from the scored model's (other than quantization); "
            "the expert structure matches, so the plan applies"
        )
    return warnings


def quantized_pair(meta: dict, quant, source: str = "checkpoint") -> str | None:
    """One line when the metadata was scored on another precision of this checkpoint (a quantized export
    and its bf16 original, or two exports): check_against has accepted the pair, since the architecture
    and the expert counts of every MoE layer match; the plan is by expert index, so it applies as is."""
    scored = (meta["model"].get("quantization") or {}).get("format", "unquantized")
    here = quant.format if quant is not None else "unquantized"
    if scored == here:
        return None
    return (
        f"the metadata was scored on the {scored} checkpoint and {source} is {here}: same architecture and "
        "expert counts per MoE layer, so the plan (expert indices) applies to it"
    )
