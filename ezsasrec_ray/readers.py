"""Reading raw interaction logs into one normalized table shape, file by file, on Ray Data.

Every input (CSV/TSV with or without header, gzip too, Parquet, JSON lines; a file, a
directory, a glob, or any URI pyarrow understands) becomes blocks with four columns:

=========  ===============================================================================
``user``   raw user id: ``int64`` when the block's ids are canonical integers, else ``string``
``item``   raw item id, the same rule
``ts``     event time in unix **milliseconds** (``int64``), null when the log has no time;
           numbers are seconds, ms, microseconds or nanoseconds by magnitude (per value;
           the units seen are stated per file)
``ord``    input order: ``file_index << 40 | row_in_file``; breaks time ties, and *is* the
           time order when there is no time column
=========  ===============================================================================

Rows with a null user or item are kept here (and counted and dropped by ``prepare``); only an
empty field (and the ``null_values`` the user names) is a null id. Lines with the wrong number
of fields, JSON lines that are not objects and ids that are JSON objects/arrays fail the read
with the file and line number, or are skipped and counted with ``on_bad_lines="skip"``.
Files and directories under the input root whose names start with ``_`` or ``.`` (Spark's
``_temporary/``, ``_SUCCESS``, ``.staging/``, ``.crc`` files) are skipped and counted. Per-file counts go to a small Ray actor
(:class:`ReadStats`) keyed by file, so a retried read task does not count twice.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
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
# unix time units by magnitude: below 1e11 seconds, then ms, us, ns (each boundary is year 5138
# in the smaller unit and 1973 in the larger one); (name, upper bound, factor to ms)
TIME_UNITS = (("s", 1e11, 1000.0), ("ms", 1e14, 1.0), ("us", 1e17, 1e-3), ("ns", np.inf, 1e-6))
MAX_MILLIS = 253_402_300_800_000  # year 10000: a time at or beyond it is out of range
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
    null_values: tuple = ()  # id values read as null, besides the empty field
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.null_values = tuple(self.null_values)
        if not all(isinstance(v, str) for v in self.null_values):
            raise PrepareError(f"--null-values: expected strings, got {self.null_values!r}")
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


def _hidden(relative: str) -> bool:
    """A path under the input root with a ``_`` or ``.`` name in it (Hadoop/Spark: temporaries,
    markers, checksums, staging copies)."""
    return any(part.startswith((".", "_")) for part in relative.replace("\\", "/").split("/")
               if part)


def list_input_files(source: str, skipped: list | None = None) -> list[str]:
    """Expand a file, directory (recursive), glob or URI into a sorted list of file URIs.

    Below the input root (the directory, or the part of a glob before its first wildcard),
    every file with a path component starting with ``_`` or ``.`` is skipped; their URIs are
    appended to ``skipped`` when given. A file named on its own is always read.
    """
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
    files = sorted(e.path for e in fs.get_file_info(selector) if e.type == pafs.FileType.File)
    if has_glob:
        _, pattern = _resolve(source) if "://" not in source else (None, source.split("://", 1)[1])
        files = [f for f in files if fnmatch.fnmatch(f, pattern)]
    root = path.rstrip("/")
    hidden = [f for f in files if _hidden(f[len(root):] if f.startswith(root) else f)]
    if skipped is not None:
        skipped.extend(_to_uri(fs, f, source) for f in hidden)
    hidden_set = set(hidden)
    files = [f for f in files if f not in hidden_set]
    if not files:
        more = f" ({len(hidden)} hidden file(s) with _ or . names skipped)" if hidden else ""
        raise PrepareError(f"{source}: no input files found{more}")
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


def unix_to_millis(numbers: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Unix times -> float milliseconds, each value's unit by its magnitude (:data:`TIME_UNITS`);
    also the units seen, in :data:`TIME_UNITS` order."""
    numbers = np.asarray(numbers, dtype=np.float64)
    magnitude = np.abs(numbers)
    out = np.empty_like(numbers)
    units, lower = [], 0.0
    for name, upper, factor in TIME_UNITS:
        hit = (magnitude >= lower) & (magnitude < upper)
        if hit.any():
            out[hit] = numbers[hit] * factor
            units.append(name)
        lower = upper
    return out, units


