"""Packed batches: several conversations in one token stream, no padding, shared prompts run once.

A batch is one stream of token ids [L] cut into segments. A segment is a whole conversation, a
shared prompt, or one response that follows a shared prompt. Attention stays inside each segment
(causal), and a response also attends to every token of its prompt, whose keys and values are
computed once: earlier in the same stream, or in an earlier batch and kept per layer until the
request's last response is scored. Each segment is attended by its own SDPA call, so the work is
block-diagonal (no L x L mask) and a score does not depend on its neighbours in the stream.

Batches start at a request boundary unless one request alone exceeds the token budget; such a
request starts a batch of its own and its responses spill into the following ones. So the batches
that follow any finished request are the same whether a run started at the first line or resumed
there: a resumed `score` computes the same numbers as an uninterrupted one.

With the decoder split over devices, `run_batches` keeps one batch in flight per stage: stage 0
takes batch k+1 while stage 1 finishes batch k (GPU kernels are queued asynchronously, and nothing
here waits for a GPU until a batch's scores are read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Group:
    """One request's conversations as token ids. prompt: ids shared by every part (each part is a
    response's own tokens after it), or None (each part is a whole conversation, scored alone).
    every_token: one part, and a reward at each of its tokens, the prompt's included (vLLM's
    token_classify pooling), instead of one at its last."""

    prompt: list[int] | None
    parts: list[list[int]]
    every_token: bool = False

    @property
    def tokens(self) -> int:
        """Tokens of the conversations as a user sees them (the prompt counted once per response)."""
        return sum(len(p) for p in self.parts) + len(self.prompt or ()) * len(self.parts)

    @property
    def work(self) -> int:
        """Tokens the model runs (the prompt once)."""
        return sum(len(p) for p in self.parts) + len(self.prompt or ())


def shared_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all of seqs share, leaving each at least its last (scoring) token."""
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != seqs[0][i]), n)
    return n


def merge_prompts(groups: list[Group]) -> tuple[list[Group], list[list[tuple[int, int]]]]:
    """The groups with the same prompt tokens merged into one (their parts in order: each part attends to
    the prompt on its own, so merging changes no score), the others as they are. Returns the merged
    groups and, for each, the (group, part) of `groups` that each of its parts came from."""
    out, members, at = [], [], {}
    for n, g in enumerate(groups):
        key = None if g.prompt is None or g.every_token else tuple(g.prompt)  # a token-level prompt is its own
        if key is not None and key in at:
            k = at[key]
            out[k] = Group(out[k].prompt, out[k].parts + g.parts)
        else:
            if key is not None:
                at[key] = len(out)
            out.append(g)
            members.append([])
            k = len(out) - 1
        members[k] += [(n, j) for j in range(len(g.parts))]
    return out, members


@dataclass(frozen=True)
class Segment:
    start: int  # first token in the stream
    length: int
    position: int  # position id of the first token: 0, or its prompt's length
    prompt: int | None = None  # key of the prompt segment it follows
    key: int | None = None  # this segment is a prompt, known by this key
    keep: bool = False  # a prompt whose keys/values later batches read: store them per layer


@dataclass
class Batch:
    ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    owners: list[tuple[int, int]] = field(default_factory=list)  # (group, part) of each scored row, in order
    scored: list[int] = field(default_factory=list)  # stream row scored: a segment's last, or each (every_token)
    done: int = 0  # groups 0..done-1 are complete once this batch is scored
    free: list[int] = field(default_factory=list)  # prompt keys no later batch reads
    tokens: int = 0  # conversation tokens completed (Group.tokens of the groups this batch finishes)

    def add(self, ids: list[int], position: int = 0, prompt: int | None = None, key: int | None = None,
            owner: tuple[int, int] | None = None, every: bool = False) -> None:
        """A segment; with `owner`, its last row is scored for it (every: each of its rows)."""
        start = len(self.ids)
        self.segments.append(Segment(start, len(ids), position, prompt, key))
        self.ids += ids
        if owner is not None:
            rows = range(start, len(self.ids)) if every else [len(self.ids) - 1]
            self.owners += [owner] * len(rows)
            self.scored += rows


