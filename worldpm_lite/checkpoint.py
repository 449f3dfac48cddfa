"""Checkpoint reader: config.json + safetensors shards of a WorldPM-architecture model.

Reads fields and tensors only; never imports or runs code shipped with a checkpoint (WorldPM's
config names `Qwen2ForRewardModel` with an `auto_map` to remote code, which we ignore).
Tensors are opened lazily through safetensors' mmap, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError, OutputExists

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_FLOATS = ("F32", "F16", "BF16")  # the dtypes a float tensor may be stored in
HEAD = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
IGNORED_PREFIXES = ("lm_head.",)


class CheckpointError(InputError):
    """A checkpoint that cannot be read as a WorldPM model; the message names file and field."""


@dataclass(frozen=True)
class WorldPMConfig:
    """The Qwen2 fields WorldPM needs, as read from config.json."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    head_dim: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads}) and no head_dim is given")
        if self.head_dim is None:  # Qwen2's default; stored so equal models compare equal
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: expected 'silu', found {self.hidden_act!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps: expected a positive number, found {self.rms_norm_eps!r}")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> WorldPMConfig:
        fields = {}
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size", "max_position_embeddings"):
            if name not in raw:
                raise CheckpointError(f"{where}: missing field '{name}' (a Qwen2 config needs it)")
            fields[name] = raw[name]
        fields["num_key_value_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
        for name in ("rms_norm_eps", "head_dim", "hidden_act"):
            if raw.get(name) is not None:
                fields[name] = raw[name]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"{where}: rope type {rope.get('rope_type')!r} is not supported (only default)")
        theta = raw.get("rope_theta", rope.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        try:
            return cls(**fields)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_qwen2(self, attn_implementation: str = "sdpa"):
        """The equivalent transformers Qwen2Config (only used to build its decoder blocks)."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            head_dim=self.head_dim, hidden_act=self.hidden_act, use_sliding_window=False,
            tie_word_embeddings=False, use_cache=False,
        )
        cfg._attn_implementation = attn_implementation
        return cfg

    def to_config_json(self) -> dict:
        """config.json fields for a WorldPM checkpoint (no auto_map: nothing to execute)."""
        return {
            "architectures": ["Qwen2ForRewardModel"], "model_type": "qwen2",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "head_dim": self.head_dim, "hidden_act": self.hidden_act,
            "tie_word_embeddings": False, "use_sliding_window": False, "num_labels": 1,
            "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
        }

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name of a bf16 WorldPM checkpoint and its shape."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,),
                  "score.0.weight": (h, h), "score.0.bias": (h,), "score.2.weight": (1, h), "score.2.bias": (1,)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        return shapes


# The linears of a Qwen2 decoder layer, as data, in the sequential groups GPTQ quantizes them in
# (q/k/v -> o -> gate/up -> down); the linears of a group share one input.
LAYER_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(name for group in LAYER_GROUPS for name in group)
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def is_linear_weight(name: str) -> bool:
    """Whether `name` is the .weight of one of a decoder layer's seven linears (bf16 layout)."""
    return name.endswith(".weight") and name.removesuffix(".weight").split(".", 3)[-1] in LINEARS


@dataclass(frozen=True)
class GPTQSpec:
    """`quantization_config` of a GPTQ checkpoint (the fields we write and read)."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits: expected 4 or 8, found {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"group_size: expected -1 or a positive integer, found {self.group_size!r}")

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> GPTQSpec:
        if raw.get("quant_method") != "gptq":
            raise CheckpointError(f"{where}: quantization_config.quant_method is {raw.get('quant_method')!r}; "
                                  "only 'gptq' is supported")
        if raw.get("checkpoint_format", "gptq") != "gptq":
            raise CheckpointError(f"{where}: quantization_config.checkpoint_format is "
                                  f"{raw.get('checkpoint_format')!r}; only 'gptq' (v1 zeros) is supported")
        try:
            return cls(bits=raw.get("bits"), group_size=raw.get("group_size", 128),
                       desc_act=bool(raw.get("desc_act", False)), sym=bool(raw.get("sym", True)))
        except ValueError as e:
            raise CheckpointError(f"{where}: quantization_config.{e}") from None

    def to_dict(self) -> dict:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym, "checkpoint_format": "gptq",
                "modules_in_block_to_quantize": [list(LINEARS)],
                "not_quantized": ["model.embed_tokens", "model.norm", "*layernorm", "score.0", "score.2"]}

    def packed_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """name suffix -> (shape, safetensors dtype) of one quantized linear."""
        groups = 1 if self.group_size == -1 else in_features // self.group_size
        per = 32 // self.bits
        return {"qweight": ((in_features // per, out_features), "I32"),
                "qzeros": ((groups, out_features // per), "I32"),
                "scales": ((groups, out_features), "F16"), "g_idx": ((in_features,), "I32")}


def write_json_atomic(path: Path, data) -> None:
    """JSON into `path` through a temporary sibling, flushed to disk and renamed: a crash leaves the
    old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_files(folder: str | Path) -> list[str]:
    """The weight shards of a model folder, sorted: those its shard index names, else model.safetensors."""
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE]
    return sorted(set(_read_json(index, "the shard index").get("weight_map", {}).values()))


def weight_stamps(folder: str | Path) -> dict[str, list[int]]:
    """Each weight shard's size and modification time (ns) in a model folder: what a resumed run checks
    the model by. Reading every byte of a 143 GB checkpoint to hash it would take minutes; a replaced
    or rewritten shard changes one of these (in a hub cache, a shard links to its blob: the blob's)."""
    folder = Path(folder)
    return {f: [st.st_size, st.st_mtime_ns] for f in shard_files(folder) if (folder / f).is_file()
            for st in [(folder / f).stat()]}


def model_identity(folder: str | Path) -> dict:
    """A model folder as a resumed run checks it: its path, config.json's sha256 and each weight shard's
    size and time (a hub model's snapshot folder names its commit)."""
    folder = Path(folder)
    return {"model": str(folder.resolve()), "config_sha256": file_sha256(folder / "config.json"),
            "weights": weight_stamps(folder)}


def changed_weights(folder: Path, saved: dict, now: dict) -> list[str]:
    """The shards whose stamps (weight_stamps) differ between an interrupted run and now, in words."""
    out = []
    for f in sorted(set(saved) | set(now)):
        a, b = saved.get(f), now.get(f)
        if a is None or b is None:
            out.append(f"{Path(folder) / f} ({'new' if a is None else 'gone'} since the run started)")
        elif a != b:
            out.append(f"{Path(folder) / f} (size {a[0]} -> {b[0]} bytes, modification time {a[1]} -> {b[1]} ns)")
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(folder: Path) -> tuple[dict, WorldPMConfig, GPTQSpec | None]:
    """A model folder's config.json: as read, as a WorldPMConfig, and its GPTQ spec (None for bf16). All
    that `plan` needs, so it reads no shard."""
    raw = _read_json(Path(folder) / "config.json", "the model's config.json")
    qc = raw.get("quantization_config")
    where = str(Path(folder) / "config.json")
    return raw, WorldPMConfig.from_dict(raw, where), None if qc is None else GPTQSpec.from_dict(qc, where)


class Checkpoint:
    """A validated model directory. `tensor(name)` reads one tensor from its shard (mmap)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a model directory with config.json)")
        self.raw_config, self.config, self.quant = read_config(self.path)
        self.weight_map = self._weight_map()  # tensor name -> shard file name
        self._handles: dict[str, object] = {}
        self._validate()

    def _shard_path(self, shard: str, where: Path) -> Path:
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{where}: shard path {shard!r} leaves the model directory")
        full = self.path / shard
        if not full.is_file():
            raise CheckpointError(f"{where}: shard {shard!r} is missing ({full} not found)")
        return full

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            data = _read_json(index, "the shard index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: missing or empty field 'weight_map'")
            for shard in set(weight_map.values()):
                self._shard_path(shard, index)
            return {k: v for k, v in weight_map.items() if not k.startswith(IGNORED_PREFIXES)}
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} and no {INDEX_FILE}")
        with safe_open(single, framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys() if not k.startswith(IGNORED_PREFIXES)}

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, framework="pt")
        return self._handles[shard]

    def expected(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Every tensor this checkpoint must hold: name -> (shape, allowed safetensors dtypes)."""
        floats = SAFETENSORS_FLOATS
        shapes = self.config.expected_shapes()
        if self.quant is None:
            return {n: (shape, floats) for n, shape in shapes.items()}
        out = {}
        for name, shape in shapes.items():
            if is_linear_weight(name):
                base = name.removesuffix(".weight")
                for suffix, (pshape, dtype) in self.quant.packed_shapes(shape[1], shape[0]).items():
                    out[f"{base}.{suffix}"] = (pshape, (dtype,))
            else:
                out[name] = (shape, floats)
        return out

    def _validate(self):
        expected = self.expected()
        shapes = {n: shape for n, (shape, _) in expected.items()}
        missing_head = [n for n in HEAD if n not in self.weight_map]
        if missing_head:
            raise CheckpointError(f"{self.path}: reward head tensor(s) {missing_head} missing; a WorldPM "
                                  "checkpoint has score.0.{weight,bias} and score.2.{weight,bias} "
                                  "(a causal LM is not a reward model)")
        for name in shapes:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor '{name}' missing from the checkpoint")
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            if name not in shapes and not name.endswith("rotary_emb.inv_freq"):
                raise CheckpointError(f"{self.path / shard}: unexpected tensor '{name}' (not part of a WorldPM model)")
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            f = self._open(shard)
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{self.path / INDEX_FILE}: names tensor '{name}' in {shard!r}, "
                                          "which does not contain it")
                if name not in shapes:
                    continue
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                if dtype not in expected[name][1]:
                    raise CheckpointError(f"{self.path / shard}: tensor '{name}' has dtype {dtype}; "
                                          f"supported: {', '.join(expected[name][1])}")
                if shape != shapes[name]:
                    raise CheckpointError(f"{self.path / shard}: tensor '{name}' has shape {list(shape)}, "
                                          f"config.json implies {list(shapes[name])}")
        for name in HEAD:
            t = self.tensor(name)
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{self.path / self.weight_map[name]}: reward head tensor '{name}' "
                                      "has non-finite values (NaN or inf)")

    def release(self) -> None:
        """Unmap the shards. Pages read through an open mapping stay resident and count as this
        process's memory, so streaming readers release after each layer."""
        self._handles.clear()

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        return self._open(self.weight_map[name]).get_tensor(name)

    def is_quantized_linear(self, name: str) -> bool:
        """Whether `name` (a ....weight of the bf16 layout) is stored packed in this checkpoint."""
        return self.quant is not None and name.endswith(".weight") and f"{name[:-7]}.qweight" in self.weight_map


def write_checkpoint(out_dir: str | Path, config: WorldPMConfig, tensors: dict[str, torch.Tensor],
                     max_shard_bytes: int = 2 << 30, extra_config: dict | None = None) -> Path:
    """Write config.json + safetensors shards (+ index when more than one) into a new directory.

    Everything goes to a temporary sibling first and is renamed into place at the end, so a crash
    never leaves a directory that looks complete.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise OutputExists(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for fname, shard in zip(names, shards):
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map |= {k: fname for k in shard}
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
        cfg = config.to_config_json() | (extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
