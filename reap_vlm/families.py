"""Every MoE model type of the installed transformers, and what REAP-VLM does with it.

`MATRIX` is the single source for three things: the tiny checkpoint each type is tested on
(`reap_vlm.tiny`), the exactness-oracle test matrix (tests/test_families.py: a `pass` type must
prune to a checkpoint that equals the original with the removed experts masked, and `verify`
must describe it; a `refused` type must be refused with its reason), and
docs/supported-models.md (`python -m reap_vlm.families` regenerates it).

Detection is structural (reap_vlm.moe.detect, reap_vlm.checkpoint.layout): the entries below only
carry tiny-model sizes where the generic ones do not fit a config's validation, and the reasons
for refusals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError

MOE_INTERMEDIATE = 32  # = tiny.MOE_INTERMEDIATE (tiny imports this module)


# Structure shared by detection in memory (moe/detect.py) and on disk (checkpoint/layout.py):
# Router rows / buffer entries after the E experts that are not prunable experts: LongCat's zero
# (identity) experts, Inkling's shared-expert gates, Zaya's extra row. They are always kept.
MAX_EXTRA_ROWS = 4
# MoE blocks that hold one of several expert sets of a layer (Ernie-4.5-VL), by module name.
EXPERT_SETS = {"text_moe": "text", "vision_moe": "vision"}


@dataclass(frozen=True)
class Entry:
    status: str  # "pass", "refused" (by design: the product says why) or "failed" (known, not yet working)
    reason: str = ""  # refused / failed: why; pass: what is special, for the docs
    # tiny config values on top of tiny.GENERIC_SIZES; "text_config" / "vision_config": dicts for those
    sizes: dict = field(default_factory=dict)
    layers: int | None = None  # decoder layers of the tiny model (default 2)


DSA_TINY = "tiny config: the sparse-attention indexer's rotary size does not match the generic MLA sizes"
LINEAR_HYBRID = {"layer_types": ["linear_attention", "full_attention"]}  # one layer of each kind


def _p(reason: str = "", **kw) -> Entry:
    return Entry("pass", reason, **kw)


def _f(reason: str, **kw) -> Entry:
    return Entry("failed", reason, **kw)


MATRIX: dict[str, Entry] = {
    "afmoe": _p("router weight inside `router.gate`, selection bias on the block; zero-initialised routers"),
    "aria": _p("fused experts stored as `experts.fc1` / `fc2`, transposed"),
    "aria_text": _p("fused experts stored as `experts.fc1` / `fc2`, transposed"),
    "axk1": _p(),
    "axk2": _f(DSA_TINY),
    "bailing_hybrid": _p(sizes={"layer_group_size": 2}),
    "beam": _p(sizes={"mlp_layer_types": ["dense", "sparse"]}),
    "cohere2_moe": _p(),
    "dbrx": Entry(
        "refused",
        "experts stored as 2-D [E*I, H] rows (experts.mlp.w1/v1/w2) and the count nested in ffn_config; "
        "the default 5.23 config cannot even be instantiated (DbrxAttentionConfig lacks rope_theta)",
    ),
    "deepseek_v2": _p(),
    "deepseek_v3": _p("group-limited routing (2 groups): plans are balanced across groups"),
    "deepseek_v32": _f(DSA_TINY),
    "deepseek_v4": Entry(
        "refused",
        "hash routing: tokens pick experts through a token-id table (tid2eid), not router logits, so removing "
        "an expert cannot be expressed as masking its logit and the table would need re-mapping",
    ),
    "dots1": _p(),
    "ernie4_5_moe": _p(),
    "ernie4_5_vl_moe": _p(
        "text and vision expert sets per layer; on disk one list of 2E experts, routers stored [H, E]",
        sizes={
            "moe_intermediate_size": [MOE_INTERMEDIATE, MOE_INTERMEDIATE // 2],
            "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 3, 2]}},
        },
    ),
    "exaone_moe": _p(),
    "flex_olmo": _p(),
    "flint": _p(sizes={"mlp_only_layers": []}),
    "gemma4_text": _p(
        "the MoE block is the decoder layer itself (router and experts beside the dense MLP)",
        sizes={"enable_moe_block": True, "vocab_size_per_layer_input": 1024, "hidden_size_per_layer_input": 16},
    ),
    "glm4_moe": _p(),
    "glm4_moe_lite": _p(),
    "glm4v_moe": _p(
        sizes={
            "text_config": {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                    "mrope_section": [2, 1, 1],
                }
            }
        }
    ),
    "glm5_next": _f(
        "tiny config rejected: DSA layers need NoPE sizes (qk_rope_head_dim 0) the generic values do not set",
        sizes={"num_key_value_heads": 4},
    ),
    "glm_moe_dsa": _f(DSA_TINY),
    "gpt_oss": _p("fused transposed experts, interleaved gate/up, biases, router bias"),
    "granitemoe": _p("original names `block_sparse_moe.input_linear` / `output_linear`, router `router.layer`"),
    "granitemoe_swa": _p(),
    "granitemoehybrid": _p(sizes={**LINEAR_HYBRID, "mamba_n_heads": 8, "mamba_d_state": 16, "mamba_chunk_size": 16}),
    "granitemoeshared": _p("as granitemoe, plus a shared MLP"),
    "hunyuan_v1_moe": _p("router weight inside `gate.wg`"),
    "hy_v3": _p(),
    "hy_v4": _p("clamped SwiGLU experts (no act_fn: the family's own gate function is used)"),
    "inkling2": _p("fused `w13_weight` (interleaved) / `w2_weight`", sizes={"vision_config": {"text_hidden_size": 64}}),
    "inkling2_text": _p("fused `w13_weight` (interleaved) / `w2_weight`"),
    "inkling_text": _p(),
    "jamba": _p(
        sizes={"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}
    ),
    "jetmoe": Entry(
        "refused",
        "num_local_experts also sizes the attention experts (mixture of attention heads), so the MLP experts "
        "cannot be reduced alone; the experts are not a fused *Experts module with a top-k pre-hook",
    ),
    "kimi_k25": _p("DeepSeek-V3 text model; original files name decoder layers `blocks.N`"),
    "kimi_linear": _p(sizes=LINEAR_HYBRID),
    "kolibri1": _p("selection bias saved as `moe.router.expert_bias` beside `mlp.experts`"),
    "laguna": _p("selection bias stored on the experts module"),
    "lfm2_moe": _p(sizes={"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]}),
    "llama4": _p(
        "experts run on pre-scaled copies of every token: routing read from the router scores, logits compared"
    ),
    "llama4_text": _p(
        "experts run on pre-scaled copies of every token: routing read from the router scores, logits compared"
    ),
    "longcat_flash": _p("zero (identity) experts after the routed ones are kept", sizes={"zero_expert_num": 2}),
    "mellum": _p(),
    "mimo_v2_flash": _p(),
    "minimax": _p(),
    "minimax_m2": _p(),
    "minimax_m3_vl": _p(),
    "minimax_m3_vl_text": _p(),
    "mistral4": _f("the tiny checkpoint does not reload: the Auto class rejects the saved Mistral4Config"),
    "mistral_large4": _f(DSA_TINY),
    "mixtral": _p(),
    "muse_spark": _f("tiny config rejected: the vision tower wants one patch size / width / depth per layer"),
    "nemotron_h": _p("experts without a gate (`up_proj` only)"),
    "olmoe": _p(),
    "phimoe": _p(),
    "qwen2_moe": _p(),
    "qwen3_5_moe": _p(sizes=LINEAR_HYBRID),
    "qwen3_5_moe_text": _p(sizes=LINEAR_HYBRID),
    "qwen3_moe": _p(),
    "qwen3_next": _p(sizes=LINEAR_HYBRID),
    "qwen3_omni_moe": _f(
        "the thinker/talker composite is not built by the generic tiny builder (no single text_config)"
    ),
    "qwen3_vl_moe": _p("text and image inputs; fused on disk"),
    "qwen4_exp": _f("tiny config: a linear-attention size stays None after the generic values", sizes=LINEAR_HYBRID),
    "qwen4_exp_text": _f(
        "tiny config: a linear-attention size stays None after the generic values", sizes=LINEAR_HYBRID
    ),
    "solar_open": _p(),
    "step3p7": _f("tiny model has no MoE layer: its MoE layer selection keys are not set by the generic values"),
    "switch_transformers": Entry(
        "refused",
        "capacity-based top-1 routing drops tokens past an expert's capacity: masking a router logit is not "
        "equivalent to removing the expert, so no pruned checkpoint can equal the original (encoder-decoder)",
    ),
    "nllb-moe": Entry(
        "refused",
        "capacity-based top-2 routing with token dropping (encoder-decoder): removing an expert is not "
        "equivalent to masking its logit",
    ),
    "unlimited_ocr": _f("tiny config: the SAM vision encoder keeps its full size (400M parameters)"),
    "deepseek_ocr2": _f("tiny config: the vision encoder config stays None after the generic values"),
    "dots3_note": _f("tiny config rejected: per_layer_config keeps the full model's layer indices"),
    "dots3_note_text": _f("tiny config rejected: per_layer_config keeps the full model's layer indices"),
    "zaya": _p("top-1 routing only (the class validates it)", sizes={"num_experts_per_tok": 1}),
}


def check_supported(config) -> None:
    """Raise UnsupportedModelError when `config` (a dict or a config object, or its text config) is of
    a type refused by design. Types this table does not know pass: detection is structural."""

    def model_type(cfg) -> str:
        return (cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", "")) or ""

    text = config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)
    for cfg in (config, text):
        entry = MATRIX.get(model_type(cfg)) if cfg is not None else None
        if entry is not None and entry.status == "refused":
            what = f"{model_type(cfg)} models cannot be expert-pruned exactly"
            raise UnsupportedModelError(what, entry.reason, "See docs/supported-models.md")


def render_doc() -> str:
    """docs/supported-models.md, from MATRIX (tests/test_families.py proves every row)."""
    import transformers

    rows = sorted(MATRIX.items())
    counts = {s: sum(1 for _, e in rows if e.status == s) for s in ("pass", "refused", "failed")}
    lines = [
        "# Supported models",
        "",
        "<!-- generated by `python -m reap_vlm.families`; tests/test_families.py checks it is current -->",
        "",
        f"Every MoE model type of transformers {transformers.__version__}, tested on a tiny random-weight "
        "checkpoint built from the real classes (`reap_vlm.tiny`). **pass** = in its default on-disk format and "
        "in the fused format, the pruned checkpoint loaded with `from_pretrained` equals the original with "
        "the removed experts' router logits masked (identical top-k sets for every token, max |Δlogit| ≤ 1e-4 "
        "in fp32), `./run.sh verify` describes it, and scoring runs on the model's own forward in full, routed "
        "and router modes (same routing counts in all three; full mode's norms equal routed mode's). "
        "**refused** = the product refuses it by design, with "
        "the reason below. **failed** = not yet working; the test expects the failure, so a fix shows up.",
        "",
        f"Totals: {counts['pass']} pass, {counts['refused']} refused, {counts['failed']} failed.",
        "",
        "| model type | status | notes |",
        "|---|---|---|",
    ]
    for model_type, entry in rows:
        lines.append(f"| `{model_type}` | {entry.status} | {entry.reason} |")
    lines += [
        "",
        "Quantized exports (AWQ, GPTQ, compressed-tensors, FP8 with `weight_scale_inv`, ModelOpt name order) are "
        "pruned by name without dequantizing (`tests/test_prune.py::test_quantized_exports_prune_by_name`).",
        "",
        "Types not listed here are handled by structure (reap_vlm/moe/detect.py, reap_vlm/checkpoint/layout.py); "
        "if detection fails, see [adding-a-model.md](adding-a-model.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m reap_vlm.families: regenerate docs/supported-models.md
    from pathlib import Path

    target = Path(__file__).resolve().parents[1] / "docs" / "supported-models.md"
    target.write_text(render_doc())
    print(f"wrote {target}")
