"""prepare: reading raw logs, k-core, encoding, sequences, errors and atomic output."""

import gzip
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import dead_pid, output_host, run_cli, shared_path, write_tsv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError, PrepareError
from ezsasrec_ray.prepare import prepare

pytestmark = pytest.mark.usefixtures("ray_session")


# ---------------------------------------------------------------------------------------------
# An independent reference: plain pandas, one process


def reference_kcore(df: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Iterate until every user has >= min_user and every item >= min_item rows."""
    while True:
        users = df["user"].map(df["user"].value_counts())
        items = df["item"].map(df["item"].value_counts())
        keep = (users >= min_user) & (items >= min_item)
        if keep.all():
            return df
        df = df[keep]


def events_from_prepared(path: str) -> pd.DataFrame:
    """Rebuild (user, item, position) events from a prepared dataset's vocab + sequences."""
    data = load_prepared(path)
    items = data.items().column("raw_id").to_numpy()
    seq = data.sequences()
    lengths = seq["n_events"].to_numpy()
    flat = seq["item_indices"].combine_chunks().flatten().to_numpy()
    return pd.DataFrame({
        "user": np.repeat(seq["user_id"].to_numpy(zero_copy_only=False), lengths),
        "item": items[flat - 1],
        "position": np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else [],
    })


def run_prepare(src, out, **options):
    options.setdefault("verbose", False)
    return prepare(str(src), str(out), **options)


# ---------------------------------------------------------------------------------------------
# Real data


def test_movielens_kcore_matches_pandas_and_round_trips(tmp_path):
    ratings = shared_path("ml-latest-small", "ratings.csv")
    manifest = run_prepare(ratings, tmp_path / "ml", k_core=7)
    df = pd.read_csv(ratings).rename(columns={"userId": "user", "movieId": "item"})
    df["order"] = np.arange(len(df))
    ref = reference_kcore(df, 7, 7)
    counts = manifest["counts"]
    assert counts["rows_read"] == len(df)
    assert counts["events_kept"] == len(ref)
    assert counts["users_kept"] == ref["user"].nunique()
    assert counts["items_kept"] == ref["item"].nunique()
    # vocab: count descending then raw id; index 1..N
    items = load_prepared(str(tmp_path / "ml")).items().to_pandas()
    expected = ref["item"].value_counts().rename_axis("raw_id").reset_index(name="count")
    expected = expected.sort_values(["count", "raw_id"], ascending=[False, True])
    assert items["raw_id"].tolist() == expected["raw_id"].tolist()
    assert items["count"].tolist() == expected["count"].tolist()
    assert items["index"].tolist() == list(range(1, len(items) + 1))
    # sequences: every event back, each user's events in time order (ties: input order)
    rebuilt = events_from_prepared(str(tmp_path / "ml"))
    ref_sorted = ref.sort_values(["user", "timestamp", "order"], kind="stable")
    ref_sorted["position"] = ref_sorted.groupby("user").cumcount()
    merged = rebuilt.merge(ref_sorted, on=["user", "position"], suffixes=("", "_ref"))
    assert len(merged) == len(ref)
    assert (merged["item"] == merged["item_ref"]).all()


# ---------------------------------------------------------------------------------------------
# Property: Ray Data k-core == reference on random small logs

event_lists = st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=60)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=event_lists, k_user=st.integers(1, 4), k_item=st.integers(1, 4))
def test_kcore_property(tmp_path_factory, events, k_user, k_item):
    tmp = tmp_path_factory.mktemp("prop")
    src = write_tsv(tmp / "log.tsv", events)
    df = pd.DataFrame(events, columns=["user", "item"])
    ref = reference_kcore(df, k_user, k_item)
    if ref.empty:
        with pytest.raises(PrepareError, match="nothing survives"):
            run_prepare(src, tmp / "out", min_user=k_user, min_item=k_item)
        return
    run_prepare(src, tmp / "out", min_user=k_user, min_item=k_item)
    rebuilt = events_from_prepared(str(tmp / "out"))
    ref = ref.assign(position=ref.groupby("user").cumcount())
    left = rebuilt.sort_values(["user", "position"]).reset_index(drop=True)
    right = ref.sort_values(["user", "position"]).reset_index(drop=True)
    assert left[["user", "item", "position"]].values.tolist() == \
        right[["user", "item", "position"]].values.tolist()


# ---------------------------------------------------------------------------------------------
# Formats


