"""Expert merging (REAM, HC-SMoE grouping): pure functions on one MoE layer's expert weights.

A layer of E experts becomes k experts. Every output expert is a *group* of original experts whose
first member is its centroid; the merged expert replaces the centroid and the other members are
removed with their router rows, exactly as pruning removes them, so the merged model routes like the
original with the non-centroids' router logits set to -inf.

Grouping (the official REAM algorithm, SamsungSAILMontreal/ream `pseudo_group`):
  1. saliency s_j (REAP or any criterion of the metadata); s_j = 0 becomes min(0.5, smallest positive s)
     so that unused experts can still be merged with a non-zero weight;
  2. the k most salient experts are the centroids, each pre-assigned to its own group;
  3. pseudo-pruning: each centroid in saliency order takes up to C-1 of the *still unassigned*
     non-centroids nearest to it. Centroids are never absorbed, so the count is k by construction
     (the published peer library let early groups take later centroids: 8 groups instead of 96 for
     128 experts, target 96, C 16). C = 0: every non-centroid joins its nearest centroid (MC-SMoE).
  distance = 1 - similarity, similarity = the mean of
     output similarity  (cos(m_i, m_j) + 1) / 2 of the experts' mean gated outputs m_j = E_x[p_j(x) f_j(x)]
     router similarity  1 - d_ij / max d, d_ij = ‖ẑ_i - ẑ_j‖ of the unit-normalised router-logit columns.
HC-SMoE: average-linkage hierarchical clustering (scipy) of the mean gated outputs, cut at k clusters;
the centroid is the member nearest to its cluster's mean.

Merging a group (REAM `_merge`, 'logits+weights'): each member's intermediate neurons are permuted onto
the centroid's by scipy.optimize.linear_sum_assignment on a cost = distance between unit-normalised
neuron activation patterns (calibration tokens) + distance between unit-normalised PCA-reduced neuron
weight rows [gate_i | up_i | down_·i]; then gate / up / down weights and biases are averaged with the
group's saliencies as weights (float64, rounded once to the output dtype). The router row is the
centroid's, or the saliency-weighted mean of the group's rows (`router="average"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BugError, PlanError

GROUPINGS = ("ream", "hcsmoe")
ROUTER_MODES = ("centroid", "average")
REAM_GROUP_SIZE = 16  # C, the REAM paper's and the official code's default
PCA_DIM = 64  # the official code's heuristic
ZERO_SALIENCY_CAP = 0.5  # zero saliency -> min(0.5, smallest positive), as the official code does
DEFAULTS = {"grouping": "ream", "group_size": REAM_GROUP_SIZE, "router": "centroid"}  # of the settings


@dataclass
class LayerExperts:
    """One layer's experts in nn.Linear convention, expert axis first (any float dtype)."""

    gate: torch.Tensor | None  # [E, I, H]; None for families without a gate
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    gate_bias: torch.Tensor | None = None  # [E, I]
    up_bias: torch.Tensor | None = None  # [E, I]
    down_bias: torch.Tensor | None = None  # [E, H]

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def members(self, idx: list[int]) -> LayerExperts:
        """The experts idx (in that order) as float64 copies."""
        pick = idx

        def take(t):
            return None if t is None else t[pick].to(torch.float64)

        return LayerExperts(*(take(t) for t in self.tensors()))

    def tensors(self) -> tuple:
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)


@dataclass
class MergedExpert:
    """One output expert: its weights [I, H] / [H, I] (float64), the group it came from (centroid first),
    the normalised merge weights and each member's neuron permutation onto the centroid."""

    group: list[int]
    weights: np.ndarray
    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    perms: list[np.ndarray] = field(default_factory=list)

    @property
    def centroid(self) -> int:
        return self.group[0]


# ---- saliency and similarity --------------------------------------------------------------------


def floor_saliency(saliency) -> np.ndarray:
    """Non-finite or zero saliency -> min(0.5, smallest positive value), as the official code does
    (an expert that never worked can then be merged with a small weight). All zero: uniform."""
    s = np.asarray(saliency, dtype=np.float64).copy()
    s[~np.isfinite(s) | (s < 0)] = 0.0
    positive = s[s > 0]
    if positive.size == 0:
        return np.ones_like(s)
    s[s == 0] = min(ZERO_SALIENCY_CAP, float(positive.min()))
    return s