def pack_batches(groups: Iterable[Group], budget: int | Callable[[], int]) -> Iterator[Batch]:
    """Batches of at most `budget` tokens (a single segment longer than that gets a batch alone), in
    group order. A group that fits no batch of its own starts a fresh one and spills over. budget: a
    number, or a function read at each group (the Scorer's budget, which changes after running out of
    memory)."""
    read = budget if callable(budget) else (lambda fixed=budget: fixed)
    batch, n = Batch(), -1
    for n, g in enumerate(groups):
        limit = read()
        if batch.ids and len(batch.ids) + g.work > limit:
            yield batch
            batch = Batch(done=n)
        key = home = None
        if g.prompt is not None:
            key, home = n, (batch, len(batch.segments))
            batch.add(g.prompt, key=key, owner=(n, 0) if g.every_token else None, every=True)
        for j, part in enumerate(g.parts):
            if batch.ids and len(batch.ids) + len(part) > limit:
                if home is not None and home[0] is batch:  # the prompt stays behind: later batches read it
                    batch.segments[home[1]] = replace(batch.segments[home[1]], keep=True)
                yield batch
                batch = Batch(done=n)
            batch.add(part, len(g.prompt or ()), key, owner=(n, j), every=g.every_token)
        if home is not None and home[0] is not batch:
            batch.free.append(key)
        batch.tokens += g.tokens
        batch.done = n + 1
    if batch.ids:
        yield batch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`. A host tensor bound for a GPU goes through pinned memory, so its copy is queued and
    the host goes on: a copy from pageable memory waits for the GPU's queue (a sync per batch)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


ALONE = 64  # segments at least this long get their own attention call; shorter ones share one per length class


class PackedRun:
    """One packed batch on its way through the model: embed, then layers stage by stage, then the
    head. `cache` maps a kept prompt's key to its per-layer (keys, values)."""

    def __init__(self, model, batch: Batch, cache: dict):
        self.model, self.batch, self.cache = model, batch, cache
        self.next_layer = 0
        ids = torch.tensor(batch.ids, dtype=torch.long)
        self.x = model.model.embed_tokens(to_device(ids, model.input_device))  # [L, h]
        # the table may stay on the host (streamed layers): then only [L, h] travels
        self.x = to_device(self.x, model.compute_device)
        pos = torch.cat([torch.arange(s.position, s.position + s.length) for s in batch.segments])
        pos = to_device(pos, self.x.device)  # indexes the rope table where x is, not from the host
        self.rope = {self.x.device: tuple(t[pos] for t in model.rope(self.x.device, self.x.dtype))}  # [L, head_dim]
        self.buckets = {torch.device("cpu"): length_buckets(batch.segments)}
        self.masks: dict = {}  # per device: (response length, prompt length) -> additive mask, built once
        for s in batch.segments:
            if s.keep:
                cache[s.key] = {}

    def advance(self, stop: int) -> None:
        """Run layers next_layer..stop-1."""
        for i in range(self.next_layer, stop):
            dev = self.model.layer_device(i)
            if dev not in self.rope:
                cos, sin = next(iter(self.rope.values()))
                self.rope[dev] = (cos.to(dev), sin.to(dev))
            if dev not in self.buckets:
                self.buckets[dev] = [tuple(to_device(t, dev) if isinstance(t, torch.Tensor) else t for t in b)
                                     for b in self.buckets[torch.device("cpu")]]
            with self.model.layer(i) as layer:
                self.x = packed_layer(layer, self.x.to(dev), self.rope[dev], self.batch.segments, self.buckets[dev],
                                      self.cache, i, self.masks.setdefault(dev, {}), self.model.mlp_chunk)
        self.next_layer = stop

    def scores(self) -> torch.Tensor:
        """[number of scored segments] fp32 (on the head's device; reading it waits for the GPU)."""
        for key in self.batch.free:
            self.cache.pop(key, None)
        if not self.batch.scored:  # a prompt alone in its batch
            return torch.empty(0)
        return self.model.head(self.x, torch.tensor(self.batch.scored, dtype=torch.long))


def length_buckets(segments: list[Segment]) -> list[tuple]:
    """The segments without a prompt, short ones grouped by length class (lengths in (2^(c-1), 2^c]) so
    each group's attention is one SDPA call over [S, H, 2^c, d]: (gather [S, 2^c] stream rows, each row's
    last real token repeated as filler; source [R] positions in the flattened [S * 2^c] output;
    destination [R] stream rows; and (start, end) for a long segment, attended alone and in place).
    Causal attention keeps the filler, which comes after every real token, out of every real token's
    result. Every short segment is padded to its class's full width, alone or not: the attention kernel
    blocks its work by the padded length, so a segment's bits then do not depend on its neighbours."""
    groups: dict[tuple, list[Segment]] = {}
    for s in segments:
        if s.prompt is None:  # a long segment alone: its call costs more than its launch
            key = ("alone", s.start) if s.length >= ALONE else ("class", (s.length - 1).bit_length())
            groups.setdefault(key, []).append(s)
    out = []
    for (kind, c), segs in groups.items():
        if kind == "alone":
            s = segs[0]
            out.append((None, None, None, (s.start, s.start + s.length)))
            continue
        width = 1 << c
        steps = torch.arange(width)
        gather = torch.stack([s.start + steps.clamp(max=s.length - 1) for s in segs])  # [S, T]
        source = torch.cat([j * width + torch.arange(s.length) for j, s in enumerate(segs)])
        dest = torch.cat([torch.arange(s.start, s.start + s.length) for s in segs])
        out.append((gather, source, dest, None))
    return out


def packed_layer(layer, x: torch.Tensor, rope: tuple, segments: list[Segment], buckets: list, cache: dict,
                 index: int, masks: dict, mlp_chunk: int | None = None) -> torch.Tensor:
    """One Qwen2 decoder layer over a packed stream x [L, h], attention confined to each segment
    (plus its prompt). The same modules and arithmetic as transformers' layer with SDPA attention.
    masks: the batch's response masks on x's device, filled on first use and reused by every layer.
    mlp_chunk: rows per MLP call, so its [rows, intermediate] tensors stay bounded on a long pass."""
    attn = layer.self_attn
    if attn.sliding_window is not None:
        raise NotImplementedError("packed attention: sliding-window layers are not supported")
    n, d = x.shape[0], attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(n, -1, d).transpose(0, 1)  # [Hq, L, d]
    k = attn.k_proj(h).view(n, -1, d).transpose(0, 1)  # [Hkv, L, d]
    v = attn.v_proj(h).view(n, -1, d).transpose(0, 1)
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    out = torch.empty_like(q)
    for gather, source, dest, span in buckets:  # whole conversations and prompts, by length
        if span is not None:
            a, b = span
            out[:, a:b] = F.scaled_dot_product_attention(  # 4-D inputs: CPU SDPA takes its flash kernel
                *(m[None, :, a:b] for m in (q, k, v)), is_causal=True, scale=attn.scaling, enable_gqa=True)[0]
            continue
        s_, t_ = gather.shape
        o = F.scaled_dot_product_attention(*(m[:, gather].transpose(0, 1) for m in (q, k, v)), is_causal=True,
                                           scale=attn.scaling, enable_gqa=True)  # [S, Hq, T, d]
        out[:, dest] = o.transpose(0, 1).reshape(o.shape[1], s_ * t_, d)[:, source]
    local = {}
    for s in segments:
        a, b = s.start, s.start + s.length
        ks, vs = k[:, a:b], v[:, a:b]
        if s.key is not None:
            local[s.key] = (ks, vs)
            if s.keep:
                cache[s.key][index] = (ks.clone(), vs.clone())
        if s.prompt is None:
            continue
        pk, pv = local[s.prompt] if s.prompt in local else cache[s.prompt][index]
        p = pk.shape[1]
        if (s.length, p) not in masks:  # [t, p + t]: the whole prompt, then causal
            keep = torch.ones(s.length, p + s.length, dtype=torch.bool, device=x.device).tril(p)
            masks[(s.length, p)] = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill(
                ~keep, -torch.inf)
        mask = masks[(s.length, p)]
        out[:, a:b] = F.scaled_dot_product_attention(q[None, :, a:b], torch.cat([pk, ks], 1)[None],
                                                     torch.cat([pv, vs], 1)[None], attn_mask=mask,
                                                     scale=attn.scaling, enable_gqa=True)[0]
    x = x + attn.o_proj(out.transpose(0, 1).reshape(n, -1))
    if mlp_chunk is None or n <= mlp_chunk:
        return x + layer.mlp(layer.post_attention_layernorm(x))
    for a in range(0, n, mlp_chunk):  # in place: x is this layer's own sum, read by nothing else
        x[a:a + mlp_chunk] += layer.mlp(layer.post_attention_layernorm(x[a:a + mlp_chunk]))
    return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Qwen2 applies it: x [H, L, d], cos/sin [L, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def stages(model) -> list[int]:
    """Layer indices where each pipeline stage ends: one stage per run of consecutive layers on one
    device (model.stage_ends overrides, e.g. to test the schedule with two stages on one CPU)."""
    if getattr(model, "stage_ends", None):
        return list(model.stage_ends)
    ends, count = [], len(model.model.layers)
    for i in range(1, count):
        if model.layer_device(i) != model.layer_device(i - 1):
            ends.append(i)
    return ends + [count]


def run_batches(model, batches: Iterable[Batch], pipeline: bool = True,
                trace: list | None = None) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, scores) for each batch, in order. With several stages and `pipeline`, stage j runs
    batch k - j in step k: later stages first, so each device has its next batch queued while the
    host waits for the last stage's scores. trace, when given, records (batch number, stage)."""
    ends = stages(model) if pipeline else [len(model.model.layers)]
    cache: dict = {}
    flight: list[tuple[int, PackedRun]] = []  # oldest first; flight[i] has finished stage s_i - 1
    source = iter(batches)
    k = 0
    while True:
        if len(flight) < len(ends):
            batch = next(source, None)
            if batch is not None:
                flight.append((k, PackedRun(model, batch, cache)))
                k += 1
        if not flight:
            return
        for number, run in flight:  # oldest (furthest along) first: it frees its device soonest
            stage = ends.index(run.next_layer) + 1 if run.next_layer else 0
            run.advance(ends[stage])
            if trace is not None:
                trace.append((number, stage))
        if flight[0][1].next_layer == ends[-1]:
            _, run = flight.pop(0)
            yield run.batch, run.scores()
