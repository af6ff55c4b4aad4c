"""The prune stage: reap_metadata.json + checkpoint → pruned checkpoint, by shard surgery."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from . import console, hub, metadata, outputs, scoring
from .checkpoint import check_target, inspect_checkpoint, plan_prune, write_pruned
from .errors import MetadataError, SettingsError
from .methods.merge import DEFAULTS as MERGE_DEFAULTS
from .provenance import tool_version
from .settings import RECIPE_NAME, PruneSettings, combined_recipe, dump, recipe_text


def _recut(settings: PruneSettings, meta: dict) -> tuple[dict[tuple[int, str], list[int]], dict]:
    """The metadata's plan, or a new one from its raw sums when ratio / criterion / modality change."""
    plan = dict(meta["plan"])
    wanted = {
        "criterion": plan.get("criterion") if settings.criterion == "auto" else settings.criterion,
        "ratio": settings.prune_ratio if settings.prune_ratio is not None else plan.get("ratio"),
        "num_keep": settings.num_keep or (None if settings.prune_ratio is not None else plan.get("num_keep")),
        "modality": settings.modality or plan.get("modality", "joint"),
        "round_to": settings.round_to or plan.get("round_to", 1),
    }
    # an explicit --modality asks for that policy's ranking, also when the metadata's plan came from a search
    policy = plan.get("policy", plan.get("modality"))
    same_policy = not settings.modality or settings.modality == policy
    if same_policy and all(wanted[k] == plan.get(k) for k in wanted):
        return metadata.keep_plan(meta), {**plan, "recut": False}
    mode = meta["scoring"]["mode"]
    if wanted["criterion"] not in scoring.available_criteria(mode):
        raise SettingsError(
            f"criterion {wanted['criterion']} is not available from {mode}-mode metadata",
            "",
            "Pick one of " + ", ".join(scoring.available_criteria(mode)),
        )
    plans = scoring.plan(
        meta["layers"],
        meta["model"]["blocks"],
        criterion=wanted["criterion"],
        ratio=wanted["ratio"],
        num_keep=wanted["num_keep"] or 0,
        modality=wanted["modality"],
        round_to=wanted["round_to"],
        protect_super=plan.get("protect_super_experts", True),
        super_factor=plan.get("super_expert_factor", 10.0),
    )
    by_key = {b["key"]: (b["layer"], b["expert_set"]) for b in meta["model"]["blocks"]}
    keep = {by_key[k]: p["kept"] for k, p in plans.items()}
    if plan.get("policy") not in (None, plan.get("modality")):
        console.info(
            f"note: the metadata's plan came from a measured search ({plan['policy']}), which the raw sums cannot "
            f"reproduce; the re-cut ranks by {wanted['criterion']}/{wanted['modality']}"
        )
    console.info(
        f"re-cut from the raw sums: criterion {wanted['criterion']}, ratio {wanted['ratio']}, "
        f"modality {wanted['modality']}"
    )
    weights = {
        b["key"]: scoring.modality_weights(meta["layers"][b["key"]]["stats"], wanted["modality"])
        for b in meta["model"]["blocks"]
    }
    return keep, {
        **plan,
        **wanted,
        "policy": wanted["modality"],
        "modality_weights": weights,
        "recut": True,
        "chosen_by": "re-cut by prune_model.py",
    }


def resolve_method(settings: PruneSettings, meta: dict) -> tuple[str, dict | None, str]:
    """(method, merge settings or None, why): --method, else the reap stage's choice (its plan's method); each
    merge setting from its flag, else the merge plan the reap stage measured, else REAM's default."""
    plan = meta.get("plan") or {}
    chosen = plan.get("method", "prune")
    if settings.method == "auto":
        method = chosen
        why = "chosen by the reap stage" if "method" in plan else "the default (the metadata records no method)"
    else:
        method, why = settings.method, "REAP_METHOD / --method"
    if method != "merge":
        if chosen == "merge":
            console.info(
                "note: the reap stage chose merging; --method prune removes the merge groups' other members instead"
            )
        return method, None, why
    measured = plan.get("merge") or {}
    given = {
        "grouping": settings.merge_grouping or None,
        "group_size": settings.merge_group_size,
        "router": settings.merge_router or None,
    }
    merge = {k: given[k] if given[k] is not None else measured.get(k, v) for k, v in MERGE_DEFAULTS.items()}
    return method, merge, why