def output_similarity(mean_out: torch.Tensor) -> np.ndarray:
    """(cos + 1) / 2 between the experts' mean gated outputs [E, H], in [0, 1]."""
    m = mean_out.to(torch.float64)
    unit = m / m.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return ((unit @ unit.T).clamp(-1, 1).numpy() + 1) / 2


def router_similarity(logit_gram: torch.Tensor, num_experts: int) -> np.ndarray:
    """1 - d / max d with d_ij = ‖ẑ_i - ẑ_j‖ between the unit-normalised router-logit columns, from their
    Gram matrix G = Zᵀ Z over the calibration tokens ([R, R], R >= E; trailing rows are not experts)."""
    g = logit_gram[:num_experts, :num_experts].to(torch.float64)
    norm = g.diagonal().clamp_min(0).sqrt()
    scale = torch.where(norm > 0, 1 / norm.clamp_min(1e-300), torch.zeros_like(norm))
    cos = g * scale[:, None] * scale[None, :]  # a zero column is the zero vector after normalising
    sq = cos.diagonal()[:, None] + cos.diagonal()[None, :] - 2 * cos
    d = sq.clamp_min(0).sqrt().numpy()
    top = d.max()
    return 1 - d / top if top > 0 else np.ones_like(d)


def expert_distance(mean_out: torch.Tensor, logit_gram: torch.Tensor | None = None) -> np.ndarray:
    """REAM's distance: 1 - similarity, the similarity averaged over outputs and router logits."""
    sim = output_similarity(mean_out)
    if logit_gram is not None:
        sim = (sim + router_similarity(logit_gram, mean_out.shape[0])) / 2
    d = 1 - sim
    np.fill_diagonal(d, 0.0)
    if not np.isfinite(d).all():
        raise BugError("expert distances are not finite")
    return d


def saliency_order(saliency: np.ndarray) -> np.ndarray:
    """Expert indices by saliency, highest first; ties by index (deterministic)."""
    return np.lexsort((np.arange(len(saliency)), -np.asarray(saliency)))


# ---- grouping ---------------------------------------------------------------------------------


def ream_groups(saliency, distance: np.ndarray, k: int, group_size: int = REAM_GROUP_SIZE) -> list[list[int]]:
    """REAM pseudo-pruning (module docstring). Returns k groups, centroid first, in centroid-saliency
    order; members in the order they were absorbed."""
    s = floor_saliency(saliency)
    E = len(s)
    if not 0 < k <= E:
        raise PlanError(f"cannot merge {E} experts into {k}", "the target must be between 1 and the count", "")
    if group_size < 0 or (group_size > 0 and k * group_size < E):
        raise PlanError(
            f"merge group size C={group_size} cannot cover {E} experts with {k} groups",
            f"{k} groups of at most {group_size} experts hold {k * max(group_size, 0)}",
            f"Set REAP_MERGE_GROUP_SIZE to at least {-(-E // k)}, or 0 (every expert joins its nearest centroid)",
        )
    centroids = [int(c) for c in saliency_order(s)[:k]]
    label = np.full(E, -1)
    label[centroids] = np.arange(k)  # centroids are assigned first: nothing can absorb them
    groups = [[c] for c in centroids]
    if group_size > 0:
        for g, c in enumerate(centroids):  # the most salient centroid chooses first
            if (label >= 0).all():
                break
            for j in np.argsort(distance[c], kind="stable"):
                if len(groups[g]) >= group_size:
                    break
                if label[j] == -1:
                    label[j] = g
                    groups[g].append(int(j))
    else:  # MC-SMoE: every non-centroid joins its nearest centroid
        cols = np.array(centroids)
        for j in range(E):
            if label[j] == -1:
                g = int(np.argmin(distance[cols, j]))
                label[j] = g
                groups[g].append(j)
    _check_partition(groups, E, k)
    return groups