def test_seed_tsv_without_header_and_roles(tmp_path):
    rows = [(u, i, 1000 + 10 * i) for u in range(1, 4) for i in range(1, 6)]
    rows += [(9, 1, 5), (9, 2, 6)]  # a user with 2 events (k=1 keeps them: train-only)
    src = write_tsv(tmp_path / "log.txt", rows)
    manifest = run_prepare(src, tmp_path / "out", k_core=1)
    assert manifest["has_time"] and manifest["columns"]["time"] == "2"
    seq = load_prepared(str(tmp_path / "out")).sequences().to_pandas().set_index("user_id")
    assert seq.loc[9, "train_only"] and seq.loc[9, "n_train"] == 2
    assert not seq.loc[1, "train_only"] and seq.loc[1, "n_train"] == 3
    assert list(seq.loc[1, "timestamps"]) == [1_010_000 + 10_000 * k for k in range(5)]


def test_string_ids_iso_time_json_and_parquet(tmp_path):
    base = pd.DataFrame({
        "user_id": ["alice", "alice", "alice", "bob", "bob", "bob"],
        "item_id": ["x", "y", "z", "z", "y", "x"],
        "event_time": ["2024-01-03T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z",
                       "2024-01-01", "2024-01-02", "2024-01-03"],
    })
    (tmp_path / "j").mkdir()
    base.to_json(tmp_path / "j" / "log.jsonl", orient="records", lines=True)
    pq.write_table(pa.Table.from_pandas(base), tmp_path / "log.parquet")
    for src in (tmp_path / "j", tmp_path / "log.parquet"):
        out = tmp_path / ("out_" + src.name)
        manifest = run_prepare(src, out, k_core=1, user_col="user_id", item_col="item_id",
                               time_col="event_time")
        assert manifest["vocab"]["user_id_type"] == "string"
        seq = load_prepared(str(out)).sequences().to_pandas().set_index("user_id")
        items = load_prepared(str(out)).items().to_pandas().set_index("index")["raw_id"]
        assert [items[i] for i in seq.loc["alice", "item_indices"]] == ["y", "z", "x"]
        assert [items[i] for i in seq.loc["bob", "item_indices"]] == ["z", "y", "x"]


def test_gzip_csv_millis_and_no_time_file_order(tmp_path):
    with gzip.open(tmp_path / "log.csv.gz", "wt") as f:
        f.write("userId,movieId,timestamp\n")
        for t, (u, i) in enumerate([(1, 10), (1, 11), (1, 12), (2, 12), (2, 10)]):
            f.write(f"{u},{i},{1_700_000_000_000 + (5 - t) * 1000}\n")
    manifest = run_prepare(tmp_path / "log.csv.gz", tmp_path / "out", k_core=1)
    seq = load_prepared(str(tmp_path / "out")).sequences().to_pandas().set_index("user_id")
    assert seq.loc[1, "timestamps"][0] == 1_700_000_000_000 + 3000  # ms kept, reversed order
    assert manifest["columns"] == {"user": "userId", "item": "movieId", "time": "timestamp"}
    run_prepare(tmp_path / "log.csv.gz", tmp_path / "out2", k_core=1, time_col="none")
    seq2 = load_prepared(str(tmp_path / "out2")).sequences().to_pandas().set_index("user_id")
    items = load_prepared(str(tmp_path / "out2")).items().to_pandas().set_index("index")
    assert [items.loc[i, "raw_id"] for i in seq2.loc[1, "item_indices"]] == [10, 11, 12]
    assert "timestamps" not in seq2.columns


def test_glob_of_files_and_int_string_id_mix(tmp_path):
    write_tsv(tmp_path / "a.tsv", [(1, "a1", 1), (1, "b2", 2)])
    write_tsv(tmp_path / "b.tsv", [(1, 7, 3), (2, 7, 4)])
    write_tsv(tmp_path / "ignored.log", [(5, 5, 5)])
    manifest = run_prepare(str(tmp_path / "*.tsv"), tmp_path / "out", k_core=1)
    assert len(manifest["source"]["files"]) == 2
    assert manifest["vocab"]["item_id_type"] == "string"  # one file's ids were not integers
    assert manifest["vocab"]["user_id_type"] == "int64"


