"""`worldpm-lite score --ray` and worldpm_lite.ray on a local Ray cluster (2 CPUs) with the small
model: the same results as single-process `score`, in JSONL and Parquet, and a worker that dies
mid-job is restarted without losing or repeating a row."""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worldpm_lite.cli import main
from worldpm_lite.ray import ScoreBatch, score_dataset
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


def test_two_workers_write_exactly_what_one_process_does(ray_cluster, small_dir, single, tmp_path):
    src, want = single
    n = score_dataset(str(src), str(tmp_path / "out.jsonl"), str(small_dir), workers=2, batch_rows=7,
                      scorer_args={"device": "cpu", "threads": 1}, log=lambda m: None)
    assert n == 60 and (tmp_path / "out.jsonl").read_bytes() == want
    assert not list(tmp_path.glob(".*partial"))


def test_parquet_in_and_out_keep_ids_and_scores(ray_cluster, small_dir, requests, single, tmp_path):
    src = tmp_path / "in.parquet"
    keys = ("id", "messages", "prompt", "chosen", "rejected", "responses")  # a column per field, null where unused
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in requests]), src)
    score_dataset(str(src), str(tmp_path / "out.parquet"), str(small_dir), workers=2, batch_rows=16,
                  scorer_args={"device": "cpu", "threads": 1}, log=lambda m: None)
    got = pq.read_table(tmp_path / "out.parquet").to_pylist()
    want = [json.loads(line) for line in single[1].decode().splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if v is not None} == {k: str(v) if k == "preferred" else v
                                                                    for k, v in w.items()}


def test_a_worker_that_dies_mid_job_is_restarted_and_no_row_is_lost_or_repeated(ray_cluster, small_dir, single,
                                                                                  tmp_path):
    marker = tmp_path / "died"

    class DiesOnce(ScoreBatch):  # defined here, so Ray ships it (and the marker's path) by value
        calls = 0

        def __call__(self, batch):
            DiesOnce.calls += 1
            if DiesOnce.calls == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the whole actor process, mid-job
            return super().__call__(batch)

    src, want = single
    score_dataset(str(src), str(tmp_path / "out.jsonl"), str(small_dir), workers=2, batch_rows=5,
                  scorer_args={"device": "cpu", "threads": 1}, log=lambda m: None, udf=DiesOnce)
    assert marker.exists()  # it did die
    assert (tmp_path / "out.jsonl").read_bytes() == want


def test_bad_rows_and_options_are_clear_errors(ray_cluster, small_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(bad), "--output",
                 str(tmp_path / "o.jsonl"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the row with id 1: messages: the last message must be the assistant's reply" in err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(bad), "--output",
                 str(tmp_path / "o.csv")]) == 2
    assert "expected a .jsonl or .parquet file name" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial"))
