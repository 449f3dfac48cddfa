"""bench/gpu_all.py --smoke: every GPU check's logic runs on the CPU (tiny shapes, the kernels in Triton's
interpreter), each in its own subprocess, each record kept as it finishes; a second call skips what this
card and code measured; a check past its limit is recorded as a timeout, the others still run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("kernels", "tail", "w4a16", "model80", "gpu0_share", "h2d", "streamed", "cuda1", "gptq_layer", "tf32")


def gpu_all(out, *args):
    res = subprocess.run([sys.executable, "bench/gpu_all.py", "--smoke", "--out", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True)
    return res, json.loads(out.read_text()) if out.exists() else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_all") / "gpu_all-smoke.json"
    return out, *gpu_all(out)


def test_every_check_runs_its_logic_on_the_cpu(smoke):
    out, res, records = smoke
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["check"] for r in records] == list(CHECKS)
    assert all(r["status"] == "ok" and r["card"] == "cpu (interpreter)" and r["smoke"] for r in records)
    assert all(r["failures"] == [] for r in records)  # every correctness check holds
    kernels = next(r for r in records if r["check"] == "kernels")["result"]["gptq_block"]
    assert set(kernels["levels_differing"].values()) == {0}
    targets = {t["target"] for r in records for t in r["targets"]}
    assert "shared prompts vs each answer alone, GRPO-shaped" in targets
    assert "streamed: host syncs per batch (reading the scores is one)" in targets
    assert "gpu_all on cpu (interpreter)" in res.stdout and "PASS" in res.stdout


def test_a_second_call_skips_what_is_measured_and_a_timeout_is_kept(smoke, tmp_path):
    out, _, records = smoke
    again = tmp_path / "again.json"
    again.write_text(out.read_text())
    res, after = gpu_all(again)
    assert res.returncode == 0 and after == records  # nothing measured twice, nothing added
    assert res.stdout.count("measured already") == len(CHECKS)
    res, after = gpu_all(again, "--only", "tf32,h2d", "--again", "--limit-s", "1")
    assert res.returncode == 1
    assert [(r["check"], r["status"]) for r in after[len(records):]] == [("tf32", "timeout"), ("h2d", "timeout")]
    res, after = gpu_all(again, "--only", "h2d", "--again", "--budget-s", "5")  # too little time left to start
    assert res.returncode == 1 and after[-1]["status"] == "not run"
