"""`worldpm-lite quantize` end to end: format, resume after a kill, refusals, the source untouched."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import SMALL, add_tokenizer, random_state
from safetensors import safe_open

from worldpm_lite.checkpoint import Checkpoint, changed_weights, write_checkpoint
from worldpm_lite.cli import main
from worldpm_lite.quantize import run
from worldpm_lite.quantize.gptq_format import dequantize_packed
from worldpm_lite.scorer import Scorer

FAST = ["--samples", "6", "--seq-len", "48"]


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.name != "quantize_log.json"}  # the log holds timings


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A random 8-layer small checkpoint: enough layers to interrupt a run in the middle."""
    import dataclasses

    cfg = dataclasses.replace(SMALL, num_hidden_layers=8)
    out = tmp_path_factory.mktemp("deep") / "src"
    write_checkpoint(out, cfg, random_state(cfg, seed=4))
    return add_tokenizer(out)


def test_quantize_writes_standard_gptq_checkpoint(tmp_path, small_dir):
    before = digest(small_dir)
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(small_dir), "--out", str(out), "--act-order",
                 "--samples", "24", "--seq-len", "96"]) == 0
    assert digest(small_dir) == before  # the source is never modified
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        ("gptq", 4, 128, True, True, "gptq")
    assert cfg["hidden_size"] == 128 and "auto_map" not in cfg
    ckpt = Checkpoint(out)
    name = "model.layers.1.mlp.down_proj"
    shard = out / ckpt.weight_map[f"{name}.qweight"]
    with safe_open(shard, "pt") as f:
        t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["qweight"].shape == (256 * 4 // 32, 128) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 128 * 4 // 32) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (256,)
    assert "model.layers.1.self_attn.q_proj.bias" in ckpt.weight_map
    assert "model.layers.1.mlp.down_proj.weight" not in ckpt.weight_map
    assert ckpt.tensor("score.0.weight").equal(Checkpoint(small_dir).tensor("score.0.weight"))
    w = dequantize_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    src_w = Checkpoint(small_dir).tensor(f"{name}.weight")
    assert 0 < (w - src_w).norm() < 0.3 * src_w.norm()  # quantized, and close
    log = json.loads((out / "quantize_log.json").read_text())
    assert len(log["layers"]) == 2 and all(r["error"] <= r["rtn_error"] for layer in log["layers"]
                                           for r in layer["linears"])
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".*partial"))
    ref, q = Scorer.from_pretrained(small_dir), Scorer.from_pretrained(out)  # the scorer reads GPTQ checkpoints
    conv = [[{"role": "user", "content": "Tips for better sleep?"}, {"role": "assistant", "content": "Dark room."}]]
    assert q.score(conv)[0] == pytest.approx(ref.score(conv)[0], abs=0.2)


def test_refusals(tmp_path, small_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    assert main(["quantize", "--model", str(small_dir), "--out", str(out), *FAST]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", "--model", str(small_dir), "--out", str(out), "--overwrite", *FAST]) == 0
    assert Checkpoint(out).quant.bits == 4
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "again"), *FAST]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", "--model", str(small_dir), "--out", str(tmp_path / "x"), "--group-size", "100"]) == 2
    assert "group_size" in capsys.readouterr().err
    bad = tmp_path / "cal.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    assert main(["quantize", "--model", str(small_dir), "--out", str(tmp_path / "y"), "--calibration", str(bad)]) == 2
    assert "cal.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_calibration_file_and_rtn_baseline(tmp_path, small_dir):
    cal = tmp_path / "cal.jsonl"
    cal.write_text(json.dumps({"prompt": "Tips for better sleep? " * 3, "chosen": "Keep a schedule. " * 4,
                               "rejected": "idk " * 10}) + "\n")
    g, r = tmp_path / "g", tmp_path / "r"
    assert main(["quantize", "--model", str(small_dir), "--out", str(g), "--calibration", str(cal)]) == 0
    assert main(["quantize", "--model", str(small_dir), "--out", str(r), "--calibration", str(cal),
                 "--method", "rtn"]) == 0
    assert json.loads((g / "quantize_log.json").read_text())["calibration_sequences"] == 2  # both responses
    rtn_layers = json.loads((r / "quantize_log.json").read_text())["layers"]
    assert all(x["error"] == x["rtn_error"] for layer in rtn_layers for x in layer["linears"])


