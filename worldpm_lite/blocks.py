"""The blocks of `score --ray` (ray.py), without Ray: the plan (blocks of about --block-rows rows:
JSONL files by byte range at line boundaries, Parquet files by row group and row range), each block
checked and read, the part files a block's results go to, the manifest that records them, the check
that a run is complete, and the parts merged into one output file.

manifest.jsonl holds one JSON record per line, appended and fsynced as each comes, so recording a part
costs the same at the first block as at the ten-thousandth:
  {"part": BLOCK, "name": PART FILE, "rows": N, "batches", "tokens", "seconds", "worker"}
  {"failed": BLOCK, "file": FILE, "where": "lines A-B" or "rows A-B", "attempts": N, "error": TEXT}
  {"complete": ROWS}
A later record of a block replaces an earlier one (a failed block scored by --resume). A killed driver
can leave a torn last line: it is dropped when the manifest is opened again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .chat import ConversationError
from .data import Request, RequestError, parse_line, parse_request, read_lines
from .errors import InputError

PARQUET = (".parquet", ".pq")
BLOCK_ROWS = 1000
SAMPLE_BYTES = 1 << 20  # of a JSONL file, to estimate its bytes per row


def part_name(block: dict) -> str:
    return f"part-{block['block']:05d}-rows-{block['first_row']}-{block['first_row'] + block['rows'] - 1}.jsonl"


def _jsonl_lines(block: dict) -> Iterator[bytes]:
    """The raw lines of a JSONL block (its byte range starts and ends at line boundaries)."""
    with open(block["file"], "rb") as f:
        f.seek(block["start"])
        left = block["end"] - block["start"]
        while left > 0 and (raw := f.readline(left)):
            left -= len(raw)
            yield raw


def _parquet_rows(block: dict) -> Iterator[dict]:
    """A Parquet block's rows as request objects (null columns left out)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(block["file"]).read_row_group(block["group"]).slice(block["offset"], block["length"])
    for row in table.to_pylist():
        yield {k: v for k, v in row.items() if v is not None}


def block_requests(block: dict) -> Iterator[tuple[str, Request]]:
    """(where, request) for each row of a checked block: where is FILE:LINE or FILE: row N."""
    if "start" in block:
        for line in read_lines(block["file"], block["start"], block["first_line"] - 1, end=block["end"]):
            yield f"{block['file']}:{line.number}", line.request
    else:
        for i, row in enumerate(_parquet_rows(block)):
            yield f"{block['file']}: row {block['row'] + i + 1}", parse_request(row, "row")


def check_block(block: dict) -> dict:
    """Parse every row of a block: its rows, lines (JSONL), sha256 of its content, and the first bad
    row as (its position in the block from 1, what is wrong) or None."""
    digest, rows, lines, bad = hashlib.sha256(), 0, 0, None
    if "start" in block:
        for raw in _jsonl_lines(block):
            lines += 1
            digest.update(raw)
            if raw.strip():
                try:
                    parse_line(raw)
                except ConversationError as e:
                    bad = (lines, str(e))
                    break
                rows += 1
    else:
        for row in _parquet_rows(block):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            try:
                parse_request(row, "row")
            except ConversationError as e:
                bad = (rows + 1, str(e).removeprefix("row: "))
                break
            rows += 1
    return {"rows": rows, "lines": lines, "sha256": digest.hexdigest(), "bad": bad}


def input_files(input: str) -> list[Path]:
    if "://" in input:
        raise RequestError(f"--input {input}: --ray reads files from a filesystem every node mounts (NFS, a shared "
                           "disk); copy the data there")
    src = Path(input)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in (".jsonl", *PARQUET) and not p.name.startswith("."))
        if not files:
            raise RequestError(f"--input {input}: no .jsonl or .parquet files in this folder")
        return [f.resolve() for f in files]
    if not src.is_file():
        raise RequestError(f"--input {input}: no such file or folder")
    return [src.resolve()]


def plan_blocks(files: list[Path], block_rows: int) -> list[dict]:
    """Blocks of about block_rows rows, in input order (see the module docstring)."""
    import pyarrow.parquet as pq

    blocks = []
    for path in files:
        if path.suffix in PARQUET:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet
                raise RequestError(f"{path}: not a readable Parquet file ({e})") from None
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                for offset in range(0, n, block_rows):
                    length = min(block_rows, n - offset)
                    blocks.append({"file": str(path), "group": g, "offset": offset, "length": length, "row": row})
                    row += length
        else:
            blocks += [{"file": str(path), "start": a, "end": b} for a, b in _byte_ranges(path, block_rows)]
    return blocks


