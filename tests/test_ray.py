"""`worldpm-lite score --ray` and worldpm_lite.ray on a local Ray cluster (2 CPUs) with the small
model: the same results as single-process `score`, in JSONL and Parquet; a killed driver resumes
without scoring again what its manifest held; a worker that dies mid-job is replaced without
losing or repeating a row; a block that kills its worker on every try is recorded as failed while
the others finish, and --resume after the fix scores only it; one large file spreads into blocks;
bad rows, changed inputs and replaced weights are named before any scoring; the manifest survives a
torn last line; a run is complete only when every block has its part."""

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

from worldpm_lite.blocks import Manifest, check_block, check_complete, plan_blocks
from worldpm_lite.cli import main
from worldpm_lite.ray import ScoreBatch, ScoreParts, score_dataset
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
        if (Path(out) / "manifest.jsonl").read_text().count('{"part": ') >= 3:
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


def records(out) -> list[dict]:
    return read_log(out / "manifest.jsonl")


@pytest.fixture
def model_copy(small_dir, tmp_path):
    """The small model in a folder of this test's own, whose weights it may touch."""
    return shutil.copytree(small_dir, tmp_path / "model")


def test_a_killed_driver_resumes_without_scoring_again_what_the_manifest_held(ray_cluster, model_copy, single,
                                                                              tmp_path):
    import ray

    src, want, small_dir = tmp_path / "in.jsonl", single[1], model_copy
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
    held = {r["part"] for r in records(out) if "part" in r}
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
    done = {r["part"]: r for r in records(out) if "part" in r}
    assert records(out)[-1] == {"complete": 60} and len(done) == len(blocks)
    names = [done[b["block"]]["name"] for b in blocks]
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
    src.write_bytes(text)
    shard = small_dir / "model-00002-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(ValueError, match=rf"its weights changed since the interrupted run: {shard} \(size \d+ -> "):
        score_dataset(str(src), str(out), str(small_dir), 2, resume=True, scorer_args=CPU, log=lambda m: None)


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


def test_parquet_a_worker_that_dies_once_and_a_block_that_kills_its_worker_every_try(ray_cluster, small_dir,
                                                                                    requests, single, tmp_path):
    """Parquet in and out. One worker dies mid-job once: its block is scored again on a fresh worker, no row
    lost or repeated. The conversation in row 21 turns into a worker exit on every try (as a host OOM or a
    fatal CUDA error would): its block is recorded as failed, the other blocks finish, the run says which
    block failed, and --resume after the fix scores only it."""
    src, marker, log = tmp_path / "in.parquet", tmp_path / "died", tmp_path / "scored.jsonl"
    keys = ("id", "messages", "prompt", "chosen", "rejected", "responses")  # a column per field, null where unused
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in requests]), src)  # one row group

    class Poisoned(ScoreParts):  # defined here, so Ray ships it (and the paths) by value
        calls = 0

        def score_block(self, block):
            Poisoned.calls += 1
            if block["first_row"] <= 20 < block["first_row"] + block["rows"] or (
                    Poisoned.calls == 2 and not marker.exists()):
                with open(log, "a") as f:
                    f.write(json.dumps({"died": block["block"], "pid": os.getpid()}) + "\n")
                marker.touch()
                os._exit(1)  # the whole actor process, mid-job
            return super().score_block(block)

    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=r"1 of 8 blocks failed") as failure:
        score_dataset(str(src), str(out), str(small_dir), workers=2, block_rows=8, scorer_args=CPU,
                      log=lambda m: None, udf=Poisoned, max_block_retries=1)
    deaths = read_log(log)
    assert len({d["pid"] for d in deaths}) == len(deaths) and [d["died"] for d in deaths].count(2) == 2
    assert len(deaths) == 3  # one block died once, then scored; block 2 (rows 17-24) on its first try and 1 more
    assert f"block 2: {src} rows 17-24 (2 tries): the worker died" in str(failure.value)
    assert "--resume" in str(failure.value)
    parts = out.with_name(".out.parquet.parts")
    failed = [r for r in records(parts) if "failed" in r]
    assert failed == [{"failed": 2, "file": str(src), "where": "rows 17-24", "attempts": 2,
                       "error": failed[0]["error"]}] and failed[0]["error"].startswith("the worker died")
    assert sorted(r["part"] for r in records(parts) if "part" in r) == [0, 1, 3, 4, 5, 6, 7]  # each once
    assert not out.exists() and not any("complete" in r for r in records(parts))

    class Logs(ScoreParts):  # the fix
        def score_block(self, block):
            with open(log, "a") as f:
                f.write(json.dumps({"resumed": block["block"]}) + "\n")
            return super().score_block(block)

    lines = []
    assert score_dataset(str(src), str(out), str(small_dir), workers=2, resume=True, scorer_args=CPU,
                         log=lines.append, udf=Logs) == 60  # one worker: one block to score
    assert [e["resumed"] for e in read_log(log) if "resumed" in e] == [2]  # only what was missing
    assert any("7 of 8 parts (52 rows) are done; scoring the other 1, 1 of them failed before" in m for m in lines)
    got = pq.read_table(out).to_pylist()
    want = [json.loads(line) for line in single[1].decode().splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if v is not None} == {k: str(v) if k == "preferred" else v
                                                                    for k, v in w.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["died", "in.parquet", "out.parquet", "scored.jsonl"]


def test_a_row_the_model_cannot_score_fails_its_block_at_once_and_the_command_lists_it(ray_cluster, small_dir,
                                                                                      requests, tmp_path, capsys):
    rows = [dict(r) for r in requests[:24]]
    rows[9] = {"id": "long", "messages": [{"role": "user", "content": " ".join(WORDS * 20)},
                                          {"role": "assistant", "content": "yes"}]}  # past the 96 positions
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["score", "--ray", "--model", str(small_dir), "--input", str(src), "--output", f"{out}/", "--device",
                 "cpu", "--block-rows", "8"]) == 2
    err = capsys.readouterr().err
    listed = [line for line in err.splitlines() if line.strip().startswith("block ")]
    assert len(listed) == 1 and f"{src} lines " in listed[0] and "(1 try)" in listed[0]
    assert f"{src}:10: conversation 0 has" in listed[0] and "the model reads at most 96" in listed[0]
    assert "1 of " in err and "Traceback" not in err
    done = [r for r in records(out) if "part" in r]
    assert len(done) == len(json.loads((out / "plan.json").read_text())["blocks"]) - 1


