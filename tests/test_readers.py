"""readers: one input file -> normalized blocks, without Ray (issue 15: nothing lost or
corrupted without an error)."""

import json
import os

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ezsasrec_ray.errors import PrepareError
from ezsasrec_ray.readers import LogSpec, list_input_files, read_file


def read(path, **spec) -> tuple[pa.Table, dict]:
    """All blocks of one file, concatenated, and the file's stats."""
    stats: dict = {}
    tables = list(read_file(str(path), 0, LogSpec(**spec), stats))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    return table, stats


# ---------------------------------------------------------------------------------------------
# 1. NA, NULL, nan, N/A are ids unless --null-values says otherwise


def test_null_like_strings_are_ids_by_default(tmp_path):
    (tmp_path / "log.csv").write_text(
        "userId,itemId\n1,NA\n1,NULL\n2,nan\n2,N/A\n3,\n,5\n3,None\n")
    table, _ = read(tmp_path / "log.csv")
    assert table["item"].to_pylist() == ["NA", "NULL", "nan", "N/A", None, "5", "None"]
    assert table["user"].to_pylist() == [1, 1, 2, 2, 3, None, 3]
    table, _ = read(tmp_path / "log.csv", null_values=("NA", "NULL"))
    assert table["item"].to_pylist() == [None, None, "nan", "N/A", None, "5", "None"]


def test_null_values_apply_to_json_and_integer_ids(tmp_path):
    lines = [{"user": 1, "item": "NA"}, {"user": 2, "item": ""}, {"user": 3, "item": "x"}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    table, _ = read(tmp_path / "log.jsonl")
    assert table["item"].to_pylist() == ["NA", None, "x"]  # the empty string is null
    table, _ = read(tmp_path / "log.jsonl", null_values=("NA", "3"))
    assert table["item"].to_pylist() == [None, None, "x"]
    assert table["user"].to_pylist() == [1, 2, None]


# ---------------------------------------------------------------------------------------------
# 2. Spark/Hadoop hidden directories under the input root are skipped and counted


def test_hidden_directories_under_the_root_are_skipped(tmp_path):
    root = tmp_path / "_exports" / "log"  # hidden names above the root are the user's choice
    for sub in ("", "_temporary/0/task_1", ".staging", "day=1"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "part-0.csv").write_text("userId,itemId\n1,2\n")
    (root / "_SUCCESS").write_text("")
    (root / "day=1" / ".part-0.csv.crc").write_text("x")
    skipped: list = []
    files = list_input_files(str(root), skipped=skipped)
    assert [os.path.relpath(f, root) for f in files] == ["day=1/part-0.csv", "part-0.csv"]
    assert sorted(os.path.relpath(f, root) for f in skipped) == [
        ".staging/part-0.csv", "_SUCCESS", "_temporary/0/task_1/part-0.csv",
        "day=1/.part-0.csv.crc"]
    # a glob below the root: the same rule
    files = list_input_files(str(root) + "/**.csv")
    assert [os.path.relpath(f, root) for f in files] == ["day=1/part-0.csv", "part-0.csv"]
    # a hidden file named on its own is read
    assert list_input_files(str(root / "_temporary/0/task_1/part-0.csv"))


# ---------------------------------------------------------------------------------------------
# 3. Time units: seconds, ms, microseconds, nanoseconds by magnitude, stated per file


@pytest.mark.parametrize("unit,scale", [("s", 1), ("ms", 1_000), ("us", 1_000_000),
                                        ("ns", 1_000_000_000)])
def test_time_units_by_magnitude(tmp_path, unit, scale):
    (tmp_path / "log.csv").write_text(
        "userId,itemId,timestamp\n" + "".join(f"1,{i},{(1_700_000_000 + i) * scale}\n"
                                              for i in range(3)))
    table, stats = read(tmp_path / "log.csv")
    assert table["ts"].to_pylist() == [(1_700_000_000 + i) * 1000 for i in range(3)]
    assert stats["time_unit"] == unit


def test_mixed_units_in_one_file_are_stated(tmp_path):
    (tmp_path / "log.csv").write_text(
        "userId,itemId,timestamp\n1,1,1700000000\n1,2,1700000001000000\n")
    table, stats = read(tmp_path / "log.csv")
    assert table["ts"].to_pylist() == [1_700_000_000_000, 1_700_000_001_000]
    assert stats["time_unit"] == "s+us"


# ---------------------------------------------------------------------------------------------
# 4. A header of unknown names is an error, not an event


def test_unknown_header_names_are_an_error(tmp_path):
    (tmp_path / "log.csv").write_text("customer,sku\n17,300\n18,301\n")
    with pytest.raises(PrepareError, match=r"log.csv: first line 'customer,sku' looks like a "
                                           r"header .*--user-col/--item-col"):
        read(tmp_path / "log.csv")
    table, _ = read(tmp_path / "log.csv", user_col="customer", item_col="sku")
    assert table["user"].to_pylist() == [17, 18]
    table, _ = read(tmp_path / "log.csv", header=False)  # the user says it is data
    assert table["user"].to_pylist() == ["customer", "17", "18"]
    (tmp_path / "t.tsv").write_text("customer\tsku\tts\nc17\ts300\t1700000000\n")
    with pytest.raises(PrepareError, match=r"t.tsv: first line 'customer\\tsku\\tts'"):
        read(tmp_path / "t.tsv")


def test_headerless_string_ids_are_still_data(tmp_path):
    (tmp_path / "log.csv").write_text("alice,apple\nbob,pear\nalice,plum\n")
    table, _ = read(tmp_path / "log.csv")
    assert table["user"].to_pylist() == ["alice", "bob", "alice"]
    (tmp_path / "t.csv").write_text("alice,apple,1700000000\nb2,p3,1700000001\n")
    table, _ = read(tmp_path / "t.csv")
    assert table["user"].to_pylist() == ["alice", "b2"]


# ---------------------------------------------------------------------------------------------
# 5. JSON lines: mixed id types are ids; objects as ids are bad rows; no Arrow tracebacks


@pytest.mark.parametrize("on_bad_lines", ["error", "skip"])
def test_json_mixed_id_types(tmp_path, on_bad_lines):
    (tmp_path / "log.jsonl").write_text(
        '{"user": 17, "item": 1, "ts": 1700000000}\n'
        '{"user": "u17", "item": 2.0, "ts": "1700000001"}\n'
        '{"user": true, "item": "3", "ts": 1700000002}\n')
    table, stats = read(tmp_path / "log.jsonl", on_bad_lines=on_bad_lines)
    assert table["user"].to_pylist() == ["17", "u17", "true"]
    assert table["item"].to_pylist() == ["1", "2.0", "3"]
    assert table["ts"].to_pylist() == [1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000]
    assert not stats.get("bad_lines")


def test_json_object_ids_and_broken_lines(tmp_path):
    (tmp_path / "log.jsonl").write_text(
        '{"user": 1, "item": 1}\n{"user": {"id": 2}, "item": 2}\nnot json\n[1, 2]\n'
        '{"user": 3, "item": 3}\n')
    with pytest.raises(PrepareError, match=r"log.jsonl: line 3: not a JSON object: 'not json'"):
        read(tmp_path / "log.jsonl")
    table, stats = read(tmp_path / "log.jsonl", on_bad_lines="skip")
    assert table["user"].to_pylist() == [1, 3]
    assert stats["bad_lines"] == 3
    (tmp_path / "obj.jsonl").write_text('{"user": {"id": 1}, "item": 1}\n')
    with pytest.raises(PrepareError, match=r"obj.jsonl: line 1: column 'user': "
                                           r"'\{\"id\": 1\}' is a JSON object or array, not an id"):
        read(tmp_path / "obj.jsonl")
    (tmp_path / "mixed.jsonl").write_text('{"user": 1, "item": 1}\n{"user": [2], "item": 2}\n')
    with pytest.raises(PrepareError, match=r"mixed.jsonl: line 2: column 'user'"):
        read(tmp_path / "mixed.jsonl")
    table, stats = read(tmp_path / "obj.jsonl", on_bad_lines="skip")
    assert (table is None or table.num_rows == 0) and stats["bad_lines"] == 1


# ---------------------------------------------------------------------------------------------
# 6. Property: any small CSV / JSON-lines input is read or refused in one line, and every
#    line is either kept or counted


tokens = st.sampled_from(["1", "17", "u7", "NA", "", " ", "x y", '"', '""', '"a,b"', "-3",
                          "1.5", "1700000000", "2024-01-01", "null", "{", "é", "\t", ";"])
text_lines = st.lists(st.lists(tokens, min_size=0, max_size=4), min_size=0, max_size=8)
headers = st.sampled_from([None, "userId,itemId", "userId,itemId,timestamp", "customer,sku",
                           "user\titem", "a,b,c"])
json_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(
                            ["", "NA", "u1", "2024-01-01", "1700000000"]),
                        st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.sampled_from(["a"]), st.integers(), max_size=1))