def test_time_split_and_max_history_and_dedupe(tmp_path):
    rows = [(1, i, 100 + i) for i in range(1, 9)] + [(1, 3, 103), (2, 1, 50), (2, 2, 200)]
    src = write_tsv(tmp_path / "log.tsv", rows)
    manifest = run_prepare(src, tmp_path / "t", k_core=1, split="time", cutoff=105)
    seq = load_prepared(str(tmp_path / "t")).sequences().to_pandas().set_index("user_id")
    assert seq.loc[1, "n_train"] == 6  # events at 101, 102, 103, 103, 104, 105
    assert seq.loc[2, "n_train"] == 1 and not seq.loc[2, "train_only"]
    manifest = run_prepare(src, tmp_path / "d", k_core=1, dedupe=True, max_history=4)
    assert manifest["counts"]["duplicates_dropped"] == 1
    assert manifest["counts"]["truncated_by_max_history"] == 4  # user 1: 8 kept -> 4
    seq = load_prepared(str(tmp_path / "d")).sequences().to_pandas().set_index("user_id")
    assert seq.loc[1, "n_events"] == 4


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, column and value


def test_bad_inputs(tmp_path):
    with pytest.raises(PrepareError, match="not found"):
        run_prepare(tmp_path / "missing.csv", tmp_path / "o")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PrepareError, match="empty.csv: empty input"):
        run_prepare(tmp_path / "empty.csv", tmp_path / "o")
    (tmp_path / "nocol.csv").write_text("userId,foo\n1,2\n")
    with pytest.raises(PrepareError, match=r"nocol.csv: no item column; columns are"):
        run_prepare(tmp_path / "nocol.csv", tmp_path / "o")
    (tmp_path / "badtime.csv").write_text("userId,movieId,timestamp\n1,2,3\n1,3,yesterday\n")
    with pytest.raises(PrepareError, match=r"badtime.csv: column 'timestamp': unparseable "
                                           r"time value 'yesterday' at data row 2"):
        run_prepare(tmp_path / "badtime.csv", tmp_path / "o")
    with pytest.raises(PrepareError, match="--k-core must be >= 1"):
        run_prepare(tmp_path / "badtime.csv", tmp_path / "o", k_core=0)
    assert not os.path.exists(tmp_path / "o")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o")]  # no temp left behind


def test_bad_lines_error_or_skip_and_nulls_counted(tmp_path):
    text = "userId,movieId\n1,10\n1,11,\n2,\"12\n1,12\n,13\n2,10\n2,11\n"
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(PrepareError, match=r"log.csv: line 3: wrong number of fields"):
        run_prepare(tmp_path / "log.csv", tmp_path / "o", k_core=1)
    manifest = run_prepare(tmp_path / "log.csv", tmp_path / "o", k_core=1, on_bad_lines="skip")
    counts = manifest["counts"]
    # the trailing separator, and the broken quote with the 4 lines it swallowed
    assert counts["bad_lines_skipped"] == 1 + 5
    assert counts["rows_read"] == 1 and counts["events_kept"] == 1
    # a broken quote alone fails by default, naming its line
    (tmp_path / "q.csv").write_text("userId,movieId\n1,10\n2,\"12\n1,12\n")
    with pytest.raises(PrepareError, match=r"q.csv: line 3: unterminated quote"):
        run_prepare(tmp_path / "q.csv", tmp_path / "o2", k_core=1)
    (tmp_path / "n.csv").write_text("userId,movieId\n1,10\n,13\n2,\n2,11\n")
    counts = run_prepare(tmp_path / "n.csv", tmp_path / "o3", k_core=1)["counts"]
    assert counts["dropped_null_user"] == 1 and counts["dropped_null_item"] == 1
    assert counts["rows_read"] == 4 and counts["events_kept"] == 2


def test_duplicates_kept_without_dedupe(tmp_path):
    src = write_tsv(tmp_path / "log.tsv", [(1, 1, 5), (1, 1, 5), (1, 2, 6)])
    manifest = run_prepare(src, tmp_path / "o", k_core=1)
    assert manifest["counts"]["events_kept"] == 3


# ---------------------------------------------------------------------------------------------
# Output: atomic, refused when it exists, deterministic vocabularies, loadable


