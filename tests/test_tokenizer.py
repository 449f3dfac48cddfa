import tiktoken
from transformers import AutoTokenizer

from worldpm_lite.chat import (
    ENDOFTEXT_ID,
    QWEN_PATTERN,
    _load_ranks,
    check_conversation,
    encode_conversation,
)
from worldpm_lite.data import sharegpt_records


def test_published_encodings_through_autotokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.encode("Hello, world!", add_special_tokens=False) == [9707, 11, 1879, 0]
    assert tok.encode("Tips for better sleep?", add_special_tokens=False) == [49079, 369, 2664, 6084, 30]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]


def test_model_directory_tokenizer_encodes_the_same(small_dir, tokenizer):
    """Beside a qwen2 config.json, AutoTokenizer picks Qwen2Tokenizer: the ids must not change."""
    from worldpm_lite.chat import load_tokenizer

    tok = load_tokenizer(small_dir)
    text = "Hello, world!\n\n  Tips for better sleep? 12345 naïve"
    assert tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    assert encode_conversation(tok, conv) == encode_conversation(tokenizer, conv)


def test_model_directory_tokenizer_matches_tiktoken_on_real_text(small_dir, caplog):
    """The tokenizer as every command loads it (from a model folder, config.json beside it) tokenizes
    3000 real ShareGPT messages exactly as tiktoken does with Qwen's ranks and regex. That is why
    load_tokenizer tells transformers not to apply its Mistral regex patch, and so no load may warn
    about "an incorrect regex pattern" (transformers 5.17 did, on every load)."""
    from worldpm_lite.chat import load_tokenizer

    with caplog.at_level("WARNING"):
        tok = load_tokenizer(small_dir)
    assert not [r for r in caplog.records if "regex" in r.getMessage()]
    ref = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=_load_ranks(), special_tokens={})
    texts = [t["value"] for r in sharegpt_records(limit=1500) for t in r["conversations"]][:3000]
    texts += ["naïve café 1234567 — 日本語のテキスト\n\n\tx  ", "emoji 🤖🚀 and  spaces   ", "'s 'LL I'm"]
    assert len(texts) == 3003
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ref.encode_ordinary(text), text[:80]


def test_empty_system_turn_inserted_and_endoftext_last(tokenizer):
    ids = encode_conversation(tokenizer, [{"role": "user", "content": "Tips for better sleep?"},
                                          {"role": "assistant", "content": "Sleep."}])
    text = tokenizer.decode(ids)
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nTips for better sleep?<|im_end|>\n"
                    "<|im_start|>assistant\nSleep.<|im_end|>\n<|endoftext|>")
    assert ids[-1] == ENDOFTEXT_ID and ids.count(ENDOFTEXT_ID) == 1


def test_given_system_turn_kept(tokenizer):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert check_conversation(conv) == conv
    assert tokenizer.decode(encode_conversation(tokenizer, conv)).startswith("<|im_start|>system\nBe brief.")


def test_template_that_ends_with_endoftext_is_not_doubled(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|endoftext|>")
    ids = encode_conversation(tok, [{"role": "user", "content": "Hi"}])
    assert ids[-1] == ENDOFTEXT_ID and ids.count(ENDOFTEXT_ID) == 1


def test_bad_conversations_are_named():
    import pytest

    from worldpm_lite.chat import ConversationError

    for conv, needle in [([], "non-empty list"), ([{"role": "bot", "content": "x"}], "[0].role"),
                         ([{"role": "user", "content": 3}], "[0].content"), (["hi"], "[0]")]:
        with pytest.raises(ConversationError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            check_conversation(conv)
