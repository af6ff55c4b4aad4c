"""Tiny checkpoints of real transformers MoE classes, for the demo and the tests.

`make_tiny(family, out_dir)` writes a random-weight model in several safetensors shards with an
index, plus a processor that loads offline: a small byte-level BPE tokenizer trained here on
Python standard-library docstrings (no download), a chat template, and for vision-language
models a real image processor. The weights are random but drawn wide enough that routing is
decisive: experts differ, and different tokens pick different experts.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import console
from .errors import BugError, SettingsError

HIDDEN = 64
HEAD_DIM = 16
NUM_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 32
VOCAB = 1024
INIT_STD = 0.08  # wider than the usual 0.02 so that router logits separate experts
MAX_TINY_PARAMETERS = 20_000_000  # a generic tiny config that misses a size key fails instead of allocating GBs

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>, which the
# processor then expands to one pad token per merged image patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Docstrings of a few stable standard-library modules: real English and code words, offline."""
    import collections
    import json as json_mod
    import pathlib
    import string
    import textwrap

    texts = []
    for mod in (collections, json_mod, pathlib, string, textwrap):
        for _name, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    texts.append("def f(x):\n    return x * 2 + 1\n\nThe quick brown fox jumps over the lazy dog. 3 + 4 = 7.")
    return texts