def _to_millis(values: pa.Array, path: str, column: str,
               first_row: int) -> tuple[pa.Array, list[str]]:
    """Unix s/ms/us/ns or ISO-8601 text -> (int64 unix milliseconds, the units seen)."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        return values.cast(pa.timestamp("ms")).cast(pa.int64()), ["timestamp"]
    original = values
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            values = values.cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            import pandas as pd

            numbers = pd.to_numeric(values.to_pandas(), errors="coerce")
            if numbers.isna().all():
                return _parse_iso(values, path, column, first_row), ["iso"]
            # a numeric column: any value that is not a number is the bad one
            values = pa.array(numbers.to_numpy(dtype=np.float64), from_pandas=False)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise PrepareError(f"{path}: column {column!r}: unsupported time type {values.type}")
    numbers = values.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(numbers)
    if bad.any():
        _raise_bad_time(original, bad, path, column, first_row)
    millis, units = unix_to_millis(numbers)
    out_of_range = np.abs(millis) >= MAX_MILLIS
    if out_of_range.any():
        _raise_bad_time(original, out_of_range, path, column, first_row, "out of range")
    return pa.array(np.round(millis).astype(np.int64)), units


def _parse_iso(values: pa.Array, path: str, column: str, first_row: int) -> pa.Array:
    import pandas as pd

    text = values.to_pandas()
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        _raise_bad_time(values, bad, path, column, first_row)
    return pa.array(parsed.dt.tz_localize(None).astype("datetime64[ms]").to_numpy()
                    .astype(np.int64))


def _raise_bad_time(values: pa.Array, bad: np.ndarray, path: str, column: str, first_row: int,
                    problem: str = "unparseable"):
    position = int(np.flatnonzero(bad)[0])
    example = values[position].as_py()
    shown = "<empty>" if example is None else repr(example)
    raise PrepareError(
        f"{path}: column {column!r}: {problem} time value {shown} at data row "
        f"{first_row + position + 1}; use unix seconds, milliseconds (or us, ns) or ISO-8601"
    )


# --------------------------------------------------------------------------------------------
# Readers, one per format; each yields raw pyarrow tables (all columns) for one file


_NEWLINE = re.compile(r"\r\n|\r|\n")
_NEWLINE_BYTES = re.compile(rb"\r\n|\r|\n")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .\-]*")
SNIFF_LINES = 20


def _sniff_lines(fs, path) -> tuple[int, list[str]]:
    """(line index of the first non-empty line, it and up to SNIFF_LINES non-empty lines after
    it) from the start of a text file."""
    with fs.open_input_stream(path, compression="detect") as stream:
        head = stream.read(1 << 16)
    lines = _NEWLINE.split(head.decode("utf-8-sig", errors="replace"))
    if len(head) == 1 << 16 and len(lines) > 1:
        lines = lines[:-1]  # cut mid-line
    first = next((i for i, line in enumerate(lines) if line), len(lines))
    return first, [line for line in lines[first:] if line][:SNIFF_LINES + 1]


def _detect_delimiter(line: str, fmt: str) -> str:
    if fmt == "tsv":
        return "\t"
    counts = {d: line.count(d) for d in ("\t", ",", ";", "|", " ")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _split_header(line: str, delimiter: str) -> list[str]:
    parts = line.split(delimiter) if delimiter != " " else line.split()
    return [p.strip().strip('"').strip() for p in parts]


def _looks_like_header(fields: list[str], data_lines: list[str], delimiter: str) -> bool:
    """Names (not values) in the first line: every field is a name, and in some column the
    first line has no digit while every sampled line below has one (``customer`` over
    ``17``/``c17``). Headerless string ids without digits (``alice,apple``) stay data."""
    if not fields or not all(_NAME.fullmatch(f) for f in fields):
        return False
    rows = [r for r in (_split_header(line, delimiter) for line in data_lines)
            if len(r) == len(fields)]
    if not rows:
        return False
    return any(not any(ch.isdigit() for ch in name)
               and all(any(ch.isdigit() for ch in row[j]) for row in rows)
               for j, name in enumerate(fields))


def _read_text(fs, path: str, uri: str, spec: LogSpec, fmt: str, stats: dict) -> Iterator:
    first_index, lines = _sniff_lines(fs, path)
    delimiter, column_names, header = _text_layout(uri, spec, fmt, first_index, lines)
    stats["header_lines"] = int(bool(header))
    bad_rows: list = []

    def on_invalid(row):  # raw text: an open quote in it may have swallowed lines after it
        spanned = sum(1 for part in _NEWLINE.split(row.text or "") if part)
        bad_rows.append((row.number, row.text, max(spanned, 1)))
        return "skip" if spec.on_bad_lines == "skip" else "error"

    stream = fs.open_input_stream(path, compression="detect")
    try:
        reader = pacsv.open_csv(stream, **_csv_options(column_names, delimiter, on_invalid,
                                                       first_index + 1 if header else 0))
        data_rows = kept = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            table = _drop_broken_quotes(pa.Table.from_batches([batch]), uri, spec, bad_rows,
                                        data_rows + first_index + int(header))
            data_rows += batch.num_rows
            kept += table.num_rows
            yield table
    except pa.ArrowInvalid as exc:
        if bad_rows and spec.on_bad_lines == "error":
            number, text = bad_rows[0][:2]
            got = len(_split_header(text.splitlines()[0] if text else "", delimiter))
            raise PrepareError(
                f"{uri}: line {number}: wrong number of fields (expected {len(column_names)}, "
                f"got {got}): {text[:80]!r}; fix it or pass --on-bad-lines skip"
            ) from None
        raise PrepareError(f"{uri}: cannot parse: {str(exc).splitlines()[0]}") from None
    finally:
        stream.close()
    _count_bad_lines(stats, bad_rows, lambda: _count_lines(fs, path) - int(bool(header)) - kept)


def _text_layout(uri: str, spec: LogSpec, fmt: str, first_index: int, lines: list):
    """The delimiter, column names and whether the first line is a header."""
    if not lines or not "".join(lines).strip():
        raise PrepareError(f"{uri}: empty input")
    first = lines[0]
    delimiter = spec.delimiter or _detect_delimiter(first, fmt)
    fields = _split_header(first, delimiter)
    if not any(fields):
        raise PrepareError(f"{uri}: line {first_index + 1}: no fields in the first line "
                           f"({first[:80]!r}); remove it or pass --delimiter")
    header = spec.header
    if header is None:
        given = {n for n in (spec.user_col, spec.item_col, spec.time_col) if n}
        known = {n.lower() for n in (*USER_CANDIDATES, *ITEM_CANDIDATES, *given)
                 if not n.isdigit()}
        header = bool(known & {f.lower() for f in fields})
        if not header and _looks_like_header(fields, lines[1:], delimiter):
            raise PrepareError(
                f"{uri}: first line {first[:80]!r} looks like a header but names no known user "
                "or item column; name them with --user-col/--item-col (or pass --header false "
                "if it is data)")
    names = fields if header else [str(i) for i in range(len(fields))]
    return delimiter, names, header


def _csv_options(column_names: list, delimiter: str, on_invalid, skip_rows: int) -> dict:
    """pyarrow CSV options: every column a string, only the empty field null (NA, NULL and nan
    are ids), quotes only where a delimiter makes them usual."""
    return {
        "read_options": pacsv.ReadOptions(column_names=column_names, skip_rows=skip_rows,
                                          use_threads=False, block_size=CSV_BLOCK_BYTES),
        "parse_options": pacsv.ParseOptions(
            delimiter=delimiter, quote_char='"' if delimiter in (",", ";", "|") else False,
            invalid_row_handler=on_invalid),
        "convert_options": pacsv.ConvertOptions(
            column_types={c: pa.string() for c in column_names}, null_values=[""],
            strings_can_be_null=True, quoted_strings_can_be_null=True),
    }


def _count_bad_lines(stats: dict, bad_rows: list, lines_not_kept):
    """Add the file's bad lines to ``stats``. Rows cut by unterminated quotes: every non-empty
    line not in a kept row or the header is one they swallowed (kept rows hold no newline)."""
    bad_lines = sum(row[2] for row in bad_rows if row[2] is not None)
    if any(row[2] is None for row in bad_rows):
        bad_lines = lines_not_kept()
    stats["bad_lines"] = stats.get("bad_lines", 0) + bad_lines
    if bad_rows:
        stats["bad_line_example"] = f"line {bad_rows[0][0]}: {bad_rows[0][1][:80]!r}"


def _count_lines(fs, path) -> int:
    """Non-empty lines of a text file (what a reader could turn into rows)."""
    count, tail = 0, b""
    with fs.open_input_stream(path, compression="detect") as stream:
        while chunk := stream.read(1 << 24):
            lines = _NEWLINE_BYTES.split(tail + chunk)  # (a \r|\n cut apart: one empty line)
            tail = lines.pop()
            count += sum(1 for line in lines if line)
    return count + int(bool(tail))


def _drop_broken_quotes(table: pa.Table, uri: str, spec: LogSpec, bad_rows: list,
                        lines_before: int) -> pa.Table:
    """A value holding a newline is an unterminated quote that swallowed the lines after it.
    Dropped rows are recorded with no line count: the lines they spanned are counted once the
    file is read (see ``_read_text``)."""
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
    for _ in range(int(pc.sum(broken).as_py())):
        bad_rows.append((line, text, None))
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
        table = pajson.read_json(io.BytesIO(data),
                                 read_options=pajson.ReadOptions(block_size=64 << 20))
    except pa.ArrowInvalid:
        table = None  # a line that is not an object, or a column whose type changes
    if table is not None:
        yield table
        return
    # line by line: bad lines are named (or skipped and counted), mixed types become text
    records, bad, example = [], 0, None
    for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            if spec.on_bad_lines == "error":
                raise PrepareError(
                    f"{uri}: line {number}: not a JSON object: {line[:80]!r}; fix it or pass "
                    "--on-bad-lines skip") from None
            bad += 1
            example = example or f"line {number}: {line[:80]!r}"
            continue
        records.append(record)
    stats["bad_lines"] = stats.get("bad_lines", 0) + bad
    if example:
        stats["bad_line_example"] = example
    if records:
        yield _records_table(records, stats)


def _json_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _records_table(records: list[dict], stats: dict) -> pa.Table:
    """JSON objects -> a table; a column of mixed types becomes text (``17`` and ``"u17"``
    are the ids ``"17"`` and ``"u17"``), its object/array values marked in
    ``stats["_nested_rows"]`` (not ids: bad rows when the column is a user or item column)."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    columns, nested = {}, {}
    for key in keys:
        values = [record.get(key) for record in records]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            columns[key] = pa.array([_json_text(v) for v in values], pa.string())
            nested[key] = np.array([isinstance(v, (dict, list)) for v in values])
    stats["_nested_rows"] = nested
    return pa.table(columns)


