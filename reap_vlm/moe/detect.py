"""Find the MoE blocks of a loaded model from its module tree.

Structure, not names: a MoE block is a module with a child `experts` that holds expert-indexed
3-D parameters (dim 0 = E), next to a router child (`gate` or `router`) whose weight has E rows
(or E columns: some routers store [H, E]). The decoder layer index comes from the module path.
Top-k and routing groups come from the router's attributes, else from the config keys that
families use for them.
"""

from __future__ import annotations

import inspect
import re

import torch

from ..errors import UnsupportedModelError
from ..families import EXPERT_SETS, MAX_EXTRA_ROWS, check_supported
from .spec import MoEBlock

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
ROUTER_ATTRS = ("gate", "router")
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token", "top_k")
SUPPORT_DOC = "docs/adding-a-model.md"


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def config_value(config, keys: tuple[str, ...], default=None):
    """First of `keys` found on the config or its text_config."""
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        for key in keys:
            value = getattr(cfg, key, None)
            if value is not None:
                return value
    return default


def _num_experts(experts: torch.nn.Module) -> int | None:
    from ..quantization import is_quantized_experts

    if is_quantized_experts(experts) and not hasattr(experts, "down_proj"):  # PackedExperts: buffers per part
        return experts.num_experts
    sizes = {
        p.shape[0] for name, p in experts.named_parameters(recurse=False) if name in EXPERT_PARAMS and p.dim() == 3
    }
    if not sizes or max(sizes) - min(sizes) > MAX_EXTRA_ROWS:
        return None
    return min(sizes)  # LongCat: gate_up_proj also holds the zero experts' rows, down_proj does not


def _router(block: torch.nn.Module, num_experts: int) -> tuple[str, str, torch.nn.Module, int] | None:
    """(attr, weight path inside the block, router module, logit rows) of the block's router.

    The router is the block's `gate` / `router` child; its logits come from a 2-D weight with one row
    per expert, sometimes followed by a few rows that are not prunable experts (LongCat's zero
    experts, Zaya's extra row). That weight may sit on the router itself or on a linear layer
    inside it (`router.gate`, `gate.wg`, `router.classifier`, ...): the last such weight in module
    order is the one that makes the logits."""
    for attr in ROUTER_ATTRS:
        router = getattr(block, attr, None)
        if not isinstance(router, torch.nn.Module):
            continue
        found = None
        for name, p in router.named_parameters():
            if p.dim() == 2 and num_experts <= p.shape[0] <= num_experts + MAX_EXTRA_ROWS:
                found = (attr, f"{attr}.{name}", router, int(p.shape[0]))
        if found is None:  # a router that stores [H, E]
            weight = getattr(router, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == num_experts:
                found = (attr, f"{attr}.weight", router, num_experts)
        if found is not None:
            return found
    return None


def _expert_set(block_path: str) -> str:
    leaf = block_path.rsplit(".", 1)[-1]
    return EXPERT_SETS.get(leaf, "experts")


def _score_fn(router: torch.nn.Module, config) -> str:
    if hasattr(router, "e_score_correction_bias") or config_value(config, ("scoring_func",)) == "sigmoid":
        return "sigmoid"
    return "softmax"


def _takes_no_indices(experts: torch.nn.Module) -> bool:
    """The experts' forward takes hidden states only (Llama 4): no top-k index reaches a hook there."""
    params = list(inspect.signature(type(experts).forward).parameters)[1:]
    return len(params) == 1


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Every routed-expert block of `model`, in module order. Raises UnsupportedModelError if none."""
    config = getattr(model, "config", None)
    if config is not None:
        check_supported(config)
    blocks = []
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        num_experts = _num_experts(experts)
        if num_experts is None:
            continue
        found = _router(module, num_experts)
        if found is None:
            continue
        router_attr, weight_path, router, rows = found
        layer_numbers = LAYER_RE.findall(path)  # the innermost "layers.N" is the decoder layer
        if not layer_numbers:
            raise UnsupportedModelError(
                f"found experts at {path} but no decoder layer index in the path",
                "the layer index joins the scores with the checkpoint's tensor names",
                f"See {SUPPORT_DOC} to describe this family",
            )
        top_k = getattr(router, "top_k", None) or config_value(config, TOP_K_KEYS)
        if top_k is None:
            raise UnsupportedModelError(
                f"no top-k found for the MoE block at {path}",
                f"looked for {', '.join(TOP_K_KEYS)}",
                f"See {SUPPORT_DOC}",
            )
        prefix = f"{path}." if path else ""
        blocks.append(
            MoEBlock(
                layer=int(layer_numbers[-1]),
                expert_set=_expert_set(path),
                block=path,
                router=prefix + router_attr,
                experts=prefix + "experts",
                num_experts=num_experts,
                top_k=int(top_k),
                n_group=int(getattr(router, "n_group", None) or config_value(config, ("n_group",), 1) or 1),
                topk_group=int(getattr(router, "topk_group", None) or config_value(config, ("topk_group",), 1) or 1),
                score_fn=_score_fn(router, config),
                router_weight=prefix + weight_path,
                router_rows=rows,
                indices_from_router=_takes_no_indices(experts),
            )
        )
    if not blocks:
        name = type(model).__name__
        raise UnsupportedModelError(
            f"no MoE layers found in {name}",
            "no module has an `experts` child with expert-indexed 3-D weights next to a gate/router",
            f"If this is a MoE model, see {SUPPORT_DOC}; dense models cannot be expert-pruned",
        )
    return blocks