def _byte_ranges(path: Path, block_rows: int) -> list[tuple[int, int]]:
    """A JSONL file cut after the first newline at or past every `step` bytes, step being block_rows
    lines of the file's first MiB."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
        step = max(1, len(sample) * block_rows // max(1, sample.count(b"\n")))
        while cuts[-1] + step < size:
            f.seek(cuts[-1] + step - 1)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


def checked(blocks: list[dict], checks: list[dict]) -> list[dict]:
    """The blocks with their rows, first line (JSONL), first output row and hash; the first bad row in
    input order is raised, named by file and line or row. Blocks without rows are left out."""
    lines: dict[str, int] = {}
    out, row = [], 0
    for b, c in zip(blocks, checks):
        first_line = lines.get(b["file"], 0) + 1
        if c["bad"] is not None:
            at, why = c["bad"]
            where = f"{b['file']}:{first_line + at - 1}" if "start" in b else f"{b['file']}: row {b['row'] + at}"
            raise RequestError(f"{where}: {why}")
        lines[b["file"]] = first_line - 1 + c["lines"]
        if c["rows"]:
            out.append(b | {"block": len(out), "rows": c["rows"], "first_row": row, "sha256": c["sha256"]}
                       | ({"first_line": first_line, "lines": c["lines"]} if "start" in b else {}))
            row += c["rows"]
    if not out:
        raise RequestError(f"{', '.join(sorted(lines)) or 'the input'}: no requests (the input is empty)")
    return out


def fingerprint(files: list[Path]) -> list[dict]:
    return [{"file": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def destination(output: str) -> tuple[Path, Path | None]:
    """(the parts folder, the single output file or None)."""
    out = Path(output)
    folder = output.endswith(("/", os.sep)) or out.is_dir()
    if not folder and out.suffix not in (".jsonl", *PARQUET):
        raise RequestError(f"--output {output}: expected a .jsonl or .parquet file name, or a folder (ending in /) "
                           "for part files")
    if not out.absolute().parent.is_dir():
        raise RequestError(f"--output {output}: folder {out.absolute().parent} does not exist")
    return (out, None) if folder else (out.with_name(f".{out.name}.parts"), out)


def merge(folder: Path, names: list[str], final: Path) -> None:
    """The parts, in order, streamed into `final` through a temporary file: JSONL byte for byte,
    Parquet through _writer, 1024 rows at a time."""
    tmp = final.with_name(f".{final.name}.partial")
    try:
        if final.suffix not in PARQUET:
            with open(tmp, "wb") as out:
                for name in names:
                    with open(folder / name, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        else:
            with _writer(tmp, final.suffix) as write:
                for name in names:
                    with open(folder / name, encoding="utf-8") as f:
                        while chunk := [line.rstrip("\n") for _, line in zip(range(1024), f)]:
                            write(chunk)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def describe(row) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return f"the row with id {row['id']!r}"
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    return f"the row {text[:80]!r}{'...' if len(text) > 80 else ''}"


class _writer:
    """Appends JSON result texts to a JSONL file, or their fields to a Parquet file (`preferred` as
    text: "chosen"/"rejected" for pairs, the index for rankings; the id column's type from the first
    batch)."""

    def __init__(self, path: Path, suffix: str):
        self.path, self.parquet = path, suffix in PARQUET
        self.file = self.writer = None

    def __enter__(self):
        if not self.parquet:
            self.file = open(self.path, "w", encoding="utf-8")
        return self.write

    def write(self, results: list[str]) -> None:
        if not self.parquet:
            self.file.write("".join(r + "\n" for r in results))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(r) for r in results]
        for r in rows:
            if "preferred" in r:
                r["preferred"] = str(r["preferred"])
        if self.writer is None:
            fields = [("score", pa.float64()), ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
                      ("scores", pa.list_(pa.float64())), ("preferred", pa.string())]
            ids = [r["id"] for r in rows if "id" in r]
            if ids:
                fields.insert(0, ("id", pa.array(ids).type))
            self.schema = pa.schema(fields)
            self.writer = pq.ParquetWriter(self.path, self.schema)
        self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        return False


def block_span(block: dict) -> str:
    """A block's rows in the words of its file: lines A-B of a JSONL file, rows A-B of a Parquet file."""
    if "start" in block:
        return f"lines {block['first_line']}-{block['first_line'] + block['lines'] - 1}"
    return f"rows {block['row'] + 1}-{block['row'] + block['length']}"


class Manifest:
    """manifest.jsonl of a parts folder (see the module docstring): `parts` and `failed` by block, and
    `complete` (the rows, or None)."""

    def __init__(self, path: Path):
        self.path, self.parts, self.failed, self.complete = Path(path), {}, {}, None
        good = 0
        if self.path.exists():
            data = self.path.read_bytes()
            for n, line in enumerate(data.splitlines(keepends=True), 1):
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except json.JSONDecodeError:
                    record = None
                if record is None:
                    if good + len(line) < len(data):
                        raise InputError(f"{self.path}:{n}: not a manifest record ({line[:80]!r}); the manifest is "
                                         f"damaged: delete {self.path.parent} to start over")
                    break  # a torn last line: the driver was killed while appending it
                self._take(record)
                good += len(line)
        self.file = open(self.path, "ab")
        self.file.truncate(good)

    def _take(self, record: dict) -> None:
        if "part" in record:
            self.parts[record["part"]] = record
            self.failed.pop(record["part"], None)
        elif "failed" in record:
            self.failed[record["failed"]] = record
        else:
            self.complete = record["complete"]

    def add(self, record: dict) -> None:
        """Append one record and fsync it: it is there when this returns."""
        self.file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self._take(record)

    def close(self) -> None:
        self.file.close()


def check_complete(folder: Path, blocks: list[dict], parts: dict[int, dict]) -> None:
    """InputError naming the first planned block without exactly its part: a record, the part file, and
    the plan's row count both in the record and in the file."""
    for b in blocks:
        p, name = parts.get(b["block"]), part_name(b)
        if p is None or p["name"] != name:
            raise InputError(f"{folder}: block {b['block']} ({b['file']} {block_span(b)}) has no part {name}; rerun "
                             "with --resume to score it")
        try:
            with open(folder / name, "rb") as f:
                rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            rows = None
        if rows != b["rows"] or p["rows"] != b["rows"]:
            raise InputError(f"{folder / name}: holds {rows} rows (its record: {p['rows']}), the plan's block "
                             f"{b['block']} ({b['file']} {block_span(b)}) has {b['rows']}; delete the part and rerun "
                             "with --resume to score it again")
