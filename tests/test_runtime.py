"""The quantized runtime: GPTQLinear backends, the loader, the tail, device plans."""

import pytest
import torch
from helpers import SMALL

from worldpm_lite.checkpoint import Checkpoint, GPTQSpec
from worldpm_lite.cli import main
from worldpm_lite.devices import check_device
from worldpm_lite.model import WorldPM, device_for, meta_model, read_weight
from worldpm_lite.offload_plan import auto_placement
from worldpm_lite.options import parse_size
from worldpm_lite.plan import GIB, activation_reserve, gpu_capacity, placement_units, plan
from worldpm_lite.qlinear import GPTQLinear, pick_backend
from worldpm_lite.quantize.gptq_format import dequantize_packed, pack
from worldpm_lite.scorer import Scorer

CONVS = [[{"role": "user", "content": "Tips for better sleep?"}, {"role": "assistant", "content": "Dark room."}],
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, because two and two make four."}]]


@pytest.fixture(scope="module")
def q_dirs(tmp_path_factory, small_dir):
    out = tmp_path_factory.mktemp("q")
    assert main(["quantize", "--model", str(small_dir), "--out", str(out / "q4"), "--act-order",
                 "--samples", "6", "--seq-len", "48"]) == 0
    assert main(["quantize", "--model", str(small_dir), "--out", str(out / "q8"), "--bits", "8", "--asym",
                 "--method", "rtn", "--group-size", "32", "--samples", "2", "--seq-len", "16"]) == 0
    return out / "q4", out / "q8"


def random_gptq_linear(K, N, bits, backend, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = GPTQSpec(bits, 32)
    q = torch.randint(0, 1 << bits, (N, K), generator=gen)
    scales, zeros = torch.rand(K // 32, N, generator=gen) * 0.05, torch.randint(0, 1 << bits, (K // 32, N),
                                                                                generator=gen)
    g_idx = (torch.arange(K) // 32)[torch.randperm(K, generator=gen)]
    lin = GPTQLinear(K, N, spec, bias=True, backend=backend)
    for k, v in pack(q, scales, zeros, g_idx, bits).items():
        setattr(lin, k, v)
    lin.bias = torch.randn(N, generator=gen)
    w = dequantize_packed(lin.qweight, lin.qzeros, lin.scales, lin.g_idx, bits)  # [N, K]
    return lin, w


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_linear_backends_match_dense(bits):
    for backend, fused in (("torch", 0), ("triton", 0), ("triton", 4)):
        lin, w = random_gptq_linear(96, 48, bits, backend, seed=bits)
        lin.fused_max_tokens = fused  # 4: the fused kernel up to 4 rows, as gpu_check can switch it on
        for M in (1, 3, 9):
            x = torch.randn(2, M, 96)
            torch.testing.assert_close(lin(x), x @ w.T + lin.bias, rtol=1e-4, atol=1e-4)


def test_gptq_linears_share_one_scratch_per_device(q_dirs):
    """Every linear dequantizes into the same buffer, made once at the largest linear's size (what
    the planner reserves): no weight-sized allocation per call."""
    scorer = Scorer.from_pretrained(q_dirs[0], device="cpu")
    linears = [m for m in scorer.model.modules() if isinstance(m, GPTQLinear)]
    scratch = linears[0].scratch
    assert all(m.scratch is scratch for m in linears)
    largest = max(m.in_features * m.out_features for m in linears)
    assert scratch.sizes == {torch.device("cpu"): largest}
    first = scorer.score(CONVS)
    (buf,) = scratch.buffers.values()
    assert buf.numel() == largest
    assert scorer.score(CONVS) == first and next(iter(scratch.buffers.values())) is buf  # reused, not regrown


def test_triton_backend_needs_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pick_backend("triton", torch.device("cpu"))
    assert pick_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        pick_backend("marlin", torch.device("cpu"))


def dequantized_model(path):
    """The GPTQ checkpoint with every linear dequantized to fp32: the plain reference."""
    ckpt = Checkpoint(path)
    with torch.device("meta"):
        model = WorldPM(ckpt.config)
    model.load_state_dict({n: read_weight(ckpt, n).float() for n in ckpt.config.expected_shapes()}, assign=True)
    model.model.rotary_emb.to("cpu")
    return model.eval()


def test_quantized_checkpoints_load_packed_and_score_like_their_dequantized_weights(q_dirs, tokenizer):
    for path in q_dirs:
        scorer = Scorer.from_pretrained(path)
        mods = [m for m in scorer.model.modules() if isinstance(m, GPTQLinear)]
        assert len(mods) == 7 * SMALL.num_hidden_layers and mods[0].qweight.dtype == torch.int32
        assert not any(n.endswith("proj.weight") for n, _ in scorer.model.named_parameters())
        assert "torch reference" in scorer.backend
        ref = Scorer(dequantized_model(path), tokenizer)
        assert scorer.score(CONVS) == pytest.approx(ref.score(CONVS), abs=1e-4)


def test_triton_backend_scores_like_torch(q_dirs):
    torch_scorer = Scorer.from_pretrained(q_dirs[0], backend="torch")
    triton_scorer = Scorer.from_pretrained(q_dirs[0], backend="triton")  # TRITON_INTERPRET=1 on a CPU
    assert "Triton" in triton_scorer.backend and triton_scorer.model.tail_backend == "triton"
    assert triton_scorer.score(CONVS) == pytest.approx(torch_scorer.score(CONVS), abs=1e-4)


def test_norm_and_head_see_only_the_scoring_rows(small_dir):
    scorer = Scorer.from_pretrained(small_dir)
    model = scorer.model
    called = []
    for m in (model.model.norm, model.score, model.score[0], model.score[2]):
        m.register_forward_hook(lambda *a: called.append(1))
    ids = torch.tensor([[9707, 11, 1879, 0, 151643], [9707, 151643, 151643, 151643, 151643]])
    last = torch.tensor([4, 1])
    with torch.no_grad():
        got = model(ids, last)
        assert not called  # the tail uses the weights on the gathered rows, not the modules
        h = model.model.norm(model.hidden_states(ids))  # the unfused way: norm and head over every token
        want = model.score(h.float())[torch.arange(2), last, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_device_for_takes_the_longest_prefix():
    dm = {"": "cpu", "model.layers.1": "cuda:1", "model.layers.10": "cuda:2"}
    assert device_for("model.layers.1.mlp.up_proj.qweight", dm) == "cuda:1"
    assert device_for("model.layers.10.mlp.up_proj.qweight", dm) == "cuda:2"
    assert device_for("score.0.weight", dm) == "cpu"
    with pytest.raises(ValueError, match="no entry"):
        device_for("score.0.weight", {"model": "cpu"})


def test_parse_size():
    assert parse_size("24GiB") == 24 * GIB == parse_size("24 gib") == parse_size("24G")
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1.5GiB") == int(1.5 * GIB) and parse_size("512") == 512
    for bad in ("", "24 GBs", "-3GiB", "lots"):
        with pytest.raises(ValueError, match="expected a number with a unit"):
            parse_size(bad)


def auto_device_map(ckpt, dtype, gpus, tokens):
    return auto_placement(ckpt, dtype, gpu_capacity(gpus), tokens, offload=False).device_map


def _sizes(small_dir):
    """bf16 bytes of the small checkpoint: total, embeddings, norm + head, and the reserve for 64 tokens."""
    ckpt = Checkpoint(small_dir)
    shapes = ckpt.config.expected_shapes()
    total = 2 * sum(torch.Size(s).numel() for s in shapes.values())
    embed = 2 * SMALL.vocab_size * SMALL.hidden_size
    tail = 2 * sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith(("score", "model.norm")))
    return ckpt, total, embed, tail, activation_reserve(ckpt.config, 64, quantized=False)


def test_auto_device_map_when_everything_fits_on_gpu_0(small_dir):
    """accelerate answers {"": 0} here, which crashed the loader (KeyError 'score') on one GPU."""
    ckpt, total, *_, reserve = _sizes(small_dir)
    for gpus in ({0: reserve + 2 * total}, {0: reserve + 2 * total, 1: reserve + 2 * total}):
        dm = auto_device_map(ckpt, torch.bfloat16, gpus, 64)
        assert {device_for(name, dm) for name in ckpt.expected()} == {0}  # one GPU is enough: no needless split
        assert dm["score"] == dm["model.norm"] == dm["model.embed_tokens"] == 0


def test_auto_device_map_balances_two_gpus(small_dir):
    ckpt, total, embed, tail, reserve = _sizes(small_dir)
    cap = reserve + embed + int((total - embed) * 0.6)  # neither GPU holds everything
    dm = auto_device_map(ckpt, torch.bfloat16, {0: cap, "cuda:1": cap}, 64)
    assert {device_for(name, dm) for name in ckpt.expected()} == {0, 1}  # every tensor has a GPU
    assert dm["model.embed_tokens"] == 0 and dm["model.norm"] == dm["score"] == 1
    result = plan(SMALL, None, [cap, cap], 64)
    assert result.layers(0) + result.layers(1) == list(range(SMALL.num_hidden_layers))  # in order, all placed
    units = [size for _, size in placement_units(meta_model(SMALL, None))[0]]
    splits = [min(cap - reserve - sum(units[:k]), cap - reserve - sum(units[k:])) for k in range(1, len(units))]
    assert min(cap - result.weights(g) - reserve for g in (0, 1)) == max(splits)  # no split point does better


def test_auto_device_map_puts_only_the_tail_on_a_small_second_gpu(small_dir):
    ckpt, *_, reserve = _sizes(small_dir)
    units = [size for _, size in placement_units(meta_model(SMALL, None))[0]]
    head, tail = sum(units[:-1]), units[-1]  # everything up to the last layer; the final norm and the head
    dm = auto_device_map(ckpt, torch.bfloat16, {0: reserve + head, 1: reserve + tail + 1024}, 64)
    assert {n: device_for(n, dm) for n in ckpt.expected() if device_for(n, dm) == 1}.keys() == {
        n for n in ckpt.expected() if n.startswith(("model.norm", "score"))}
    with pytest.raises(ValueError, match="does not fit these GPUs"):
        auto_device_map(ckpt, torch.bfloat16, {0: reserve + head}, 64)


def test_devices_are_checked_before_anything_touches_them(small_dir, monkeypatch, capsys):
    with pytest.raises(ValueError, match="max_memory"):
        Scorer.from_pretrained(small_dir, device="cpu", max_memory={0: "1GiB"})
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="expected auto"):
            check_device(bad)
    assert check_device("auto") == ("auto" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        Scorer.from_pretrained(small_dir, device="cuda:0")
    # one visible GPU, as on the H200 where cuda:3 gave a raw "invalid device ordinal" traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3': this machine has 1 visible GPU \(cuda:0\)"):
        Scorer.from_pretrained(small_dir, device="cuda:3")
    with pytest.raises(ValueError, match="GPU 1 is not visible"):
        Scorer.from_pretrained(small_dir, device="auto", max_memory={0: "1GiB", 1: "1GiB"})
    src = small_dir.parent / "one.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    assert main(["score", "--model", str(small_dir), "--input", str(src), "--device", "cuda:3"]) == 2
    err = capsys.readouterr().err
    assert "worldpm-lite: error: device 'cuda:3': this machine has 1 visible GPU" in err and "Traceback" not in err


def test_plan_worldpm_72b_fits_two_24gb_gpus_only_at_4_bits(capsys):
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB,24GiB"]) == 0
    out = capsys.readouterr().out
    # balanced: 37 + 43 layers, 2.49 and 2.14 GiB headroom (accelerate's greedy fill: 41 + 39, 0.79 and 3.84)
    assert "GPTQ 4-bit" in out and "fits: 2 GPU(s), smallest headroom 2.14 GiB" in out
    assert "| 0 | 24.0 GiB | 0-36 (37) + embed_tokens |" in out and "| 1 | 24.0 GiB | 37-79 (43) + norm, score |" in out
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB,24GiB", "--bits", "8", "--host-memory",
                 "16GiB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "4x24GiB" in out and "--bits 4" in out
    p = plan(plan_config(), None, [80 * GIB, 80 * GIB], 8192)  # bf16 on 2 x 80 GB, as WorldPM's README says
    assert p.fits and p.layers(0) and p.layers(1)
    assert not plan(plan_config(), None, [24 * GIB, 24 * GIB], 8192).fits


def plan_config():
    from worldpm_lite.plan import WORLDPM_72B

    return WORLDPM_72B


def test_plan_reads_a_checkpoint_and_checks_its_arguments(q_dirs, capsys):
    assert main(["plan", "--model", str(q_dirs[0]), "--gpus", "2GiB"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ 4-bit, group 128" in out and "| 0 | 2.0 GiB | 0-1 (2) + " in out
    assert main(["plan", "--model", str(q_dirs[0]), "--gpus", "24 bananas"]) == 2
    assert "--gpus: memory size '24 bananas'" in capsys.readouterr().err
    assert main(["plan", "--model", str(q_dirs[0]) + "-missing", "--gpus", "1GiB"]) == 2


def test_bitsandbytes_baselines_quantize_a_bf16_checkpoint_while_loading(small_dir, q_dirs, tmp_path, capsys):
    import bitsandbytes as bnb

    ref = Scorer.from_pretrained(small_dir).score(CONVS)
    for quant, module, tol in (("bnb-int8", bnb.nn.Linear8bitLt, 0.05), ("bnb-nf4", bnb.nn.Linear4bit, 0.3)):
        scorer = Scorer.from_pretrained(small_dir, quant=quant)
        assert sum(isinstance(m, module) for m in scorer.model.modules()) == 7 * SMALL.num_hidden_layers
        assert "bitsandbytes" in scorer.backend
        got = scorer.score(CONVS)
        assert got != ref and got == pytest.approx(ref, abs=tol)
    with pytest.raises(ValueError, match="already GPTQ"):
        Scorer.from_pretrained(q_dirs[0], quant="bnb-nf4")
    with pytest.raises(ValueError, match="quant: expected"):
        Scorer.from_pretrained(small_dir, quant="awq")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "no"}\n')
    assert main(["score", "--model", str(small_dir), "--input", str(src), "--quant", "bnb-nf4"]) == 0
    captured = capsys.readouterr()
    assert "backend: bitsandbytes Linear4bit" in captured.err and '"chosen_score"' in captured.out


def test_bf16_loading_keeps_rope_frequencies_in_fp32(small_dir):
    model = Scorer.from_pretrained(small_dir, dtype="bfloat16").model
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # bf16 would shift angles at long positions
    assert model.score[0].weight.dtype == model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