# `quantize` in a subprocess that SIGKILLs itself right after layer KILL_AT's shard is written and
# before progress.json counts it: the worst moment, reached on any machine at any speed.
KILL_AT = 3
KILLED_QUANTIZE = r"""
import os, signal, sys
from worldpm_lite.cli import main
from worldpm_lite.quantize import run

save, saved = run._save_atomic, []

def save_then_die(tensors, path):
    save(tensors, path)
    saved.append(path)
    if len(saved) == int(sys.argv[1]) + 1:
        os.kill(os.getpid(), signal.SIGKILL)

run._save_atomic = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_kill_gives_the_same_bytes(tmp_path, deep_dir):
    full = tmp_path / "full"
    assert main(["quantize", "--model", str(deep_dir), "--out", str(full), *FAST]) == 0
    out = tmp_path / "killed"
    staging = tmp_path / ".killed.partial"
    killed = subprocess.run([sys.executable, "-c", KILLED_QUANTIZE, str(KILL_AT), "quantize", "--model",
                             str(deep_dir), "--out", str(out), *FAST], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (staging / "model-00004-of-00009.safetensors").exists()  # layer 3's shard, not yet counted
    assert json.loads((staging / "progress.json").read_text())["layers_done"] == KILL_AT
    assert not out.exists()  # nothing that looks complete
    assert main(["quantize", "--model", str(deep_dir), "--out", str(out), *FAST]) == 2  # needs --resume
    assert main(["quantize", "--model", str(deep_dir), "--out", str(out), "--resume", *FAST]) == 0
    assert digest(out) == digest(full)
    log = json.loads((out / "quantize_log.json").read_text())
    assert [r["layer"] for r in log["layers"]] == list(range(8))


def test_resume_with_other_settings_is_refused(tmp_path, deep_dir, capsys):
    staging = tmp_path / ".o.partial"
    staging.mkdir()
    (staging / "progress.json").write_text(json.dumps({"fingerprint": "other", "layers_done": 2, "layers": []}))
    assert main(["quantize", "--model", str(deep_dir), "--out", str(tmp_path / "o"), "--resume", *FAST]) == 2
    assert "other settings" in capsys.readouterr().err


def test_resume_from_a_changed_source_is_refused(tmp_path, small_dir, monkeypatch, capsys):
    """A source shard touched (or replaced) between an interrupted run and --resume: the finished layers
    were made from other weights, so resuming would mix two models in one checkpoint."""
    src, cal = tmp_path / "src", tmp_path / "cal.jsonl"
    shutil.copytree(small_dir, src)
    cal.write_text(json.dumps({"prompt": "Tips for better sleep?", "chosen": "A dark room.", "rejected": "idk"}) + "\n")
    out = tmp_path / "q"
    args = ["quantize", "--model", str(src), "--out", str(out), "--calibration", str(cal)]
    save = run._save_atomic

    def save_then_crash(tensors, path):  # layer 0's shard is written, then the run dies
        save(tensors, path)
        raise RuntimeError("crash")

    monkeypatch.setattr(run, "_save_atomic", save_then_crash)
    with pytest.raises(RuntimeError, match="crash"):
        main(args)
    monkeypatch.undo()
    shard = src / "model-00001-of-00002.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten with the same size
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"was started from another source checkpoint: {shard} (size {st.st_size} -> {st.st_size} bytes, " \
           f"modification time {st.st_mtime_ns} -> {st.st_mtime_ns + 10**9} ns)" in err, err
    assert "model-00002-of-00002" not in err  # only what changed is named
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # the original source again: resumed
    assert main([*args, "--resume"]) == 0 and Checkpoint(out).quant.bits == 4
    assert changed_weights(src, {"a": [1, 2], "b": [3, 4]}, {"a": [5, 2], "c": [3, 4]}) == [
        f"{src / 'a'} (size 1 -> 5 bytes, modification time 2 -> 2 ns)", f"{src / 'b'} (gone since the run started)",
        f"{src / 'c'} (new since the run started)"]


@pytest.mark.parametrize("name, value, counts", [
    ("model.layers.1.mlp.down_proj.weight", float("inf"), "(1 inf, 0 NaN)"),  # found when layer 1 is loaded
    ("model.embed_tokens.weight", float("nan"), "(0 inf, 1 NaN)"),  # found before anything is written
    ("model.norm.weight", float("-inf"), "(1 inf, 0 NaN)"),  # written last, checked before the first layer
])
def test_non_finite_source_tensor_is_refused(tmp_path, small_state, capsys, name, value, counts):
    state = dict(small_state)
    state[name] = small_state[name].clone()
    state[name].view(-1)[7] = value
    src = tmp_path / "src"
    write_checkpoint(src, SMALL, state, max_shard_bytes=40 << 20)
    add_tokenizer(src)
    shard = src / Checkpoint(src).weight_map[name]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--method", "rtn", "--samples", "4",
                 "--seq-len", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: tensor '{name}' has non-finite values {counts}; the source checkpoint is damaged" in err, err
    assert not out.exists()  # nothing that looks complete
    staging = tmp_path / ".q.partial"
    if name.startswith("model.layers.1."):
        assert (staging / "model-00001-of-00003.safetensors").exists()  # layer 0 was fine
    elif not name.startswith("model.layers."):
        assert not staging.exists()  # refused before anything was written
