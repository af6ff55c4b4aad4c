"""`./run.sh verify MODEL`: a checkpoint's MoE layout without loading any weight.

Reads config.json and the safetensors headers (reap_vlm.checkpoint), builds the architecture on the meta
device to find routers and experts (reap_vlm.moe), and prints: family, MoE layers, experts, top-k, the
routing rule, shared experts, the on-disk layout, parameter counts before/after a ratio, and the memory
each scoring mode needs. With --metadata-path it also checks that reap_metadata.json fits the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import console
from .checkpoint import inspect_checkpoint
from .checkpoint.layout import DTYPE_BYTES
from .cli import guarded
from .errors import ReapError, SettingsError
from .settings import Parser


def _meta_blocks(model_dir: Path, config: dict):
    """MoE blocks of the architecture instantiated on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .loading import is_vision_language
    from .moe import find_moe_blocks

    # verify never runs a checkpoint's own code: with trust_remote_code=False transformers builds its built-in
    # class or refuses, and never prompts
    cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg, trust_remote_code=False)
    blocks = find_moe_blocks(model)
    shared = sorted(
        {name.split(".")[-1] for name, _ in model.named_modules() if "shared_expert" in name.split(".")[-1]}
    )
    return blocks, shared


def describe(model_dir: Path, ratio: float | None) -> dict:
    layout = inspect_checkpoint(model_dir)
    config = layout.config
    info: dict = {
        "model": str(model_dir),
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "moe_blocks": len(layout.blocks),
        "experts": layout.num_experts,
        "top_k": layout.top_k,
        "n_group": layout.n_group,
        "topk_group": layout.topk_group,
        "layout": sorted(set().union(*(b.layout for b in layout.blocks.values()))),
        "shards": len(layout.shards),
    }
    from .quantization import detect

    try:
        quant = detect(config, layout)
        info["quantization"] = quant.summary() if quant is not None else None
    except ReapError as err:  # a method scoring does not read: said here, refused by reap
        info["quantization"] = f"refused by reap: {err}"
    from .loading import remote_code

    try:
        info["custom_code"] = remote_code(model_dir, config, trust=False) or "none"
    except ReapError as err:  # what reap and test would refuse: said here, verify itself runs no code
        info["custom_code"] = f"refused by reap/test: {err}"
    try:
        blocks, shared = _meta_blocks(model_dir, config)
        info["routing"] = sorted(
            {f"{b.score_fn} top-{b.top_k}" + (f", {b.n_group} groups" if b.n_group > 1 else "") for b in blocks}
        )
        info["shared_experts"] = shared
    except Exception as err:  # custom code, quantized configs transformers cannot build offline, ...
        info["routing"] = f"not derived ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    sizes = {"expert": 0, "router": 0, "other": 0}
    counts = {"expert": 0, "router": 0, "other": 0}
    for name, t in layout.tensors.items():
        kind = {"expert": "expert", "fused": "expert", "router": "router", "buffer": "router"}.get(
            layout.roles[name].kind, "other"
        )
        sizes[kind] += t.nbytes
        counts[kind] += math.prod(t.shape)
    info["bytes"] = sizes
    info["parameters"] = sum(counts.values())
    if ratio is not None:
        keep = layout.num_experts - int(layout.num_experts * ratio)
        if not 0 < keep < layout.num_experts:
            raise SettingsError(
                f"--prune-ratio {ratio} keeps {keep} of {layout.num_experts} experts",
                "it must remove at least one expert and keep at least one",
                f"Pass a ratio between {1 / layout.num_experts:.4f} and {1 - 1 / layout.num_experts:.4f}",
            )
        frac = keep / layout.num_experts
        info["after"] = {
            "ratio": ratio,
            "experts_kept": keep,
            "parameters": int(counts["other"] + (counts["expert"] + counts["router"]) * frac),
            "bytes": int(sizes["other"] + (sizes["expert"] + sizes["router"]) * frac),
        }
    weights = sum(sizes.values())
    if isinstance(info["quantization"], dict):  # in memory the model holds the dequantized weights (bf16)
        from .quantization import dequantized_bytes

        weights = dequantized_bytes(layout, quant)
        info["bytes_dequantized"] = weights
    # Scoring memory: the weights, plus per mode what the observer adds per MoE block for a batch of
    # T tokens (T = 4 x 512 here): routed keeps T*K pair outputs [T*K, H] as the model does anyway;
    # full adds the chunk budget (REAP_CHUNK_MEMORY_MB, default 768 MiB); router adds [T, E] probabilities.
    hidden = next((t.shape[-1] for n, t in layout.tensors.items() if layout.roles[n].kind == "router"), 0)
    tokens = 2048
    itemsize = DTYPE_BYTES.get(next(iter(layout.tensors.values())).dtype, 2)
    info["scoring_memory_gib"] = {
        "router": round((weights + tokens * layout.num_experts * 4) / 2**30, 2),
        "routed": round((weights + tokens * layout.top_k * hidden * itemsize) / 2**30, 2),
        "full": round((weights + 768 * 2**20) / 2**30, 2),
    }
    return info


def check_ratio(ratio: float) -> None:
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise SettingsError(
            f"--prune-ratio {ratio} is out of range",
            "the fraction of experts to remove must be strictly between 0 and 1",
            "Pass a value such as 0.5",
        )


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="./run.sh verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint folder, or a Hub repo id (org/name) in the local cache")
    parser.add_argument("--prune-ratio", type=float, default=0.5, help="show sizes after removing this fraction")
    parser.add_argument("--metadata-path", type=Path, help="also check this reap_metadata.json against the model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # this entry point's own output (its --json prints the description itself, not a stage's result line); the
    # console's state may have been set by an earlier stage run in the same process
    console.configure("info", False)
    return guarded("verify", lambda: _show(parser.parse_args(argv)))


def _show(args: argparse.Namespace) -> int:
    check_ratio(args.prune_ratio)
    from .hub import resolve

    args.model = resolve(args.model, "MODEL")
    info = describe(args.model, args.prune_ratio)
    if args.metadata_path:
        from . import metadata

        layout = inspect_checkpoint(args.model)
        meta = metadata.read(args.metadata_path)
        info["metadata_notes"] = metadata.check_against(
            meta, layout.config, layout.counts(), str(args.model), layout.params_per_expert()
        )
        info["metadata"] = "matches this checkpoint"
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MoE layout of {args.model}", show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