def test_the_manifest_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / "manifest.jsonl"
    m = Manifest(path)
    m.add({"part": 0, "name": "part-00000-rows-0-3.jsonl", "rows": 4})
    m.add({"failed": 1, "file": "in.jsonl", "where": "lines 5-8", "attempts": 4, "error": "the worker died"})
    m.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"part": 1, "name": "part-00001-ro')  # the driver killed mid-append
    m = Manifest(path)
    assert set(m.parts) == {0} and set(m.failed) == {1} and m.complete is None
    m.add({"part": 1, "name": "part-00001-rows-4-7.jsonl", "rows": 4})  # a failed block scored by --resume
    m.close()
    assert path.read_bytes().startswith(whole) and path.read_bytes().count(b"\n") == 3
    m = Manifest(path)
    assert set(m.parts) == {0, 1} and not m.failed
    m.close()
    path.write_bytes(path.read_bytes().replace(b'{"failed"', b'{"fai', 1))  # not the last line: damaged
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: not a manifest record"):
        Manifest(path)


def test_complete_means_every_planned_block_has_its_part_with_the_planned_rows(tmp_path):
    blocks = [{"block": i, "file": "in.jsonl", "first_row": 3 * i, "rows": 3, "first_line": 3 * i + 1, "lines": 3,
               "start": 0, "end": 1} for i in range(3)]
    names = [f"part-0000{i}-rows-{3 * i}-{3 * i + 2}.jsonl" for i in range(3)]
    for n in names:
        (tmp_path / n).write_text('{"score": 1.0}\n' * 3)
    parts = {i: {"part": i, "name": n, "rows": 3} for i, n in enumerate(names)}
    check_complete(tmp_path, blocks, parts)
    with pytest.raises(ValueError, match=r"block 1 \(in.jsonl lines 4-6\) has no part part-00001-rows-3-5.jsonl"):
        check_complete(tmp_path, blocks, {k: v for k, v in parts.items() if k != 1})
    (tmp_path / names[2]).write_text('{"score": 1.0}\n' * 2)
    with pytest.raises(ValueError, match=r"part-00002-rows-6-8.jsonl: holds 2 rows \(its record: 3\), the plan's "
                                         r"block 2 \(in.jsonl lines 7-9\) has 3"):
        check_complete(tmp_path, blocks, parts)


def test_a_worker_that_cannot_load_the_model_stops_the_run_with_its_error(ray_cluster, small_dir, single, tmp_path):
    class NoDevice(ScoreParts):
        def __init__(self, model, folder, options):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    with pytest.raises(ValueError, match=r"a Ray worker died while loading .*small: RuntimeError: CUDA error: no "
                                         r"kernel image is available for execution on the device$"):
        score_dataset(str(single[0]), f"{tmp_path}/out/", str(small_dir), workers=1, block_rows=30, scorer_args=CPU,
                      log=lambda m: None, udf=NoDevice)
    assert not [r for r in records(tmp_path / "out") if "part" in r]
