"""reap_metadata.json: the contract between scoring and pruning (schema in docs/design.md).

Raw sums come first, so any ratio or criterion can be re-cut without re-scoring. This module
builds, writes (atomically), reads and validates the file, and checks it against a checkpoint."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from .errors import MetadataError
from .provenance import sha256_json, versions, write_json_atomic

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
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
    validate(meta, source=str(path))
    write_json_atomic(Path(path), _clean(meta))


def read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(
            f"metadata file {path} does not exist",
            "",
            "Run ./run.sh reap first, or point --metadata-path at reap_metadata.json",
        )
    if path.stat().st_size > MAX_BYTES:
        raise MetadataError(
            f"{path} is larger than {MAX_BYTES >> 20} MiB",
            "it cannot be a reap_metadata.json",
            "Point --metadata-path at the file written by reap.py",
        )
    try:
        meta = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise MetadataError(f"{path} is not valid JSON", str(err), "Re-run ./run.sh reap to write it again") from None
    validate(meta, source=str(path))
    return meta


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def validate(meta: Any, source: str = "metadata") -> None:
    """Structure and internal consistency; raises MetadataError with what is wrong."""

    def bad(what: str, fix: str = "Re-run ./run.sh reap to write it again"):
        raise MetadataError(f"{source}: {what}", "", fix)

    if not isinstance(meta, dict):
        bad("the top level is not a JSON object")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        bad("schema_version is missing")
    if version > SCHEMA_VERSION:
        raise MetadataError(
            f"{source} has schema version {version}",
            f"this reap-vlm reads up to version {SCHEMA_VERSION}",
            "Upgrade reap-vlm",
        )
    if version < 1:
        bad(f"schema_version {version} is invalid")
    for key in ("model", "scoring", "calibration", "layers", "plan"):
        if not isinstance(meta.get(key), dict):
            bad(f"'{key}' is missing or not an object")
    blocks = meta["model"].get("blocks")
    if not isinstance(blocks, list) or not blocks:
        bad("model.blocks is missing or empty")
    for block in blocks:
        key, n = block.get("key"), block.get("num_experts")
        if not isinstance(n, int) or n <= 0:
            bad(f"block {key}: num_experts is not a positive integer")
        layer = meta["layers"].get(key)
        if layer is None:
            if meta["layers"]:
                bad(f"block {key} has no entry in 'layers'")
            continue
        for modality, stats in (layer.get("stats") or {}).items():
            for name in STAT_FIELDS:
                values = stats.get(name)
                if values is not None and (not isinstance(values, list) or len(values) != n):
                    bad(f"layers[{key}].stats.{modality}.{name} does not have {n} entries")
        kept = layer.get("kept")
        if kept is not None:
            if not isinstance(kept, list) or not all(isinstance(i, int) for i in kept):
                bad(f"layers[{key}].kept is not a list of integers")
            if len(set(kept)) != len(kept) or any(i < 0 or i >= n for i in kept):
                bad(f"layers[{key}].kept has duplicate or out-of-range indices")
            if len(kept) < block.get("top_k", 1):
                bad(f"layers[{key}] keeps {len(kept)} experts, fewer than top_k={block.get('top_k')}")


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
    meta: dict, config: dict, counts: dict[tuple[int, str], int], source: str = "checkpoint"
) -> list[str]:
    """Refuse metadata of another model. A quantized sibling (same architecture and expert counts, other
    dtypes or quantization_config) is accepted. Returns warnings (e.g. config hash differs)."""
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
    if model.get("config_sha256") and model["config_sha256"] != config_hash(config):
        warnings.append(
            "config.json differs from the scored model's (other than quantization); "
            "the expert structure matches, so the plan applies"
        )
    return warnings
