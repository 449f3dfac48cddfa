"""`worldpm-lite fidelity`: the metrics, the report, bad input, and the CI fidelity gates."""

import json
import shutil

import numpy as np
import pytest

from worldpm_lite.cli import main
from worldpm_lite.data import parse_request
from worldpm_lite.fidelity import Candidate, compare, compared_pairs, flat_scores
from worldpm_lite.instrument import (
    GATES_4BIT,
    GATES_8BIT,
    dense_variant,
    gate_failures,
    layer_errors,
    layer_gate_failures,
    permuted_hessian,
)
from worldpm_lite.quantize.calibration import builtin_calibration
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import TINY_QUANT, cached_variant, tiny_quantized_dir

LAYER_PAIRS = 100  # held-out pairs (200 conversations) for the per-layer errors


def req(obj):
    return parse_request(obj)


PAIR = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
RANK = {"prompt": "Q", "responses": ["a", "b", "c", "d"]}


def test_metrics_on_known_scores():
    requests = [req(PAIR), req(PAIR), req(RANK)]  # conversations 0-1, 2-3, 4-7
    ref = np.array([2.0, 1.0, 0.0, 1.0, 4.0, 3.0, 2.0, 1.0])
    m = compare(ref, 2 * ref + 1, requests, margin=0.5)
    assert m["pairs"] == 2 + 6 and m["pairwise_agreement"] == 1.0 and m["spearman"] == pytest.approx(1.0)
    assert m["fit_scale"] == pytest.approx(2.0) and m["fit_offset"] == pytest.approx(1.0)
    assert m["label_pairs"] == 2 and m["label_accuracy"] == 0.5 and m["kendall_tau_per_prompt"] == pytest.approx(1.0)
    assert m["max_abs_error"] == pytest.approx(5.0) and m["mean_abs_error"] == pytest.approx(np.mean(ref + 1))
    flipped = compare(ref, -ref, requests, margin=0.5)
    assert flipped["pairwise_agreement"] == 0.0 and flipped["kendall_tau_per_prompt"] == pytest.approx(-1.0)
    # one pair swapped in the ranking: 5 of 6 ranking pairs and both labelled pairs still agree
    swapped = ref.copy()
    swapped[[6, 7]] = swapped[[7, 6]]
    m = compare(ref, swapped, requests, margin=1.5)
    assert m["pairwise_agreement"] == pytest.approx(7 / 8)
    assert m["pairs_above_margin"] == 3 and m["pairwise_agreement_above_margin"] == 1.0  # the swap had margin 1


