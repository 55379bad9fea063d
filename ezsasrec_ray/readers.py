"""Reading raw interaction logs into one normalized table shape, file by file, on Ray Data.

Every input (CSV/TSV with or without header, gzip too, Parquet, JSON lines; a file, a
directory, a glob, or any URI pyarrow understands) becomes blocks with four columns:

=========  ===============================================================================
``user``   raw user id: ``int64`` when the block's ids are canonical integers, else ``string``
``item``   raw item id, the same rule
``ts``     event time in unix **milliseconds** (``int64``), null when the log has no time
``ord``    input order: ``file_index << 40 | row_in_file``; breaks time ties, and *is* the
           time order when there is no time column
=========  ===============================================================================

Rows with a null user or item are kept here (and counted and dropped by ``prepare``); lines
with the wrong number of fields fail the read with the file and line number, or are skipped
and counted with ``on_bad_lines="skip"``. Per-file counts go to a small Ray actor
(:class:`ReadStats`) keyed by file, so a retried read task does not count twice.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .errors import PrepareError

USER_CANDIDATES = ("userID", "userId", "user_id", "user", "UserId", "uid")
ITEM_CANDIDATES = ("itemID", "itemId", "item_id", "movieId", "item", "ItemId", "iid", "product_id")
TIME_CANDIDATES = ("time", "timestamp", "Timestamp", "ts", "datetime", "event_time")
FORMATS = ("csv", "tsv", "parquet", "json")
MS_THRESHOLD = 100_000_000_000  # a unix time above this (year 5138 in seconds) is milliseconds
ROW_BITS = 40  # ord = file_index << 40 | row_in_file
CSV_BLOCK_BYTES = 16 << 20


@dataclass
class LogSpec:
    """How to read a raw log. ``None`` fields are detected from the data."""

    format: str | None = None  # csv | tsv | parquet | json, else from the file extension
    user_col: str | None = None  # a column name, or a 0-based position for header-less text
    item_col: str | None = None
    time_col: str | None = None  # "" or "none" disables time even if a column matches
    delimiter: str | None = None
    header: bool | None = None
    on_bad_lines: str = "error"  # error | skip
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise PrepareError(f"--format: unknown format {self.format!r}; use one of {FORMATS}")
        if self.on_bad_lines not in ("error", "skip"):
            raise PrepareError(
                f"--on-bad-lines: unknown value {self.on_bad_lines!r}; use 'error' or 'skip'"
            )


# --------------------------------------------------------------------------------------------
# Listing input files


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _to_uri(fs: pafs.FileSystem, path: str, original: str) -> str:
    if "://" not in original:
        return path
    scheme = original.split("://", 1)[0]
    return path if path.startswith(scheme + "://") else f"{scheme}://{path}"


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/")[-1:])


def list_input_files(source: str) -> list[str]:
    """Expand a file, directory (recursive), glob or URI into a sorted list of file URIs."""
    if not source:
        raise PrepareError("--input: no input given")
    has_glob = any(ch in source for ch in "*?[")
    base = source
    if has_glob:
        cut = min(source.index(ch) for ch in "*?[" if ch in source)
        base = source[: source.rfind("/", 0, cut) + 1] or "."
    try:
        fs, path = _resolve(base)
        info = fs.get_file_info(path)
    except Exception as exc:  # noqa: BLE001 - any filesystem error becomes one line
        raise PrepareError(f"{source}: cannot open input ({exc})") from None
    if info.type == pafs.FileType.NotFound:
        raise PrepareError(f"{source}: input not found")
    if info.type == pafs.FileType.File and not has_glob:
        return [_to_uri(fs, path, source)]
    selector = pafs.FileSelector(path, recursive=True)
    entries = [e for e in fs.get_file_info(selector) if e.type == pafs.FileType.File]
    files = sorted(e.path for e in entries if _visible(e.path))
    if has_glob:
        _, pattern = _resolve(source) if "://" not in source else (None, source.split("://", 1)[1])
        files = [f for f in files if fnmatch.fnmatch(f, pattern)]
    if not files:
        raise PrepareError(f"{source}: no input files found")
    return [_to_uri(fs, f, source) for f in files]


def detect_format(path: str, fmt: str | None) -> str:
    """The reader for one file: the given format, else its extension (default csv)."""
    if fmt:
        return fmt
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith(".tsv"):
        return "tsv"
    return "csv"


# --------------------------------------------------------------------------------------------
# Column resolution and value normalization


def _pick(columns: list[str], wanted: str | None, candidates, role: str, path: str,
          required: bool) -> str | None:
    if wanted is not None:
        if wanted in ("", "none", "None"):
            return None
        if wanted in columns:
            return wanted
        raise PrepareError(f"{path}: {role} column {wanted!r} not found; columns are {columns}")
    for name in candidates:
        if name in columns:
            return name
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name.lower() in lower:
            return lower[name.lower()]
    if required:
        raise PrepareError(
            f"{path}: no {role} column; columns are {columns}; name it with --{role}-col"
        )
    return None


def normalize_ids(values: pa.Array) -> pa.Array:
    """Ids as ``int64`` when every value is a canonical integer, else as ``string``."""
    if pa.types.is_integer(values.type):
        return values.cast(pa.int64())
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    as_text = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    valid = pc.drop_null(as_text)
    if len(valid) and pc.all(pc.match_substring_regex(valid, r"^-?(0|[1-9][0-9]{0,17})$")).as_py():
        return as_text.cast(pa.int64())
    return as_text


def _to_millis(values: pa.Array, path: str, column: str, first_row: int) -> pa.Array:
    """Unix seconds, milliseconds or ISO-8601 text -> int64 unix milliseconds."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        return values.cast(pa.timestamp("ms")).cast(pa.int64())
    original = values
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            values = values.cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            import pandas as pd

            numbers = pd.to_numeric(values.to_pandas(), errors="coerce")
            if numbers.isna().all():
                return _parse_iso(values, path, column, first_row)
            # a numeric column: any value that is not a number is the bad one
            values = pa.array(numbers.to_numpy(dtype=np.float64), from_pandas=False)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise PrepareError(f"{path}: column {column!r}: unsupported time type {values.type}")
    numbers = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(numbers)
    if bad.any():
        _raise_bad_time(original, bad, path, column, first_row)
    millis = np.where(np.abs(numbers) >= MS_THRESHOLD, numbers, numbers * 1000.0)
    return pa.array(np.round(millis).astype(np.int64))


