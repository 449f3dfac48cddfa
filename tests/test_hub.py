"""Models by hub id (worldpm_lite.hub) against a small imitation of the Hub on 127.0.0.1 (fakehub.py):
what is downloaded and what never is, a cut download resumed, the cache used offline, and every
refusal as one clear line (exit 2). huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE
once, at import: in-process tests set its constants instead (the `hf` fixture); one test runs a
command with the environment variables themselves."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakehub import FakeHub, Repo, folder_files
from huggingface_hub import constants
from huggingface_hub.utils import close_session

from worldpm_lite import hub as hub_module
from worldpm_lite.checkpoint import INDEX_FILE, Checkpoint
from worldpm_lite.cli import main
from worldpm_lite.errors import NotFound
from worldpm_lite.hub import resolve
from worldpm_lite.scorer import Scorer

TOKEN = "hf_test_token"
PROMPT = [{"role": "user", "content": "Tips for better sleep?"}]
REQUESTS = [{"prompt": PROMPT, "responses": ["Keep a fixed schedule.", "idk lol", "Avoid screens at night."]}]
# what a repo may hold besides the model: other formats and folders, never downloaded
EXTRAS = {"pytorch_model.bin": b"\0" * 4096, "model.gguf": b"GGUF" * 1024, "consolidated.safetensors": b"\1" * 4096,
          "original/model.safetensors": b"\2" * 4096, "original/params.json": b"{}", "onnx/model.onnx": b"\3" * 512,
          "README.md": b"# a model\n", ".gitattributes": b"*.safetensors filter=lfs\n"}


def edited(files, name, change):
    """`files` with the JSON file `name` changed by `change(data)`."""
    data = json.loads(files[name])
    change(data)
    return {**files, name: json.dumps(data, indent=2).encode()}


def dev_config(config):
    config["rope_theta"] = 1000.0  # same weights, other scores


def causal_lm(config):
    config["architectures"] = ["Qwen2ForCausalLM"]


def headless(index):
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("score.")}


@pytest.fixture(scope="module")
def model_files(small_dir):
    return folder_files(small_dir)


@pytest.fixture(scope="module")
def hub(model_files):
    """The fake Hub for the whole module: acme/small (with a `dev` branch), a gated copy, a causal LM and a
    reward model whose index lacks the head."""
    with FakeHub() as server:
        small = Repo({**model_files, **EXTRAS})
        small.add_commit(edited({**model_files, **EXTRAS}, "config.json", dev_config), "dev")
        server.repos.update({
            "acme/small": small,
            "acme/gated": Repo(model_files, gated_token=TOKEN),
            "acme/causal": Repo(edited(model_files, "config.json", causal_lm)),
            "acme/nohead": Repo(edited(model_files, INDEX_FILE, headless)),
        })
        yield server
        server.release.set()  # a stalled transfer ends: its handler thread can be joined
        close_session()  # its kept-alive connections: the handler threads end, the server closes


def use_endpoint(monkeypatch, url):
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake Hub, with an empty cache of this test's own, no token (not the
    developer's) and no telemetry request; the Hub's log and faults cleared."""
    home = tmp_path / "hf_home"
    use_endpoint(monkeypatch, hub.url)
    for name, value in [("HF_HUB_CACHE", str(home / "hub")), ("HF_HUB_OFFLINE", False),
                        ("HF_HUB_DISABLE_TELEMETRY", True), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", False),
                        ("HF_TOKEN_PATH", str(home / "token")), ("HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))]:
        monkeypatch.setattr(constants, name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    hub.log.clear()
    hub.cuts.clear()
    hub.stalls.clear()
    hub.release.clear()
    return hub


@pytest.fixture
def inp(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


def score(model, inp, out, *extra):
    """`worldpm-lite score` into `out`; its JSONL text."""
    assert main(["score", "--model", str(model), "--input", str(inp), "--output", str(out), *extra]) == 0
    return out.read_text()


def refused(capsys, argv) -> str:
    """The one error line of a command that must exit 2 (an InputError, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("worldpm-lite: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot_files(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_score_downloads_only_the_model_files_and_scores_as_the_folder(hf, small_dir, model_files, inp, tmp_path,
                                                                        capsys):
    from_hub = score("acme/small", inp, tmp_path / "hub.jsonl")
    assert from_hub == score(small_dir, inp, tmp_path / "local.jsonl")
    assert "acme/small: downloading at " in capsys.readouterr().err
    assert sorted(hf.downloads()) == sorted(model_files)  # each file once; none of EXTRAS, no folder
    path = resolve("acme/small")  # now from the cache: the same folder, nothing fetched again
    assert path.name == hf.repos["acme/small"].main and snapshot_files(path) == sorted(model_files)
    assert len(hf.downloads()) == len(model_files)


def test_plan_downloads_config_json_alone(hf, capsys):
    assert main(["plan", "--model", "acme/small", "--gpus", "24GiB"]) == 0
    assert "2 layers, hidden 128" in capsys.readouterr().out
    assert hf.downloads() == ["config.json"]
    assert [r.method for r in hf.log if "/resolve/" in r.path] == ["HEAD", "GET"]


def test_a_cut_download_resumes_in_the_same_call(hf, small_dir):
    shard = max(json.loads((small_dir / INDEX_FILE).read_text())["weight_map"].values(),
                key=lambda f: (small_dir / f).stat().st_size)
    data = (small_dir / shard).read_bytes()
    assert len(data) > 20 << 20  # larger than the client's 10 MiB chunks, and than the cut
    hf.cuts[shard] = 15 << 20
    path = resolve("acme/small")
    gets = [r for r in hf.log if r.method == "GET" and r.path.endswith("/" + shard)]
    assert [(r.status, r.range is None) for r in gets] == [(200, True), (206, False)]
    start = int(re.fullmatch(r"bytes=(\d+)-", gets[1].range)[1])
    assert 0 < start <= 15 << 20  # what it had written to disk (whole 10 MiB chunks) is not fetched again
    assert (path / shard).read_bytes() == data
    blobs = path.parents[1] / "blobs"
    assert not [p.name for p in blobs.iterdir() if p.name.endswith(".incomplete")]


def test_a_killed_download_leaves_no_partial_file_behind_the_next_run(hf, small_dir, tmp_path, capsys):
    """huggingface_hub names each attempt's partial file anew and never takes an old one up: the next
    run removes what a killed one left (once nothing has written to it for STALE_PARTIAL_S) and fetches
    the file again; what the killed run finished is not fetched again."""
    shard = max(json.loads((small_dir / INDEX_FILE).read_text())["weight_map"].values(),
                key=lambda f: (small_dir / f).stat().st_size)
    hf.stalls[shard] = 12 << 20  # more than one 10 MiB chunk of the client's: a partial file on disk
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_CACHE=constants.HF_HUB_CACHE, HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=hf.url,
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    proc = subprocess.Popen([sys.executable, "-c", "from worldpm_lite.hub import resolve; resolve('acme/small')"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blobs = Path(constants.HF_HUB_CACHE) / "models--acme--small" / "blobs"
    try:
        deadline = time.monotonic() + 120
        while not [p for p in blobs.glob("*.incomplete") if p.stat().st_size >= 10 << 20]:
            assert proc.poll() is None and time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        hf.release.set()
    partials = list(blobs.glob("*.incomplete"))  # the stalled shard's, and any other cut by the kill
    fresh = blobs / "0123abcd.5678ef01.incomplete"  # another run's, being written to now: kept
    fresh.write_bytes(b"\0" * 1024)
    old = time.time() - hub_module.STALE_PARTIAL_S - 60
    for p in partials:
        os.utime(p, (old, old))
    size = sum(p.stat().st_size for p in partials)
    done = {p.name for p in blobs.iterdir() if not p.name.endswith(".incomplete")}
    hf.log.clear()
    capsys.readouterr()
    assert main(["plan", "--model", "acme/small", "--gpus", "24GiB"]) == 0  # config only: nothing removed
    assert all(p.exists() for p in partials)
    path = resolve("acme/small", log=lambda m: print(m))
    assert not any(p.exists() for p in partials) and fresh.exists()
    assert (f"removed {len(partials)} partial download(s) of an interrupted run ({size / 1e9:.2f} GB)"
            in capsys.readouterr().out)
    assert (path / shard).read_bytes() == (small_dir / shard).read_bytes()
    fetched = {r.path.rsplit("/", 1)[-1] for r in hf.log if r.method == "GET" and "/resolve/" in r.path}
    assert shard in fetched and not done & {(path / f).resolve().name for f in fetched}  # finished: not again


def test_offline_and_unreachable_hub_use_the_cache(hf, small_dir, tmp_path, monkeypatch):
    path = resolve("acme/small")  # the cache filled by huggingface_hub itself
    hf.log.clear()
    # HF_HUB_OFFLINE=1 and HF_HUB_CACHE as environment variables, read by a fresh process at import
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=constants.HF_HUB_CACHE, HF_HOME=str(tmp_path / "hf_home"),
               HF_ENDPOINT=hf.url, HF_HUB_DISABLE_TELEMETRY="1")
    run = subprocess.run([sys.executable, "-c", "from worldpm_lite.hub import resolve; print(resolve('acme/small'))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(path) and hf.log == []
    conversations = [[*PROMPT, {"role": "assistant", "content": r}] for r in REQUESTS[0]["responses"]]
    expected = Scorer.from_pretrained(small_dir, device="cpu").score(conversations)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Scorer.from_pretrained("acme/small", device="cpu").score(conversations) == expected
    assert hf.log == []
    # not offline, but the hub out of reach: the complete snapshot is used as it is
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    use_endpoint(monkeypatch, closed_port_url())
    assert Scorer.from_pretrained("acme/small", device="cpu").score(conversations) == expected


def test_offline_without_the_files_is_refused(hf, capsys, monkeypatch):
    resolve("acme/small", config_only=True)  # config.json alone in the cache, as `plan` leaves it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hf.log.clear()
    line = refused(capsys, ["score", "--model", "acme/small", "--input", "x.jsonl"])
    assert "holds only some of its files and HF_HUB_OFFLINE=1 forbids downloading" in line
    line = refused(capsys, ["score", "--model", "acme/causal", "--input", "x.jsonl"])  # never downloaded
    assert "acme/causal: the cache" in line and "does not hold its files and HF_HUB_OFFLINE=1" in line
    assert constants.HF_HUB_CACHE in line
    with pytest.raises(NotFound):
        resolve("acme/causal")
    assert hf.log == []


def test_gated_repo_needs_hf_token(hf, model_files, inp, monkeypatch, capsys):
    line = refused(capsys, ["score", "--model", "acme/gated", "--input", str(inp)])
    assert "acme/gated: a gated repository" in line and "HF_TOKEN" in line
    assert hf.downloads() == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = resolve("acme/gated")
    assert {f: (path / f).read_bytes() for f in snapshot_files(path)} == model_files
    assert {r.authorization for r in hf.log if "/resolve/" in r.path and r.status == 200} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize("model, extra, message", [
    ("acme/nothing", [], "acme/nothing: no such model repository on http://127.0.0.1:"),
    ("acme/small", ["--revision", "nope"], "--revision nope: no such branch, tag or commit in acme/small"),
    ("acme/small@nope", [], "--revision nope: no such branch, tag or commit in acme/small"),
    ("acme/small", ["--revision", "0" * 40], f"--revision {'0' * 40}: no such branch, tag or commit"),
    ("acme/causal", [], "acme/causal: not a WorldPM-architecture reward model (config.json's architectures: "
                        "['Qwen2ForCausalLM']"),
    ("acme/nohead", [], "acme/nohead: its shard index has no reward head (score.0.weight"),
])
def test_refusals_download_no_weights(hf, inp, capsys, model, extra, message):
    line = refused(capsys, ["score", "--model", model, *extra, "--input", str(inp)])
    assert message in line
    assert not [f for f in hf.downloads() if not f.endswith(".json")]  # config.json and the index at most


def test_unknown_repo_is_not_found(hf):
    with pytest.raises(NotFound, match="acme/nothing"):
        resolve("acme/nothing")


def test_no_network_is_a_clear_error(hf, monkeypatch, capsys):
    url = closed_port_url()
    use_endpoint(monkeypatch, url)
    line = refused(capsys, ["score", "--model", "acme/small", "--input", "x.jsonl"])
    assert f"acme/small: the hub ({url}) cannot be reached (ConnectError" in line
    assert "does not hold its files" in line


def test_too_little_disk_space_is_refused_before_downloading(hf, model_files, monkeypatch, capsys):
    monkeypatch.setattr(hub_module.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12,
                                                                                      free=10**6))
    line = refused(capsys, ["score", "--model", "acme/small", "--input", "x.jsonl"])
    need = sum(len(data) for name, data in model_files.items() if name not in ("config.json", INDEX_FILE))
    assert f"needs {need / 1e9:.2f} GB more in the cache ({constants.HF_HUB_CACHE}), which has 0.00 GB free" in line
    assert sorted(hf.downloads()) == ["config.json", INDEX_FILE]


def test_quantize_from_a_hub_id(hf, small_dir, tmp_path):
    out = tmp_path / "q4"
    assert main(["quantize", "--model", "acme/small", "--out", str(out), "--method", "rtn", "--samples", "1",
                 "--seq-len", "16"]) == 0
    assert "model-00001-of-00002.safetensors" in hf.downloads()
    q, src = Checkpoint(out), Checkpoint(small_dir)
    assert q.quant.bits == 4 and "model.layers.0.mlp.down_proj.qweight" in q.weight_map
    for name in ("model.embed_tokens.weight", "score.0.weight", "score.2.bias"):  # kept as they were
        assert torch.equal(q.tensor(name), src.tensor(name))


def test_a_local_folder_of_that_name_wins(hf, small_dir, inp, tmp_path, monkeypatch, capsys):
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "small").symlink_to(small_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    score("acme/small", inp, tmp_path / "out.jsonl")
    line = refused(capsys, ["score", "--model", "acme/small", "--revision", "dev", "--input", str(inp)])
    assert "--revision dev: only for a hub id; acme/small is a local folder" in line
    assert hf.log == []


def test_revision_branch_and_commit(hf, small_dir, model_files, inp, tmp_path, monkeypatch):
    local_dev = tmp_path / "dev"
    local_dev.mkdir()
    dev_files = edited(model_files, "config.json", dev_config)
    for name in model_files:
        if name == "config.json":
            (local_dev / name).write_bytes(dev_files[name])
        else:
            (local_dev / name).symlink_to(small_dir / name)
    expected = score(local_dev, inp, tmp_path / "local_dev.jsonl")
    assert expected != score(small_dir, inp, tmp_path / "local_main.jsonl")  # the revision shows in the scores
    assert score("acme/small", inp, tmp_path / "branch.jsonl", "--revision", "dev") == expected
    dev = hf.repos["acme/small"].refs["dev"]
    assert resolve("acme/small@dev", config_only=True).name == dev
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache2"))  # the commit, downloaded afresh
    hf.log.clear()
    path = resolve("acme/small", dev)
    assert path.name == dev and {f: (path / f).read_bytes() for f in snapshot_files(path)} == dev_files
    assert not [r for r in hf.log if "/revision/" in r.path and "?blobs" not in r.path]  # a commit needs no lookup
