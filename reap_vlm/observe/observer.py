"""Hooks on the model's own routers and experts; no routing is recomputed here.

- A forward hook on each router keeps a reference to its logits ([T, E], output 0); they become
  probabilities p (the block's score function: softmax, or sigmoid for bias-corrected routers) only
  when the block's statistics are added.
- router mode: a forward hook on the experts module sees the model's exact decision (`top_k_index`,
  `top_k_weights`). It runs after the experts, so its small kernels queue behind the expert GEMMs
  instead of delaying their launch.
- routed mode: the experts implementation is swapped (transformers' ExpertsInterface) for one that
  runs the model's own kernel once per selected (token, expert) pair with unit weights, records
  each ‖f‖ and max|f|, then applies the routing weights and sums exactly as the model does. The
  statistics cost one forward; the model's output is unchanged.
- full mode: as routed mode, plus ‖f_j‖ of every other expert on every token (for Σp·‖f‖), computed
  with the Gram identity (kernel.all_expert_gram_norms): the down projection's [I, I] Gram matrix
  instead of its [H, I] weights, no expert output written.
In every mode a block's sums are not added where its hook runs: the hook keeps references to the batch's
tensors, and `flush` (at the next batch, or when the tables would pass FLUSH_BYTES) adds the sums of all
waiting blocks that share token rows with one set of stacked kernels (stats.add_stacked): about twenty
kernel launches and their Python per flush instead of per block and batch.
Experts without the interface (and Llama 4's, which take no indices) are observed by the experts hook:
routed mode recomputes the selected pairs there, full mode computes every expert directly
(kernel.all_expert_norms).
"""

from __future__ import annotations

import torch

from ..errors import BugError
from ..moe.spec import MoEBlock, expert_output, expert_weights
from ..quantization import DEQUANTIZED_IMPLS, SortedPairs, is_fp8_experts, is_quantized_experts
from .kernel import all_expert_gram_norms, all_expert_norms, row_stats
from .stats import BlockStats, Rows, Totals, add_stacked

ROUTED_IMPL = "reap_routed"
TOKEN_TYPE_SETS = {"text": False, "vision": True}  # Ernie-4.5-VL expert sets -> takes the vision tokens
MERGE_STATE = "__merge__"  # the merge statistics' entry in the resume state
_ACTIVE: dict[int, Observer] = {}  # id(experts module) -> observer, for the routed implementation
_FP8_INTERFACE: list = []  # transformers' ALL_FP8_EXPERTS_FUNCTIONS, once an FP8Experts module was seen
FLUSH_BYTES = 128 * 2**20  # the working tables of one deferred addition of many blocks' sums (Observer.flush)


