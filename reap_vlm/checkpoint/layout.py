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

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, InputNotFoundError, UnsupportedModelError

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
FUSED_PARAMS = ("gate_up_proj", "down_proj", "up_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj_bias")
SHARED = ("shared_expert.", "shared_experts.", "shared_expert_gate.", "shared_mlp.")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
EXPERTS_RE = re.compile(r"^(?P<block>.+?)\.experts\.(?P<rest>.+)$")
PER_EXPERT_RE = re.compile(r"^(?P<j>\d+)\.(?P<rest>.+)$")
MODELOPT_RE = re.compile(r"^(?P<proj>[A-Za-z_][\w]*)\.(?P<j>\d+)\.(?P<rest>.+)$")
SUPPORT_DOC = "docs/adding-a-model.md"


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


@dataclass
class Block:
    prefix: str
    layer: int
    expert_set: str = "experts"
    num_experts: int = 0
    layout: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.expert_set)


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
        return {b.key: b.num_experts for b in self.blocks.values()}

    def block_by_key(self, key: tuple[int, str]) -> Block:
        return next(b for b in self.blocks.values() if b.key == key)


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory, with a clear error when it is missing or corrupt."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputNotFoundError(f"model path {model_dir} does not exist", "", "Check REAP_MODEL_PATH / --model-path")
    if not model_dir.is_dir():
        raise InputNotFoundError(f"model path {model_dir} is not a directory", "", "Point it at the checkpoint folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json",
            "it is not a Hugging Face checkpoint folder",
            "Point --model-path at the folder that holds config.json and the safetensors files",
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON", str(err), "Restore the file from the original") from None


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file, validated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors file", str(err), "Re-download or re-copy that shard"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt header", "not a JSON object", "Re-copy that shard")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            ok = info["dtype"] in DTYPE_BYTES and 0 <= begin <= end and data_start + end <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"{path.name}: tensor {name} has a corrupt header entry or lies beyond the file end",
                "the shard is truncated or damaged",
                "Re-copy that shard",
            )
    return header, data_start


def _count(config: dict) -> int:
    for cfg in (config.get("text_config") or {}, config, config.get("ffn_config") or {}):
        for key in COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return 0


def _config_value(config: dict, keys: tuple[str, ...], default=None):
    for cfg in (config.get("text_config") or {}, config):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
    return default


def _shards(src: Path) -> tuple[list[str], dict | None]:
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
            raise CheckpointError(f"{index_path} is corrupt", "no valid weight_map", "Re-copy the index file") from None
        shards = list(dict.fromkeys(weight_map.values()))
        orphans = sorted(p.name for p in src.glob("model*.safetensors") if p.name not in shards)
        if orphans:
            raise CheckpointError(
                f"shard {orphans[0]} is in {src} but the index does not list it or its tensors",
                "index and shards disagree: its tensors would be lost",
                "Re-copy the checkpoint",
            )
        for shard in shards:
            if "/" in shard or shard.startswith(".") or not (src / shard).is_file():
                raise CheckpointError(
                    f"the index names shard {shard}, which is not in {src}",
                    "the checkpoint is incomplete",
                    "Copy the missing shard, or re-download",
                )
        return shards, index
    single = src / "model.safetensors"
    if single.is_file():
        return ["model.safetensors"], None
    raise CheckpointError(
        f"{src} has no safetensors weights",
        "neither model.safetensors nor an index was found",
        "Point --model-path at a checkpoint saved with safetensors",
    )


def _classify(name: str, info: TensorInfo, blocks: dict[str, Block]) -> Role:
    m = EXPERTS_RE.match(name)
    if m is None:
        for prefix in blocks:
            if name.startswith(prefix + "."):
                return _block_member(name, prefix, info, blocks[prefix])
        return Role("copy")
    prefix, rest = m.group("block"), m.group("rest")
    block = blocks[prefix]
    if rest in FUSED_PARAMS:
        block.layout.add("fused")
        return Role("fused", prefix, axis=0)
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


def _block_member(name: str, prefix: str, info: TensorInfo, block: Block) -> Role:
    rest = name[len(prefix) + 1 :]
    if rest.startswith(SHARED):
        return Role("copy")
    E = block.num_experts
    if rest.startswith(("gate.", "router.")) or rest in ("e_score_correction_bias",) or rest.startswith("moe_statics."):
        shape = info.shape
        if len(shape) >= 1 and shape[0] == E and not (len(shape) == 2 and shape[1] == E and rest.endswith("_1")):
            return Role("router" if rest.startswith(("gate.", "router.")) else "buffer", prefix, axis=0)
        if len(shape) == 2 and shape[1] == E:
            return Role("router" if rest.startswith(("gate.", "router.")) else "buffer", prefix, axis=1)
        if shape and E in shape:
            return Role("buffer", prefix, axis=list(shape).index(E))
        if len(shape) <= 1 and (not shape or shape[0] == 1):
            return Role("copy")  # a scalar gate (e.g. shared_expert_gate-like), not expert-indexed
    raise CheckpointError(
        f"tensor {name} is inside the MoE block {prefix} but fits no known rule",
        "it is neither an expert, a router, an expert-indexed buffer nor a shared expert",
        f"See {SUPPORT_DOC} to describe this layout",
    )


def inspect_checkpoint(src: Path) -> Layout:
    """Structure of a checkpoint from config.json + headers; no tensor is read."""
    src = Path(src)
    config = read_config(src)
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
        m = EXPERTS_RE.match(name)
        if m and m.group("block") not in blocks:
            layers = LAYER_RE.findall(m.group("block"))
            if not layers:
                raise UnsupportedModelError(
                    f"found experts under {m.group('block')} but no layer index", "", f"See {SUPPORT_DOC}"
                )
            blocks[m.group("block")] = Block(m.group("block"), int(layers[-1]), num_experts=num_experts)
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
    roles = {name: _classify(name, info, blocks) for name, info in tensors.items()}
    _check_counts(tensors, roles, blocks)
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
        int(_config_value(config, TOP_K_KEYS, 1)),
        int(_config_value(config, ("n_group",), 1) or 1),
        int(_config_value(config, ("topk_group",), 1) or 1),
    )


def _check_counts(tensors, roles, blocks) -> None:
    seen: dict[str, dict[str, set[int]]] = {}
    for name, role in roles.items():
        if role.kind == "expert":
            seen.setdefault(role.block, {}).setdefault(role.pattern, set()).add(role.expert)
        elif role.kind == "fused" and tensors[name].shape[0] != blocks[role.block].num_experts:
            raise CheckpointError(
                f"{name} has {tensors[name].shape[0]} experts on axis 0 but config.json says "
                f"{blocks[role.block].num_experts}",
                "",
                "Check that config.json belongs to these shards",
            )
    for prefix, patterns in seen.items():
        expected = set(range(blocks[prefix].num_experts))
        for pattern, indices in patterns.items():
            if indices != expected:
                raise CheckpointError(
                    f"{pattern.format(j='J')} has experts {sorted(indices)[:6]}... but config.json "
                    f"says {blocks[prefix].num_experts}",
                    "",
                    "Check that the checkpoint is complete",
                )
