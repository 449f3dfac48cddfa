"""`score` on files of any size: streaming, resumable after kill -9, memory flat in the input
size, NaN/inf scores stopped; `fidelity` on the same machinery."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import SMALL, add_tokenizer, random_state

from worldpm_lite import stream
from worldpm_lite.checkpoint import WorldPMConfig, write_checkpoint
from worldpm_lite.cli import main
from worldpm_lite.fidelity import flat_scores

MICRO = WorldPMConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=152064, max_position_embeddings=96, rope_theta=10000.0)


def request(i: int) -> dict:
    """Every format, lengths varying with i."""
    q, a = f"Question {i}: " + "why " * (i % 7), f"Answer {i}. " + "because " * (i % 11)
    if i % 3 == 0:
        return {"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if i % 3 == 1:
        return {"id": i, "prompt": q, "chosen": a, "rejected": a[::-1]}
    return {"id": i, "prompt": [{"role": "user", "content": q}], "responses": [a, "no", a[:9]]}


def write_requests(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(request(i)) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_requests(tmp_path_factory.mktemp("stream") / "in.jsonl", 240)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, small_dir, data):
    """The uninterrupted run's bytes (a small budget: many batches, prompts kept across them)."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    assert main(["score", "--model", str(small_dir), "--input", str(data), "--output", str(out),
                 "--token-budget", "64"]) == 0
    return out.read_bytes()


def score_args(small_dir, data, out, *extra):
    return ["score", "--model", str(small_dir), "--input", str(data), "--output", str(out), "--token-budget", "64",
            *extra]


def interrupt_after_one_batch(monkeypatch, args) -> None:
    """main(args), interrupted (as by Ctrl-C) once its first batch is recorded."""
    from worldpm_lite.scorer import Scorer

    monkeypatch.setattr(stream, "RECORD_EVERY", 0.0)
    run = Scorer.run

    def crashing(self, groups):
        yield next(run(self, groups))
        raise KeyboardInterrupt

    monkeypatch.setattr(Scorer, "run", crashing)
    assert main(args) == 130
    monkeypatch.setattr(Scorer, "run", run)


def interrupt_second_model(monkeypatch, args) -> None:
    """`fidelity` args, interrupted as its second model (the first candidate) starts scoring."""
    calls, real = [], stream.score_file

    def failing_second(scorer, path, output, *args, **kwargs):
        calls.append(output)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scorer, path, output, *args, **kwargs)

    monkeypatch.setattr(stream, "score_file", failing_second)
    assert main(args) == 130
    monkeypatch.setattr(stream, "score_file", real)


def test_output_matches_the_padded_reference_and_reports_progress(tmp_path, small_dir, data, expected, capsys):
    out = tmp_path / "padded.jsonl"
    assert main(score_args(small_dir, data, out, "--no-packing", "--no-shared-prompts")) == 0
    assert "line/s" in capsys.readouterr().err
    rows, ref = [json.loads(x) for x in out.read_text().splitlines()], [json.loads(x) for x in expected.splitlines()]
    assert [r.get("id") for r in rows] == [r.get("id") for r in ref] == list(range(240))
    for a, b in zip(rows, ref):
        for key in ("score", "chosen_score", "rejected_score"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)
        if "scores" in a:
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@pytest.fixture(scope="module")
def scorer(small_dir):
    from worldpm_lite.scorer import Scorer

    return Scorer.from_pretrained(small_dir, token_budget=64)  # as `score --token-budget 64`


@pytest.mark.parametrize("crash_after", [0, 5, 17])
def test_resume_after_a_crash_is_byte_identical(tmp_path, small_dir, scorer, data, expected, monkeypatch,
                                                crash_after):
    """A crash after some batches, then garbage after the recorded length (bytes written after
    the last record): resuming ends with the uninterrupted run's bytes."""
    from worldpm_lite.scorer import Scorer

    monkeypatch.setattr(stream, "RECORD_EVERY", 0.0)
    run = Scorer.run

    def crashing(self, groups):
        for k, step in enumerate(run(self, groups)):
            if k == crash_after:
                raise KeyboardInterrupt
            yield step

    out = tmp_path / "out.jsonl"
    settings = stream.score_settings(scorer, small_dir)

    def score(resume=False):
        return stream.score_file(scorer, str(data), str(out), settings, resume=resume, progress=False, log=print)

    monkeypatch.setattr(Scorer, "run", crashing)
    with pytest.raises(KeyboardInterrupt):
        score()
    monkeypatch.setattr(Scorer, "run", run)
    partial, record = stream.partial_paths(out)
    assert not out.exists()
    if crash_after == 0:  # nothing finished: nothing kept
        assert not partial.exists() and not record.exists()
    else:
        assert partial.exists() and record.exists()
        with open(partial, "ab") as f:
            f.write(b'{"id": 999, "score": 1.0}\n{"id": 10')
        with pytest.raises(FileExistsError, match="pass --resume"):  # not silently replaced
            score()
    assert score(resume=True) == 240
    assert out.read_bytes() == expected and not partial.exists() and not record.exists()
    mtime = out.stat().st_mtime_ns
    assert score(resume=True) == 240 and out.stat().st_mtime_ns == mtime  # complete: nothing rescored


