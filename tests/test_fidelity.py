"""`worldpm-lite fidelity`: the metrics, the report, bad input, and the CI fidelity gates."""

import json
import shutil

import numpy as np
import pytest

from worldpm_lite.cli import main
from worldpm_lite.data import parse_request
from worldpm_lite.fidelity import Candidate, compare, compared_pairs
from worldpm_lite.tiny import tiny_quantized_dir


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


def test_fidelity_gates_on_the_small_model(tmp_path, tiny_dir, heldout_file):
    """The CI gates: 8-bit GPTQ agreement >= 99.5% and Spearman >= 0.995; 4-bit GPTQ >= 97% and
    >= 0.98; 4-bit GPTQ's mean absolute error below 4-bit RTN's."""
    cands = {"gptq8": tiny_quantized_dir(8), "gptq4": tiny_quantized_dir(4),
             "rtn4": tiny_quantized_dir(4, method="rtn")}
    out = tmp_path / "gates"
    candidates = [a for d in cands.values() for a in ("--candidate", str(d))]
    assert main(["fidelity", "--reference", str(tiny_dir), *candidates, "--data", str(heldout_file),
                 "--report", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    m = dict(zip(cands, (c["metrics"] for c in report["candidates"])))
    assert report["pairs"] >= 490 and report["reference_label_accuracy"] > 0.7  # the instrument has resolution
    assert m["gptq8"]["pairwise_agreement"] >= 0.995 and m["gptq8"]["spearman"] >= 0.995
    assert m["gptq4"]["pairwise_agreement"] >= 0.97 and m["gptq4"]["spearman"] >= 0.98
    assert m["gptq4"]["mean_abs_error"] < m["rtn4"]["mean_abs_error"]
    assert m["gptq8"]["mean_abs_error"] < m["gptq4"]["mean_abs_error"]
