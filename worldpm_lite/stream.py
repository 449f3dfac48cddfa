"""Score a JSONL file of any size: read lazily, results written in input order as they come,
resumable after a crash at any point.

Results go to `.OUT.partial` beside the output; `.OUT.progress.json` (replaced atomically) says how
many input lines and output bytes are final, with a hash of the input read so far and the settings
that decide the numbers. `resume=True` checks both, cuts the partial file back to the recorded
length and goes on from the next line. Records are taken only after a batch, where a fresh run
starting at that line forms the same batches (see packing.py), so a resumed run ends
byte-identical to an uninterrupted one. Only the finished file is renamed to OUT.

Memory: the lines of the batches in flight, whatever the input's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .checkpoint import changed_weights, model_identity, write_json_atomic
from .data import Line, RequestError, read_lines
from .errors import InputError, OutputExists

RECORD_EVERY = 2.0  # seconds between progress records (each one fsyncs the partial file)


def scan(path: str) -> list[tuple[str, int]]:
    """Check every line before any scoring (a bad line at line 900,000 should not wait days to be
    found); returns (kind, conversations) per request. Memory: two small ints per request."""
    shapes = [(line.request.kind, len(line.request.conversations)) for line in read_lines(path)]
    if not shapes:
        raise RequestError(f"{path}: no requests (the file is empty)")
    return shapes


def _hash_prefix(path: str, size: int):
    """sha256 of the first `size` bytes of `path`, read in 4 MiB chunks (a hashlib object)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            size -= len(chunk)
    return digest


def partial_paths(output: str | Path) -> tuple[Path, Path]:
    out = Path(output)
    return out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.progress.json")


def score_settings(scorer, model: str | Path) -> dict:
    """What decides the bytes of the results: a resumed run must match every entry (the model by its
    folder, config.json and each weight shard's size and time; a hub model's folder names its commit)."""
    return {**model_identity(model), "backend": scorer.backend, "token_budget": scorer.token_budget,
            "truncation": scorer.truncation, "max_length": scorer.max_length, "packing": scorer.packing,
            "share_prompts": scorer.share_prompts}


FIRST_LINE = {"line": 0, "offset": 0, "bytes": 0, "requests": 0, "input_sha256": hashlib.sha256().hexdigest()}


def _resume_point(output: str, path: str, settings: dict, resume: bool, total: int, log):
    """(where to start, the input's digest up to there) for writing `output`: the first line, or with
    resume where the interrupted run stopped; None when resume finds `output` complete."""
    partial, record = partial_paths(output)
    if not partial.parent.is_dir():
        raise RequestError(f"--output {output}: folder {partial.parent} does not exist")
    if partial.exists() and not resume:
        raise OutputExists(f"{output}: an interrupted run's results are in {partial} (pass --resume to "
                           "continue it, or delete it)")
    if resume and not partial.exists() and Path(output).exists():
        log(f"--resume: {output} is complete and no interrupted run is there; nothing to do (delete it to "
            "score again)")
        return None
    if resume and partial.exists() and record.exists():
        start, digest = _check_resume(record, path, settings, log)
        log(f"resuming {output} after line {start['line']} ({start['requests']} of {total} results written)")
        return start, digest
    if resume:
        log(f"--resume: no interrupted run of {output} found; starting from the first line")
    return dict(FIRST_LINE), hashlib.sha256()


def score_file(scorer, path: str, output: str | None, settings: dict, resume: bool = False,
               log: Callable[[str], None] = print, progress: bool = True) -> int:
    """Score every line of `path` into `output` (None: standard output, not resumable); returns the
    number of results written."""
    shapes = scan(path)
    total = len(shapes)
    del shapes
    start, digest = dict(FIRST_LINE), hashlib.sha256()  # digest: of the input read so far
    if output is None:
        sink, partial, record = sys.stdout, None, None
    else:
        partial, record = partial_paths(output)
        begin = _resume_point(output, path, settings, resume, total, log)
        if begin is None:
            return total
        start, digest = begin
        sink = open(partial, "r+b" if start["bytes"] else "wb")
        sink.truncate(start["bytes"])
        sink.seek(start["bytes"])

    lines: deque[tuple[int, Line, object]] = deque()  # in flight: group number, line, digest after it

    def groups():
        for n, line in enumerate(read_lines(path, start["offset"], start["line"], digest)):
            lines.append((n, line, digest.copy()))
            r = line.request
            try:
                yield scorer.group(r.conversations, r.prompt)
            except ValueError as e:
                raise RequestError(f"{path}:{line.number}: {e}") from None

    bar = progress_bar(total, start["requests"]) if progress else None
    t0 = last_record = time.time()
    tokens, state = 0, dict(start)
    try:
        for step in _steps(scorer, groups(), lines, path):
            now = dict(state)
            for _, scores in step.results:
                _, line, after = lines.popleft()
                text = json.dumps(line.request.result(scores), ensure_ascii=False) + "\n"
                data = text.encode("utf-8")
                sink.write(data if partial else text)
                now.update(line=line.number, offset=line.end, requests=now["requests"] + 1,
                           input_sha256=after.hexdigest(), bytes=now["bytes"] + len(data))
            state = now  # only whole batches count as done: see the module docstring
            tokens += step.tokens
            if bar is not None:
                bar.update(len(step.results))
                bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s", refresh=False)
            if record is not None and time.time() - last_record >= RECORD_EVERY:
                _record(sink, record, state, settings)
                last_record = time.time()
        if partial is None:
            return state["requests"]
        sink.flush()
        os.fsync(sink.fileno())
        sink.close()
        os.replace(partial, output)
        record.unlink(missing_ok=True)
        return state["requests"]
    finally:
        if bar is not None:
            bar.close()
        if partial is not None and not sink.closed:
            if state["requests"]:
                _record(sink, record, state, settings)  # what is complete stays usable for --resume
                sink.close()
            else:  # nothing to keep
                sink.close()
                partial.unlink()
                record.unlink(missing_ok=True)