def _is_nested(type_: pa.DataType) -> bool:
    return pa.types.is_nested(type_) or pa.types.is_union(type_)


def _json_line_number(fs, path: str, row: int) -> int:
    """The line of the ``row``-th (0-based) non-blank line of a JSON-lines file."""
    with fs.open_input_stream(path, compression="detect") as stream:
        text = stream.read().decode("utf-8", errors="replace")
    seen = -1
    for number, line in enumerate(text.split("\n"), 1):
        seen += bool(line.strip())
        if seen == row:
            return number
    return row + 1


def _bad_id_rows(table: pa.Table, columns: tuple, nested_rows: dict,
                 first_row: int) -> tuple[np.ndarray | None, str | None]:
    """Rows whose user or item is a JSON object/array/struct (not an id) and the first
    such column."""
    bad, where = None, None
    for name in columns[:2]:
        values = table.column(name)
        if _is_nested(values.type):
            hit = values.is_valid().to_numpy(zero_copy_only=False)
        elif name in nested_rows:
            hit = nested_rows[name][first_row:first_row + table.num_rows]
        else:
            continue
        if hit.any():
            if where is None or np.flatnonzero(hit)[0] < np.flatnonzero(bad)[0]:
                where = name
            bad = hit if bad is None else bad | hit
    return bad, where


