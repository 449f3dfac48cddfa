"""Scorer: conversations in, one WorldPM reward per conversation out, in input order."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import (
    ASSISTANT_HEADER,
    ENDOFTEXT,
    ConversationError,
    check_conversation,
    check_scored_conversation,
    encode_conversation,
    encode_text,
    load_tokenizer,
)
from .checkpoint import Checkpoint
from .data import prompt_messages, with_response
from .devices import check_device
from .errors import InputError
from .hub import resolve
from .model import WorldPM, load_model
from .offload_plan import MLP_CHUNK, place_checkpoint
from .options import RuntimeOptions
from .packing import Group, merge_prompts, pack_batches, run_batches, shared_prefix
from .qlinear import GPTQLinear

log = logging.getLogger(__name__)
# padded tokens per forward pass: GPUs want large batches; on a CPU smaller ones stay in cache
# (bench/test_throughput.py: 2048 scored 22% faster than 8192 on the 2-core box)
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 8192}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # RuntimeOptions.dtype


PADDED_WINDOW = 64  # the padded path sorts by length within windows of this many token budgets
SHARE_MIN = 64  # prompt tokens from which a conversation's prompt runs as its own segment, shareable (Scorer.single)
# Passes that fit at a reduced token budget (after running out of GPU memory) before the budget doubles
# back toward the planned one; doubled each time a regrown budget runs out of memory again.
GROW_AFTER = 16


class ConversationTooLong(InputError):
    """A conversation longer than the model reads (and truncation is "error")."""


class DoesNotFit(InputError):
    """One conversation (or shared prompt) ran out of GPU memory alone in its pass."""

    def __init__(self, group: int, tokens: int, budget: int):
        self.group, self.tokens = group, tokens
        super().__init__(f"request {group}: a segment of {tokens} tokens ran out of GPU memory alone in its pass "
                         f"({budget} tokens per pass); it needs a larger GPU, or --truncate to a shorter length")


class _Replay:
    """Groups drawn from a lazy iterable and kept until their scores are out, so that a pass that ran
    out of memory can run them again: groups() yields the kept ones, then draws on."""

    def __init__(self, groups: Iterable[Group]):
        self.source, self.kept, self.first = iter(groups), collections.deque(), 0

    def groups(self) -> Iterator[Group]:
        yield from list(self.kept)
        for g in self.source:
            self.kept.append(g)
            yield g

    def finished(self, done: int) -> None:
        """Groups first..done-1 are out: forget them."""
        while self.first < done:
            self.kept.popleft()
            self.first += 1


class NonFiniteScore(InputError):
    """A score came out NaN or inf: the weights (or their quantization) are broken."""

    def __init__(self, group: int, part: int, value: float):
        self.group, self.part, self.value = group, part, value
        super().__init__(f"request {group}, conversation {part}: the score is {value}; a NaN/inf score means "
                         "the checkpoint is the likely cause (non-finite or overflowing weights)")


@dataclass(frozen=True)
class Step:
    """What one batch finished: groups 0..done-1 are complete; results lists (group, scores) of
    the groups completed now, in order; tokens counts their conversations' tokens."""

    done: int
    results: list[tuple[int, list[float]]]
    tokens: int


def _check_finite(values: list[float], owners: list[tuple[int, int]]) -> None:
    for v, (g, j) in zip(values, owners):
        if not math.isfinite(v):
            raise NonFiniteScore(g, j, v)


@contextlib.contextmanager
def _quiet_bnb():
    with warnings.catch_warnings():  # bitsandbytes int8 says this on every call with fp32/bf16 inputs
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        yield


@dataclass(frozen=True)
class Comparison:
    score_a: float
    score_b: float

    @property
    def prob_a(self) -> float:
        """Bradley-Terry probability that A is preferred: sigmoid(score_a - score_b)."""
        return 1.0 / (1.0 + math.exp(self.score_b - self.score_a))

    @property
    def preferred(self) -> str:
        return "a" if self.score_a >= self.score_b else "b"


