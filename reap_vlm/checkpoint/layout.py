"""Read a checkpoint's structure from config.json and the safetensors headers alone, and classify every tensor.

Names are matched by shape of the name, not by family:
  per-expert        <block>.experts.<j>.<proj>.<suffix>     (Qwen, DeepSeek, Mixtral w1-w3, AWQ, GPTQ, ...)
  ModelOpt order    <block>.experts.<proj>.<j>.<suffix>
  fused             <block>.experts.<param>                  (gate_up_proj / down_proj / up_proj [+ _bias]; axis 0)
  router            <block>.gate.<x> or <block>.router.<x>   (rows = experts, or [H, E]; bias; correction bias)
  block buffer      <block>.e_score_correction_bias, <block>.moe_statics.*
  shared experts    <block>.shared_expert(s).*, shared_expert_gate.*, shared_mlp.*   (untouched)
Any other tensor under a MoE block is an error that names it: never a silent copy.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, InputNotFoundError, UnsupportedModelError
from ..families import EXPERT_SETS, MAX_EXTRA_ROWS, check_supported
from ..validate import (
    DTYPE_BITS,
    HEADER,
    HEADER_METADATA,
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    IndexFile,
    Provenance,
    check,
    open_regular,
    parse_json,
    read_json,
)

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E8M0": 1,
    "F4": 1,
}
COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token")
MAX_HEADER = 100 * 1024 * 1024
FUSED_PARAMS = (
    "gate_up_proj",
    "down_proj",
    "up_proj",
    "gate_up_proj_bias",
    "down_proj_bias",
    "up_proj_bias",
    "fc1.weight",  # Aria
    "fc2.weight",
    "input_linear.weight",  # Granite-MoE
    "output_linear.weight",
    "w13_weight",  # Inkling-2 (gate/up interleaved on dim 1; the expert axis is still 0)
    "w2_weight",
)
# Fused experts stored beside the router rather than under `experts.` (Granite-MoE's original names).
FUSED_BESIDE_RE = re.compile(
    r"^(?P<block>.+?\.block_sparse_moe)\.(?P<rest>input_linear\.weight|output_linear\.weight)$"
)
SPLIT_SETS = {"ernie4_5_vl_moe": ("text", "vision")}  # model types whose original files list both sets as one
LAYER_BLOCK_RE = re.compile(r"(?:^|\.)layers\.\d+$")  # the MoE block is the decoder layer itself (Gemma 4)
EXPERT_BUFFERS = ("e_score_correction_bias", "expert_bias")
NORM_RE = re.compile(r"^\w*norm\w*\.(weight|bias)$")  # a norm layer inside the block: not expert-indexed
SHARED = ("shared_expert.", "shared_experts.", "shared_expert_gate.", "shared_mlp.")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")  # as in moe.detect
EXPERTS_RE = re.compile(r"^(?P<block>.+?)\.experts\.(?P<rest>.+)$")
PER_EXPERT_RE = re.compile(r"^(?P<j>\d+)\.(?P<rest>.+)$")
MODELOPT_RE = re.compile(r"^(?P<proj>[A-Za-z_][\w]*)\.(?P<j>\d+)\.(?P<rest>.+)$")
SUPPORT_DOC = "docs/adding-a-model.md"
ROUTER_PREFIXES = ("gate.", "router.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Role:
    kind: str  # "copy", "expert", "fused", "router", "buffer"
    block: str = ""
    expert: int = -1  # per-expert tensors
    axis: int = 0  # expert axis for fused / router / buffer tensors
    pattern: str = ""  # per-expert: name with {j} in place of the index
    expert_set: str = ""  # split blocks: the set a router tensor belongs to
    row_sets: bool = False  # split blocks: row i of this buffer belongs to set i (moe_statics [2, E])


@dataclass
class Block:
    prefix: str
    layer: int
    expert_set: str = "experts"
    num_experts: int = 0
    layout: set[str] = field(default_factory=set)
    # On-disk blocks that hold several in-memory expert sets in one list (Ernie-4.5-VL: text experts
    # 0..E-1, vision experts E..2E-1, routers gate.weight / gate.weight_1): the sets, in that order.
    sets: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.expert_set)

    @property
    def keys(self) -> list[tuple[int, str]]:
        return [(self.layer, s) for s in self.sets] if self.sets else [self.key]

    def locate(self, j: int) -> tuple[tuple[int, str], int]:
        """(plan key, index within its set) of on-disk expert j."""
        if not self.sets:
            return self.key, j
        k, local = divmod(j, self.num_experts)
        return (self.layer, self.sets[min(k, len(self.sets) - 1)]), local


@dataclass
class Layout:
    src: Path
    config: dict
    shards: list[str]  # in index order
    index: dict | None  # the index JSON, None for a single-file checkpoint
    shard_meta: dict[str, dict]  # per shard "__metadata__"
    tensors: dict[str, TensorInfo]  # name -> info, in file order
    roles: dict[str, Role]
    blocks: dict[str, Block]  # prefix -> block
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int

    def counts(self) -> dict[tuple[int, str], int]:
        return {key: b.num_experts for b in self.blocks.values() for key in b.keys}

    def params_per_expert(self) -> dict[tuple[int, str], int] | None:
        """Weights per routed expert of every block, from the headers; None for a quantized checkpoint
        (packed or scaled weights have other element counts than the model's parameters)."""
        float_types = {"F64", "F32", "F16", "BF16"}
        if self.config.get("quantization_config") or any(
            self.tensors[n].dtype not in float_types for n, r in self.roles.items() if r.kind in ("expert", "fused")
        ):
            return None
        out: dict[tuple[int, str], int] = {}
        for name, role in self.roles.items():
            block = self.blocks[role.block] if role.block else None
            if block is None or block.sets or role.kind not in ("expert", "fused"):
                continue
            shape = self.tensors[name].shape
            if role.kind == "fused":
                out[block.key] = out.get(block.key, 0) + math.prod(shape[1:])
            elif role.expert == 0:
                out[block.key] = out.get(block.key, 0) + math.prod(shape)
        return out

    def block_by_key(self, key: tuple[int, str]) -> Block:
        return next(b for b in self.blocks.values() if b.key == key)


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory, validated (see check_config), with a clear error when it is
    missing, corrupt or of the wrong shape."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputNotFoundError(f"model path {model_dir} does not exist", "", "Check REAP_MODEL_PATH / --model-path")
    if not model_dir.is_dir():
        raise InputNotFoundError(f"model path {model_dir} is not a directory", "", "Point it at the checkpoint folder")
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{model_dir} has no config.json",
            "it is not a Hugging Face checkpoint folder",
            "Point --model-path at the folder that holds config.json and the safetensors files",
        )
    config = read_json(path, CheckpointError, CONFIG_FIX, MAX_CONFIG_BYTES)
    check_config(config, str(path))
    return config