def _steps(scorer, groups, lines, path):
    """scorer.run, with a NaN/inf score or a conversation too large for the GPU reported by its input line."""
    from .scorer import DoesNotFit, NonFiniteScore

    try:
        yield from scorer.run(groups)
    except (NonFiniteScore, DoesNotFit) as e:
        number = next(line.number for n, line, _ in lines if n == e.group)
        raise score_failure(e, f"{path}:{number}") from None


def score_failure(e, where: str) -> RequestError:
    """What a NonFiniteScore or DoesNotFit means for the input row at `where`."""
    from .scorer import NonFiniteScore

    if isinstance(e, NonFiniteScore):
        return RequestError(f"{where}: conversation {e.part} scored {e.value}; a NaN/inf score means the checkpoint "
                            "is the likely cause (non-finite or overflowing weights). Nothing is written for this "
                            "row; the results before it are kept for --resume")
    return RequestError(f"{where}: {e.tokens} tokens ran out of GPU memory alone in one pass; this row needs a "
                        "larger GPU (or --truncate to the model's limit if it is over it). The results before it "
                        "are kept for --resume")


def refuse_other_settings(saved: dict, now: dict, record: Path, delete: str, log) -> None:
    """InputError unless a resumed run's settings (as score_settings makes them) are the interrupted
    run's: each weight shard replaced or rewritten since is named, as quantize --resume does. A run
    started before the weights were recorded is taken as it is, saying so."""
    if "weights" not in saved:
        log(f"--resume: the interrupted run did not record {now['model']}'s weight shards (an older "
            "worldpm-lite): they are taken to be unchanged")
        saved = {**saved, "weights": now["weights"]}
    if saved.get("model") == now["model"] and saved["weights"] != now["weights"]:
        changed = changed_weights(Path(now["model"]), saved["weights"], now["weights"])
        raise InputError(f"{now['model']}: its weights changed since the interrupted run: {'; '.join(changed)}; "
                         f"rerun with the original weights, or delete {delete} to start over")
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise InputError(f"{record}: the interrupted run used other settings ({', '.join(changed)}: "
                         f"{[saved.get(k) for k in changed]}, now {[now.get(k) for k in changed]}); rerun with "
                         f"those, or delete {delete} to start over")


def _record(sink, record: Path, state: dict, settings: dict) -> None:
    sink.flush()
    os.fsync(sink.fileno())
    write_json_atomic(record, {**state, "settings": settings})


def _check_resume(record: Path, path: str, settings: dict, log) -> tuple[dict, object]:
    """Where the interrupted run stopped, and the hash of the input up to there (checked against
    the record, then fed on by the resumed run)."""
    saved = json.loads(record.read_text())
    refuse_other_settings(saved.get("settings", {}), settings, record, f"{record} and its .partial file", log)
    digest = _hash_prefix(path, saved["offset"])
    if Path(path).stat().st_size < saved["offset"] or digest.hexdigest() != saved["input_sha256"]:
        raise InputError(f"{path}: its first {saved['line']} lines changed since the interrupted run; delete "
                         f"{record} and its .partial file to start over")
    if record.with_name(record.name.replace(".progress.json", ".partial")).stat().st_size < saved["bytes"]:
        raise InputError(f"{record}: says {saved['bytes']} bytes of results were written, but the .partial file "
                         "is shorter; delete both to start over")
    return {k: saved[k] for k in ("line", "offset", "bytes", "requests", "input_sha256")}, digest


def progress_bar(total: int, initial: int):
    """tqdm on stderr: lines/s and the ETA, a line every 30 s when stderr is not a terminal."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="scoring", unit="line", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if tty else 30, smoothing=0.05)
