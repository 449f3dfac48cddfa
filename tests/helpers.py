"""Small checkpoints for tests: random weights, the real Qwen tokenizer."""

import shutil
import time

import torch

from worldpm_lite.checkpoint import WorldPMConfig
from worldpm_lite.model import WorldPM
from worldpm_lite.tiny import cached_tokenizer_dir, init_weights

SMALL = WorldPMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, vocab_size=152064, max_position_embeddings=96, rope_theta=10000.0)


def random_state(config: WorldPMConfig, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = WorldPM(config)
    init_weights(model, seed)
    # larger random weights than the training init, so layers change the hidden state visibly
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "score.0.weight", "score.2.weight")):
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0, 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def add_tokenizer(model_dir):
    for f in cached_tokenizer_dir().iterdir():
        shutil.copy2(f, model_dir / f.name)
    return model_dir


def wait_for(what: str, ready, deadline: float = 180):
    """Poll `ready()` until it is true (returned), failing after `deadline` seconds, generous for a
    loaded 2-core machine. Every 0.1 s: a poll of a service's /metrics or /health asks every replica,
    CPU time a starting worker wants."""
    end = time.monotonic() + deadline
    while not (value := ready()):
        assert time.monotonic() < end, f"{what}: not within {deadline} s"
        time.sleep(0.1)
    return value