def test_output_refused_overwrite_and_deterministic_vocab(tmp_path):
    src = write_tsv(tmp_path / "log.tsv", [(u, (u * i) % 7 + 1, i) for u in range(1, 30)
                                           for i in range(6)])
    first = run_prepare(src, tmp_path / "o", k_core=2)
    with pytest.raises(PrepareError, match="already exists; pass --overwrite"):
        run_prepare(src, tmp_path / "o", k_core=2)
    second = run_prepare(src, tmp_path / "o", k_core=2, overwrite=True)
    for name in ("users/part-0.parquet", "items/part-0.parquet"):
        assert first["content_hashes"][name] == second["content_hashes"][name]
    data = load_prepared(str(tmp_path / "o"))
    data.verify()
    assert data.sequences()["user_index"].to_pylist() == list(range(1, data.num_users + 1))


def test_load_prepared_rejects_bad_directories(tmp_path):
    with pytest.raises(EzSASRecError, match="not found"):
        load_prepared(str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    with pytest.raises(EzSASRecError, match="no manifest.json"):
        load_prepared(str(tmp_path / "d"))
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(
        {"format_version": 99, "kind": "ezsasrec_ray.prepared"}))
    with pytest.raises(EzSASRecError, match="format_version 99 is not supported"):
        load_prepared(str(tmp_path / "d"))


