"""The WorldPM reward model: a Qwen2 decoder (transformers' blocks) plus the two-layer head.

Module names mirror the checkpoint (`model.*`, `score.0`, `score.2`) so a state dict loads
as is. Only the scoring rows reach the final norm and the head (`tail`): one row per sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import PACKED, Checkpoint, WorldPMConfig


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


def tail(rows: torch.Tensor, norm_weight: torch.Tensor, eps: float, w0: torch.Tensor, b0: torch.Tensor,
         w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm + Linear(h,h) + ReLU + Linear(h,1) on gathered rows, in fp32.

    rows: [B, h] hidden states at the scoring positions. Returns [B] fp32 scores.
    """
    x = rows.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    x = torch.relu(x @ w0.float().T + b0.float())  # [B, h]
    return (x @ w2.float().T + b2.float()).squeeze(-1)  # [B]


class WorldPM(nn.Module):
    def __init__(self, config: WorldPMConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output before the final norm. input_ids: [B, T] -> [B, T, h].

        Attention is causal only: sequences are right-padded, so a real token never sees padding
        and its hidden state does not depend on what else is in the batch.
        """
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # [1, T]
        rope = self.model.rotary_emb(x, pos)  # (cos, sin), each [1, T, head_dim]
        for layer in self.model.layers:
            x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
        return x

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] right-padded; last_index: [B] position of each sequence's
        <|endoftext|>. Returns [B] fp32 scores."""
        x = self.hidden_states(input_ids)  # [B, T, h]
        rows = x[torch.arange(x.shape[0], device=x.device), last_index.to(x.device)]  # [B, h]
        s0, s2 = self.score[0], self.score[2]
        return tail(rows, self.model.norm.weight, self.model.norm.variance_epsilon,
                    s0.weight, s0.bias, s2.weight, s2.bias)


def read_weight(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A tensor by its bf16-layout name; GPTQ-packed linears come back dequantized (fp32)."""
    if ckpt.is_quantized_linear(name):
        from .quantize.pack import dequantize_packed

        base = name.removesuffix(".weight")
        return dequantize_packed(*(ckpt.tensor(f"{base}.{k}") for k in PACKED),
                                 bits=ckpt.quant.bits)
    return ckpt.tensor(name)


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WorldPM:
    """Build on the meta device, then assign each tensor read from the checkpoint.

    GPTQ checkpoints are dequantized here (the torch reference path: exact, not memory-saving)."""
    with torch.device("meta"):
        model = WorldPM(ckpt.config)
    state = {name: read_weight(ckpt, name).to(device=device, dtype=dtype) for name in ckpt.config.expected_shapes()}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb.to(device)
    return model.eval()
