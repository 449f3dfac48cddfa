"""`worldpm-lite score --ray` and worldpm_lite.ray on a local Ray cluster (2 CPUs) with the small
model: the same results as single-process `score`, in JSONL and Parquet; a killed driver resumes
without scoring again what its manifest held; a worker that dies mid-job is restarted without
losing or repeating a row; one large file spreads into blocks; bad rows and changed inputs are
named before any scoring."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import wait_for

from worldpm_lite.cli import main
from worldpm_lite.ray import ScoreBatch, ScoreParts, check_block, plan_blocks, score_dataset
from worldpm_lite.scorer import Scorer
from worldpm_lite.stream import score_file, score_settings

WORDS = "sleep tea walk early screen light dark cool room habit week rest quiet mind body read".split()


@pytest.fixture(scope="module")
def requests():
    rng = random.Random(5)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    out = []
    for i in range(60):
        kind = i % 3
        if kind == 0:
            out.append({"id": f"r{i}", "messages": [{"role": "user", "content": text(1, 8)},
                                                    {"role": "assistant", "content": text(1, 30)}]})
        elif kind == 1:
            out.append({"id": f"r{i}", "prompt": text(1, 8), "chosen": text(1, 20), "rejected": text(1, 20)})
        else:
            out.append({"id": f"r{i}", "prompt": text(1, 8), "responses": [text(1, 15) for _ in range(3)]})
    return out


@pytest.fixture(scope="module")
def single(small_dir, requests, tmp_path_factory):
    """`score`'s output (one process) for the same lines: the reference bytes."""
    d = tmp_path_factory.mktemp("ray")
    src = d / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    scorer = Scorer.from_pretrained(small_dir, device="cpu")
    score_file(scorer, str(src), str(d / "single.jsonl"), score_settings(scorer, small_dir), progress=False,
               log=lambda m: None)
    return src, (d / "single.jsonl").read_bytes()


CPU = {"device": "cpu", "threads": 1}
DRIVER = """
import json, os, sys, threading
from pathlib import Path
import ray
from worldpm_lite.ray import ScoreParts, score_dataset

address, src, out, model, log = sys.argv[1:]


class Stalls(ScoreParts):
    # scores blocks until the manifest lists three parts; then each worker says so and waits for ever
    def score_block(self, block):
        if len(json.loads((Path(out) / "manifest.json").read_text())["parts"]) >= 3:
            with open(log, "a") as f:
                f.write(json.dumps({"stalled": block["block"], "pid": os.getpid()}) + "\\n")
            threading.Event().wait()
        result = super().score_block(block)
        with open(log, "a") as f:
            f.write(json.dumps({"block": block["block"], "batches": result["batches"]}) + "\\n")
        return result


ray.init(address=address, log_to_driver=False, configure_logging=False)
score_dataset(src, out + "/", model, workers=2, block_rows=6, scorer_args={"device": "cpu", "threads": 1},
              udf=Stalls)
"""


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_driver_resumes_without_scoring_again_what_the_manifest_held(ray_cluster, small_dir, single,
                                                                              tmp_path):
    import ray

    src, want = tmp_path / "in.jsonl", single[1]
    shutil.copy(single[0], src)
    out, log = tmp_path / "out", tmp_path / "scored.jsonl"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address, str(src), str(out),
                               str(small_dir), str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # both workers had a block of the one input file, and wait: the driver dies mid-run
        wait_for("both workers to stall", lambda: driver.poll() is not None
                 or len([e for e in read_log(log) if "stalled" in e]) == 2)
        assert driver.poll() is None, driver.stderr.read()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert len({e["pid"] for e in read_log(log) if "stalled" in e}) == 2  # the one file spread over both workers
    first = [e for e in read_log(log) if "block" in e]
    held = {int(k) for k in json.loads((out / "manifest.json").read_text())["parts"]}
    blocks = json.loads((out / "plan.json").read_text())["blocks"]
    assert 3 <= len(held) < len(blocks) and held <= {e["block"] for e in first}

    class Logs(ScoreParts):  # defined here, so Ray ships it (and the log's path) by value
        def score_block(self, block):
            result = super().score_block(block)
            with open(log, "a") as f:
                f.write(json.dumps({"block": block["block"], "batches": result["batches"], "resumed": 1}) + "\n")
            return result

    lines = []
    assert score_dataset(str(src), str(out), str(small_dir), workers=1, resume=True, scorer_args=CPU,
                         log=lines.append, udf=Logs) == 60
    assert any(f"{len(held)} of {len(blocks)} parts" in m for m in lines)
    second = [e for e in read_log(log) if e.get("resumed")]
    assert sorted(e["block"] for e in second) == sorted(set(range(len(blocks))) - held)  # nothing the manifest held
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 60
    names = [manifest["parts"][str(b["block"])]["part"] for b in blocks]
    assert names == sorted(p.name for p in out.glob("part-*")) and not list(out.glob(".*.tmp"))
    assert b"".join((out / n).read_bytes() for n in names) == want  # byte-identical to single-process score
    print(f"batches: {sum(e['batches'] for e in first)} before the kill, {sum(e['batches'] for e in second)} after "
          f"({len(held)} of {len(blocks)} parts held)")

    # what --resume refuses, before any scoring
    with pytest.raises(ValueError, match=r"other settings \(token_budget"):
        score_dataset(str(src), str(out), str(small_dir), 2, resume=True, scorer_args=CPU | {"token_budget": 64},
                      log=lambda m: None)
    with pytest.raises(FileExistsError, match="already complete"):
        score_dataset(str(src), str(out), str(small_dir), 2, scorer_args=CPU, log=lambda m: None)
    text = src.read_bytes()
    src.write_bytes(text.replace(b"sleep", b"sleeq", 1))  # same size, newer time, other content
    with pytest.raises(ValueError, match=r"in.jsonl: its content changed since the .+ \(block 0, lines 1-\d+\)"):
        score_dataset(str(src), str(out), str(small_dir), 2, resume=True, scorer_args=CPU, log=lambda m: None)
    src.write_bytes(text + text[:text.index(b"\n") + 1])
    with pytest.raises(ValueError, match=r"in.jsonl: changed since the interrupted run \(\d+ bytes then"):
        score_dataset(str(src), str(out), str(small_dir), 2, resume=True, scorer_args=CPU, log=lambda m: None)


