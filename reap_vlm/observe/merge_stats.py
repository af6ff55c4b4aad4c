"""The statistics expert merging needs, gathered by full-mode scoring beside the saliency sums.

Per MoE block, over the calibration tokens (padding never counts):
  gated_hidden_sum  Σ_x p_j(x) h_j(x)    [E, I] float64; h_j = combine(gate_j x, up_j x), the expert's
                    intermediate activation. The mean gated output E_x[p_j(x) f_j(x)] [E, H] is linear in
                    it: (W_down_j · Σ p h + b_j Σ p) / N, so no expert output is written to get it.
  prob_sum          Σ_x p_j(x)           [E]
  router_logit_gram Σ_x z(x) z(x)ᵀ        [R, R] float64: every router-logit column's norm and their
                    cosines, which is all REAM's router similarity needs, exactly, whatever N.
  activations       h_j(x) of every expert on the same S sampled tokens [E, S, I] (bfloat16): the
                    neuron activation patterns that alignment matches. S is set by the size bound.
The sums and the sampled activations ride on the Gram-path kernel (it computes every h anyway).
Written as reap_merge_stats.safetensors next to reap_metadata.json (`write`), read by the prune stage's
merge method (`read`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import BugError, MetadataError
from ..moe.spec import ExpertWeights, MoEBlock
from ..quantization import DEFAULT_CHUNK_BYTES, experts_per_chunk
from .stats import to_device

FILE_NAME = "reap_merge_stats.safetensors"
MEAN_CHUNK_BYTES = 64 * 2**20  # float64 down projections at a time for the mean gated outputs
FORMAT = "reap-merge-stats/1"
ACT_DTYPE = torch.bfloat16


def block_seed(seed: int, key: str) -> int:
    """The seed of block `key`'s row draws: stable across processes (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def sample_budget(sizes: list[tuple[int, int, int, int]], budget_mb: int) -> int:
    """Sampled tokens per block so that the file stays under budget_mb. sizes: (E, I, H, R) per block."""
    fixed = sum(E * H * 4 + R * R * 8 + E * 8 + 8 for E, _, H, R in sizes)
    per_token = sum(E * inter * ACT_DTYPE.itemsize for E, inter, _, _ in sizes)
    room = (budget_mb << 20) - fixed
    return max(room // per_token, 0) if per_token else 0


class MergeStats:
    """Accumulators for every block (see module docstring). `add` is called by the Observer's full-mode
    paths with a block's non-padding rows; it returns the (probs, acc) pair the kernel fills."""

    def __init__(self, blocks: list[MoEBlock], samples: int, per_batch: int, seed: int = 0):
        self.samples, self.per_batch = samples, per_batch
        # one generator per block, seeded by (seed, block key): a block's draws do not depend on which other
        # blocks share the accumulator, so streamed scoring (one MergeStats per decoder layer) draws the very
        # rows of the in-memory path (one over all blocks), and their merge plans are the same
        self._gens = {b.key: torch.Generator().manual_seed(block_seed(seed, b.key)) for b in blocks}
        self._blocks = {b.key: b for b in blocks}
        self._weights: dict[str, ExpertWeights] = {}
        self._budget = DEFAULT_CHUNK_BYTES  # bytes of quantized experts dequantized at a time (add's)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.acts: dict[str, list[torch.Tensor]] = {}
        self._filling: dict[str, torch.Tensor] = {}  # this batch's sampled h per block, on the device

    def add(
        self,
        block: MoEBlock,
        w: ExpertWeights,
        hidden: torch.Tensor,
        logits: torch.Tensor | None,
        probs,
        budget_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        """hidden [T, H] and logits [T, R] of the block's real tokens; probs [T, E] fp32 (p of the block's
        score function). Returns (probs, gated_hidden_sum[, Sample]) for the kernel to add Σ p h into and to hand
        the sampled rows' h to (kernel._add_gated). Experts kept
        quantized are dequantized `budget_bytes` at a time."""
        if logits is None:
            raise BugError(f"no router logits were captured for block {block.key}")
        E, inter = w.up.shape[0], w.up.shape[1]
        device = hidden.device
        if block.key not in self.sums:
            R = logits.shape[-1]
            self.sums[block.key] = {
                "gated_hidden_sum": torch.zeros((E, inter), dtype=torch.float64, device=device),
                "prob_sum": torch.zeros(E, dtype=torch.float64, device=device),
                "router_logit_gram": torch.zeros((R, R), dtype=torch.float64, device=device),
                "tokens": torch.zeros(1, dtype=torch.int64, device=device),
            }
            self.acts[block.key] = []
        self._weights[block.key] = w
        self._budget = budget_bytes
        s = self.sums[block.key]
        if s["tokens"].device != device:  # resumed from a checkpoint on the cpu
            s.update({name: t.to(device) for name, t in s.items()})
        z = logits.double()
        s["router_logit_gram"] += z.T @ z
        s["prob_sum"] += probs.double().sum(0)
        s["tokens"] += hidden.shape[0]
        self._collect(block.key)  # the previous batch's sampled rows of this block, to the host
        taken = sum(a.shape[1] for a in self.acts[block.key])
        want = min(self.per_batch, self.samples - taken, hidden.shape[0])
        if want <= 0:
            return probs, s["gated_hidden_sum"]
        # the sampled rows' h are taken from the chunks the kernel computes anyway (Sample.take): no extra
        # up projection of all experts (it read every expert's weights again for a few rows, per block and batch)
        rows = torch.randperm(hidden.shape[0], generator=self._gens[block.key])[:want].sort().values
        buffer = torch.zeros((E, want, inter), dtype=ACT_DTYPE, device=device)
        self._filling[block.key] = buffer
        return probs, s["gated_hidden_sum"], Sample(rows, buffer)

    def settle(self) -> None:
        """Every sampled activation on the host (`acts` complete): after the last batch, before reading acts."""
        self._collect()
        _settle()

    def _collect(self, key: str | None = None) -> None:
        """Sampled activations the kernel has filled -> the host, without waiting (tensors() and state() wait)."""
        for k in [key] if key is not None else list(self._filling):
            buffer = self._filling.pop(k, None)
            if buffer is not None:
                self.acts[k].append(buffer.to("cpu", non_blocking=buffer.device.type == "cuda"))

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the side file holds, by '<block key>.<name>' (cpu)."""
        self.settle()
        out = {}
        for key, s in self.sums.items():
            w = self._weights[key]
            n = max(int(s["tokens"].item()), 1)
            gated = s["gated_hidden_sum"].to(w.down.device)
            # a few experts at a time: the float64 copy of every down projection at once would be
            # E·H·I·8 bytes (1.5 GiB for one Qwen3-VL-30B-A3B layer) on the GPU
            step = max(1, MEAN_CHUNK_BYTES // max(w.down[0].numel() * 8, 1))
            if w.dequantize is not None:
                step = min(step, experts_per_chunk(w, self._budget))
            mean = torch.cat(
                [
                    torch.einsum("ehi,ei->eh", w.experts(e, e + step).down.double(), gated[e : e + step])
                    for e in range(0, w.down.shape[0], step)
                ]
            )
            if w.down_bias is not None:
                mean = mean + w.down_bias.double() * s["prob_sum"].to(w.down.device)[:, None]
            out[f"{key}.mean_gated_output"] = (mean / n).float().cpu()
            for name, t in s.items():
                out[f"{key}.{name}"] = t.cpu()
            acts = self.acts[key]
            empty = torch.zeros((w.up.shape[0], 0, w.up.shape[1]), dtype=ACT_DTYPE)
            out[f"{key}.activations"] = torch.cat(acts, dim=1) if acts else empty
        return {k: v.contiguous() for k, v in out.items()}

    # ---- resume -----------------------------------------------------------------------------
    def state(self) -> dict:
        self.settle()
        return {
            "sums": {k: {n: t.cpu() for n, t in s.items()} for k, s in self.sums.items()},
            "acts": self.acts,
            "gens": {k: g.get_state() for k, g in self._gens.items()},
        }

    def load(self, state: dict) -> None:
        self.sums = {k: dict(s) for k, s in state["sums"].items()}
        self.acts = {k: list(a) for k, a in state["acts"].items()}
        for key, gen in state["gens"].items():
            self._gens[key].set_state(gen)


class Sample:
    """Which rows of a block's batch keep their h (rows: sorted host indices into the kernel's tokens) and
    where they go (buffer [E, n, I] on the device); the kernel hands over each chunk it computes (`take`)."""

    def __init__(self, rows: torch.Tensor, buffer: torch.Tensor):
        self.rows, self.buffer = rows, buffer
        self._starts = rows.tolist()
        self._local: dict[tuple[int, int], torch.Tensor] = {}

    def take(self, h: torch.Tensor, t0: int, e0: int, e1: int) -> None:
        """h [e1 - e0, t, I] of the experts e0..e1 on tokens t0..t0 + t: the sampled rows among them."""
        t1 = t0 + h.shape[1]
        lo, hi = bisect.bisect_left(self._starts, t0), bisect.bisect_left(self._starts, t1)
        if hi <= lo:
            return
        if (t0, t1) not in self._local:  # the same token chunks for every chunk of experts
            self._local[(t0, t1)] = to_device(self.rows[lo:hi] - t0, h.device)
        self.buffer[e0:e1, lo:hi] = h.index_select(1, self._local[(t0, t1)]).to(self.buffer.dtype)


def _settle() -> None:
    """Wait for the sampled activations' copies to the host (made without waiting)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def by_block(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'<block key>.<name>' -> tensor, regrouped as block key -> name -> tensor."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, field = name.rsplit(".", 1)
        out.setdefault(key, {})[field] = t
    return out


def write(path: Path, stats: MergeStats, info: dict) -> Path:
    """Atomically write the side file (temporary name beside it, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(stats.tensors(), str(tmp), metadata={"format": FORMAT, "info": json.dumps(info)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(per block key: name -> tensor, info) of a side file; a clear error when it is missing or foreign."""
    from safetensors import SafetensorError, safe_open

    from ..validate import check_regular

    path = Path(path)
    if not path.is_file():
        raise MetadataError(
            f"{path} does not exist",
            "merging needs the statistics that full-mode scoring writes beside reap_metadata.json",
            "Re-run reap with REAP_SCORING_MODE=full and REAP_MERGE_STATS_MB > 0, or use --method prune",
        )
    check_regular(path, MetadataError, "Re-run reap to write it again")  # a FIFO would block safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise MetadataError(f"{path} is not a merge statistics file of this tool", "", "Re-run reap")
            out = by_block({name: f.get_tensor(name) for name in f.keys()})
            info = json.loads(meta.get("info") or "{}")
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, MetadataError):
            raise
        raise MetadataError(f"{path} is unreadable", str(err), "Re-run reap to write it again") from None
    return out, info