def _merge_plan(settings: PruneSettings, layout, meta: dict, n_keep: int, criterion: str, modality: str, merge: dict):
    """The merge method's plan and groups, from the metadata's scores and the merge statistics."""
    from .methods import merge_checkpoint
    from .observe import merge_stats

    recorded = meta.get("merge_stats")
    if not recorded:
        raise MetadataError(
            "the metadata records no merge statistics",
            "merging needs the statistics that full-mode scoring writes with REAP_MERGE_STATS_MB > 0",
            "Re-run reap with REAP_SCORING_MODE=full, or use --method prune",
        )
    path = settings.merge_stats_file
    stats, info = merge_stats.read(path)
    if info.get("created") != meta.get("created") or info.get("config_sha256") != meta["model"]["config_sha256"]:
        raise MetadataError(
            f"{path} was written by another scoring run than {settings.metadata_file}",
            "statistics and scores must come from the same run",
            "Point --merge-stats-path at the file written with this metadata, or re-run reap",
        )
    groups, saliency, acts = merge_checkpoint.build_groups(
        meta,
        stats,
        n_keep,
        criterion,
        grouping=merge["grouping"],
        group_size=merge["group_size"],
        modality=modality,
    )
    plan = merge_checkpoint.plan_merge(
        layout,
        groups,
        saliency,
        acts,
        router_mode=merge["router"],
        collapse_groups=settings.collapse_groups,
        max_shard_size=settings.max_shard_size,
    )
    return plan, groups


def model_card(provenance: dict, layout, n_keep: int, base_model: str | None = None) -> str:
    """README.md of the new checkpoint (reap_vlm.card): the source card's metadata kept and extended."""
    from . import card

    return card.build(
        provenance,
        layout.config,
        num_experts=layout.num_experts,
        n_keep=n_keep,
        moe_layers=len(layout.blocks),
        src=layout.src,
        base_model=base_model,
    )


def quantization_of(src: Path, config: dict):
    from .loading import quantization_of as detect

    return detect(src, config)


