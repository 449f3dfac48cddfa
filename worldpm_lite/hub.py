"""Models by hub id: `Qwen/WorldPM-72B` (with a branch, tag or commit as `revision`) resolved through
huggingface_hub to a local snapshot folder holding only the files a command reads: config.json alone
for `plan`; else config.json, the tokenizer files, the shard index and the shards it names (or the
single model.safetensors), never a repository's other formats or folders. huggingface_hub's own rules
apply: its cache (HF_HUB_CACHE, HF_HOME), HF_HUB_OFFLINE=1 (the cache only), HF_TOKEN (gated or private
repos), HF_ENDPOINT (a mirror), its progress bars, and its retries (a download cut midway goes on from
what it wrote, in the same call). A run killed midway keeps the files it finished; the next run fetches
only the others, and first removes the partial files the killed one left (clear_stale_partials).

A local directory of the same spelling always wins, as in transformers. Before any weight is downloaded,
config.json and the shard index come first: a repo that is not a WorldPM-architecture reward model is
refused then, and the free space of the cache's disk is checked against what the shards need. Every
failure is an InputError saying what to do: an unknown repo or revision, a gated repo without a token,
no network, a cache without the files.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .chat import TOKENIZER_FILES
from .checkpoint import HEAD, INDEX_FILE, shard_files
from .errors import InputError, NotFound, UsageError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ARCHITECTURE = "Qwen2ForRewardModel"
CONFIG_FILES = ("config.json", INDEX_FILE)  # what is read first, before any weight


def is_hub_id(model: str) -> bool:
    """owner/name, and no local path of that spelling (a local directory always wins)."""
    return bool(REPO_ID.fullmatch(str(model))) and not Path(model).exists()


def resolve(model: str, revision: str | None = None, config_only: bool = False, log=None) -> Path:
    """The local folder of `model`: a directory as it is, or a hub id's snapshot (downloaded when not in
    the cache); "owner/name@revision" names the revision too. config_only: config.json is all that is
    needed (`plan`)."""
    repo, at, rev = str(model).partition("@")
    if at and revision is None and is_hub_id(repo):
        model, revision = repo, rev
    if not is_hub_id(model):
        if revision is not None:
            raise UsageError(f"--revision {revision}: only for a hub id; {model} is a local folder")
        return Path(model)
    hub = _hub()
    path = _download(hub, model, revision, CONFIG_FILES[:1] if config_only else CONFIG_FILES)
    check_architecture(model, path)
    if config_only:
        return path
    commit = path.name  # snapshots/<commit>: the rest comes from the same commit, even if a branch moves
    files = model_files(path)
    missing = [f for f in files if f.endswith(".safetensors") and not (path / f).is_file()]
    if missing and not hub.constants.HF_HUB_OFFLINE:
        clear_stale_partials(hub, model, log)
        check_room(hub, model, revision, commit, files, path)
    if log is not None:
        log(f"{model}: {'downloading' if missing else 'cached'} at {path}")
    return _download(hub, model, revision, files, commit)


def _hub():
    import huggingface_hub
    import huggingface_hub.constants

    return huggingface_hub


def model_files(path: Path) -> list[str]:
    """What a scoring command reads from the repo whose config.json (and shard index) are in `path`:
    those, the tokenizer files and the shards the index names (else model.safetensors)."""
    return [*CONFIG_FILES, *TOKENIZER_FILES, *shard_files(path)]


def _download(hub, model: str, revision: str | None, files, commit: str | None = None) -> Path:
    """snapshot_download of `files` (exact repo paths) at `commit` (else `revision`)."""
    with _hub_errors(hub, model, revision):
        return Path(hub.snapshot_download(model, revision=commit or revision, allow_patterns=list(files)))


@contextmanager
def _hub_errors(hub, model: str, revision: str | None):
    """huggingface_hub's failures as InputErrors (NotFound for what is not there) saying what to do."""
    from huggingface_hub import errors

    where = f"{model}{f' at revision {revision}' if revision else ''}"
    endpoint, cache = hub.constants.ENDPOINT, hub.constants.HF_HUB_CACHE
    try:
        yield
    except errors.GatedRepoError:
        raise InputError(f"{model}: a gated repository on {endpoint}: accept its terms on its page, then set HF_TOKEN "
                         "(or run `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise NotFound(f"{model}: no such model repository on {endpoint} (or a private one: set HF_TOKEN); a local "
                       "folder of that name does not exist either") from None
    except errors.RevisionNotFoundError:
        raise NotFound(f"--revision {revision}: no such branch, tag or commit in {model} on {endpoint}") from None
    except errors.LocalEntryNotFoundError as e:  # offline, or the hub out of reach: the cache lacks the files
        some = "holds only some of its files" if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())) else (
            "does not hold its files")
        if hub.constants.HF_HUB_OFFLINE:
            raise NotFound(f"{where}: the cache ({cache}) {some} and HF_HUB_OFFLINE=1 forbids downloading") from None
        raise InputError(f"{where}: the hub ({endpoint}) cannot be reached ({_reason(e.__cause__ or e)}) and the "
                         f"cache ({cache}) {some}") from None
    except errors.HfHubHTTPError as e:
        raise InputError(f"{where}: the hub ({endpoint}) answered {e.response.status_code}: "
                         f"{e.server_message or _reason(e)}") from None
    except _transport_errors() as e:  # the connection failed or broke off, retries included
        raise InputError(f"{where}: the transfer from the hub ({endpoint}) failed ({_reason(e)}); run it again "
                         "(what the cache holds is kept)") from None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _transport_errors() -> tuple[type, ...]:
    """The connection errors of huggingface_hub's HTTP client: httpx2 since 2.0, httpx in 1.x."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(found)


def check_architecture(model: str, path: Path) -> None:
    """A WorldPM-architecture reward model: config.json names Qwen2ForRewardModel, and the shard index (when
    there is one) has the reward head. Checked before the weights are downloaded."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise InputError(f"{model}: no readable config.json in the repository ({type(e).__name__})") from None
    found = config.get("architectures") or []
    if ARCHITECTURE not in found:
        raise InputError(f"{model}: not a WorldPM-architecture reward model (config.json's architectures: {found}; "
                         f"expected {ARCHITECTURE}, a Qwen2 decoder with the score head)")
    index = path / INDEX_FILE
    if index.is_file():
        names = json.loads(index.read_text()).get("weight_map", {})
        missing = [n for n in HEAD if n not in names]
        if missing:
            raise InputError(f"{model}: its shard index has no reward head ({', '.join(missing)} missing): not a "
                             "WorldPM reward model")


