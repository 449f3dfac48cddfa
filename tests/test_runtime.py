"""The quantized runtime: GPTQLinear backends, the loader, the tail, device plans."""

import pytest
import torch
from helpers import SMALL
from worldpm_lite.quantize.pack import dequantize_packed, pack

from worldpm_lite.checkpoint import Checkpoint, GPTQSpec
from worldpm_lite.cli import main
from worldpm_lite.model import WorldPM, device_for, read_weight
from worldpm_lite.plan import GIB, activation_reserve, auto_device_map, parse_size, plan
from worldpm_lite.qlinear import GPTQLinear, pick_backend
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
    for backend in ("torch", "triton"):
        lin, w = random_gptq_linear(96, 48, bits, backend, seed=bits)
        for M in (1, 3, lin.fused_max_tokens + 5):  # the fused kernel, then dequantize + GEMM
            x = torch.randn(2, M, 96)
            torch.testing.assert_close(lin(x), x @ w.T + lin.bias, rtol=1e-4, atol=1e-4)


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


def test_auto_device_map_splits_whole_layers_and_refuses_what_does_not_fit(small_dir):
    ckpt = Checkpoint(small_dir)
    total = 2 * sum(torch.Size(s).numel() for s in ckpt.config.expected_shapes().values())  # bf16 bytes
    reserve = activation_reserve(ckpt.config, 64, quantized=False)
    embed = 2 * SMALL.vocab_size * SMALL.hidden_size
    half = reserve + embed + int((total - embed) * 0.6)  # the embedding and about half the layers
    dm = auto_device_map(ckpt, torch.bfloat16, {0: half, "cuda:1": half}, 64)
    assert set(dm.values()) == {0, 1} and dm["model.norm"] == dm["score"]
    assert {device_for(name, dm) for name in ckpt.expected()} == {0, 1}  # every tensor has a GPU
    with pytest.raises(ValueError, match="does not fit these GPUs"):
        auto_device_map(ckpt, torch.bfloat16, {0: half}, 64)
    with pytest.raises(ValueError, match="max_memory"):
        Scorer.from_pretrained(small_dir, device="cpu", max_memory={0: "1GiB"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            Scorer.from_pretrained(small_dir, device="cuda:0")


def test_plan_worldpm_72b_fits_two_24gb_gpus_only_at_4_bits(capsys):
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB,24GiB"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ 4-bit" in out and "fits: 2 GPU(s)" in out and "| 1 | 24.0 GiB | 41-79" in out
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB,24GiB", "--bits", "8"]) == 1
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