CONFIG_FIX = "Restore config.json from the original checkpoint"


def _config_parts(config: dict) -> list[tuple[str, dict]]:
    """(prefix, dict) of the config levels that hold MoE keys: text_config first, then the top, then ffn_config."""
    parts = [(name + ".", config[name]) for name in ("text_config",) if isinstance(config.get(name), dict)]
    parts.append(("", config))
    parts += [(name + ".", config[name]) for name in ("ffn_config",) if isinstance(config.get(name), dict)]
    return parts


def _config_int(part: dict, key: str, where: str, source: str, minimum: int) -> int | None:
    value = part.get(key)
    if isinstance(value, list) and value and all(type(v) is int for v in value) and len(set(value)) == 1:
        value = value[0]  # a per-layer list with one value (HunYuan's moe_topk)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise CheckpointError(
            f"{source}: {where}{key} is {value!r}",
            "it must be a whole number"
            + (f" >= {minimum}" if minimum else " (not negative, not a string or a boolean)"),
            CONFIG_FIX,
        )
    return value


def check_config(config, source: str = "config.json") -> None:
    """Types and cross-checks of the keys this tool reads: the top level is an object, text_config and
    ffn_config are objects, expert counts / top-k / routing groups are integers (not booleans, not
    strings), top-k <= experts, n_group divides the expert count, topk_group <= n_group."""
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source} is not a JSON object", f"its top level is a {type(config).__name__}", CONFIG_FIX
        )
    for name in ("text_config", "ffn_config", "vision_config"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise CheckpointError(
                f"{source}: {name} is not an object", f"it is a {type(config[name]).__name__}", CONFIG_FIX
            )
    if config.get("architectures") is not None and not (
        isinstance(config["architectures"], list) and all(isinstance(a, str) for a in config["architectures"])
    ):
        raise CheckpointError(f"{source}: architectures is not a list of names", "", CONFIG_FIX)
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise CheckpointError(f"{source}: model_type is not a string", "", CONFIG_FIX)
    if config.get("reap_pruning") is not None:
        check(Provenance, config["reap_pruning"], source, CheckpointError, "Re-run ./run.sh prune", "reap_pruning.")
    for where, part in _config_parts(config):
        count = next((v for k in COUNT_KEYS if (v := _config_int(part, k, where, source, 0))), None)
        top_k = next((v for k in TOP_K_KEYS if (v := _config_int(part, k, where, source, 0)) is not None), None)
        groups = _config_int(part, "n_group", where, source, 0) or 1
        topk_group = _config_int(part, "topk_group", where, source, 0) or 1
        if count and top_k is not None and top_k > count:
            raise CheckpointError(
                f"{source}: {where}top-k is {top_k} but the model has {count} experts",
                "a token cannot pick more experts than exist",
                CONFIG_FIX,
            )
        if count and groups > 1 and count % groups:
            raise CheckpointError(
                f"{source}: {where}n_group={groups} does not divide the {count} experts",
                "group-limited routing splits the experts into n_group equal groups",
                CONFIG_FIX,
            )
        if topk_group > groups:
            raise CheckpointError(
                f"{source}: {where}topk_group={topk_group} exceeds n_group={groups}",
                "routing cannot pick more groups than exist",
                CONFIG_FIX,
            )


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file, validated: every entry's dtype, shape and
    offsets; shape x dtype equals the entry's byte length; the data lies inside the file; no two tensors
    share bytes."""
    fix = "Re-download or re-copy that shard"
    unreadable = f"{path.name} is not a readable safetensors file"
    with open_regular(path, CheckpointError, fix) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(unreadable, "file shorter than 8 bytes", fix)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(unreadable, f"header length {n} exceeds the file", fix)
        blob = fh.read(n)
    source = f"{path.name} (safetensors header)"
    header = parse_json(blob, source, CheckpointError, fix)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt header", "not a JSON object", fix)
    check(HEADER_METADATA, header.get("__metadata__"), f"{source} __metadata__", CheckpointError, fix)
    entries = check(HEADER, {k: v for k, v in header.items() if k != "__metadata__"}, source, CheckpointError, fix)
    data_start = 8 + n
    spans = []
    for name, e in entries.items():
        begin, end = e.data_offsets
        if end < begin or data_start + end > size:
            raise CheckpointError(
                f"{path.name}: tensor {name} has a corrupt header entry or lies beyond the file end",
                f"data_offsets [{begin}, {end}] in a file of {size} bytes: the shard is truncated or damaged",
                fix,
            )
        bits = math.prod(e.shape) * DTYPE_BITS[e.dtype]
        if bits != 8 * (end - begin):
            raise CheckpointError(
                f"{path.name}: tensor {name} has shape {e.shape} of {e.dtype}, which is {bits / 8:g} bytes, "
                f"but its data_offsets hold {end - begin}",
                "the header is damaged; a copy would not load",
                fix,
            )
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    reach, owner = 0, ""  # the furthest end so far and its tensor
    for begin, end, name in spans:
        if begin < reach:
            raise CheckpointError(
                f"{path.name}: tensors {owner} and {name} share bytes",
                "each tensor must own its byte range; copying them would duplicate or corrupt data",
                fix,
            )
        if end > reach:
            reach, owner = end, name
    return header, data_start


def _count(config: dict) -> int:
    for _, cfg in _config_parts(config):
        for key in COUNT_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key]:
                return cfg[key]
    return 0


def _config_value(config: dict, keys: tuple[str, ...], default=None, *, class_default: bool = False):
    """The first of `keys` in config.json (text_config first); else, with class_default, the default of
    transformers' config class for this model type, which is what transformers uses when it loads the
    checkpoint (importing transformers costs seconds, so only where a missing key changes the plan)."""
    for _, cfg in _config_parts(config)[:2]:
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, list) and value:
                value = value[0]  # a per-layer list with one value (checked in check_config)
            if value is not None:
                return value
    value = _class_default(config, keys) if class_default else None
    return default if value is None else value


def _class_default(config: dict, keys: tuple[str, ...]):
    model_type = config.get("model_type")
    if not model_type:
        return None
    try:
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except (ImportError, KeyError):
        return None
    classes = [cls.sub_configs["text_config"]] if "text_config" in getattr(cls, "sub_configs", {}) else []
    for klass in [*classes, cls]:
        for key in keys:
            value = getattr(klass, key, None)
            if type(value) is int:
                return value
    return None


def _shards(src: Path) -> tuple[list[str], dict | None]:
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        fix = "Re-copy the index file from the original checkpoint"
        index = read_json(index_path, CheckpointError, fix, MAX_INDEX_BYTES)
        check(IndexFile, index, str(index_path), CheckpointError, fix)
        weight_map = index["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        orphans = sorted(p.name for p in src.glob("model*.safetensors") if p.name not in shards)
        if orphans:
            raise CheckpointError(
                f"shard {orphans[0]} is in {src} but the index does not list it or its tensors",
                "index and shards disagree: its tensors would be lost",
                "Re-copy the checkpoint",
            )
        for shard in shards:
            if "/" in shard or shard.startswith(".") or not (src / shard).exists():
                raise CheckpointError(
                    f"the index names shard {shard}, which is not in {src}",
                    "the checkpoint is incomplete",
                    "Copy the missing shard, or re-download",
                )
        return shards, index
    single = src / "model.safetensors"
    if single.exists():
        return ["model.safetensors"], None
    raise CheckpointError(
        f"{src} has no safetensors weights",
        "neither model.safetensors nor an index was found",
        "Point --model-path at a checkpoint saved with safetensors",
    )


def _experts_match(name: str):
    return EXPERTS_RE.match(name) or FUSED_BESIDE_RE.match(name)


def _classify(name: str, info: TensorInfo, blocks: dict[str, Block]) -> Role:
    m = _experts_match(name)
    if m is None:
        for prefix in blocks:
            if name.startswith(prefix + "."):
                return _block_member(name, prefix, info, blocks[prefix])
        return _router_bias_beside(name, info, blocks)
    prefix, rest = m.group("block"), m.group("rest")
    block = blocks[prefix]
    if rest in FUSED_PARAMS:
        block.layout.add("fused")
        return Role("fused", prefix, axis=0)
    if rest in EXPERT_BUFFERS:  # a selection bias stored on the experts module (Laguna)
        axes = _expert_axes(info.shape, block.num_experts)
        if len(axes) == 1:
            return Role("buffer", prefix, axis=axes[0])
    pe = PER_EXPERT_RE.match(rest)
    if pe:
        block.layout.add("per-expert")
        return Role("expert", prefix, expert=int(pe.group("j")), pattern=f"{prefix}.experts.{{j}}.{pe.group('rest')}")
    mo = MODELOPT_RE.match(rest)
    if mo:
        block.layout.add("modelopt")
        return Role(
            "expert",
            prefix,
            expert=int(mo.group("j")),
            pattern=f"{prefix}.experts.{mo.group('proj')}.{{j}}.{mo.group('rest')}",
        )
    raise CheckpointError(
        f"tensor {name} is inside the MoE block {prefix} but fits no known expert layout",
        "copying it unchanged could leave the pruned model inconsistent",
        f"See {SUPPORT_DOC} to describe this layout",
    )


def _router_bias_beside(name: str, info: TensorInfo, blocks: dict[str, Block]) -> Role:
    """A selection bias saved under another module name of the same decoder layer (Kolibri's
    `layers.N.moe.router.expert_bias` beside `layers.N.mlp.experts`): expert-indexed, so sliced."""
    parts = name.split(".")
    if "bias" not in parts[-1] or not ({"router", "gate"} & set(parts)):
        return Role("copy")
    layer = LAYER_RE.search(name)
    same_layer = [b for b in blocks.values() if layer and b.layer == int(layer.group(1))]
    if layer is None or len(same_layer) != 1:
        return Role("copy")
    axes = _expert_axes(info.shape, same_layer[0].num_experts)
    return Role("buffer", same_layer[0].prefix, axis=axes[0]) if len(axes) == 1 else Role("copy")


def _expert_axes(shape: tuple[int, ...], E: int) -> list[int]:
    """Axes that can index the experts: E entries, or E plus a few trailing non-prunable ones."""
    return [i for i, n in enumerate(shape) if E <= n <= E + MAX_EXTRA_ROWS]


def _block_member(name: str, prefix: str, info: TensorInfo, block: Block) -> Role:
    rest = name[len(prefix) + 1 :]
    if rest.startswith(SHARED) or NORM_RE.match(rest):
        return Role("copy")
    if LAYER_BLOCK_RE.search(prefix) and not rest.startswith(ROUTER_PREFIXES) and "." in rest:
        return Role("copy")  # attention, norms, the dense MLP of a decoder layer that is the MoE block
    is_router = rest.startswith(ROUTER_PREFIXES)
    if is_router or "." not in rest or rest.startswith("moe_statics."):
        axes = _expert_axes(info.shape, block.num_experts)
        kind = "router" if is_router else "buffer"
        if len(axes) == 1 or (len(axes) > 1 and info.shape[0] == block.num_experts):
            if not block.sets:
                return Role(kind, prefix, axis=axes[0])
            if kind == "router":  # gate.weight: the first set; gate.weight_1: the second
                suffix = re.search(r"_(\d+)$", rest)
                return Role(kind, prefix, axis=axes[0], expert_set=block.sets[int(suffix.group(1)) if suffix else 0])
            if len(info.shape) == 2 and info.shape[0] == len(block.sets) and axes == [1]:
                return Role(kind, prefix, axis=1, row_sets=True)
        if not axes and is_router:
            return Role("copy")  # router internals with no expert axis (a router MLP's hidden layer)
        if not axes and "." not in rest:
            return Role("copy")  # a block-level scalar or per-channel tensor: not expert-indexed
    raise CheckpointError(
        f"tensor {name} is inside the MoE block {prefix} but fits no known rule",
        "it is neither an expert, a router, an expert-indexed buffer nor a shared expert",
        f"See {SUPPORT_DOC} to describe this layout",
    )


def inspect_checkpoint(src: Path) -> Layout:
    """Structure of a checkpoint from config.json + headers; no tensor is read."""
    src = Path(src)
    config = read_config(src)
    check_supported(config)
    shards, index = _shards(src)
    tensors: dict[str, TensorInfo] = {}
    shard_meta: dict[str, dict] = {}
    for shard in shards:
        header, data_start = read_header(src / shard)
        shard_meta[shard] = header.get("__metadata__") or {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in two shards", "", "Re-copy the checkpoint")
            begin, end = info["data_offsets"]
            tensors[name] = TensorInfo(
                name, shard, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end
            )
    if index is not None:
        listed = index["weight_map"]
        unlisted = [n for n in tensors if n not in listed]
        if unlisted:
            raise CheckpointError(
                f"shard {tensors[unlisted[0]].shard} holds {unlisted[0]}, which the index does not list",
                "index and shards disagree",
                "Re-copy the checkpoint",
            )
        missing = [n for n, s in listed.items() if n not in tensors or tensors[n].shard != s]
        if missing:
            raise CheckpointError(
                f"the index maps {missing[0]} to {listed[missing[0]]}, which does not hold it",
                "index and shards disagree",
                "Re-copy the checkpoint",
            )

    num_experts = _count(config)
    blocks: dict[str, Block] = {}
    for name in tensors:
        m = _experts_match(name)
        if m and m.group("block") not in blocks:
            layers = LAYER_RE.findall(m.group("block"))
            if not layers:
                raise UnsupportedModelError(
                    f"found experts under {m.group('block')} but no layer index", "", f"See {SUPPORT_DOC}"
                )
            expert_set = EXPERT_SETS.get(m.group("block").rsplit(".", 1)[-1], "experts")
            blocks[m.group("block")] = Block(m.group("block"), int(layers[-1]), expert_set, num_experts)
    if not blocks:
        raise UnsupportedModelError(
            f"no MoE experts found in {src}",
            "no tensor name contains '.experts.'",
            "Dense models cannot be expert-pruned; for other layouts see " + SUPPORT_DOC,
        )
    if not num_experts:
        raise UnsupportedModelError(
            f"config.json of {src} has no expert count", "looked for " + ", ".join(COUNT_KEYS), f"See {SUPPORT_DOC}"
        )
    split = SPLIT_SETS.get(config.get("model_type", ""))
    if split:
        for b in blocks.values():
            if b.expert_set == "experts":  # the original one-list layout (not the fused text_moe/vision_moe)
                b.sets = split
    top_k = _config_value(config, TOP_K_KEYS, class_default=True)
    if not top_k:
        raise CheckpointError(
            f"config.json of {src} does not say how many experts each token uses",
            "looked for " + ", ".join(TOP_K_KEYS) + " and found none, nor a default in transformers' config "
            f"class for model_type {config.get('model_type')!r}; a plan could keep fewer experts than it routes to",
            "Add num_experts_per_tok (the model's top-k) to config.json",
        )
    if top_k > num_experts:
        raise CheckpointError(
            f"config.json of {src} routes each token to {top_k} experts but the model has {num_experts}",
            "a token cannot pick more experts than exist (where config.json has no top-k, transformers uses "
            "its default for the model type)",
            "Set num_experts_per_tok in config.json to the model's top-k",
        )
    roles = {name: _classify(name, info, blocks) for name, info in tensors.items()}
    _check_counts(tensors, roles, blocks, int(_config_value(config, ("zero_expert_num",), 0) or 0))
    return Layout(
        src,
        config,
        shards,
        index,
        shard_meta,
        tensors,
        roles,
        blocks,
        num_experts,
        int(top_k),
        int(_config_value(config, ("n_group",), 1) or 1),
        int(_config_value(config, ("topk_group",), 1) or 1),
    )


def _check_counts(tensors, roles, blocks, zero_experts: int) -> None:
    seen: dict[str, dict[str, set[int]]] = {}
    for name, role in roles.items():
        if role.kind == "expert":
            seen.setdefault(role.block, {}).setdefault(role.pattern, set()).add(role.expert)
        elif role.kind == "fused" and tensors[name].shape[0] not in (
            blocks[role.block].num_experts,
            blocks[role.block].num_experts + zero_experts,
        ):
            raise CheckpointError(
                f"{name} has {tensors[name].shape[0]} experts on axis 0 but config.json says "
                f"{blocks[role.block].num_experts}",
                "",
                "Check that config.json belongs to these shards",
            )
    for prefix, patterns in seen.items():
        E = blocks[prefix].num_experts * max(1, len(blocks[prefix].sets))
        for pattern, indices in patterns.items():
            # experts 0..E-1, maybe followed by the config's zero experts (LongCat: gate/up only)
            if indices not in (set(range(E)), set(range(E + zero_experts))):
                raise CheckpointError(
                    f"{pattern.format(j='J')} has experts {sorted(indices)[:6]}... but config.json "
                    f"says {blocks[prefix].num_experts}",
                    "",
                    "Check that the checkpoint is complete",
                )