def _grouped_routed(self, observer, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward, step for step, with the per-pair outputs' norms taken
    before the routing weights are applied. Same kernels, same output; None if the internals differ."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        return None
    if getattr(self, "_is_expert_parallel", False) or getattr(self, "has_post_expert_norm", False):
        return None
    if is_quantized_experts(self):  # e4m3 or packed weights: their implementation computes the pairs (base_forward)
        return None
    T, K = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    hidden_g = hidden_states[perm // K]
    weights_g = top_k_weights.reshape(-1)[perm]
    device = hidden_states.device
    histc_input = expert_ids.float() if device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    has_bias = getattr(self, "has_bias", False)
    if self.has_gate:
        bias = self.gate_up_proj_bias[expert_ids] if has_bias else None
        proj = _grouped_linear(hidden_g, self.gate_up_proj, offsets, bias=bias, is_transposed=self.is_transposed)
        proj = self._apply_gate(proj)
    else:
        bias = self.up_proj_bias[expert_ids] if has_bias else None
        proj = self.act_fn(
            _grouped_linear(hidden_g, self.up_proj, offsets, bias=bias, is_transposed=self.is_transposed)
        )
    bias = self.down_proj_bias[expert_ids] if has_bias else None
    proj = _grouped_linear(proj, self.down_proj, offsets, bias=bias, is_transposed=self.is_transposed)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    norms, peaks = row_stats(proj)
    observer.record_pair_stats(
        self, hidden_states, top_k_index, top_k_weights, norms[inv_perm].view(T, K), peaks[inv_perm].view(T, K)
    )
    weighted = (proj * weights_g.unsqueeze(-1))[inv_perm]
    return weighted.view(T, K, -1).sum(dim=1).to(hidden_states.dtype)


def _routed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    observer = _ACTIVE.get(id(self))
    if observer.mode == "full" and self._reap_base_impl in DEQUANTIZED_IMPLS:
        return observer.full_dequantized(self, hidden_states, top_k_index, top_k_weights)
    if self._reap_base_impl == "grouped_mm":
        out = _grouped_routed(self, observer, hidden_states, top_k_index, top_k_weights)
        if out is not None:
            return out
    base = observer.base_forward(self)
    T, K = top_k_index.shape
    pairs = base(
        self,
        hidden_states.repeat_interleave(K, dim=0),
        top_k_index.reshape(-1, 1),
        torch.ones_like(top_k_weights).reshape(-1, 1),
    )  # [T*K, H]: unweighted f per pair
    pairs = pairs.view(T, K, -1)
    observer.record_pairs(self, hidden_states, top_k_index, top_k_weights, pairs)
    return (pairs * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


def _register_routed() -> bool:
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(ROUTED_IMPL, _routed_experts_forward)
    if _FP8_INTERFACE:  # transformers' FP8Experts dispatch through their own interface
        type(_FP8_INTERFACE[0]).register(ROUTED_IMPL, _routed_experts_forward)
    return True


def _interface(experts: torch.nn.Module):
    """The experts implementations the module dispatches through (FP8Experts have their own)."""
    if is_fp8_experts(experts):
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

        if not _FP8_INTERFACE:
            _FP8_INTERFACE.append(ALL_FP8_EXPERTS_FUNCTIONS)
        return ALL_FP8_EXPERTS_FUNCTIONS
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS


class Observer:
    """Context manager: while active, every forward of `model` adds to the per-block statistics."""

    def __init__(self, model: torch.nn.Module, blocks: list[MoEBlock], mode: str, budget_mb: int = 768, merge=None):
        if mode not in ("full", "routed", "router"):
            raise BugError(f"unknown scoring mode {mode!r}")
        if merge is not None and mode != "full":
            raise BugError("merge statistics need full mode (every expert on every token)")
        self.model, self.blocks, self.mode, self.budget_mb = model, blocks, mode, budget_mb
        self.merge = merge  # observe.merge_stats.MergeStats, or None
        self.stats: dict[str, BlockStats] = {}
        self._modality: torch.Tensor | None = None
        self._by_device: dict[torch.device, Rows] = {}
        self._logits: dict[str, torch.Tensor] = {}
        self._routed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Llama 4: router input and scores
        self._token_types: dict[str, torch.Tensor | None] = {}  # Ernie-4.5-VL: vision-token mask per layer
        self._handles: list = []
        self._restore: list = []
        self._block_of: dict[int, MoEBlock] = {}
        self._pending: list[tuple] = []  # (stats, rows, tensors...) of blocks whose sums wait for flush()
        self._pending_bytes = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Observer:
        self._make_stats()
        for b in self.blocks:
            experts = self.model.get_submodule(b.experts)
            router = self.model.get_submodule(b.router)
            self._block_of[id(experts)] = b
            self._handles.append(router.register_forward_hook(self._router_hook(b)))
            parent = b.block.rsplit(".", 1)[0]
            if b.expert_set in TOKEN_TYPE_SETS and parent not in self._token_types:
                self._token_types[parent] = None
                layer = self.model.get_submodule(parent)
                self._handles.append(layer.register_forward_pre_hook(self._token_type_hook(parent), with_kwargs=True))
            # routed and full mode: the model's own kernel gives the routed pairs' f (full mode adds the
            # norms of every other pair, from the Gram identity, in record_pair_stats)
            if self.mode != "router" and not b.indices_from_router and self._use_interface(experts):
                continue
            self._handles.append(experts.register_forward_hook(self._experts_hook(b), with_kwargs=True))
        return self

    def _make_stats(self) -> None:
        """One BlockStats per block; blocks with the same expert count, score function and device share one
        Totals (so that flush adds them together)."""
        groups: dict[tuple, list[MoEBlock]] = {}
        for b in self.blocks:
            if b.key in self.stats:
                continue
            experts = self.model.get_submodule(b.experts)
            device = next(iter([*experts.parameters(), *experts.buffers()])).device  # PackedExperts: buffers
            if device.type == "meta":  # offloaded by accelerate until its forward: BlockStats.add moves the totals
                self.stats[b.key] = BlockStats(b.num_experts, "cpu", self.mode == "full", b.score_fn)
                continue
            groups.setdefault((b.num_experts, b.score_fn, device), []).append(b)
        for (num_experts, score_fn, device), members in groups.items():
            totals = Totals(num_experts, len(members), device)
            for row, b in enumerate(members):
                self.stats[b.key] = BlockStats(num_experts, device, self.mode == "full", score_fn, totals, row)

    def __exit__(self, *exc) -> None:
        self.flush()
        for h in self._handles:
            h.remove()
        for config, value in self._restore:
            config._experts_implementation = value
        for b in self.blocks:
            _ACTIVE.pop(id(self.model.get_submodule(b.experts)), None)
        self._handles, self._restore = [], []

    def _use_interface(self, experts: torch.nn.Module) -> bool:
        config = getattr(experts, "config", None)
        if config is None or not hasattr(config, "_experts_implementation"):
            return False
        _interface(experts)  # FP8Experts: their interface gets the routed implementation too
        if not _register_routed():
            return False
        if is_quantized_experts(experts):  # its dequantizing forward's chunks within this observer's budget
            experts._reap_chunk_bytes = int(self.budget_mb * 2**20)
        # one config is shared by all experts modules of a (sub)model: swap it once, remember the base
        if not any(c is config for c, _ in self._restore):
            if config._experts_implementation == ROUTED_IMPL:
                raise BugError("the routed-mode experts implementation is already active on this model")
            self._restore.append((config, config._experts_implementation))
            config._experts_implementation = ROUTED_IMPL
        experts._reap_base_impl = next(value for c, value in self._restore if c is config)
        _ACTIVE[id(experts)] = self
        return True

    def base_forward(self, experts: torch.nn.Module):
        original = type(experts).forward.__wrapped__  # the class' own (eager) forward
        name = experts._reap_base_impl
        return original if name in (None, "eager") else _interface(experts).get_interface(name, original)

    # ---- per batch -------------------------------------------------------------------------
    def set_modality(self, modality: torch.Tensor) -> None:
        """[B, S] with 0 text, 1 image, -1 padding; flattened like the blocks flatten hidden states."""
        self.flush()
        self._modality = modality.reshape(-1)
        self._by_device = {}

    def _rows(self, device: torch.device, rows: int, block: MoEBlock | None = None) -> Rows:
        if self._modality is None:
            raise BugError("Observer.set_modality was not called before the forward")
        modality, cache = self._modality, device
        if block is not None and block.expert_set in TOKEN_TYPE_SETS:  # this set sees its tokens only
            types = self._token_types.get(block.block.rsplit(".", 1)[0])
            vision = types.reshape(-1).bool() if types is not None else torch.zeros_like(modality, dtype=torch.bool)
            mine = vision if TOKEN_TYPE_SETS[block.expert_set] else ~vision
            modality, cache = modality[mine.to(modality.device)], (device, block.block)
        if rows != modality.numel():
            raise BugError(f"a MoE block saw {rows} token rows but the batch has {modality.numel()} tokens")
        if cache not in self._by_device:  # once per batch and device, shared by every block there
            self._by_device[cache] = Rows.of(modality, device)
        return self._by_device[cache]

    # ---- hooks -----------------------------------------------------------------------------
    def _router_hook(self, block: MoEBlock):
        def hook(_module, args, output):
            # no kernel here: anything launched now would delay the expert GEMMs that follow
            if block.indices_from_router:  # Llama 4: (scores [T, E], logits [T, E]) of the unscaled tokens
                self._routed[block.key] = (args[0], output[0])
                self._logits[block.key] = output[1]
                return
            self._logits[block.key] = output[0] if isinstance(output, tuple) else output

        return hook

    def _token_type_hook(self, parent: str):
        def hook(_module, args, kwargs):
            types = kwargs.get("moe_mm_token_type_ids", args[1] if len(args) > 1 else None)
            self._token_types[parent] = types

        return hook

    def _experts_hook(self, block: MoEBlock):
        def hook(module, args, kwargs, _output):
            hidden, top_k_index, top_k_weights = (list(args) + [None] * 3)[:3]
            hidden = kwargs.get("hidden_states", hidden)
            top_k_index = kwargs.get("top_k_index", top_k_index)
            top_k_weights = kwargs.get("top_k_weights", top_k_weights)
            if block.indices_from_router:  # score the unscaled tokens with the router's top-k and sigmoid weights
                hidden, scores = self._routed.pop(block.key)
                top_k_weights, top_k_index = scores.topk(block.top_k, dim=-1)
            rows = self._rows(hidden.device, hidden.shape[0], block)
            logits = self._logits.pop(block.key, None)
            if self.mode == "router":
                self._add(block, rows, top_k_index, top_k_weights, logits)
                return None
            w = expert_weights(module)
            if self.mode == "full":
                real = rows.select(hidden)  # padding is never computed
                gated = self._merge_add(block, w, real, logits, rows)
                norms, peaks = (rows.scatter(v) for v in all_expert_norms(w, real, self.budget_mb, gated))
                safe = top_k_index.clamp(0, block.num_experts - 1)
                pair_norms, pair_max = norms.gather(1, safe), peaks.gather(1, safe)
                self._add(block, rows, top_k_index, top_k_weights, logits, pair_norms, pair_max, norms)
                return None
            pair_norms, pair_max = self._recompute_pairs(w, hidden, top_k_index, rows.modality, block.num_experts)
            self._add(block, rows, top_k_index, top_k_weights, logits, pair_norms, pair_max)
            return None

        return hook

    @staticmethod
    def _recompute_pairs(w, hidden, top_k_index, modality, num_experts):
        """‖f‖ and max|f| of each selected (token, expert) pair, grouped by expert."""
        pair_norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=hidden.device)
        pair_max = torch.zeros_like(pair_norms)
        valid = (modality >= 0).unsqueeze(1) & (top_k_index >= 0) & (top_k_index < num_experts)
        for e in torch.unique(top_k_index[valid]).tolist():
            tok, k = torch.nonzero(valid & (top_k_index == e), as_tuple=True)
            f = expert_output(w, e, hidden[tok].to(w.dtype))
            pair_norms[tok, k] = torch.linalg.vector_norm(f, dim=-1, dtype=torch.float32)
            pair_max[tok, k] = f.abs().amax(dim=-1).float()
        return pair_norms, pair_max

    def record_pairs(self, experts, hidden, top_k_index, top_k_weights, pairs: torch.Tensor) -> None:
        """Routed mode through the experts interface: pairs [T, K, H] are the model's own f per pair."""
        norms, peaks = row_stats(pairs)
        self.record_pair_stats(experts, hidden, top_k_index, top_k_weights, norms, peaks)

    def record_pair_stats(self, experts, hidden, top_k_index, top_k_weights, norms, peaks) -> None:
        block = self._block_of[id(experts)]
        rows = self._rows(hidden.device, hidden.shape[0], block)
        all_norms = None
        logits = self._logits.pop(block.key, None)
        if self.mode == "full":  # every expert on every (non-padding) token
            w = expert_weights(experts)
            real = rows.select(hidden)
            gated = self._merge_add(block, w, real, logits, rows)
            all_norms = rows.scatter(all_expert_gram_norms(w, real, self.budget_mb, gated))
        self._add(block, rows, top_k_index, top_k_weights, logits, norms, peaks, all_norms)

    # ---- deferred sums -----------------------------------------------------------------------
    def _add(
        self, block: MoEBlock, rows: Rows, top_k_index, top_k_weights, logits, norms=None, peaks=None, all_norms=None
    ):
        """A block's sums of this forward: added by flush() together with the other waiting blocks'."""
        stats = self.stats[block.key]
        if stats.totals.acc.device != top_k_index.device:  # offloaded weights (meta): added now, onto the data's device
            stats.add(rows, top_k_index, top_k_weights, logits, norms, peaks, all_norms)
            return
        T, E = top_k_index.shape[0], block.num_experts
        width = (4 if norms is not None else 2) * (E + 1) + (0 if logits is None else E * (1 + (all_norms is not None)))
        self._pending.append((stats, rows, top_k_index, top_k_weights, logits, norms, peaks, all_norms))
        self._pending_bytes += 4 * T * (width + (3 * (E + 1) if peaks is not None else 0))
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Add the waiting blocks' sums: blocks that share Totals, token rows and tensor shapes at once."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[tuple, list[tuple]] = {}
        for entry in pending:
            stats, rows, *tensors = entry
            shape = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
            key = (id(stats.totals), id(rows), shape)
            while any(e[0] is stats for e in groups.get(key, ())):  # a block twice: another group
                key = (*key, 0)
            groups.setdefault(key, []).append(entry)
        for entries in groups.values():
            stats = [e[0] for e in entries]
            tensors = [None if e[0] is None else torch.stack(e) for e in zip(*(x[2:] for x in entries), strict=True)]
            add_stacked(stats, entries[0][1], *tensors)

    def full_dequantized(self, experts, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Full mode on experts kept quantized whose forward dequantizes (FP8 without transformers' FP8
        kernels, PackedExperts): each chunk of experts is dequantized once, for the Gram norms of every token
        and for the outputs of the pairs routed to it (the dequantizing forward's arithmetic,
        quantization.SortedPairs); returns the block's output."""
        block = self._block_of[id(experts)]
        rows = self._rows(hidden.device, hidden.shape[0], block)
        logits = self._logits.pop(block.key, None)
        w = expert_weights(experts)
        pairs = SortedPairs(hidden, top_k_index, w)
        real = rows.select(hidden)
        gated = self._merge_add(block, w, real, logits, rows)

        def routed(e0, e1, chunk):
            pairs.run(experts, e0, e1, chunk)

        all_norms = rows.scatter(all_expert_gram_norms(w, real, self.budget_mb, gated, on_chunk=routed))
        f = pairs.unsort(pairs.out)  # [T, K, H] unweighted
        norms, peaks = row_stats(f)
        self._add(block, rows, top_k_index, top_k_weights, logits, norms, peaks, all_norms)
        return (f * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)

    def _merge_add(self, block, w, hidden, logits, rows: Rows):
        """Merge statistics of the block's real tokens (`hidden`: those rows); (probs, acc) for the kernel,
        or None."""
        if self.merge is None:
            return None
        z = None if logits is None else rows.select(logits.reshape(rows.modality.shape[0], -1))
        probs = None
        if z is not None:
            probs = torch.empty((z.shape[0], block.num_experts), dtype=torch.float32, device=z.device)
            self.stats[block.key]._probabilities(z, probs)
        return self.merge.add(block, w, hidden, z, probs, int(self.budget_mb * 2**20))

    # ---- results ---------------------------------------------------------------------------
    def export(self) -> dict[str, dict]:
        self.flush()
        return {key: s.export(self.mode) for key, s in self.stats.items()}

    def state(self) -> dict:
        self.flush()
        state = {key: s.state() for key, s in self.stats.items()}
        if self.merge is not None:
            state[MERGE_STATE] = self.merge.state()
        return state

    def load(self, state: dict) -> None:
        for key, s in state.items():
            if key == MERGE_STATE:
                if self.merge is not None:
                    self.merge.load(s)
                continue
            self.stats[key].load(s)
