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
        self.tokens = {m: 0 for m in MODALITY_IDS}

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
        all_norms [T, E] (full mode: ‖f_j‖ for every expert)."""
        E = self.num_experts
        for name, mid in MODALITY_IDS.items():
            rows = modality == mid
            n = int(rows.sum())
            if n == 0:
                continue
            self.tokens[name] += n
            idx = top_k_index[rows].reshape(-1)
            valid = (idx >= 0) & (idx < E)  # some families append sentinel / zero experts
            idx = idx[valid]
            s = self.sums[name]
            s["count"].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
            g = top_k_weights[rows].reshape(-1)[valid].double()
            s["gate_sum"].index_add_(0, idx, g)
            if probs is not None:
                s["prob_sum"] += probs[rows].double().sum(0)
            if pair_norms is not None:
                norms = pair_norms[rows].reshape(-1)[valid].double()
                s["norm_sum"].index_add_(0, idx, norms)
                s["gate_norm_sum"].index_add_(0, idx, g * norms)
                peaks = pair_max[rows].reshape(-1)[valid].double()
                self.max_abs[name].scatter_reduce_(0, idx, peaks, reduce="amax")
            if all_norms is not None and probs is not None:
                s["soft_norm_sum"] += (probs[rows].double() * all_norms[rows].double()).sum(0)

    def export(self, mode: str) -> dict:
        """JSON-ready sums per modality and 'all' (the metadata's raw sums)."""
        out = {}
        for name in MODALITY_IDS:
            out[name] = self._one(self.sums[name], self.max_abs[name], self.tokens[name], mode)
        both = {f: self.sums["text"][f] + self.sums["image"][f] for f in SUM_FIELDS}
        peak = torch.maximum(self.max_abs["text"], self.max_abs["image"])
        out["all"] = self._one(both, peak, self.tokens["text"] + self.tokens["image"], mode)
        return out

    def _one(self, sums: dict, peak: torch.Tensor, tokens: int, mode: str) -> dict:
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
            "tokens": dict(self.tokens),
        }

    def load(self, state: dict) -> None:
        for m, fields in state["sums"].items():
            for f, t in fields.items():
                self.sums[m][f].copy_(t)
        for m, t in state["max_abs"].items():
            self.max_abs[m].copy_(t)
        self.tokens = dict(state["tokens"])
