"""Per-block, per-expert float64 sums, kept separately for text and image tokens ("all" = both)."""

from __future__ import annotations

import torch

SUM_FIELDS = ("count", "gate_sum", "gate_norm_sum", "norm_sum", "prob_sum", "soft_norm_sum")
MODALITY_IDS = {"text": 0, "image": 1}


class BlockStats:
    def __init__(self, num_experts: int, device: torch.device | str = "cpu", soft: bool = False):
        self.num_experts = num_experts
        self.soft = soft
        self.sums = {
            m: {f: torch.zeros(num_experts, dtype=torch.float64, device=device) for f in SUM_FIELDS}
            for m in MODALITY_IDS
        }
        self.max_abs = {m: torch.zeros(num_experts, dtype=torch.float64, device=device) for m in MODALITY_IDS}
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
        all_norms [T, E] (full mode: ‖f_j‖ for every expert).

        Both modalities are accumulated in one pass over bins (modality, expert), and masks multiply
        instead of selecting rows, so nothing here waits for the GPU. Per-batch partial sums are
        float64 like the running totals."""
        E = self.num_experts
        real = modality >= 0
        bins = modality.clamp(min=0)[:, None] * E + top_k_index.clamp(0, E - 1)  # [T, K] in [0, 2E)
        valid = (real[:, None] & (top_k_index >= 0) & (top_k_index < E)).reshape(-1).double()
        bins = bins.reshape(-1)
        g = top_k_weights.reshape(-1).double() * valid
        per_bin = {"count": valid, "gate_sum": g}
        if pair_norms is not None:
            norms = pair_norms.reshape(-1).double()
            per_bin["norm_sum"] = norms * valid
            per_bin["gate_norm_sum"] = g * norms
        for name, values in per_bin.items():
            total = torch.zeros(2 * E, dtype=torch.float64, device=values.device).index_add_(0, bins, values)
            self._add_pair(name, total)
        onehot = torch.stack([modality == 0, modality == 1], dim=1).double()  # [T, 2]; padding rows are 0
        self._tokens += onehot.sum(0).to(torch.int64)
        if probs is not None:
            self._add_pair("prob_sum", (onehot.T @ probs.double()).reshape(-1))
            if all_norms is not None:
                self._add_pair("soft_norm_sum", (onehot.T @ (probs.double() * all_norms.double())).reshape(-1))
        if pair_max is not None:
            peak = torch.zeros(2 * E, dtype=torch.float64, device=bins.device)
            peak.scatter_reduce_(0, bins, pair_max.reshape(-1).double() * valid, reduce="amax")  # values >= 0
            for i, name in enumerate(MODALITY_IDS):
                torch.maximum(self.max_abs[name], peak[i * E : (i + 1) * E], out=self.max_abs[name])

    def _add_pair(self, field: str, total: torch.Tensor) -> None:
        E = self.num_experts
        self.sums["text"][field] += total[:E]
        self.sums["image"][field] += total[E:]

    @property
    def tokens(self) -> dict[str, int]:
        counts = self._tokens.tolist()
        return {m: counts[i] for i, m in enumerate(MODALITY_IDS)}

    def export(self, mode: str) -> dict:
        """JSON-ready sums per modality and 'all' (the metadata's raw sums)."""
        tokens = self.tokens
        out = {name: self._one(self.sums[name], self.max_abs[name], tokens[name], mode) for name in MODALITY_IDS}
        both = {f: self.sums["text"][f] + self.sums["image"][f] for f in SUM_FIELDS}
        peak = torch.maximum(self.max_abs["text"], self.max_abs["image"])
        out["all"] = self._one(both, peak, tokens["text"] + tokens["image"], mode)
        return out

    @staticmethod
    def _one(sums: dict, peak: torch.Tensor, tokens: int, mode: str) -> dict:
        entry = {"tokens": tokens}
        for f in SUM_FIELDS:
            entry[f] = sums[f].cpu().tolist()
        entry["max_abs"] = peak.cpu().tolist()
        if mode != "full":
            entry["soft_norm_sum"] = None
        return entry

    # --- resume support -----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "sums": {m: {f: t.cpu() for f, t in s.items()} for m, s in self.sums.items()},
            "max_abs": {m: t.cpu() for m, t in self.max_abs.items()},
            "tokens": self.tokens,
        }

    def load(self, state: dict) -> None:
        for m, fields in state["sums"].items():
            for f, t in fields.items():
                self.sums[m][f].copy_(t)
        for m, t in state["max_abs"].items():
            self.max_abs[m].copy_(t)
        self._tokens.copy_(torch.tensor([state["tokens"][m] for m in MODALITY_IDS]))
