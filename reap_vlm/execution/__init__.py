"""How the model is driven. `memory`: the whole model is loaded and each batch runs through its
forward. `stream`: the model is a meta-device skeleton, decoder layers are read from the shards one
at a time and every cached batch runs through the resident layer. Both use the same observers."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingsError
from ..settings import EXECUTION_MODES as MODES


@dataclass(frozen=True)
class Execution:
    mode: str  # "memory" or "stream"
    reason: str


def choose(settings, *, gpu_free: list[int] | None = None, need=None) -> Execution:
    """Resolve REAP_EXECUTION. auto streams when the model's weights plus the scoring memory (as `verify`
    estimates it) do not fit the free memory of ONE of the GPUs in use, even when several are visible:
    accelerate's device_map over several GPUs runs the layers one GPU after another (one GPU busy at a
    time), while streaming on one GPU measured 1.01x the in-memory path's throughput (docs/multi-gpu.md);
    REAP_EXECUTION=memory keeps the device_map. Without a GPU auto keeps the in-memory path.
    `gpu_free`: free bytes per GPU in use (default: asked of CUDA). `need`: another stage's estimate
    instead (the test stage's), a function returning (bytes, what)."""
    mode = getattr(settings, "execution", "memory")
    if mode not in MODES:
        raise SettingsError(f"REAP_EXECUTION={mode!r} is not a mode", "expected auto, memory or stream", "Fix it")
    if mode != "auto":
        return Execution(mode, f"REAP_EXECUTION={mode}")
    import torch

    if gpu_free is None:
        if not torch.cuda.is_available() or settings.device == "cpu":
            return Execution("memory", "auto: no GPU in use, the model is loaded into CPU memory")
        indices = range(torch.cuda.device_count())
        if settings.device.startswith("cuda:"):
            indices = [int(settings.device.split(":")[1])]
        gpu_free = [torch.cuda.mem_get_info(i)[0] for i in indices]
    if need is None:
        from ..verify import describe

        needed = describe(settings.model_path, None)["scoring_memory_gib"][settings.scoring_mode] * 2**30
        what = f"weights + {settings.scoring_mode}-mode scoring"
    else:
        needed, what = need()
    one = max(gpu_free)
    where = "one GPU" if len(gpu_free) == 1 else f"the largest of the {len(gpu_free)} visible GPUs"
    head = f"auto: {what} need {needed / 2**30:.1f} GiB"
    if needed <= one:
        return Execution("memory", f"{head} and fit the {one / 2**30:.1f} GiB free on {where}")
    reason = f"{head} and do not fit the {one / 2**30:.1f} GiB free on {where}"
    if len(gpu_free) > 1:
        reason += (
            "; streaming on one GPU, not accelerate's device_map over the GPUs (one GPU busy at a time; "
            "REAP_EXECUTION=memory keeps it)"
        )
    return Execution("stream", reason)