def _parse_iso(values: pa.Array, path: str, column: str, first_row: int) -> pa.Array:
    import pandas as pd

    text = values.to_pandas()
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        _raise_bad_time(values, bad, path, column, first_row)
    return pa.array(parsed.astype("datetime64[ms, UTC]").to_numpy().astype("datetime64[ms]")
                    .astype(np.int64))


def _raise_bad_time(values: pa.Array, bad: np.ndarray, path: str, column: str, first_row: int):
    position = int(np.flatnonzero(bad)[0])
    example = values[position].as_py()
    shown = "<empty>" if example is None else repr(example)
    raise PrepareError(
        f"{path}: column {column!r}: unparseable time value {shown} at data row "
        f"{first_row + position + 1}; use unix seconds, milliseconds or ISO-8601"
    )


# --------------------------------------------------------------------------------------------
# Readers, one per format; each yields raw pyarrow tables (all columns) for one file


def _sniff_first_line(fs, path) -> str:
    with fs.open_input_stream(path, compression="detect") as stream:
        head = stream.read(1 << 16)
    text = head.decode("utf-8", errors="replace")
    return text.splitlines()[0] if text.strip() else ""


def _detect_delimiter(line: str, fmt: str) -> str:
    if fmt == "tsv":
        return "\t"
    counts = {d: line.count(d) for d in ("\t", ",", ";", "|", " ")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _split_header(line: str, delimiter: str) -> list[str]:
    parts = line.split(delimiter) if delimiter != " " else line.split()
    return [p.strip().strip('"').strip() for p in parts]


def _read_text(fs, path: str, uri: str, spec: LogSpec, fmt: str, stats: dict) -> Iterator:
    first = _sniff_first_line(fs, path)
    if not first.strip():
        raise PrepareError(f"{uri}: empty input")
    delimiter = spec.delimiter or _detect_delimiter(first, fmt)
    fields = _split_header(first, delimiter)
    header = spec.header
    if header is None:
        names = {n for n in (spec.user_col, spec.item_col, spec.time_col) if n}
        header = bool((names | set(USER_CANDIDATES) | set(ITEM_CANDIDATES)) & set(fields))
    if header:
        column_names = fields
    else:
        column_names = [str(i) for i in range(len(fields))]
    bad_rows: list = []

    def on_invalid(row):
        bad_rows.append((row.number, row.text, 1))
        return "skip" if spec.on_bad_lines == "skip" else "error"

    read_options = pacsv.ReadOptions(
        column_names=column_names, skip_rows=1 if header else 0, use_threads=False,
        block_size=CSV_BLOCK_BYTES)
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter, quote_char='"' if delimiter in (",", ";", "|") else False,
        invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in column_names}, strings_can_be_null=True)
    stream = fs.open_input_stream(path, compression="detect")
    try:
        reader = pacsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                                convert_options=convert)
        data_rows = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            table = pa.Table.from_batches([batch])
            table = _drop_broken_quotes(table, uri, spec, bad_rows, data_rows + int(header))
            data_rows += batch.num_rows
            yield table
    except pa.ArrowInvalid as exc:
        if bad_rows and spec.on_bad_lines == "error":
            number, text, _ = bad_rows[0]
            got = len(_split_header(text.splitlines()[0] if text else "", delimiter))
            raise PrepareError(
                f"{uri}: line {number}: wrong number of fields (expected {len(column_names)}, "
                f"got {got}): {text[:80]!r}; fix it or pass --on-bad-lines skip"
            ) from None
        raise PrepareError(f"{uri}: cannot parse: {str(exc).splitlines()[0]}") from None
    finally:
        stream.close()
    stats["bad_lines"] = sum(n for _, _, n in bad_rows)
    if bad_rows:
        stats["bad_line_example"] = f"line {bad_rows[0][0]}: {bad_rows[0][1][:80]!r}"