def test_resume_after_kill_9_is_byte_identical(tmp_path, small_dir, data, expected):
    """A real SIGKILL at three moments of a separate process, each followed by --resume."""
    out = tmp_path / "out.jsonl"
    partial, _ = stream.partial_paths(out)
    for delay in (0.0, 0.3, 1.5):  # after the first bytes reach the partial file
        proc = subprocess.Popen([sys.executable, "-m", "worldpm_lite", *score_args(small_dir, data, out, "--resume")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (partial.exists() and partial.stat().st_size) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(score_args(small_dir, data, out, "--resume")) == 0
    assert out.read_bytes() == expected


def test_resume_refuses_other_settings_or_changed_input(tmp_path, small_dir, data, monkeypatch, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(data.read_bytes())
    out = tmp_path / "out.jsonl"
    interrupt_after_one_batch(monkeypatch, score_args(small_dir, inp, out))
    capsys.readouterr()
    assert main([*score_args(small_dir, inp, out), "--resume", "--token-budget", "65"]) == 2
    assert "other settings (token_budget" in capsys.readouterr().err
    inp.write_bytes(data.read_bytes().replace(b"Question 0", b"Question X"))
    assert main(score_args(small_dir, inp, out, "--resume")) == 2
    assert "lines changed since the interrupted run" in capsys.readouterr().err
    fresh = tmp_path / "fresh.jsonl"
    assert main(score_args(small_dir, inp, fresh, "--resume")) == 0  # nothing to resume: starts at line 1
    assert "starting from the first line" in capsys.readouterr().err and len(fresh.read_text().splitlines()) == 240


def test_bad_line_late_in_the_file_stops_before_scoring(tmp_path, small_dir, capsys):
    inp = write_requests(tmp_path / "in.jsonl", 50)
    with open(inp, "a") as f:
        f.write(json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]}))
    out = tmp_path / "out.jsonl"
    assert main(score_args(small_dir, inp, out)) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:51: messages: the last message must be the assistant's reply" in err
    assert not out.exists() and not stream.partial_paths(out)[0].exists()


