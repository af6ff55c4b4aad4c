"""How to find and read MoE blocks in a model, in memory (detect, spec) and on disk (ondisk)."""

from .detect import find_moe_blocks, get_module
from .spec import ExpertWeights, MoEBlock, expert_weights

__all__ = ["ExpertWeights", "MoEBlock", "expert_weights", "find_moe_blocks", "get_module"]