def hc_groups(mean_out: torch.Tensor, k: int, saliency=None) -> list[list[int]]:
    """HC-SMoE: average-linkage clustering of the mean gated outputs (Euclidean), cut at exactly k
    clusters; centroid = the member nearest to its cluster's mean. Groups in centroid-saliency order."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    x = mean_out.to(torch.float64).numpy()
    E = x.shape[0]
    if not 0 < k <= E:
        raise PlanError(f"cannot merge {E} experts into {k}", "the target must be between 1 and the count", "")
    if k == E:
        labels = np.arange(E)
    else:
        labels = cut_tree(linkage(x, method="average", metric="euclidean"), n_clusters=k).reshape(-1)
    groups = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        center = x[members].mean(0)
        nearest = int(members[np.argmin(((x[members] - center) ** 2).sum(1))])
        groups.append([nearest] + [int(j) for j in members if j != nearest])
    s = floor_saliency(np.ones(E) if saliency is None else saliency)
    groups.sort(key=lambda g: (-s[g[0]], g[0]))
    _check_partition(groups, E, k)
    return groups


def _check_partition(groups: list[list[int]], E: int, k: int) -> None:
    flat = sorted(j for g in groups for j in g)
    if len(groups) != k or flat != list(range(E)) or any(not g for g in groups):
        raise BugError(f"merge grouping made {len(groups)} groups over {len(flat)} experts, expected {k} over {E}")


# ---- alignment and averaging ------------------------------------------------------------------


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


FEATURE_DTYPE = torch.float32  # the assignment cost's precision (the averaging itself is float64)


def neuron_rows(x: LayerExperts) -> torch.Tensor:
    """[E, I, D] per-neuron weight vectors [gate_i | up_i | down_·i]."""
    parts = [x.up.to(FEATURE_DTYPE), x.down.transpose(1, 2).to(FEATURE_DTYPE)]
    if x.gate is not None:
        parts.insert(0, x.gate.to(FEATURE_DTYPE))
    return torch.cat(parts, dim=2)


def pca_reduce(rows: torch.Tensor, r: int = PCA_DIM, inplace: bool = False) -> torch.Tensor:
    """[N, D] -> [N, r]: centred rows projected on the top-r principal directions, scaled by their
    singular values (as the official code). Randomised (torch.pca_lowrank) with a fixed seed. `inplace`:
    `rows` is centred in place (the same numbers, no second [N, D] copy)."""
    N, D = rows.shape
    r = min(r, N, D)
    x = rows.sub_(rows.mean(0, keepdim=True)) if inplace else rows - rows.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        _, s, v = torch.pca_lowrank(x, q=r, center=False)
    return x @ (v[:, :r] * s[:r])


def neuron_cost(
    centroid_feats: torch.Tensor, member_feats: torch.Tensor, centroid_act=None, member_act=None
) -> np.ndarray:
    """[I, I] assignment cost between the centroid's neurons (rows) and a member's (columns)."""
    cost = torch.cdist(_unit_rows(centroid_feats), _unit_rows(member_feats))
    if centroid_act is not None and centroid_act.shape[0] > 1:
        device = centroid_feats.device
        a = _unit_rows(centroid_act.T.to(device, FEATURE_DTYPE))  # [I, S]: each neuron's activation pattern
        b = _unit_rows(member_act.T.to(device, FEATURE_DTYPE))
        cost = cost + torch.cdist(a, b.to(a.device))
    return cost.cpu().numpy()


def align(cost: np.ndarray) -> np.ndarray:
    """perm with member neuron perm[i] placed at the centroid's neuron i (minimum total cost)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    if not np.array_equal(rows, np.arange(cost.shape[0])):
        raise BugError("linear_sum_assignment returned rows out of order")
    return cols