def test_parquet_in_and_out_and_a_worker_that_dies_mid_job(ray_cluster, small_dir, requests, single, tmp_path):
    """A worker dies mid-job: Ray restarts it and runs its block again; no row is lost or repeated."""
    src, marker = tmp_path / "in.parquet", tmp_path / "died"
    keys = ("id", "messages", "prompt", "chosen", "rejected", "responses")  # a column per field, null where unused
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in requests]), src)  # one row group

    class DiesOnce(ScoreParts):  # defined here, so Ray ships it (and the marker's path) by value
        calls = 0

        def __call__(self, batch):
            DiesOnce.calls += 1
            if DiesOnce.calls == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the whole actor process, mid-job
            return super().__call__(batch)

    score_dataset(str(src), str(tmp_path / "out.parquet"), str(small_dir), workers=2, block_rows=8,
                  scorer_args=CPU, log=lambda m: None, udf=DiesOnce)
    assert marker.exists()  # it did die
    got = pq.read_table(tmp_path / "out.parquet").to_pylist()
    want = [json.loads(line) for line in single[1].decode().splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if v is not None} == {k: str(v) if k == "preferred" else v
                                                                    for k, v in w.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["died", "in.parquet", "out.parquet"]  # no parts, no partial


def test_one_large_file_spreads_into_blocks_that_cover_every_row_once(requests, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + ("\n\n" if i == 7 else "\n") for i, r in enumerate(requests)))
    blocks = plan_blocks([src], 6)
    assert len(blocks) >= 8 and blocks[0]["start"] == 0 and blocks[-1]["end"] == src.stat().st_size
    assert all(a["end"] == b["start"] for a, b in zip(blocks, blocks[1:]))
    assert sum(check_block(b)["rows"] for b in blocks) == 60 and sum(check_block(b)["lines"] for b in blocks) == 61
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "prompt": r.get("prompt")} for r in requests]),
                   tmp_path / "in.parquet", row_group_size=25)
    blocks = plan_blocks([tmp_path / "in.parquet"], 10)
    assert [(b["group"], b["offset"], b["length"], b["row"]) for b in blocks] == [
        (0, 0, 10, 0), (0, 10, 10, 10), (0, 20, 5, 20), (1, 0, 10, 25), (1, 10, 10, 35), (1, 20, 5, 45),
        (2, 0, 10, 50)]


def test_score_batch_scores_rows_as_score_does(small_dir, single):
    src, want = single
    rows = src.read_text().splitlines()
    out = ScoreBatch(str(small_dir), **CPU)(pa.table({"text": rows}))
    assert "".join(r + "\n" for r in out["result"]).encode() == want


def test_bad_rows_and_options_are_clear_errors(ray_cluster, small_dir, requests, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(requests[0]) + "\n" + '{"id": 1, "messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(bad), "--output",
                 str(tmp_path / "o.jsonl"), "--device", "cpu", "--block-rows", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: messages: the last message must be the assistant's reply" in err
    rows = [{"id": r["id"], "prompt": r.get("prompt"), "chosen": r.get("chosen"), "rejected": r.get("rejected")}
            for r in requests if "chosen" in r]
    rows[12]["rejected"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet", row_group_size=5)
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(tmp_path / "bad.parquet"), "--output",
                 f"{tmp_path}/p/", "--device", "cpu", "--block-rows", "2"]) == 2
    assert "bad.parquet: row 13: has a pair without 'rejected'" in capsys.readouterr().err
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(bad), "--output",
                 str(tmp_path / "o.csv")]) == 2
    assert "expected a .jsonl or .parquet file name, or a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.parquet"]  # nothing half-written