json_lines = st.lists(st.one_of(
    st.fixed_dictionaries({}, optional={"user": json_values, "item": json_values,
                                        "ts": json_values}).map(json.dumps),
    st.sampled_from(["not json", "[1]", "{", "", "3", '{"user": 1, "item": 2}'])),
    min_size=0, max_size=8)


def _check_every_line_accounted(path, data_lines: int, on_bad_lines: str):
    try:
        table, stats = read(path, on_bad_lines=on_bad_lines)
    except PrepareError as exc:
        assert "\n" not in str(exc) and os.path.basename(path) in str(exc)
        return
    kept = table.num_rows if table is not None else 0
    assert kept + stats.get("bad_lines", 0) == data_lines - stats.get("header_lines", 0)
    if on_bad_lines == "error":
        assert not stats.get("bad_lines")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, rows=text_lines, delimiter=st.sampled_from([",", "\t"]),
       on_bad_lines=st.sampled_from(["error", "skip"]))
def test_property_text_rows_kept_or_counted(tmp_path_factory, header, rows, delimiter,
                                            on_bad_lines):
    path = tmp_path_factory.mktemp("csv") / ("log.csv" if delimiter == "," else "log.tsv")
    lines = ([header.replace(",", delimiter)] if header else []) + \
        [delimiter.join(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines))
    _check_every_line_accounted(str(path), sum(1 for line in lines if line), on_bad_lines)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=json_lines, on_bad_lines=st.sampled_from(["error", "skip"]))
def test_property_json_rows_kept_or_counted(tmp_path_factory, lines, on_bad_lines):
    path = tmp_path_factory.mktemp("json") / "log.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    _check_every_line_accounted(str(path), sum(1 for line in lines if line.strip()),
                                on_bad_lines)
