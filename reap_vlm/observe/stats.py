"""Per-block, per-expert float64 sums, kept separately for text and image tokens ("all" = both)."""

from __future__ import annotations

import torch

SUM_FIELDS = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "prob_sum", "soft_norm_sum")
MODALITY_IDS = {"text": 0, "image": 1}
_ROUTED = 4  # the first four fields are sums over routed (token, expert) pairs


class BlockStats:
    """Totals live in one float64 tensor [modality, expert, field]. Each forward adds a float32 partial
    sum (exact for counts, ~1e-7 relative for the rest), so a batch costs a handful of GPU kernels and no
    host synchronisation."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu", soft: bool = False):
        self.num_experts = num_experts
        self.soft = soft
        self.acc = torch.zeros((2, num_experts, len(SUM_FIELDS)), dtype=torch.float64, device=device)
        self.peak = torch.zeros((2, num_experts), dtype=torch.float64, device=device)
        self._tokens = torch.zeros(2, dtype=torch.int64, device=device)  # text, image

    def add(
        self,
        modality: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        probs: torch.Tensor | None,
        pair_norms: torch.Tensor | None,
        pair_max: torch.Tensor | None,
        all_norms: torch.Tensor | None = None,
    ) -> None:
        """One forward's worth of a block. modality [T] (0 text, 1 image, -1 padding); top_k_* [T, K];
        probs [T, E]; pair_norms / pair_max [T, K] (‖f‖ and max|f| of each selected expert);
        all_norms [T, E] (full mode: ‖f_j‖ for every expert). Padding never counts."""
        E = self.num_experts
        real = modality >= 0
        # bin = (modality, expert); pairs of padding tokens or sentinel experts get weight 0
        bins = (modality.clamp(min=0)[:, None] * E + top_k_index.clamp(0, E - 1)).reshape(-1)
        valid = (real[:, None] & (top_k_index >= 0) & (top_k_index < E)).reshape(-1).float()
        g = top_k_weights.reshape(-1).float() * valid
        columns = [valid, g]
        if pair_norms is not None:
            norms = pair_norms.reshape(-1).float()
            columns += [norms * valid, g * norms]
        partial = torch.zeros((2 * E, len(columns)), dtype=torch.float32, device=bins.device)
        partial.index_add_(0, bins, torch.stack(columns, dim=1))
        self.acc[:, :, : len(columns)] += partial.view(2, E, -1)
        onehot = torch.stack([modality == 0, modality == 1], dim=1).float()  # [T, 2]
        self._tokens += onehot.sum(0).to(torch.int64)
        if probs is not None:
            self.acc[:, :, _ROUTED] += onehot.T @ probs.float()
            if all_norms is not None:
                self.acc[:, :, _ROUTED + 1] += onehot.T @ (probs.float() * all_norms.float())
        if pair_max is not None:
            peak = torch.zeros(2 * E, dtype=torch.float32, device=bins.device)
            peak.scatter_reduce_(0, bins, pair_max.reshape(-1).float() * valid, reduce="amax")  # values >= 0
            torch.maximum(self.peak, peak.view(2, E).double(), out=self.peak)

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