STALE_PARTIAL_S = 600  # a partial download not written to for this long belongs to no running download


def clear_stale_partials(hub, model: str, log=None) -> int:
    """Remove the partial downloads (blobs/*.incomplete) that a killed run left in `model`'s cache folder
    and that nothing has written to for STALE_PARTIAL_S; returns the bytes freed. huggingface_hub names
    each attempt's file anew and never takes an old one up again: left alone, every interrupted run
    would keep up to a shard (about 4 GB) per download thread on the disk."""
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(hub.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model, repo_type="model") / "blobs"
    now, freed, count = time.time(), 0, 0
    for p in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        try:
            st = p.stat()
            if now - st.st_mtime > STALE_PARTIAL_S:
                p.unlink()
                freed, count = freed + st.st_size, count + 1
        except FileNotFoundError:  # finished or removed meanwhile by another run
            continue
    if count and log is not None:
        log(f"{model}: removed {count} partial download(s) of an interrupted run ({freed / 1e9:.2f} GB) from {blobs}; "
            "huggingface_hub fetches those files again from their start")
    return freed


def check_room(hub, model: str, revision: str | None, commit: str, files, path: Path) -> None:
    """Enough free space where the cache is for `files` not in the snapshot folder `path` yet (their
    sizes from the hub's file list), before a multi-GB download starts."""
    with _hub_errors(hub, model, revision):
        info = hub.HfApi().model_info(model, revision=commit, files_metadata=True)
    need = sum(s.size or 0 for s in info.siblings if s.rfilename in files and not (path / s.rfilename).exists())
    cache = Path(hub.constants.HF_HUB_CACHE)
    free = shutil.disk_usage(cache).free
    if need > free:
        raise InputError(f"{model}: downloading it needs {need / 1e9:.2f} GB more in the cache ({cache}), which has "
                         f"{free / 1e9:.2f} GB free: free some space or set HF_HUB_CACHE to a larger disk")