def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "log.tsv").write_text("1\t2\n3\t4\t\n")
    env = dict(os.environ, RAY_ADDRESS="")
    proc = run_cli("prepare", "--input", tmp_path / "x.csv", "--output", tmp_path / "o",
                   env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ezsasrec prepare: error: {tmp_path / 'x.csv'}: input not found")


def test_cli_overwrite_never_replaces_a_users_directory(tmp_path):
    src = write_tsv(tmp_path / "log.tsv", [(u, i, i) for u in range(1, 6) for i in range(1, 6)])
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not ours")
    env = dict(os.environ, RAY_ADDRESS="")
    proc = run_cli("prepare", "--input", src, "--output", photos, "--overwrite", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(photos) in lines[0] and "not written by ezsasrec_ray" in \
        lines[0], proc.stderr
    assert (photos / "holiday.jpg").read_bytes() == b"not ours"
    assert sorted(os.listdir(tmp_path)) == ["log.tsv", "photos"]  # no temporaries left


def test_killed_run_temporaries_are_removed_by_the_next_run(tmp_path):
    src = write_tsv(tmp_path / "log.tsv", [(u, (u * i) % 7 + 1, i) for u in range(1, 30)
                                           for i in range(6)])
    stale = tmp_path / f".o.tmp-{output_host()}-{dead_pid()}-0123abcd"
    (stale / "sequences").mkdir(parents=True)
    run_prepare(src, tmp_path / "o", k_core=2)
    assert sorted(os.listdir(tmp_path)) == ["log.tsv", "o"]


def test_fit_lengths_by_holdout_and_split_kind():
    from ezsasrec_ray.dataset import fit_lengths, training_sequences

    # leave-one-out: users with 5 and 2 events (the second is train-only)
    loo = pa.table({"item_indices": pa.array([[1, 2, 3, 4, 5], [6, 7]]),
                    "n_events": pa.array([5, 2]), "n_train": pa.array([3, 2]),
                    "train_only": pa.array([False, True])})
    assert fit_lengths(loo, "valid").tolist() == [3, 2]
    assert fit_lengths(loo, "test").tolist() == [4, 2]
    assert fit_lengths(loo, "none").tolist() == [5, 2]
    assert training_sequences(loo, "test").to_pylist() == [[1, 2, 3, 4], [6, 7]]
    # time split: one target after the cutoff, so holdout test keeps the cutoff too
    assert fit_lengths(loo, "test", kind="time").tolist() == [3, 2]
    with pytest.raises(EzSASRecError, match="--holdout: unknown value 'x'"):
        fit_lengths(loo, "x")


def test_a_validation_sample_holds_out_only_its_users_validation_targets():
    """train --valid-users: the sampled users' validation targets stay out of training and are
    the validation split; every other user trains on theirs; test targets never train."""
    from ezsasrec_ray.dataset import fit_lengths, holdout_examples, validation_users

    n = 2000
    table = pa.table({"user_index": pa.array(np.arange(1, n + 1), pa.int32()),
                      "item_indices": pa.array([[u % 50 + 1, 2, 3, 4, 5] for u in range(n)]),
                      "n_events": pa.array([5] * n), "n_train": pa.array([3] * n),
                      "train_only": pa.array([u % 10 == 0 for u in range(n)])})
    sample = validation_users(table["user_index"].to_numpy(), 0.25)
    assert 0.2 < sample.mean() < 0.3
    assert np.array_equal(sample, validation_users(np.arange(1, n + 1), 0.25))  # same users
    lengths = fit_lengths(table, "valid", valid_share=0.25)
    train_only = table["train_only"].to_numpy()
    assert (lengths[sample | train_only] == 3).all()  # validation targets held out
    assert (lengths[~sample & ~train_only] == 4).all()  # the others train on theirs
    users, _, targets = holdout_examples(table, "valid", "loo", valid_share=0.25)
    assert set(users) == set(np.flatnonzero(sample & ~train_only) + 1)
    assert len(holdout_examples(table, "test", "loo", valid_share=0.25)[0]) == (~train_only).sum()
    assert fit_lengths(table, "valid", kind="time", valid_share=0.25).tolist() == [3] * n
    assert fit_lengths(table, "valid", valid_share=1.0).tolist() == [3] * n


# ---------------------------------------------------------------------------------------------
# Nothing lost or corrupted without a word (issue 15): the prepare side of the reader fixes


def test_null_like_item_ids_are_items_unless_null_values(tmp_path):
    rows = [(u, item) for u in range(1, 4) for item in ("NA", "NULL", "nan", "N/A", "x")]
    (tmp_path / "log.csv").write_text(
        "userId,itemId\n" + "".join(f"{u},{i}\n" for u, i in rows))
    manifest = run_prepare(tmp_path / "log.csv", tmp_path / "o", k_core=1)
    assert manifest["counts"]["dropped_null_item"] == 0
    assert manifest["counts"]["items_kept"] == 5 and manifest["counts"]["events_kept"] == 15
    manifest = run_prepare(tmp_path / "log.csv", tmp_path / "o2", k_core=1,
                           null_values="NA,NULL")
    assert manifest["counts"]["dropped_null_item"] == 6
    assert manifest["options"]["null_values"] == "NA,NULL"


def test_spark_temporary_and_staging_copies_are_skipped_and_counted(tmp_path):
    rows = "".join(f"{u},{i},{1_700_000_000 + i}\n" for u in range(1, 4) for i in range(1, 4))
    root = tmp_path / "log"
    for sub in ("", "_temporary/0/_temporary/attempt_1", ".staging"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "part-00000.csv").write_text("userId,itemId,timestamp\n" + rows)
    (root / "_SUCCESS").write_text("")
    manifest = run_prepare(root, tmp_path / "o", k_core=1, verbose=True)
    assert manifest["counts"]["rows_read"] == 9
    assert manifest["counts"]["files_skipped_hidden"] == 3
    assert len(manifest["source"]["files_skipped_hidden"]) == 3
    from ezsasrec_ray.prepare import format_summary

    assert "files skipped (hidden: _ or . names)" in format_summary(manifest)


def test_time_units_mixed_across_files_are_normalised_and_stated(tmp_path):
    root = tmp_path / "log"
    root.mkdir()
    (root / "a.csv").write_text("userId,itemId,timestamp\n" + "".join(
        f"1,{i},{1_700_000_000 + i}\n" for i in range(3)))
    (root / "b.csv").write_text("userId,itemId,timestamp\n" + "".join(
        f"2,{i},{(1_700_000_000 + i) * 1_000_000}\n" for i in range(3)))
    manifest = run_prepare(root, tmp_path / "o", k_core=1)
    seq = load_prepared(str(tmp_path / "o")).sequences().to_pandas().set_index("user_id")
    assert list(seq.loc[2, "timestamps"]) == list(seq.loc[1, "timestamps"]) == [
        (1_700_000_000 + i) * 1000 for i in range(3)]
    assert manifest["time_units_read"] == {str(root / "a.csv"): "s", str(root / "b.csv"): "us"}
    from ezsasrec_ray.prepare import format_summary

    assert "time units differ across files" in format_summary(manifest)


def test_json_mixed_id_types_with_skip_is_no_traceback(tmp_path):
    lines = [{"user": 17, "item": i} for i in range(3)] + \
        [{"user": "u17", "item": i} for i in range(3)] + ["not json"]
    (tmp_path / "log.jsonl").write_text(
        "\n".join(json.dumps(r) if isinstance(r, dict) else r for r in lines) + "\n")
    manifest = run_prepare(tmp_path / "log.jsonl", tmp_path / "o", k_core=1,
                           on_bad_lines="skip")
    assert manifest["counts"]["rows_read"] == 6 and manifest["counts"]["bad_lines_skipped"] == 1
    assert manifest["counts"]["users_kept"] == 2
