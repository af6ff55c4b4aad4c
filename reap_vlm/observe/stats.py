"""Per-block, per-expert float64 sums, kept separately for text and image tokens ("all" = both)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUM_FIELDS = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "prob_sum", "soft_norm_sum")
MODALITY_IDS = {"text": 0, "image": 1}
_ROUTED = 4  # the first four fields are sums over routed (token, expert) pairs


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """t on `device` without waiting for the GPU: a host tensor is copied from pinned memory
    asynchronously (a plain `.to("cuda")` of pageable memory synchronises the stream)."""
    device = t.device if device is None else torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Rows:
    """A batch's token rows as every block on one device needs them; made once per batch and device.

    modality [T]: 0 text, 1 image, -1 padding. onehot [2, T] fp32: text and image rows, all zero for
    padding, so padding never counts. block [T, 1]: 0 text, 1 image, 2 padding (where a row's peaks
    go). tokens [2] int64: text and image tokens. real [n] int64: the indices of the non-padding rows, or
    None when no row is padding — made from the host's copy of the modality, so that selecting a batch's
    real rows in every layer needs no device-to-host synchronisation (boolean indexing would)."""

    modality: torch.Tensor
    onehot: torch.Tensor
    block: torch.Tensor
    tokens: torch.Tensor
    real: torch.Tensor | None = None

    @classmethod
    def of(cls, modality: torch.Tensor, device: torch.device | None = None) -> Rows:
        """`modality` where it is (the host, usually); the tensors on `device` (default: modality's)."""
        padding = modality < 0
        real = to_device(torch.nonzero(~padding).squeeze(1), device) if bool(padding.any()) else None
        modality = to_device(modality, device)
        mask = torch.stack([modality == 0, modality == 1])
        return cls(modality, mask.float(), modality.remainder(3)[:, None], mask.sum(1), real)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The non-padding rows of x [T, ...]."""
        return x if self.real is None else x.index_select(0, self.real)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[n, ...] values of the non-padding rows as a [T, ...] tensor, zero in the padding rows."""
        if self.real is None:
            return values
        out = values.new_zeros((self.modality.shape[0], *values.shape[1:]))
        return out.index_copy_(0, self.real, values)


class BlockStats:
    """Totals live in one float64 tensor [modality, expert, field]. Each forward adds a float32 partial
    sum (exact for counts below 2^24 tokens per batch, ~1e-7 relative for the rest).

    No atomics over a few bins and no host synchronisation: each routed pair is scattered into its own
    row of a dense [T, E+1] table per field (column E takes sentinel / out-of-range expert ids and is
    never read), the router probabilities sit next to them, and ONE [2, T] x [T, width] matmul with the
    modality one-hot gives every per-(modality, expert) sum. max|f| is an amax over rows of a
    [T, 3·(E+1)] table whose text / image / padding blocks keep the modalities apart."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu", soft: bool = False, score_fn="softmax"):
        self.num_experts = num_experts
        self.soft = soft
        self.score_fn = score_fn
        self.acc = torch.zeros((2, num_experts, len(SUM_FIELDS)), dtype=torch.float64, device=device)
        self.peak = torch.zeros((2, num_experts), dtype=torch.float64, device=device)
        self._tokens = torch.zeros(2, dtype=torch.int64, device=device)  # text, image
        self._fields = torch.arange(_ROUTED, device=device)

    def add(
        self,
        rows: Rows,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        logits: torch.Tensor | None,
        pair_norms: torch.Tensor | None = None,
        pair_max: torch.Tensor | None = None,
        all_norms: torch.Tensor | None = None,
    ) -> None:
        """One forward's worth of a block. top_k_* [T, K]: the model's routing decision; logits [T, R]:
        the router's output (R >= E: trailing non-expert columns take part in the softmax, then are
        dropped); pair_norms / pair_max [T, K]: ‖f‖ and max|f| of each selected expert; all_norms
        [T, E] (full mode): ‖f_j‖ for every expert."""
        if self.acc.device != top_k_index.device:  # the totals follow the data (accelerate offload: weights on meta)
            self._move(top_k_index.device)
        E, D = self.num_experts, self.num_experts + 1
        T, K = top_k_index.shape
        col = top_k_index.clamp(-1, E).remainder(D)  # ids outside [0, E) -> the dump column E
        g = top_k_weights.float()
        values = [g.new_ones(1).expand_as(g), g]
        if pair_norms is not None:
            norms = pair_norms.float()
            values += [norms, g * norms]
        nf = len(values)  # count, gate_sum[, norm_sum, gate_norm_sum]: the order of SUM_FIELDS
        dense = 0 if logits is None else 1 + (all_norms is not None)
        table = torch.empty((T, nf * D + dense * E), dtype=torch.float32, device=col.device)
        pairs = table[:, : nf * D]
        pairs.zero_()
        # per row the K experts are distinct: an add without contention (it also keeps duplicates right)
        index = (col[:, :, None] * nf + self._fields[:nf]).view(T, K * nf)
        pairs.scatter_add_(1, index, torch.stack(values, dim=-1).view(T, K * nf))
        if dense:
            probs = table[:, nf * D : nf * D + E]
            self._probabilities(logits.reshape(T, -1), probs)
            if all_norms is not None:
                torch.mul(probs, all_norms, out=table[:, nf * D + E :])
        partial = rows.onehot @ table  # [2, width]: every sum of this batch
        # add_ on the views: `acc[...] += x` would also copy the sum back onto itself (__setitem__)
        self.acc[:, :, :nf].add_(partial[:, : nf * D].view(2, D, nf)[:, :E])
        if dense:
            self.acc[:, :, _ROUTED : _ROUTED + dense].add_(partial[:, nf * D :].view(2, dense, E).transpose(1, 2))
        self._tokens += rows.tokens
        if pair_max is not None:
            peak = torch.zeros((T, 3 * D), dtype=torch.float32, device=col.device)
            peak.scatter_reduce_(1, col + rows.block * D, pair_max.float(), reduce="amax")  # values >= 0
            torch.maximum(self.peak, peak.amax(0).view(3, D)[:2, :E], out=self.peak)

    def _move(self, device: torch.device) -> None:
        self.acc, self.peak, self._tokens = self.acc.to(device), self.peak.to(device), self._tokens.to(device)
        self._fields = self._fields.to(device)

    def _probabilities(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """p = softmax / sigmoid of the router logits, in fp32, written into out [T, E]."""
        if self.score_fn == "sigmoid":
            torch.sigmoid(logits[:, : self.num_experts].float(), out=out)
        elif logits.shape[1] == self.num_experts:
            torch.softmax(logits, -1, dtype=torch.float32, out=out)
        else:
            out.copy_(torch.softmax(logits, -1, dtype=torch.float32)[:, : self.num_experts])

    @property
    def tokens(self) -> dict[str, int]:
        counts = self._tokens.tolist()
        return {m: counts[i] for i, m in enumerate(MODALITY_IDS)}

    def export(self, mode: str) -> dict:
        """JSON-ready sums per modality and 'all' (the metadata's raw sums)."""
        tokens = self.tokens
        acc, peak = self.acc.cpu(), self.peak.cpu()
        out = {name: self._one(acc[i], peak[i], tokens[name], mode) for name, i in MODALITY_IDS.items()}
        out["all"] = self._one(acc.sum(0), peak.max(0).values, tokens["text"] + tokens["image"], mode)
        return out

    @staticmethod
    def _one(acc: torch.Tensor, peak: torch.Tensor, tokens: int, mode: str) -> dict:
        entry = {"tokens": tokens}
        for i, f in enumerate(SUM_FIELDS):
            entry[f] = acc[:, i].tolist()
        entry["max_abs"] = peak.tolist()
        if mode != "full":
            entry["soft_norm_sum"] = None
        return entry

    # --- resume support -----------------------------------------------------------------------
    def state(self) -> dict:
        return {"acc": self.acc.cpu(), "peak": self.peak.cpu(), "tokens": self._tokens.cpu()}

    def load(self, state: dict) -> None:
        self.acc.copy_(state["acc"])
        self.peak.copy_(state["peak"])
        self._tokens.copy_(state["tokens"])
