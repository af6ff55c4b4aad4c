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


class Totals:
    """The float64 totals of n blocks with the same expert count, in stacked tensors on one device: acc
    [n, modality, expert, field], peak [n, modality, expert], tokens [n, modality]. Each block's BlockStats
    reads and writes its row (views), so one batch's sums of many blocks are added with one kernel per
    field group (`add_stacked`) instead of a dozen per block."""

    def __init__(self, num_experts: int, n: int, device: torch.device | str = "cpu"):
        self.num_experts, self.n = num_experts, n
        self.acc = torch.zeros((n, 2, num_experts, len(SUM_FIELDS)), dtype=torch.float64, device=device)
        self.peak = torch.zeros((n, 2, num_experts), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((n, 2), dtype=torch.int64, device=device)  # text, image
        self.fields = torch.arange(_ROUTED, device=device)
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}

    def ids(self, rows: tuple[int, ...]) -> torch.Tensor:
        """The rows as an index tensor on the totals' device (made once per distinct tuple)."""
        if rows not in self._ids:
            self._ids[rows] = to_device(torch.tensor(rows, dtype=torch.long), self.acc.device)
        return self._ids[rows]


class BlockStats:
    """Totals of one block: a row of a `Totals` (its own, or one shared with other blocks). Each forward adds
    a float32 partial sum into the float64 totals (exact for counts below 2^24 tokens per batch, ~1e-7
    relative for the rest).

    No atomics over a few bins and no host synchronisation: each routed pair is scattered into its own
    row of a dense [T, E+1] table per field (column E takes sentinel / out-of-range expert ids and is
    never read), the router probabilities sit next to them, and ONE [2, T] x [T, width] matmul with the
    modality one-hot gives every per-(modality, expert) sum. max|f| is an amax over rows of a
    [T, 3·(E+1)] table whose text / image / padding blocks keep the modalities apart."""

    def __init__(
        self,
        num_experts: int,
        device: torch.device | str = "cpu",
        soft: bool = False,
        score_fn="softmax",
        totals: Totals | None = None,
        row: int = 0,
    ):
        self.num_experts = num_experts
        self.soft = soft
        self.score_fn = score_fn
        self.totals = Totals(num_experts, 1, device) if totals is None else totals
        self.row = 0 if totals is None else row

    @property
    def acc(self) -> torch.Tensor:
        return self.totals.acc[self.row]

    @property
    def peak(self) -> torch.Tensor:
        return self.totals.peak[self.row]

    @property
    def _tokens(self) -> torch.Tensor:
        return self.totals.tokens[self.row]

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
        one = [None if t is None else t[None] for t in (logits, pair_norms, pair_max, all_norms)]
        add_stacked([self], rows, top_k_index[None], top_k_weights[None], *one)

    def _move(self, device: torch.device) -> None:
        """Onto its own totals on `device` (a shared Totals stays where its other blocks are)."""
        own = Totals(self.num_experts, 1, device)
        own.acc[0].copy_(self.acc)
        own.peak[0].copy_(self.peak)
        own.tokens[0].copy_(self._tokens)
        self.totals, self.row = own, 0

    def _probabilities(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """p = softmax / sigmoid of the router logits [..., R], in fp32, written into out [..., E]."""
        if self.score_fn == "sigmoid":
            torch.sigmoid(logits[..., : self.num_experts].float(), out=out)
        elif logits.shape[-1] == self.num_experts:
            torch.softmax(logits, -1, dtype=torch.float32, out=out)
        else:
            out.copy_(torch.softmax(logits, -1, dtype=torch.float32)[..., : self.num_experts])

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
        return {"acc": self.acc.cpu().clone(), "peak": self.peak.cpu().clone(), "tokens": self._tokens.cpu().clone()}

    def load(self, state: dict) -> None:
        self.acc.copy_(state["acc"])
        self.peak.copy_(state["peak"])
        self._tokens.copy_(state["tokens"])


def add_stacked(
    stats: list[BlockStats],
    rows: Rows,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    logits: torch.Tensor | None,
    pair_norms: torch.Tensor | None = None,
    pair_max: torch.Tensor | None = None,
    all_norms: torch.Tensor | None = None,
) -> None:
    """One forward's worth of L blocks at once (BlockStats.add with a leading block dimension: top_k_* [L, T, K],
    logits [L, T, R], pair_* [L, T, K], all_norms [L, T, E]). The blocks share one Totals, each appears
    once, and all have the same expert count, score function and token rows."""
    first = stats[0]
    totals, E, D = first.totals, first.num_experts, first.num_experts + 1
    L, T, K = top_k_index.shape
    col = top_k_index.clamp(-1, E).remainder(D)  # ids outside [0, E) -> the dump column E
    g = top_k_weights.float()
    values = [g.new_ones(1).expand_as(g), g]
    if pair_norms is not None:
        norms = pair_norms.float()
        values += [norms, g * norms]
    nf = len(values)  # count, gate_sum[, norm_sum, gate_norm_sum]: the order of SUM_FIELDS
    dense = 0 if logits is None else 1 + (all_norms is not None)
    table = torch.empty((L, T, nf * D + dense * E), dtype=torch.float32, device=col.device)
    pairs = table[..., : nf * D]
    pairs.zero_()
    # per row the K experts are distinct: an add without contention (it also keeps duplicates right)
    index = (col[..., None] * nf + totals.fields[:nf]).view(L, T, K * nf)
    pairs.scatter_add_(2, index, torch.stack(values, dim=-1).view(L, T, K * nf))
    if dense:
        probs = table[..., nf * D : nf * D + E]
        first._probabilities(logits.reshape(L, T, -1), probs)
        if all_norms is not None:
            torch.mul(probs, all_norms, out=table[..., nf * D + E :])
    partial = torch.matmul(rows.onehot, table).double()  # [L, 2, width]: every sum of this batch
    ids = totals.ids(tuple(s.row for s in stats))
    # each block once: index_add_ adds every element once, in a fixed order
    totals.acc[..., :nf].index_add_(0, ids, partial[..., : nf * D].view(L, 2, D, nf)[:, :, :E])
    if dense:
        sums = partial[..., nf * D :].view(L, 2, dense, E).transpose(2, 3)
        totals.acc[..., _ROUTED : _ROUTED + dense].index_add_(0, ids, sums)
    totals.tokens.index_add_(0, ids, rows.tokens.expand(L, 2))
    if pair_max is not None:
        peak = torch.zeros((L, T, 3 * D), dtype=torch.float32, device=col.device)
        peak.scatter_reduce_(2, col + rows.block * D, pair_max.float(), reduce="amax")  # values >= 0
        new = peak.amax(1).view(L, 3, D)[:, :2, :E].double()
        totals.peak.index_copy_(0, ids, torch.maximum(totals.peak.index_select(0, ids), new))
