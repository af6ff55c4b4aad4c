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


def choose(settings, *, gpu_bytes: int | None = None) -> Execution:
    """Resolve REAP_EXECUTION. auto streams when the model's weights plus the scoring memory (as
    `verify` estimates it) do not fit the visible GPU memory; without a GPU it keeps the in-memory path."""
    mode = getattr(settings, "execution", "memory")
    if mode not in MODES:
        raise SettingsError(f"REAP_EXECUTION={mode!r} is not a mode", "expected auto, memory or stream", "Fix it")
    if mode != "auto":
        return Execution(mode, f"REAP_EXECUTION={mode}")
    import torch

    if gpu_bytes is None:
        if not torch.cuda.is_available() or settings.device == "cpu":
            return Execution("memory", "auto: no GPU in use, the model is loaded into CPU memory")
        indices = range(torch.cuda.device_count())
        if settings.device.startswith("cuda:"):
            indices = [int(settings.device.split(":")[1])]
        gpu_bytes = sum(torch.cuda.mem_get_info(i)[0] for i in indices)
    from ..verify import describe

    need = describe(settings.model_path, None)["scoring_memory_gib"][settings.scoring_mode] * 2**30
    fits = need <= gpu_bytes
    verdict = "fit" if fits else "do not fit"
    reason = (
        f"auto: weights + {settings.scoring_mode}-mode scoring need {need / 2**30:.1f} GiB and {verdict} "
        f"the {gpu_bytes / 2**30:.1f} GiB free on the GPU(s)"
    )
    return Execution("memory" if fits else "stream", reason)