def _drop_broken_quotes(table: pa.Table, uri: str, spec: LogSpec, bad_rows: list,
                        lines_before: int) -> pa.Table:
    """A value holding a newline is an unterminated quote that swallowed the lines after it."""
    broken = None
    for column in table.columns:
        hit = pc.fill_null(pc.match_substring(column, "\n"), False)
        broken = hit if broken is None else pc.or_(broken, hit)
    if broken is None or not pc.any(broken).as_py():
        return table
    first = int(np.flatnonzero(broken.to_numpy(zero_copy_only=False))[0])
    line = lines_before + first + 1 + len(bad_rows)
    text = "|".join(str(v) for v in table.slice(first, 1).to_pylist()[0].values())
    if spec.on_bad_lines == "error":
        raise PrepareError(f"{uri}: line {line}: unterminated quote swallows the lines after it: "
                           f"{text[:80]!r}; fix it or pass --on-bad-lines skip")
    for row in table.filter(broken).to_pylist():
        swallowed = sum(str(v).rstrip("\r\n").count("\n") for v in row.values() if v)
        bad_rows.append((line, text, 1 + swallowed))
    return table.filter(pc.invert(broken))


def _read_parquet(fs, path: str, uri: str, spec: LogSpec, stats: dict) -> Iterator:
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as exc:  # noqa: BLE001
        raise PrepareError(f"{uri}: cannot read Parquet ({str(exc).splitlines()[0]})") from None
    for batch in parquet.iter_batches(batch_size=1 << 20):
        yield pa.Table.from_batches([batch])


def _read_json(fs, path: str, uri: str, spec: LogSpec, stats: dict) -> Iterator:
    with fs.open_input_stream(path, compression="detect") as stream:
        data = stream.read()
    if not data.strip():
        raise PrepareError(f"{uri}: empty input")
    try:
        yield pajson.read_json(io.BytesIO(data),
                               read_options=pajson.ReadOptions(block_size=64 << 20))
        return
    except pa.ArrowInvalid as exc:
        if spec.on_bad_lines == "error":
            raise PrepareError(
                f"{uri}: bad JSON line ({str(exc).splitlines()[0]}); "
                "fix it or pass --on-bad-lines skip") from None
    records, bad, example = [], 0, None
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except ValueError:
            bad += 1
            example = example or f"line {number}: {line[:80]!r}"
    stats["bad_lines"] = bad
    if example:
        stats["bad_line_example"] = example
    if records:
        yield pa.Table.from_pylist(records)


def read_file(uri: str, file_index: int, spec: LogSpec, stats: dict) -> Iterator[pa.Table]:
    """Yield the normalized blocks (user, item, ts, ord) of one input file; fill ``stats``."""
    fs, path = _resolve(uri)
    fmt = detect_format(path, spec.format)
    try:
        if fmt == "parquet":
            raw_tables = _read_parquet(fs, path, uri, spec, stats)
        elif fmt == "json":
            raw_tables = _read_json(fs, path, uri, spec, stats)
        else:
            raw_tables = _read_text(fs, path, uri, spec, fmt, stats)
        rows = 0
        columns = None
        for table in raw_tables:
            if columns is None:
                names = table.column_names
                headerless = all(n.isdigit() for n in names)
                default_time = "2" if headerless and len(names) == 3 else None
                columns = (
                    _pick(names, spec.user_col or ("0" if headerless else None),
                          USER_CANDIDATES, "user", uri, True),
                    _pick(names, spec.item_col or ("1" if headerless else None),
                          ITEM_CANDIDATES, "item", uri, True),
                    _pick(names, spec.time_col if spec.time_col is not None else default_time,
                          () if headerless else TIME_CANDIDATES, "time", uri, False),
                )
            user_col, item_col, time_col = columns
            n = table.num_rows
            if time_col is None:
                ts = pa.nulls(n, pa.int64())
            else:
                ts = _to_millis(table.column(time_col).combine_chunks(), uri, time_col, rows)
            order = (np.int64(file_index) << ROW_BITS) + np.arange(rows, rows + n, dtype=np.int64)
            yield pa.table({
                "user": normalize_ids(table.column(user_col).combine_chunks()),
                "item": normalize_ids(table.column(item_col).combine_chunks()),
                "ts": ts,
                "ord": pa.array(order),
            })
            rows += n
    except OSError as exc:
        raise PrepareError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None
    if columns is None or rows == 0:
        if not stats.get("bad_lines"):
            raise PrepareError(f"{uri}: empty input (no data rows)")
    stats.update(rows=rows, columns={"user": columns and columns[0],
                                     "item": columns and columns[1],
                                     "time": columns and columns[2]})