def make_tokenizer(vocab_size: int = VOCAB, corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer (Qwen2 style) trained on `corpus` (default: stdlib docstrings), as a
    fast HF tokenizer with the special tokens and chat template of the tiny checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_kwargs(vocab_size: int, ids: dict[str, int], num_layers: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=4096,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )


def qwen3_vl_moe(
    tokenizer,
    num_layers: int,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    patch_size: int = 16,
    pixels: tuple[int, int] = (32 * 32, 256 * 256),
):
    """A Qwen3-VL-MoE model (random weights) and its processor around `tokenizer`.

    `text` / `vision` override the tiny sizes of the text and vision configs (any of their keys);
    `patch_size` is the vision patch side, `pixels` the image processor's (min, max) image area."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    ids = _ids(tokenizer)
    text_config = _text_kwargs(len(tokenizer), ids, num_layers)
    # M-RoPE splits head_dim/2 = 8 rotary frequencies over (time, height, width).
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
    text_config.update(text or {})
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_config["hidden_size"],
        num_position_embeddings=256,
        deepstack_visual_indexes=[0],
        initializer_range=INIT_STD,
    )
    vision_config.update(vision or {})
    config = Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )
    model = Qwen3VLMoeForConditionalGeneration(config)
    size = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}
    patches = dict(patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, size=size),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**patches),
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def _qwen3_moe(tokenizer, num_layers: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs = _text_kwargs(len(tokenizer), _ids(tokenizer), num_layers)
    config = Qwen3MoeConfig(norm_topk_prob=True, **kwargs)
    return Qwen3MoeForCausalLM(config), tokenizer


# Text MoE families built from their config class with tiny sizes; values override _text_kwargs.
TEXT_FAMILIES: dict[str, dict] = {
    "mixtral": {"num_local_experts": NUM_EXPERTS},
    "qwen2_moe": {"shared_expert_intermediate_size": 48},
    "olmoe": {},
    "deepseek_v3": {  # group-limited routing: 2 groups of 4, sigmoid scores with a correction bias
        "n_routed_experts": NUM_EXPERTS,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "first_k_dense_replace": 0,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "head_dim": 8,
        "routed_scaling_factor": 1.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "glm4_moe": {
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 1,
        "first_k_dense_replace": 0,
        "n_group": 1,
        "topk_group": 1,
    },
    "gpt_oss": {
        "num_local_experts": NUM_EXPERTS,
        "intermediate_size": MOE_INTERMEDIATE,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 16,
    },
}


def _text_family(model_type: str):
    def builder(tokenizer, num_layers: int):
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {**_text_kwargs(len(tokenizer), _ids(tokenizer), num_layers), **TEXT_FAMILIES[model_type]}
        if model_type == "gpt_oss":
            kwargs["layer_types"] = kwargs["layer_types"][:1] * num_layers
        config = AutoConfig.for_model(model_type, **kwargs)
        return AutoModelForCausalLM.from_config(config), tokenizer

    return builder


# Tiny sizes for any transformers MoE config, on top of _text_kwargs: the names other families use for
# the same sizes, and the sizes of attention variants. They are passed to the config class' constructor
# where it takes the argument (or an alias in its attribute_map). Per-type values live in reap_vlm.families.
GENERIC_SIZES = dict(
    intermediate_size=96,  # a dense MLP (first dense layers, Mixtral-style experts) not 2x the expert width
    shared_expert_intermediate_size=48,
    num_local_experts=NUM_EXPERTS,
    n_routed_experts=NUM_EXPERTS,
    moe_num_experts=NUM_EXPERTS,
    moe_k=TOP_K,
    moe_topk=TOP_K,
    top_k_experts=TOP_K,
    num_experts_per_token=TOP_K,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
    n_shared_experts=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    index_head_dim=16,  # sparse-attention indexers (DeepSeek-V3.2, GLM-5)
    index_n_heads=2,
    projection_hidden_size=32,  # Kimi-K2.5's vision projector
)
# Vision / audio towers of composite configs: small but real (they are never pruned).
TOWER_SIZES = dict(
    depth=2,
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    num_attention_heads=2,
    out_hidden_size=HIDDEN,
    initializer_range=INIT_STD,
)
TOWERS = ("vision_config", "audio_config")
TOKEN_IDS = {  # special-token attributes of VLM configs -> tokens of the tiny tokenizer
    "image_token_id": "<|image_pad|>",
    "image_token_index": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "image_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_end_token_id": "<|vision_end|>",
}


def _fields(cls) -> set[str]:
    """Constructor arguments of a config class, and the aliases of its attribute_map."""
    return set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))


def _tiny_kwargs(cls, values: dict, num_layers: int) -> dict:
    """Constructor kwargs that make `cls` tiny: the class derives everything else (per-layer lists,
    MLA head sizes, ...) itself, as it does for a real checkpoint's config.json."""
    fields = _fields(cls)
    kwargs = {k: v for k, v in values.items() if k in fields and k not in TOWERS and k != "text_config"}
    if "num_hidden_layers" in fields:
        kwargs["num_hidden_layers"] = num_layers
    if "kv_lora_rank" in fields:  # multi-head latent attention: the rotary part is the head size
        kwargs["head_dim"] = values["qk_rope_head_dim"]
    for key, token in TOKEN_IDS.items():
        if key in fields:
            kwargs[key] = values["token_ids"][token]
    for key, spec in (getattr(cls, "sub_configs_defaults", None) or {}).items():
        sub, sub_type = spec.config_class, getattr(spec, "model_type", None)
        if sub_type and not getattr(sub, "model_type", ""):
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            sub = CONFIG_MAPPING[sub_type]  # an AutoConfig slot (Kimi-K2.5's DeepSeek-V3 text model)
        if key in ("text_config", "language_config"):
            kwargs[key] = {**_tiny_kwargs(sub, values, num_layers), **values.get("text_config", {})}
            if sub_type:
                kwargs[key]["model_type"] = sub_type
        elif key in TOWERS:
            tower = {**TOWER_SIZES, **values.get(key, {})}
            kwargs[key] = {k: v for k, v in tower.items() if k in _fields(sub)}
    return kwargs


def _generic(model_type: str):
    def builder(tokenizer, num_layers: int):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto import modeling_auto
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from .families import MATRIX

        entry = MATRIX[model_type]
        ids = _ids(tokenizer)
        num_layers = entry.layers or num_layers
        values = {
            **_text_kwargs(len(tokenizer), ids, num_layers),
            **GENERIC_SIZES,
            "bos_token_id": ids["<|im_start|>"],  # a real token id rather than _text_kwargs' None
            "token_ids": ids,
            **entry.sizes,
        }
        cls = CONFIG_MAPPING[model_type]
        config = cls(**_tiny_kwargs(cls, values, num_layers))
        causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
        with torch.device("meta"):  # a size the generic values missed would allocate gigabytes
            size = sum(p.numel() for p in auto.from_config(config).parameters())
        if size > MAX_TINY_PARAMETERS:
            raise BugError(f"tiny {model_type} would have {size:,} parameters: add its size keys in reap_vlm.families")
        return auto.from_config(config), tokenizer

    return builder


# family name -> builder(tokenizer, num_layers) -> (model, processor-or-tokenizer)
FAMILIES: dict[str, Callable] = {
    "qwen3_vl_moe": qwen3_vl_moe,
    "qwen3_moe": _qwen3_moe,
    **{name: _text_family(name) for name in TEXT_FAMILIES},
}
DEFAULT_LAYERS = {"qwen3_vl_moe": 3, "qwen3_moe": 4}  # others: 2


def _builder(family: str) -> Callable | None:
    from .families import MATRIX

    if family in FAMILIES:
        return FAMILIES[family]
    entry = MATRIX.get(family)
    return _generic(family) if entry is not None and entry.status != "refused" else None


def build(family: str, *, seed: int = 0, num_layers: int | None = None):
    """(model, processor) in memory, fp32, eval mode, weights drawn from `seed`."""
    builder = _builder(family)
    if builder is None:
        raise SettingsError(
            f"unknown tiny family {family!r}",
            "known: the model types listed in docs/supported-models.md",
            "Pick one of them",
        )
    torch.manual_seed(seed)
    console.step("training the tiny model's byte-level BPE tokenizer")
    tokenizer = make_tokenizer()
    console.step(f"building a random-weight {family}")
    model, processor = builder(tokenizer, num_layers or DEFAULT_LAYERS.get(family, 2))
    _spread_expert_scales(model, seed)
    return model.eval(), processor


def _spread_expert_scales(model: torch.nn.Module, seed: int) -> None:
    """Give experts different output scales (x1/16 .. x1, shuffled per layer), as trained experts have:
    with identical random experts every plan would look alike and saliency would have nothing to find."""
    from .moe import expert_weights, find_moe_blocks

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            experts = model.get_submodule(block.experts)
            scales = torch.logspace(-2, 0, block.num_experts, base=4.0)[
                torch.randperm(block.num_experts, generator=generator)
            ]
            down = expert_weights(experts).down  # a view: scaling it scales the parameter
            down.mul_(scales.to(down.dtype).view(-1, 1, 1))
            router = model.get_parameter(block.router_weight)
            if not router.any():  # some families initialise routers to zero: every expert would tie
                router.normal_(0.0, INIT_STD, generator=generator)


def make_tiny(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    max_shard_size: str = "300KB",
    save_original_format: bool = True,
) -> Path:
    """Write a tiny random-weight checkpoint of `family` to `out_dir` (several shards + index + processor)."""
    out_dir = Path(out_dir)
    model, processor = build(family, seed=seed, num_layers=num_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.step(f"saving it to {out_dir}")
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, save_original_format=save_original_format)
    processor.save_pretrained(out_dir)
    # Record how the checkpoint was made, for humans; loaders ignore this file.
    (out_dir / "tiny_checkpoint.json").write_text(
        json.dumps({"family": family, "seed": seed, "generator": "reap_vlm.tiny.make_tiny"}, indent=1) + "\n"
    )
    return out_dir


# ---- quantized twins (tests and benchmarks) -------------------------------------------------------
QUANTIZED_PARTS = ("experts.", "self_attn.")  # what the quantizers below quantize: experts and attention


def _quantizable(name: str, tensor: torch.Tensor, parts: tuple[str, ...]) -> bool:
    return name.endswith(".weight") and tensor.ndim == 2 and any(p in name for p in parts) and "visual" not in name


def _per_expert(name: str, tensor: torch.Tensor, hidden: int):
    """Fused experts (Qwen3-VL: gate_up_proj, down_proj) as the per-expert [out, in] weights that quantized
    releases store (experts.{j}.gate_proj.weight, ...); other tensors as they are. The fused tensors are
    in the hub layout ([E, H, 2I], [E, I, H]) or already in the model's ([E, 2I, H], [E, H, I]): as
    transformers' loader does (Transpose with check_dims), a tensor whose shape is the model's is not
    transposed."""
    head, _, leaf = name.rpartition(".")
    if not head.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj") or tensor.ndim != 3:
        yield name, tensor
        return
    model_layout = tensor.shape[2] == hidden if leaf == "gate_up_proj" else tensor.shape[1] == hidden
    for j in range(tensor.shape[0]):
        w = tensor[j] if model_layout else tensor[j].T  # [out, in]
        if leaf == "down_proj":
            yield f"{head}.{j}.down_proj.weight", w.contiguous()
        else:
            inter = w.shape[0] // 2
            yield f"{head}.{j}.gate_proj.weight", w[:inter].contiguous()
            yield f"{head}.{j}.up_proj.weight", w[inter:].contiguous()


def quantize_checkpoint(
    src: Path,
    dst: Path,
    fmt: str,
    *,
    block: int = 16,
    group: int = 16,
    parts: tuple[str, ...] = QUANTIZED_PARTS,
    device: str = "cpu",
) -> Path:
    """A quantized copy of the checkpoint `src` in `dst` with per-expert names (fused experts are split, as
    Qwen's FP8 releases store them), made by the formats' own producers: fp8 block-wise by transformers'
    `Fp8Quantize` (e4m3 + weight_scale_inv per [block, block]); `ct-int4` (pack-quantized, asymmetric,
    groups of `group`) and `ct-fp8` (float-quantized, per channel) by compressed-tensors' compressors, with
    the scales of its `calculate_qparams`. Only the 2-D weights of `parts` are quantized (routers, norms,
    embeddings, head and vision tower stay). `device`: where the producers compute (a GPU makes a real-width
    checkpoint in seconds)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))  # the shards are written below
    config = json.loads((dst / "config.json").read_text())
    if fmt == "fp8":
        import types

        from transformers.integrations.finegrained_fp8 import Fp8Quantize
        from transformers.utils.quantization_config import FineGrainedFP8Config

        qconfig = FineGrainedFP8Config(weight_block_size=[block, block], modules_to_not_convert=["lm_head"])
        fp8 = Fp8Quantize(types.SimpleNamespace(quantization_config=qconfig))

        def convert(name, tensor):
            return fp8._quantize_one(name, tensor)

        qc = qconfig.to_dict()
        qc["quant_method"] = "fp8"
    elif fmt in ("ct-int4", "ct-fp8"):
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
        from compressed_tensors.quantization.utils import calculate_qparams

        if fmt == "ct-int4":
            args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)
            form = "pack-quantized"
        else:
            args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
            form = "float-quantized"
        import re

        targets = [f"re:.*{re.escape(p)}.*" for p in parts]  # module names: what _quantizable quantizes
        scheme = QuantizationScheme(targets=targets, weights=args, format=form)
        compressor = BaseCompressor.get_value_from_registry(form)

        def convert(name, tensor):
            w = tensor.to(torch.bfloat16)
            if args.strategy == "group":
                grouped = w.float().reshape(w.shape[0], -1, group)
                lo, hi = grouped.amin(-1), grouped.amax(-1)
            else:
                lo, hi = w.float().amin(-1, keepdim=True), w.float().amax(-1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, args)
            state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero}
            prefix = name.rpartition(".")[0]
            return {f"{prefix}.{k}": v for k, v in compressor.compress(state, scheme).items()}

        qc = QuantizationConfig(
            config_groups={"group_0": scheme},
            format=form,
            ignore=["lm_head", "re:.*visual.*"],
            quantization_status="compressed",
        ).model_dump(mode="json")
        qc["quant_method"] = "compressed-tensors"
    else:
        raise BugError(f"unknown quantized format {fmt!r}")
    hidden = (config.get("text_config") or config)["hidden_size"]
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [p.name for p in src.glob("*.safetensors")]
    weight_map = {}
    for shard in shards:
        out = {}
        with safe_open(str(src / shard), framework="pt") as f:
            for name in f.keys():
                for name2, tensor in _per_expert(name, f.get_tensor(name), hidden):
                    if _quantizable(name2, tensor, parts):
                        out.update({k: v.cpu() for k, v in convert(name2, tensor.to(device)).items()})
                    else:
                        out[name2] = tensor
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    if index:
        index["weight_map"] = weight_map
        index_path.write_text(json.dumps(index, indent=1) + "\n")
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return dst