def _apply_null_values(values: pa.Array, null_values: tuple) -> pa.Array:
    """Ids that are the empty string or one of ``null_values`` (compared as text) -> null."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    textual = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    if not textual and not null_values:
        return values
    text = values if textual else values.cast(pa.string())
    hit = pc.is_in(text, value_set=pa.array(("", *null_values), pa.string()))
    if not pc.any(hit).as_py():
        return values
    return pc.if_else(hit, pa.nulls(len(values), values.type), values)


def read_file(uri: str, file_index: int, spec: LogSpec, stats: dict) -> Iterator[pa.Table]:
    """Yield the normalized blocks (user, item, ts, ord) of one input file; fill ``stats``."""
    fs, path = _resolve(uri)
    fmt = detect_format(path, spec.format)
    rows = kept = 0
    columns = None
    units: set[str] = set()
    try:
        for table in _raw_tables(fs, path, uri, spec, fmt, stats):
            if columns is None:
                columns = _pick_columns(table.column_names, spec, uri)
            n = table.num_rows
            order = (np.int64(file_index) << ROW_BITS) + np.arange(rows, rows + n,
                                                                  dtype=np.int64)
            table, order = _drop_nested_ids(table, order, columns, stats, rows,
                                            (fs, path, uri, fmt), spec)
            rows += n
            if not table.num_rows:
                continue
            yield _normalized(table, order, columns, spec, uri, kept, units)
            kept += table.num_rows
    except OSError as exc:
        raise PrepareError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None
    except pa.ArrowException as exc:  # every other Arrow error: one line naming the file
        raise PrepareError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None
    _finish_stats(stats, uri, columns, kept, units)


def _raw_tables(fs, path: str, uri: str, spec: LogSpec, fmt: str, stats: dict) -> Iterator:
    if fmt == "parquet":
        return _read_parquet(fs, path, uri, spec, stats)
    if fmt == "json":
        return _read_json(fs, path, uri, spec, stats)
    return _read_text(fs, path, uri, spec, fmt, stats)


def _pick_columns(names: list[str], spec: LogSpec, uri: str) -> tuple:
    """(user, item, time) column names of a file; a headerless file is user, item[, time]."""
    headerless = bool(names) and all(n.isdigit() for n in names)
    default_time = "2" if headerless and len(names) == 3 else None
    return (
        _pick(names, spec.user_col or ("0" if headerless else None), USER_CANDIDATES, "user",
              uri, True),
        _pick(names, spec.item_col or ("1" if headerless else None), ITEM_CANDIDATES, "item",
              uri, True),
        _pick(names, spec.time_col if spec.time_col is not None else default_time,
              () if headerless else TIME_CANDIDATES, "time", uri, False),
    )


def _drop_nested_ids(table, order, columns, stats: dict, rows: int, where_from, spec: LogSpec):
    """Rows whose id is a JSON object or array: an error, or skipped and counted."""
    fs, path, uri, fmt = where_from
    bad, where = _bad_id_rows(table, columns, stats.get("_nested_rows", {}), rows)
    if bad is None:
        return table, order
    first = int(np.flatnonzero(bad)[0])
    value = _json_text(table.column(where)[first].as_py())
    place = (f"line {_json_line_number(fs, path, rows + first)}" if fmt == "json"
             else f"row {rows + first + 1}")
    if spec.on_bad_lines == "error":
        raise PrepareError(
            f"{uri}: {place}: column {where!r}: {str(value)[:80]!r} is a JSON object "
            "or array, not an id; fix it or pass --on-bad-lines skip")
    stats["bad_lines"] = stats.get("bad_lines", 0) + int(bad.sum())
    stats.setdefault("bad_line_example", f"{place}: {where}={str(value)[:80]!r}")
    return table.filter(pa.array(~bad)), order[~bad]


def _normalized(table, order, columns, spec: LogSpec, uri: str, kept: int, units: set):
    """One block as (user, item, ts in ms or null, ord)."""
    user_col, item_col, time_col = columns
    if time_col is None:
        ts = pa.nulls(table.num_rows, pa.int64())
    else:
        ts, seen = _to_millis(table.column(time_col).combine_chunks(), uri, time_col, kept)
        units.update(seen)
    ids = {name: normalize_ids(_apply_null_values(table.column(col).combine_chunks(),
                                                  spec.null_values))
           for name, col in (("user", user_col), ("item", item_col))}
    return pa.table({**ids, "ts": ts, "ord": pa.array(order)})


def _finish_stats(stats: dict, uri: str, columns, kept: int, units: set):
    stats.pop("_nested_rows", None)
    if (columns is None or kept == 0) and not stats.get("bad_lines"):
        raise PrepareError(f"{uri}: empty input (no data rows)")
    stats.update(rows=kept, columns={"user": columns and columns[0],
                                     "item": columns and columns[1],
                                     "time": columns and columns[2]})
    if columns and columns[2] is not None:
        order_of = [name for name, _, _ in TIME_UNITS] + ["iso", "timestamp"]
        stats["time_unit"] = "+".join(u for u in order_of if u in units) or None