@dataclass(frozen=True)
class Ranking:
    scores: list[float]  # in the order the responses were given

    @property
    def order(self) -> list[int]:
        """Indices of the responses, best first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    @property
    def best(self) -> int:
        return self.order[0]


def in_text_order(order: list[int], group_scores: list[list[float]]) -> list[float]:
    """Scores of Scorer.text_groups' groups (one list per group) back in the order of its texts."""
    scores = [0.0] * len(order)
    for n, s in zip(order, (s for group in group_scores for s in group)):
        scores[n] = s
    return scores


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each at most token_budget padded tokens
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # sorted longest first, so a batch's first element sets its padded length
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class Scorer:
    """Scores conversations with a WorldPM model.

    token_budget: tokens per forward pass (packed: their sum; padded: batch size x longest sequence); default 8192 on
    a GPU, 2048 on the CPU.
    truncation: "error" (default) refuses a conversation longer than max_length tokens;
    "left" drops its oldest tokens and keeps the end, where the reward is read.
    packing (default on): conversations of different lengths share one token stream per batch,
    attention confined to each; off: right-padded, length-sorted batches (the reference path).
    share_prompts (default on, needs packing): the prompt shared by the responses of a pair or a
    ranking runs once and each response attends to its keys/values.
    pipeline (default on): with the layers split over devices, stage 0 runs batch k+1 while the
    next stage finishes batch k.
    """

    def __init__(self, model: WorldPM, tokenizer, *, token_budget: int | None = None,
                 truncation: str = "error", max_length: int | None = None, packing: bool = True,
                 share_prompts: bool = True, pipeline: bool = True):
        RuntimeOptions(token_budget=token_budget, truncation=truncation, packing=packing, share_prompts=share_prompts,
                       pipeline=pipeline)  # the one place these are checked
        if token_budget is None:
            token_budget = DEFAULT_TOKEN_BUDGET["cpu" if model.compute_device.type == "cpu" else "cuda"]
        limit = model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise InputError(f"max_length: expected 2..{limit} (max_position_embeddings), found {max_length}")
        self.model, self.tokenizer = model, tokenizer
        self.token_budget, self.truncation = token_budget, truncation
        self.planned_budget, self.grow_after, self._fits, self._regrown = token_budget, GROW_AFTER, 0, False
        self.packing, self.share_prompts, self.pipeline = packing, share_prompts, pipeline
        self.max_length = max_length or limit
        self.pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)

    @classmethod
    def from_pretrained(cls, path: str | Path, options: RuntimeOptions | dict | None = None, *,
                        revision: str | None = None, log=None, **overrides) -> Scorer:
        """Load a bf16 or GPTQ checkpoint (a directory, or a hub id such as "Qwen/WorldPM-72B" at `revision`,
        a branch, tag or commit: hub.resolve) to run as `options` say: a RuntimeOptions (its docstring
        explains each field), a dict of its fields, or those fields as keywords, e.g.
        Scorer.from_pretrained(DIR, device="cpu", token_budget=4096, max_memory={0: "22GiB"}).

        device "auto" (the default): every visible GPU, whole decoder layers placed in order under each
        GPU's free memory (or `max_memory`) minus a reserve for the activations of `token_budget` tokens,
        on as few GPUs as hold them, balanced; when they do not all fit, as many as fit stay resident on
        the first GPU and the rest stream from pinned host memory behind compute (offload.py), with a
        pass size the plan picks. The CPU when no GPU is visible. Each tensor goes from its shard
        straight to its device.
        log: called with one line saying where the layers go, before any weight is read."""
        opts = RuntimeOptions.of(options, **overrides)
        device = check_device(opts.device)
        path = resolve(str(path), revision)
        dtype = TORCH_DTYPES[opts.dtype] if opts.dtype else None
        ckpt = Checkpoint(path)
        placement = place_checkpoint(ckpt, device, dtype or torch.bfloat16, opts.max_memory, opts.token_budget,
                                     opts.quant, opts.offload, opts.host_memory)
        if log is not None and placement.summary:
            log(placement.summary)
        dm = placement.device_map
        first = torch.device("cuda" if isinstance(dm, dict) else dm)
        if dtype is None:
            dtype = torch.float32 if first.type == "cpu" else torch.bfloat16
        model = load_model(ckpt, dtype, dm, opts.backend, opts.quant, placement.offload)
        if model.streamer is not None and model.streamer.device.type == "cuda":
            model.mlp_chunk = MLP_CHUNK
        return cls(model, load_tokenizer(path), token_budget=opts.token_budget or placement.token_budget,
                   truncation=opts.truncation, packing=opts.packing, share_prompts=opts.share_prompts,
                   pipeline=opts.pipeline)

    @property
    def backend(self) -> str:
        """What runs the model, in words (also logged by the CLI)."""
        m = self.model
        devices = sorted({str(p.device) for p in m.parameters() if p.device.type != "meta"})
        quant = next((q for q in m.modules() if isinstance(q, GPTQLinear)), None)
        dtype = str(m.score[0].weight.dtype).removeprefix("torch.")
        bnb = next((type(q).__name__ for q in m.modules() if type(q).__module__.startswith("bitsandbytes")), None)
        weights = (quant.describe() if quant is not None else f"bitsandbytes {bnb} linears (quantized while loading)"
                   if bnb else f"dense {dtype} linears")
        tail = "Triton fused tail" if m.tail_backend == "triton" else "torch tail"
        streamed = f"; {m.streamer.describe()}" if m.streamer is not None else ""
        return f"{weights}; {tail}; {dtype} compute on {', '.join(devices)}{streamed}"

    def encode(self, conversations: list, where: str = "conversation") -> list[list[int]]:
        """Token ids of each conversation (refused unless it ends with the assistant's reply)."""
        return [self.fit(encode_conversation(self.tokenizer, check_scored_conversation(conv, f"{where} {n}")),
                          f"{where} {n}") for n, conv in enumerate(conversations)]

    def encode_texts(self, texts: list, where: str = "query") -> list[list[int]]:
        """Token ids of already templated texts (OpenRLHF's queries), see chat.encode_text."""
        return [self.fit(encode_text(self.tokenizer, t, f"{where}[{n}]"), f"{where}[{n}]")
                for n, t in enumerate(texts)]

    def fit(self, ids: list[int], where: str) -> list[int]:
        """ids as the model reads them: refused (ConversationTooLong) or, with truncation "left", cut to
        their last max_length tokens."""
        if len(ids) <= self.max_length:
            return ids
        if self.truncation == "error":
            raise ConversationTooLong(f"{where} has {len(ids)} tokens; the model reads at most {self.max_length} "
                                      "(pass truncation='left' / --truncate to keep the last tokens)")
        return ids[-self.max_length:]

    def single(self, ids: list[int], prompt_ids: list[int] | None = None) -> Group:
        """One conversation's token ids as a Group. With share_prompts (and packing) it is cut after its
        prompt when that is at least SHARE_MIN tokens: after `prompt_ids` when they are a prefix of
        `ids`, else after its last assistant header. The prompt then runs as a segment of its own,
        which requests with the same prompt share (packing.merge_prompts: the Batcher merges a round's
        requests). The cut depends on the conversation alone and each response attends to the prompt's
        keys and values on its own, so the score is the same bits whoever shares the prompt: alone,
        in a request with others, or merged with other requests."""
        if not (self.share_prompts and self.packing):
            return Group(None, [ids])
        k = len(prompt_ids) if prompt_ids and ids[:len(prompt_ids)] == prompt_ids else self._after_last_header(ids)
        k = min(k, len(ids) - 1)  # the scoring token stays in the response
        return Group(ids[:k], [ids[k:]]) if k >= SHARE_MIN else Group(None, [ids])

    def _after_last_header(self, ids: list[int]) -> int:
        """The position just after the last assistant header of ids (0: none)."""
        header = self.__dict__.setdefault("_header", self.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False))
        for i in range(len(ids) - len(header), -1, -1):
            if ids[i:i + len(header)] == header:
                return i + len(header)
        return 0

    def group(self, conversations: list, prompt: list | None = None, where: str = "conversation") -> Group:
        """One request's conversations as a Group. One conversation: `single`. Several, with `prompt`
        (the messages every conversation starts with) and share_prompts: the tokens all conversations
        share are run once, provided the prompt's own tokens under the chat template are an exact
        prefix of every one of them; otherwise (a template that renders the prompt differently, left
        truncation) each conversation is scored alone."""
        full = self.encode(conversations, where)
        if len(full) == 1:
            return self.single(full[0], None if prompt is None else self._prompt_ids(prompt))
        if prompt is None or not (self.share_prompts and self.packing):
            return Group(None, full)
        own = self._prompt_ids(prompt)
        n = shared_prefix(full)
        if n < len(own) or full[0][:len(own)] != own:
            return Group(None, full)
        return Group(full[0][:n], [f[n:] for f in full])

    def _prompt_ids(self, prompt: list) -> list[int]:
        text = self.tokenizer.apply_chat_template(check_conversation(prompt), tokenize=False,
                                                  add_generation_prompt=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text_groups(self, texts: list, prompts: list | None = None,
                    where: str = "query") -> tuple[list[Group], list[int]]:
        """Already templated texts as Groups, each text as `single` cuts it (after its `prompts` entry's
        tokens when they are its prefix), those with the same prompt tokens merged into one Group whose
        prompt runs once. Returns the groups and the text index of each of their parts, in order."""
        if prompts is not None and (len(prompts) != len(texts) or not all(isinstance(p, str) for p in prompts)):
            raise ConversationError(f"prompts: expected a list of {len(texts)} strings (one per {where}), found "
                                    f"{len(prompts)} items of types {sorted({type(p).__name__ for p in prompts})}")
        ids = self.encode_texts(texts, where)
        prompt_ids = {}
        if prompts is not None and self.share_prompts and self.packing:
            prompt_ids = {p: self.tokenizer.encode(p, add_special_tokens=False) for p in set(prompts)}
        singles = [self.single(t, prompt_ids.get(prompts[n]) if prompts else None) for n, t in enumerate(ids)]
        groups, members = merge_prompts(singles)
        return groups, [n for m in members for n, _ in m]

    def run(self, groups: Iterable[Group]) -> Iterator[Step]:
        """Score groups lazily, in order: one Step per batch, each with the groups it completed.
        A non-finite score raises NonFiniteScore. Out of GPU memory during a pass, the groups not yet
        finished run again at half the token budget (logged); after `grow_after` passes that fit it
        doubles back toward the planned budget (`planned_budget`). Only a segment that fails alone
        raises DoesNotFit."""
        if not self.packing:
            yield from self._run_padded(groups)
            return
        source = _Replay(groups)
        while True:
            try:
                yield from self._run_packed(source)
                return
            except torch.OutOfMemoryError:
                first = source.kept[0] if source.kept else None
                self._out_of_memory(source.first, max(map(len, first.parts + [first.prompt or []])) if first else 1)

    def _out_of_memory(self, group: int, longest: int) -> None:
        """Halve the token budget (not below `longest`, the segment that must fit alone; DoesNotFit for
        request `group` when that is the budget already)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.token_budget <= longest:
            raise DoesNotFit(group, longest, self.token_budget)
        if self._regrown:  # a budget that grew back ran out again: wait longer before the next try
            self.grow_after, self._regrown = 2 * self.grow_after, False
        smaller = max(longest, self.token_budget // 2)
        log.warning("out of GPU memory with %d tokens per pass: running again from request %d with %d tokens per "
                    "pass, growing back toward %d after %d passes that fit", self.token_budget, group, smaller,
                    self.planned_budget, self.grow_after)
        self.token_budget, self._fits = smaller, 0

    def _pass_fit(self) -> None:
        """A pass ran: at a reduced budget, the grow_after-th one doubles it back toward the planned one."""
        if self.token_budget >= self.planned_budget:
            return
        self._fits += 1
        if self._fits >= self.grow_after:
            self.token_budget, self._fits, self._regrown = min(self.planned_budget, 2 * self.token_budget), 0, True
            log.info("token budget back to %d tokens per pass (planned: %d)", self.token_budget, self.planned_budget)

    def _run_packed(self, source: _Replay) -> Iterator[Step]:
        sizes, pending, first = {}, {}, source.first
        reported = first

        def counted():
            for n, g in enumerate(source.groups(), first):
                sizes[n] = (len(g.parts), g.every_token)
                yield g

        with torch.inference_mode(), _quiet_bnb():
            batches = pack_batches(counted(), lambda: self.token_budget)  # read as each batch starts
            for batch, scores in run_batches(self.model, batches, self.pipeline):
                values = scores.tolist()
                self._pass_fit()
                owners = [(first + g, j) for g, j in batch.owners]
                _check_finite(values, owners)
                for (g, j), v in zip(owners, values):
                    parts, every = sizes[g]
                    if every:  # each row's reward, in stream order: the prompt's, then the part's
                        pending.setdefault(g, [[] for _ in range(parts)])[j].append(v)
                    else:
                        pending.setdefault(g, [0.0] * parts)[j] = v
                done = [(g, pending.pop(g)) for g in range(reported, first + batch.done)]
                for g, _ in done:
                    del sizes[g]
                reported = first + batch.done
                source.finished(reported)
                yield Step(reported, done, batch.tokens)

    def _run_padded(self, groups: Iterable[Group]) -> Iterator[Step]:
        """The padded reference path: windows of groups, each conversation alone, length-sorted
        batches right-padded to their longest sequence."""
        window, first, work = [], 0, 0
        for g in groups:
            if g.every_token:  # one conversation, a reward at each token: alone, after the window before it
                if window:
                    yield self._padded_retried(window, first)
                    first, window, work = first + len(window), [], 0
                yield self._every_token_alone(g, first)
                first += 1
                continue
            parts = g.parts if g.prompt is None else [g.prompt + p for p in g.parts]
            window.append(parts)
            work += sum(map(len, parts))
            if work >= PADDED_WINDOW * self.token_budget:
                yield self._padded_retried(window, first)
                first, window, work = first + len(window), [], 0
        if window:
            yield self._padded_retried(window, first)

    @torch.inference_mode()
    def _every_token_alone(self, g: Group, index: int) -> Step:
        ids = (g.prompt or []) + g.parts[0]
        with _quiet_bnb():
            x = self.model.hidden_states(torch.tensor([ids]))[0]  # [T, h]
            values = self.model.head(x, torch.arange(len(ids))).tolist()
        _check_finite(values, [(index, 0)] * len(values))
        return Step(index + 1, [(index, [values])], len(ids))

    def _padded_retried(self, window: list[list[list[int]]], first: int) -> Step:
        """_padded_window, run again at a smaller token budget when it runs out of GPU memory."""
        while True:
            try:
                return self._padded_window(window, first)
            except torch.OutOfMemoryError:
                longest, g = max((len(ids), g) for g, parts in enumerate(window) for ids in parts)
                self._out_of_memory(first + g, longest)

    @torch.inference_mode()
    def _padded_window(self, window: list[list[list[int]]], first: int) -> Step:
        encoded = [ids for parts in window for ids in parts]
        owners = [(first + g, j) for g, parts in enumerate(window) for j in range(len(parts))]
        scores = [0.0] * len(encoded)
        for batch in plan_batches([len(ids) for ids in encoded], self.token_budget):
            width = len(encoded[batch[0]])
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T], right-padded
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            last = torch.tensor([len(encoded[i]) - 1 for i in batch])  # [B] the <|endoftext|> positions
            with _quiet_bnb():
                out = self.model(ids, last).tolist()
            self._pass_fit()
            _check_finite(out, [owners[i] for i in batch])
            for i, s in zip(batch, out):
                scores[i] = s
        results, k = [], 0
        for g, parts in enumerate(window):
            results.append((first + g, scores[k: k + len(parts)]))
            k += len(parts)
        return Step(first + len(window), results, sum(map(len, encoded)))

    def score_ids(self, encoded: list[list[int]], progress=None) -> list[float]:
        """One score per token sequence (each ending with <|endoftext|>), in input order."""
        scores = []
        for step in self.run(self.single(ids) for ids in encoded):
            scores += [s[0] for _, s in step.results]
            if progress is not None:
                progress.update(len(step.results))
        return scores

    def score(self, conversations: list, progress=None) -> list[float]:
        """One score per conversation (a list of {"role", "content"} messages ending with the
        assistant's reply), in input order."""
        return self.score_ids(self.encode(conversations), progress)

    def score_groups(self, groups: list[Group]) -> list[list[float]]:
        return [s for step in self.run(groups) for _, s in step.results]

    def score_texts(self, texts: list[str], prompts: list | None = None) -> list[float]:
        """One score per already templated text (the whole conversation as the chat template renders
        it, as RL trainers send it: see chat.encode_text), in input order. With `prompts` (one per
        text), texts with equal prompts share their common leading tokens' computation."""
        groups, order = self.text_groups(texts, prompts)
        return in_text_order(order, self.score_groups(groups))

    def compare(self, prompt, response_a: str, response_b: str) -> Comparison:
        """Score two responses to the same prompt (a string or a list of prior messages)."""
        convs = [with_response(prompt, r, "response") for r in (response_a, response_b)]
        a, b = self.score_groups([self.group(convs, prompt_messages(prompt, "prompt"))])[0]
        return Comparison(a, b)

    def rank(self, prompt, responses: list[str]) -> Ranking:
        """Score several responses to one prompt; `.order` lists them best first."""
        convs = [with_response(prompt, r, f"responses[{i}]") for i, r in enumerate(responses)]
        return Ranking(self.score_groups([self.group(convs, prompt_messages(prompt, "prompt"))])[0])