def _features(experts: LayerExperts, multi: list[int], pca_dim: int) -> dict[int, torch.Tensor]:
    """Expert j -> its neurons' PCA features [I, r]: neuron_rows of the experts `multi`, unit rows, pca_reduce,
    with one [n, I, D] float32 buffer filled expert by expert and normalised and centred in place (the same
    numbers as neuron_rows + _unit_rows + pca_reduce, without their copies: at Qwen3-VL-30B-A3B widths each is
    2.4 GB for a layer's experts)."""
    parts = [t for t in (experts.gate, experts.up) if t is not None]
    inter = experts.up.shape[1]
    width = sum(t.shape[2] for t in parts) + experts.down.shape[1]
    rows = torch.empty((len(multi), inter, width), dtype=FEATURE_DTYPE, device=experts.up.device)
    for i, j in enumerate(multi):
        col = 0
        for t in parts:
            rows[i, :, col : col + t.shape[2]] = t[j]
            col += t.shape[2]
        rows[i, :, col:] = experts.down[j].transpose(0, 1)
    rows = rows.reshape(len(multi) * inter, width)
    rows.div_(rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    reduced = pca_reduce(rows, pca_dim, inplace=True).reshape(len(multi), inter, -1)
    return {j: reduced[i] for i, j in enumerate(multi)}


def merge_layer(
    experts: LayerExperts,
    groups: list[list[int]],
    saliency,
    acts: torch.Tensor | None = None,
    *,
    pca_dim: int = PCA_DIM,
    align_neurons: bool = True,
) -> list[MergedExpert]:
    """Merge every group of more than one expert (module docstring). acts [E, S, I]: intermediate
    activations h = combine(gate x, up x) of every expert on the same S calibration tokens (or None:
    weights alone set the cost). Returns the merged experts in the order of `groups` (singletons too)."""
    return list(iter_merge_layer(experts, groups, saliency, acts, pca_dim=pca_dim, align_neurons=align_neurons))


def iter_merge_layer(
    experts: LayerExperts,
    groups: list[list[int]],
    saliency,
    acts: torch.Tensor | None = None,
    *,
    pca_dim: int = PCA_DIM,
    align_neurons: bool = True,
):
    """merge_layer one group at a time: a caller that keeps each merged expert in the model's dtype holds one
    group's float64 members and result at a time, not every group's."""
    s = floor_saliency(saliency)
    multi = sorted({j for g in groups if len(g) > 1 for j in g})
    feats = _features(experts, multi, pca_dim) if multi and align_neurons else {}
    for group in groups:
        w = s[group] / s[group].sum()
        m = experts.members(group)
        perms = []
        if len(group) > 1 and align_neurons:
            c = group[0]
            for j in group[1:]:
                cost = neuron_cost(
                    feats[c], feats[j], None if acts is None else acts[c], None if acts is None else acts[j]
                )
                perms.append(align(cost))
        else:
            perms = [np.arange(experts.up.shape[1])] * (len(group) - 1)
        merged = []
        for t, axis in zip(m.tensors(), (1, 1, 2, 1, 1, None), strict=True):
            if t is None:
                merged.append(None)
                continue
            total = t[0] * float(w[0])
            for i, perm in enumerate(perms, start=1):
                member = t[i] if axis is None else t[i].index_select(axis - 1, torch.as_tensor(perm, device=t.device))
                total = total + member * float(w[i])
            merged.append(total)
        yield MergedExpert(list(group), w, *merged, perms=perms)


def merged_router(router: torch.Tensor, groups: list[list[int]], saliency, mode: str = "centroid") -> torch.Tensor:
    """[k, H] router rows of the output experts in `groups` order: the centroid's row, or the group's rows
    averaged with the saliencies as weights (float64)."""
    if mode not in ROUTER_MODES:
        raise PlanError(f"unknown router mode {mode!r}", "", "Use one of " + ", ".join(ROUTER_MODES))
    s = floor_saliency(saliency)
    rows = []
    for g in groups:
        if mode == "centroid" or len(g) == 1:
            rows.append(router[g[0]].to(torch.float64))
        else:
            w = torch.as_tensor(s[g] / s[g].sum(), dtype=torch.float64)
            rows.append((router[g].to(torch.float64) * w[:, None]).sum(0))
    return torch.stack(rows)


def by_centroid(groups: list[list[int]]) -> list[list[int]]:
    """Groups in the order of their centroids' original indices: the order of the output experts."""
    return sorted(groups, key=lambda g: g[0])
