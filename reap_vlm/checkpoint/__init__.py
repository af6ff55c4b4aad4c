"""On-disk surgery: classify tensors from headers, plan, stream, write atomically."""

from .layout import Layout, inspect_checkpoint, read_header
from .write import PrunePlan, check_target, plan_prune, verify, write_pruned

__all__ = [
    "Layout",
    "PrunePlan",
    "check_target",
    "inspect_checkpoint",
    "plan_prune",
    "read_header",
    "verify",
    "write_pruned",
]
