"""Calibration is built the way scoring sees text: whole templated conversations ending in <|endoftext|>."""

import os

from worldpm_lite.chat import ENDOFTEXT_ID, encode_conversation
from worldpm_lite.options import QuantizeSettings
from worldpm_lite.quantize.calibration import builtin_calibration, file_calibration, whole_conversation
from worldpm_lite.tiny import TINY_QUANT, cached_variant

SYSTEM_START = "<|im_start|>system\n"


def test_builtin_calibration_is_whole_conversations_of_varied_length(tokenizer):
    calib = builtin_calibration(tokenizer, samples=64, seq_len=256)
    assert len(calib) == 64 and len({len(ids) for ids in calib}) > 40
    for ids in calib:
        text = tokenizer.decode(ids)
        assert len(ids) <= 256 and ids[-1] == ENDOFTEXT_ID and ids.count(ENDOFTEXT_ID) == 1
        assert text.startswith(SYSTEM_START) and text.endswith("<|im_end|>\n<|endoftext|>")
        last_turn = text.rsplit("<|im_start|>", 1)[1]
        assert last_turn.startswith("assistant\n")  # the reward is read after a reply, as in scoring


def test_long_conversations_are_cut_after_the_last_reply_that_fits(tokenizer):
    turn = [{"role": "user", "content": "Tell me about tea. " * 5}, {"role": "assistant", "content": "Tea. " * 20}]
    conv = turn * 3 + [{"role": "user", "content": "And coffee?"}]
    one, two = (encode_conversation(tokenizer, turn * k) for k in (1, 2))
    assert whole_conversation(tokenizer, conv, len(two)) == two
    assert whole_conversation(tokenizer, conv, len(two) - 1) == one
    assert whole_conversation(tokenizer, conv, len(one) - 1) is None  # not even the first exchange fits


def test_too_long_conversations_make_up_a_shortfall_as_their_last_tokens(tokenizer, tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text('{"prompt": "Hi", "chosen": "Hello! How can I help you today?", "rejected": "no"}\n'
                    + '{"prompt": "' + "word " * 200 + '", "chosen": "ok", "rejected": "fine"}\n')
    calib = file_calibration(str(path), tokenizer, samples=4, seq_len=64)
    assert len(calib) == 4
    assert [tokenizer.decode(ids).startswith(SYSTEM_START) for ids in calib] == [True, True, False, False]
    assert all(len(ids) <= 64 and ids[-1] == ENDOFTEXT_ID for ids in calib)
    assert len(builtin_calibration(tokenizer, samples=2, seq_len=16)) == 2  # nothing fits whole: tails


def test_cached_variants_are_keyed_by_calibration_settings_data_and_source(tmp_path):
    """The small model's quantized variants are rebuilt when anything that decides their bytes changes:
    a calibration setting, the calibration file's content, the source's files."""
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    built = []

    def variant(settings=None):
        def build(path):
            path.mkdir()
            (path / "config.json").write_text("{}")
            built.append(path)
        return cached_variant(src, "gptq4", build, log=lambda *a: None, settings=settings)

    first = variant()
    assert variant(QuantizeSettings(**TINY_QUANT)) == first and len(built) == 1  # the default is TINY_QUANT
    seen = {first}
    cal = tmp_path / "cal.jsonl"
    cal.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    for settings in (QuantizeSettings(samples=TINY_QUANT["samples"] + 1, seq_len=TINY_QUANT["seq_len"]),
                     QuantizeSettings(calibration=str(cal), **TINY_QUANT)):
        seen.add(variant(settings))
    cal.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')  # same file, other conversations
    seen.add(variant(QuantizeSettings(calibration=str(cal), **TINY_QUANT)))
    st = (src / "model.safetensors").stat()
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the source rewritten
    seen.add(variant())
    assert len(seen) == len(built) == 5
    assert [p for p in tmp_path.iterdir() if p.name.startswith("tiny-gptq4")] == [built[-1]]  # stale ones removed