def test_non_finite_score_stops_the_run_with_its_line(tmp_path, small_state, capsys):
    """One inf in a decoder weight: the first line that scores NaN/inf stops the run, naming the
    line and the checkpoint; no output file appears."""
    state = {k: v.clone() for k, v in small_state.items()}
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    model = add_tokenizer(write_checkpoint(tmp_path / "broken", SMALL, state))
    inp = write_requests(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(model), "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1: conversation 0 scored nan" in err and "checkpoint is the likely cause" in err
    assert not out.exists()


# The file job scores each input in one fresh process with the model loaded once. Before each run,
# freed heap goes back to the OS (malloc_trim) and the kernel's peak-RSS mark is reset (clear_refs 5),
# so a run's peak above its starting RSS is what the run itself holds, not the load's leftovers.
PEAK_RSS = r"""
import ctypes, gc, json, sys
from worldpm_lite.scorer import Scorer
from worldpm_lite.stream import score_file, score_settings

def status_mib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

model, runs = sys.argv[1], json.loads(sys.argv[2])
scorer = Scorer.from_pretrained(model, device="cpu")
growth = []
for inp, out in runs:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmRSS:")
    score_file(scorer, inp, out, score_settings(scorer, model), progress=False, log=lambda m: None)
    growth.append(status_mib("VmHWM:") - before)
print(json.dumps(growth))
"""
ID_BYTES = 8192  # per line; echoed in its result, so holding lines, requests or results costs ~80 MiB at 10,000


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's per-process peak RSS")
def test_memory_does_not_grow_with_the_input(tmp_path, ci_notes):
    """Scoring 10,000 lines raises the peak no more than 1,000 lines do, plus a small constant. Each
    line carries an 8 KiB id, so holding the lines, the requests or the results would take about 80 MiB
    more (measured with the input's lines held on purpose: +56 MiB over 1,000 lines, against a 16 MiB limit)."""
    model = add_tokenizer(write_checkpoint(tmp_path / "micro", MICRO, random_state(MICRO)))
    runs, sizes = [], (1_000, 10_000)
    for n in sizes:
        inp = tmp_path / f"in{n}.jsonl"
        with open(inp, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{i:08d}-" + "x" * ID_BYTES,
                                    "messages": [{"role": "user", "content": f"q{i % 97}"},
                                                 {"role": "assistant", "content": f"a{i}"}]}) + "\n")
        runs.append((str(inp), str(tmp_path / f"out{n}.jsonl")))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(model), json.dumps(runs)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = dict(zip(sizes, json.loads(done.stdout.splitlines()[-1])))
    for n in sizes:
        assert sum(1 for _ in open(tmp_path / f"out{n}.jsonl")) == n
    ci_notes.append(f"score: peak RSS above its start, 1,000 lines {rss[1_000]:.1f} MiB, 10,000 lines "
                    f"{rss[10_000]:.1f} MiB ({ID_BYTES} B ids)")
    assert rss[10_000] <= rss[1_000] + 16, rss


def test_fidelity_resumes_without_rescoring_finished_models(tmp_path, small_dir, data, monkeypatch, capsys):
    """fidelity streams each model through score_file into the report's staging folder: after a
    crash in the candidate, --resume keeps the reference's scores and finishes the report."""
    report = tmp_path / "report"
    args = ["fidelity", "--reference", str(small_dir), "--candidate", f"bnb-int8:{small_dir}", "--data", str(data),
            "--report", str(report), "--token-budget", "512"]
    interrupt_second_model(monkeypatch, args)
    assert not report.exists()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    done = tmp_path / ".report.partial" / "scores-0.jsonl"
    before = done.stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert (report / "scores-0.jsonl").stat().st_mtime_ns == before  # the reference was not scored again
    r = json.loads((report / "report.json").read_text())
    assert r["requests"] == 240 and r["conversations"] == len(flat_scores(report / "scores-1.jsonl"))


def test_resume_refuses_weights_rewritten_in_place_naming_the_shard(tmp_path, small_dir, monkeypatch, capsys):
    """score --resume and fidelity --resume know a model by its weights: a shard rewritten in place since
    the interrupted run (its time moved) is refused by name; the same stamps again are accepted."""
    import shutil

    model = shutil.copytree(small_dir, tmp_path / "model")
    shard = model / "model-00001-of-00002.safetensors"
    stamp = shard.stat().st_atime_ns, shard.stat().st_mtime_ns
    inp, out = write_requests(tmp_path / "in.jsonl", 30), tmp_path / "out.jsonl"
    interrupt_after_one_batch(monkeypatch, score_args(model, inp, out))
    os.utime(shard, ns=(stamp[0], stamp[1] + 10**9))
    capsys.readouterr()
    assert main(score_args(model, inp, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"its weights changed since the interrupted run: {shard} (size " in err and "modification time" in err
    os.utime(shard, ns=stamp)
    assert main(score_args(model, inp, out, "--resume")) == 0 and len(out.read_text().splitlines()) == 30

    args = ["fidelity", "--reference", str(model), "--candidate", str(small_dir), "--data", str(inp), "--report",
            str(tmp_path / "report"), "--token-budget", "512", "--resume"]
    interrupt_second_model(monkeypatch, args)  # the reference finished, the candidate interrupted
    done = tmp_path / ".report.partial" / "scores-0.jsonl"
    before = done.stat().st_mtime_ns
    os.utime(shard, ns=(stamp[0], stamp[1] + 10**9))
    capsys.readouterr()
    assert main(args) == 2
    assert f"its weights changed since the interrupted run: {shard}" in capsys.readouterr().err
    os.utime(shard, ns=stamp)
    assert main(args) == 0
    assert (tmp_path / "report" / "scores-0.jsonl").stat().st_mtime_ns == before  # the reference: not scored again