def test_single_conversations_are_compared_all_against_all():
    requests = [req({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": str(i)}]})
                for i in range(5)]
    assert len(compared_pairs(requests)) == 10
    ref = np.arange(5.0)
    assert compare(ref, ref ** 3, requests, margin=0.0)["pairwise_agreement"] == 1.0
    m = compare(ref, np.zeros(5), requests, margin=0.0)
    assert m["pairwise_agreement"] == 0.0 and m["spearman"] is None  # a constant candidate has no rank correlation


def test_candidate_syntax():
    assert Candidate.parse("models/a") == Candidate("models/a")
    assert Candidate.parse("bnb-nf4:models/a") == Candidate("models/a", "bnb-nf4")
    assert Candidate.parse("bnb-int8:/x/b").label == "b (bnb-int8)"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "data.jsonl"
    lines = [{"prompt": "Tips for better sleep?", "chosen": "Keep a fixed schedule and a dark room.",
              "rejected": "idk lol"},
             {"prompt": "2+2?", "chosen": "4.", "rejected": "5, probably."},
             {"prompt": "Name a fruit.", "responses": ["Apple.", "A car.", "Banana, a yellow fruit.", "no"]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_report_files_and_refusals(tmp_path, small_dir, data_file, capsys):
    out = tmp_path / "report"
    args = ["fidelity", "--reference", str(small_dir), "--candidate", f"bnb-int8:{small_dir}",
            "--data", str(data_file), "--report", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conversations"] == 8 and report["pairs"] == 8 and report["label_pairs"] == 2
    m = report["candidates"][0]["metrics"]
    assert report["candidates"][0]["quant"] == "bnb-int8" and 0 < m["mean_abs_error"] < 0.05
    assert "| pairwise agreement |" in (out / "report.md").read_text()
    for png in ("scatter.png", "errors.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pairwise agreement" not in capsys.readouterr().err
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # no silent overwrite
    assert main(args + ["--overwrite"]) == 0
    other = tmp_path / "other"
    shutil.copytree(small_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg | {"model_max_length": 7}))
    assert main(["fidelity", "--reference", str(small_dir), "--candidate", str(other), "--data", str(data_file),
                 "--report", str(tmp_path / "r2")]) == 2
    assert "tokenizer_config.json differs" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "Q", "chosen": "a"}\n')
    assert main(["fidelity", "--reference", str(small_dir), "--candidate", str(small_dir), "--data", str(bad),
                 "--report", str(tmp_path / "r3")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["fidelity", "--reference", str(small_dir), "--candidate", str(tmp_path / "nope"), "--data",
                 str(data_file), "--report", str(tmp_path / "r4")]) == 2


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory, tiny_heldout):
    """The small model's 500 held-out pairs from real ShareGPT conversations, as a fidelity data file."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in tiny_heldout))
    return path


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return Scorer.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def layer_seqs(tiny_heldout):
    """The conversations of the first LAYER_PAIRS held-out pairs: the per-layer errors' data."""
    return [ids for p in tiny_heldout[:LAYER_PAIRS] for ids in (p.chosen_ids, p.rejected_ids)]


@pytest.fixture(scope="module")
def rtn4_layers(reference, layer_seqs):
    """4-bit round-to-nearest's held-out error per layer (the `quantize --method rtn` checkpoint):
    what GPTQ must halve, and what the negative controls must not."""
    return layer_errors(reference.model, Scorer.from_pretrained(tiny_quantized_dir(4, method="rtn"),
                                                                device="cpu").model, layer_seqs)


CANDIDATES = {"gptq8": (8, "gptq"), "gptq4": (4, "gptq"), "rtn4": (4, "rtn")}


@pytest.fixture(scope="module")
def gates_report(tmp_path_factory, tiny_dir, heldout_file):
    """`worldpm-lite fidelity` of the real `quantize` outputs against the bf16 model on its 500
    held-out pairs: the report folder (report.json, scores-0.jsonl of the reference, ...)."""
    out = tmp_path_factory.mktemp("gates") / "report"
    candidates = [a for bits, method in CANDIDATES.values()
                  for a in ("--candidate", str(tiny_quantized_dir(bits, method=method)))]
    assert main(["fidelity", "--reference", str(tiny_dir), *candidates, "--data", str(heldout_file),
                 "--report", str(out)]) == 0
    return out


def test_fidelity_gates_on_the_small_model(gates_report, tiny_dir, reference, layer_seqs, rtn4_layers, ci_notes):
    """The CI gates (worldpm_lite/instrument.py) on the real `quantize` output: 8-bit and 4-bit GPTQ
    against the bf16 model on its 500 held-out pairs, and GPTQ's held-out error per layer against
    round-to-nearest's at 4 bits."""
    out, cands = gates_report, {k: tiny_quantized_dir(bits, method=method) for k, (bits, method) in CANDIDATES.items()}
    report = json.loads((out / "report.json").read_text())
    m = dict(zip(cands, (c["metrics"] for c in report["candidates"])))
    assert report["pairs"] >= 490 and report["reference_label_accuracy"] >= 0.74  # the instrument has resolution
    layers = {"gptq4": layer_errors(reference.model, Scorer.from_pretrained(cands["gptq4"], device="cpu").model,
                                    layer_seqs), "rtn4": rtn4_layers}
    ci_notes.append(f"gates on {tiny_dir.name}: reference label accuracy {report['reference_label_accuracy']:.3f}, "
                    f"score std {m['gptq4']['reference_std']:.3f}")
    for k in cands:
        ci_notes.append(f"  {k}: " + ", ".join(f"{key} {m[k][key]:.5f}" for key in {**GATES_8BIT, **GATES_4BIT}))
    for k, errors in layers.items():
        ci_notes.append(f"  {k} held-out layer errors: " + ", ".join(f"{e:.2e}" for e in errors))
    assert gate_failures(m["gptq8"], GATES_8BIT) == []
    assert gate_failures(m["gptq4"], GATES_4BIT) == []
    assert layer_gate_failures(layers["gptq4"], layers["rtn4"]) == []


def test_gates_fail_a_clearly_worse_quantizer(tiny_dir, tiny_heldout, reference, layer_seqs, rtn4_layers,
                                              gates_report, ci_notes):
    """Negative controls through the same gates: 3-bit round-to-nearest, and 4-bit GPTQ fed a
    permuted Hessian (the true one's spectrum, the wrong correlations). A gate that can no longer
    fail them measures nothing."""
    calibration = builtin_calibration(reference.tokenizer, **TINY_QUANT)
    requests = [parse_request({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) for p in tiny_heldout]
    seqs = [ids for p in tiny_heldout for ids in (p.chosen_ids, p.rejected_ids)]
    ref = flat_scores(gates_report / "scores-0.jsonl")  # the reference's scores of the same 1,000 conversations
    controls = {"rtn3": dict(bits=3, method="rtn"), "gptq4-permuted-hessian": dict(bits=4,
                                                                                 hessian_transform=permuted_hessian()),
                "rtn8": dict(bits=8, method="rtn")}
    metrics, caught = {}, {}
    for name, args in controls.items():
        path = cached_variant(tiny_dir, f"control-{name}",
                              lambda out, args=args: dense_variant(tiny_dir, out, calibration, **args))
        model = Scorer.from_pretrained(path, device="cpu")
        metrics[name] = compare(ref, np.array(model.score_ids(seqs)), requests, margin=0.5)
        if name != "rtn8":  # rtn8 is the positive control of the score gates only
            caught[name] = (gate_failures(metrics[name], GATES_8BIT),
                            layer_gate_failures(layer_errors(reference.model, model.model, layer_seqs), rtn4_layers))
    for name, (as_8bit, as_gptq) in caught.items():
        ci_notes.append(f"  control {name}: fails " + "; ".join(as_8bit + as_gptq))
        assert as_gptq, f"{name} passes the GPTQ-vs-RTN layer gate"  # measured 4.7-5.0x and 1.16-1.39x RTN's error
    assert caught["rtn3"][0], "3-bit rounding passes the 8-bit gates"  # max error 0.14-0.35 score std
    # The instrument is not on a knife's edge: plain 8-bit rounding moves no score by more than a
    # twentieth of the spread (recipe 2's model moved one by 0.6 of it: one-hot attention).
    ci_notes.append(f"  rtn8 max error {metrics['rtn8']['max_abs_error_over_std']:.4f} of the score std")
    assert gate_failures(metrics["rtn8"], GATES_8BIT) == []