def run(settings: PruneSettings) -> int:
    if settings.model_path is None:
        raise SettingsError(
            "REAP_MODEL_PATH is not set",
            "the prune stage needs the source checkpoint",
            "Set REAP_MODEL_PATH in .env or pass --model-path",
        )
    if settings.base_model and ("@" in settings.base_model or not hub.is_repo_id(settings.base_model)):
        raise SettingsError(
            f"REAP_BASE_MODEL={settings.base_model!r} is not a Hub repo id",
            "the model card's base_model names the source as ORG/NAME",
            "Set it to e.g. Qwen/Qwen3-VL-30B-A3B-Instruct, or leave it empty",
        )
    src, dst = Path(settings.model_path), settings.pruned_dir
    layout = inspect_checkpoint(src)
    meta = metadata.read(settings.metadata_file)
    for warning in metadata.check_against(meta, layout.config, layout.counts(), str(src), layout.params_per_expert()):
        console.info(f"note: {warning}")
    note = metadata.quantized_pair(meta, quantization_of(src, layout.config), str(src))
    if note:
        console.info(f"note: {note}")
    keep, plan_info = _recut(settings, meta)
    n_keep = len(next(iter(keep.values())))
    groups = None
    method, merge, why = resolve_method(settings, meta)
    if merge is not None:
        modality = plan_info.get("modality") or "joint"
        plan, groups = _merge_plan(settings, layout, meta, n_keep, plan_info["criterion"], modality, merge)
        keep = plan.keep  # the groups' centroids: where the merged experts sit
        sizes = [len(g) for gs in groups.values() for g in gs]
        console.info(
            f"merge: {merge['grouping']} grouping"
            + (f" (C {merge['group_size']})" if merge["grouping"] == "ream" else "")
            + f", {merge['router']} router rows, {n_keep} groups per block, "
            f"{sum(s > 1 for s in sizes) / len(groups):.1f} merged per block on average, largest {max(sizes)} experts"
        )
    else:
        plan = plan_prune(
            layout, keep, collapse_groups=settings.collapse_groups, max_shard_size=settings.max_shard_size
        )
    console.info(f"method: {method} ({why})")
    for note in plan.notes:
        console.info(f"note: {note}")
    console.info(
        f"{src}: {len(layout.blocks)} MoE blocks, {layout.num_experts} experts each, top_k {layout.top_k}, "
        f"layout {sorted(set().union(*(b.layout for b in layout.blocks.values())))}"
    )
    source_bytes = sum(t.nbytes for t in layout.tensors.values())
    console.info(
        f"plan: keep {n_keep} of {layout.num_experts} experts per block ({plan_info['criterion']}); "
        f"{source_bytes / 2**30:.3f} GiB -> {plan.total_bytes / 2**30:.3f} GiB in {len(plan.shards)} shard(s)"
    )
    if settings.dry_run:
        for key in sorted(keep):
            removed = sorted(set(range(layout.counts()[key])) - set(keep[key]))
            console.info(f"  layer {key[0]} ({key[1]}): remove {removed}")
        console.info("dry run: nothing written")
        console.set_result({"dry_run": True, "kept_per_block": n_keep, "bytes": plan.total_bytes})
        return 0
    check_target(src, dst, settings.overwrite, settings.metadata_file)
    settings_file = Path(settings.output_path) / "prune_settings.json"
    outputs.guard_file(settings_file, what="settings file", setting="REAP_OUTPUT_PATH (--output-path)", models=[src])
    provenance = {
        "tool": f"reap-vlm {tool_version()}",
        "source": {
            "path": str(src),
            "architecture": meta["model"]["architecture"],
            "config_sha256": meta["model"]["config_sha256"],
            "num_experts": layout.num_experts,
        },
        "criterion": plan_info["criterion"],
        "ratio": plan_info.get("ratio"),
        "num_keep": n_keep,
        "modality": plan_info.get("modality"),
        "scoring_mode": meta["scoring"]["mode"],
        "calibration": meta["calibration"].get("spec"),
        "recut": plan_info.get("recut", False),
        "kept": {f"{layer}.{expert_set}": kept for (layer, expert_set), kept in sorted(keep.items())},
    }
    if groups is not None:
        provenance["method"] = "merge"
        provenance["merge"] = {
            **merge,
            "groups": {f"{layer}.{s}": g for (layer, s), g in sorted(groups.items())},
        }
    base_model = settings.base_model or hub.cache_repo_id(src)
    if not base_model:
        console.info(
            "note: the model card names no base_model (the source is a local folder): pass --base-model ORG/NAME"
        )
    recipe = recipe_text(
        combined_recipe(meta.get("settings") or {}, settings),
        "The settings that made this checkpoint: the reap stage's (from its metadata), then the prune stage's.\n"
        "Run the pipeline again with them: --config reap_recipe.yaml (flags and the environment still win).",
    )
    with ExitStack() as stack:
        bar = stack.enter_context(console.bytes_progress("writing", plan.total_bytes))

        def hashing(total: int):
            stack.close()  # the writing bar ends where the hash check starts
            return stack.enter_context(console.bytes_progress("hash check", total)).advance

        summary = write_pruned(
            plan,
            dst,
            overwrite=settings.overwrite,
            metadata=settings.metadata_file,
            provenance=provenance,
            model_card=model_card(provenance, layout, n_keep, base_model),
            hash_check_mb=settings.hash_check_mb,
            hash_check_all=settings.hash_check_all,
            progress=lambda _name, n: bar.advance(n),
            verify_progress=hashing,
            extra_files={RECIPE_NAME: recipe},
        )
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    with outputs.staged(settings_file.parent) as files:
        dump(settings, files.path(settings_file.name))
    console.info(
        f"pruned checkpoint written to {dst}: {summary['shards']} shard(s), {summary['tensors']} tensors "
        f"({summary['hashed']} hash-verified against the source), {summary['bytes'] / 2**30:.3f} GiB"
    )
    console.set_result(
        {
            "pruned": str(dst),
            "settings": str(settings_file),
            "recipe": str(dst / RECIPE_NAME),
            "method": method,
            "experts": {"source": layout.num_experts, "kept": n_keep},
            "bytes": {"source": source_bytes, "pruned": summary["bytes"]},
            "shards": summary["shards"],
            "tensors": summary["tensors"],
            "hash_verified": summary["hashed"],
        }
    )
    return 0
