"""The WorldPM reward model: a Qwen2 decoder (transformers' blocks) plus the two-layer head.

Module names mirror the checkpoint (`model.*`, `score.0`, `score.2`) so a state dict loads
as is. Only the scoring rows reach the final norm and the head: one row per sequence.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .checkpoint import PACKED, Checkpoint, GPTQSpec, WorldPMConfig, is_linear_weight
from .errors import InputError
from .kernels.tail import fused_tail, fused_tail_ref
from .qlinear import bnb_weight, check_quant, pick_backend, share_scratch, swap_in_bnb_linears, swap_in_gptq_linears


class Backbone(nn.Module):
    def __init__(self, config: WorldPMConfig):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

        qcfg = config.to_qwen2()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(qcfg, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        with torch.device("cpu"):  # inv_freq is computed, not loaded: never on the meta device
            self.rotary_emb = Qwen2RotaryEmbedding(qcfg)


class WorldPM(nn.Module):
    def __init__(self, config: WorldPMConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.tail_backend = "torch"  # or "triton": the fused kernel (set by load_model)
        self.streamer = None  # offload.LayerStream when some layers stream from host memory (set by load_model)
        self.mlp_chunk = None  # tokens per MLP call in a pass, packed or padded (None: the whole pass at once)

    @property
    def input_device(self) -> torch.device:
        """Where the embedding table is (the host, when layers stream and it stays there)."""
        return self.model.embed_tokens.weight.device

    @property
    def compute_device(self) -> torch.device:
        """Where the first decoder layer runs."""
        return self.layer_device(0)

    def streamed(self, i: int) -> bool:
        return self.streamer is not None and i in self.streamer.position

    def layer_device(self, i: int) -> torch.device:
        return self.streamer.device if self.streamed(i) else self.model.layers[i].input_layernorm.weight.device

    def layer(self, i: int):
        """Context manager giving decoder layer i's module: resident, or a ring slot its weights were
        copied into (streamed; the slot is released for the next copy when the block exits)."""
        return self.streamer.layer(i) if self.streamed(i) else contextlib.nullcontext(self.model.layers[i])

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output before the final norm. input_ids: [B, T] -> [B, T, h].

        Attention is causal only: sequences are right-padded, so a real token never sees padding
        and its hidden state does not depend on what else is in the batch. With layers on several
        GPUs the hidden state moves to each layer's device on the way.
        """
        x = self.model.embed_tokens(input_ids.to(self.input_device))
        pos = torch.arange(input_ids.shape[1], device=x.device).unsqueeze(0)  # [1, T]
        cos, sin = (t[: input_ids.shape[1]].unsqueeze(0) for t in self.rope(x.device, x.dtype))  # [1, T, head_dim]
        rope = {x.device: (cos, sin)}
        for i in range(len(self.model.layers)):
            with self.layer(i) as layer:
                dev = layer.input_layernorm.weight.device
                if dev not in rope:
                    rope[dev] = (cos.to(dev), sin.to(dev))
                x = self._padded_layer(layer, x.to(dev), pos.to(dev), rope[dev])
        return x

    def _padded_layer(self, layer, x: torch.Tensor, pos: torch.Tensor, rope: tuple) -> torch.Tensor:
        """layer(x) for right-padded x [B, T, h]; with mlp_chunk set and more tokens than that, the MLP
        runs on mlp_chunk rows at a time (what the memory reserve of a streamed plan assumes), the same
        modules and arithmetic as the layer's own forward otherwise."""
        if self.mlp_chunk is None or x.shape[0] * x.shape[1] <= self.mlp_chunk:
            return layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None, position_ids=pos,
                               position_embeddings=rope)
        x = x + h
        rows = x.view(-1, x.shape[-1])  # [B * T, h], a view: the sums below land in x
        for a in range(0, rows.shape[0], self.mlp_chunk):
            rows[a:a + self.mlp_chunk] += layer.mlp(layer.post_attention_layernorm(rows[a:a + self.mlp_chunk]))
        return x

    def rope(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_position_embeddings, head_dim] of every position, built once per device and
        dtype. A position's values must not depend on the batch it is in (or on the process, for
        `score --resume`): transformers' rotary module, called per batch, gave 1-ulp different
        values in some processes. Same formula (fp32 angle = position x inv_freq), cos/sin taken in
        fp64 and rounded."""
        tables = self.__dict__.setdefault("_rope_tables", {})
        if (device, dtype) not in tables:
            r = self.model.rotary_emb
            pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
            angle = (pos[:, None] * r.inv_freq.to("cpu", torch.float32)[None, :]).double()  # [P, head_dim / 2]
            angle = torch.cat((angle, angle), -1)
            tables[(device, dtype)] = tuple((f(angle) * r.attention_scaling).to(device, dtype) for f in (torch.cos,
                                                                                                          torch.sin))
        return tables[(device, dtype)]

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] right-padded; last_index: [B] position of each sequence's
        <|endoftext|>. Returns [B] fp32 scores. Only those rows reach the final norm and the head."""
        return self.head(self.hidden_states(input_ids), last_index)  # [B, T, h] -> [B]

    def head(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Scores from hidden states before the final norm: x [B, T, h] with index [B] the scoring
        position in each row, or packed x [L, h] with index [B] the scoring rows. Returns [B] fp32."""
        s0, s2 = self.score[0], self.score[2]
        # index stays where the caller made it (the CPU): the tail checks it there without a GPU sync
        if x.device != s0.weight.device:  # only the scoring rows travel to the head's GPU
            rows = index.to(x.device)
            x = (x[torch.arange(x.shape[0], device=x.device), rows] if x.dim() == 3 else x[rows]).to(s0.weight.device)
            index = torch.arange(x.shape[0])
        args = (self.model.norm.weight, self.model.norm.variance_epsilon, s0.weight, s0.bias, s2.weight, s2.bias)
        if self.tail_backend == "triton":
            return fused_tail(x, index, *args)
        if x.device.type == "cpu" and len(index) > 1:
            # Row by row: BLAS runs a product of few rows through other kernels than one of many, so a
            # batched head would let a score's last bits depend on how many conversations share its batch.
            # The decoder's products have a row per token, and for 16 rows or more (a chat-templated
            # conversation has at least 18 tokens) MKL gives each row the same bits whatever the count.
            # So on the CPU a conversation scores the same bits in any batch: what `serve` relies on.
            return torch.cat([fused_tail_ref(x[i:i + 1] if x.dim() == 3 else x, index[i:i + 1], *args)
                              for i in range(len(index))])
        return fused_tail_ref(x, index, *args)


def read_weight(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A tensor by its bf16-layout name; GPTQ-packed linears come back dequantized (fp32)."""
    if ckpt.is_quantized_linear(name):
        from .quantize.gptq_format import dequantize_packed

        base = name.removesuffix(".weight")
        return dequantize_packed(*(ckpt.tensor(f"{base}.{k}") for k in PACKED),
                                 bits=ckpt.quant.bits)
    return ckpt.tensor(name)


def meta_model(config: WorldPMConfig, spec: GPTQSpec | None, dtype: torch.dtype = torch.bfloat16,
               backend: str = "torch", quant: str | None = None) -> WorldPM:
    """The model with every parameter on the meta device (shapes and dtypes, no memory); GPTQ
    linears swapped in when `spec` is given, bitsandbytes ones when `quant` is."""
    with torch.device("meta"):
        model = WorldPM(config)
        cast_parameters(model, dtype)
        if spec is not None:
            swap_in_gptq_linears(model, spec, backend, bias_dtype=dtype)
        elif quant is not None:
            swap_in_bnb_linears(model, quant, dtype)
    return model


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to `dtype`; buffers keep theirs. `model.to(dtype)` would also round RoPE's
    inv_freq to bf16, and the rotation angle error grows with the position."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
    return model


def layer_of(name: str) -> int | None:
    """The decoder layer index of tensor or module `name` ("model.layers.7.mlp..." -> 7), else None."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def device_for(name: str, device_map: dict[str, torch.device]) -> torch.device:
    """The device of the longest device_map prefix that contains module or tensor `name`."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise ValueError(f"device_map: no entry for {name!r}")
    return device_map[best]


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32,
               device_map: dict[str, str | int | torch.device] | str | torch.device = "cpu",
               backend: str = "auto", quant: str | None = None, offload=None) -> WorldPM:
    """Build on the meta device, then put each tensor straight from its shard on its device.

    device_map: one device for everything, or module name prefix -> device (e.g. from
    `plan.place`). GPTQ checkpoints get GPTQLinear modules running `backend` ("auto": Triton on
    CUDA devices, the torch reference elsewhere); their packed tensors and fp16 scales keep their
    dtypes, every other tensor is cast to `dtype`. quant "bnb-nf4" / "bnb-int8" quantizes the
    decoder linears of a bf16 checkpoint with bitsandbytes as each reaches its device.
    offload (an `offload.Offload`): its layers go to one host allocation (pinned when they run on a
    GPU) and stream through a ring of buffers on the device of `device_map["model.layers"]`."""
    from .offload import HostLayers, LayerStream

    check_quant(quant)
    if quant is not None and ckpt.quant is not None:
        raise InputError(f"{ckpt.path}: quant {quant!r} quantizes a bf16 checkpoint; this one is already GPTQ "
                         f"{ckpt.quant.bits}-bit")
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    device_map = {k: torch.device(f"cuda:{v}" if isinstance(v, int) else v) for k, v in device_map.items()}
    devices = set(device_map.values())
    kinds = {d.type for d in devices}
    backend = pick_backend(backend, next(iter(devices)) if len(kinds) == 1 else
                           torch.device("cuda") if "cuda" in kinds else torch.device("cpu"))
    model = meta_model(ckpt.config, ckpt.quant, dtype, backend, quant)
    streamed = {}  # layer index -> its place in the host allocation
    if offload is not None and offload.streamed:
        if quant is not None:
            raise InputError(f"offload: streams GPTQ and bf16 checkpoints, not {quant!r} (bitsandbytes)")
        if max(offload.streamed) >= ckpt.config.num_hidden_layers:
            raise InputError(f"offload: layer {max(offload.streamed)} streamed, but {ckpt.path} has "
                             f"{ckpt.config.num_hidden_layers} layers")
        streamed = {layer: j for j, layer in enumerate(offload.streamed)}
        template = model.model.layers[offload.streamed[0]]
        compute = device_for("model.layers", device_map)
        host = HostLayers(template, len(streamed), pinned=compute.type == "cuda")
    state, on_the_fly = {}, set()
    for name in ckpt.expected():
        t, device = ckpt.tensor(name), device_for(name, device_map)
        if quant is not None and is_linear_weight(name):
            model.get_submodule(name.removesuffix(".weight")).weight = bnb_weight(t.to(dtype), quant, device)
            on_the_fly.add(name)
            continue
        floating = t.is_floating_point() and not name.endswith(".scales")
        if layer_of(name) in streamed:
            host.put(streamed[layer_of(name)], name.split(".", 3)[3], t.to(dtype if floating else t.dtype))
            continue
        state[name] = t.to(device=device, dtype=dtype if floating else t.dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not any(k.startswith(n) for n in on_the_fly)
               and layer_of(k) not in streamed]
    if missing or result.unexpected_keys:  # the checkpoint was validated: this is a bug, not bad input
        raise RuntimeError(f"loading {ckpt.path}: missing {missing}, unexpected {result.unexpected_keys}")
    if streamed:
        model.streamer = LayerStream(host, template, offload.streamed, offload.ring, compute)
    model.model.rotary_emb.to(model.input_device)
    model.tail_backend = backend
    share_scratch(model)
    return model.eval()
