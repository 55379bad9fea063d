"""Nightly full-catalog scoring (ezsasrec_ray.score) against a brute-force numpy reference.

Tiny random models (no training) written as model directories; a small prepared log
(builders in conftest.py).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from conftest import random_model_dir, read_results, synth_prepared

from ezsasrec_ray import recommend, score_pairs
from ezsasrec_ray.batching import left_pad
from ezsasrec_ray.cli import main as cli_main
from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.encoder import user_vectors
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.model_io import load_model
from ezsasrec_ray.score import FAULT_ENV

TOP_N = 10


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("score_data")
    return load_prepared(synth_prepared(root, users=240, items=90, events=4000, seed=3,
                                        themes=4))


@pytest.fixture(scope="module")
def model_dir(prepared, tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("model") / "m", prepared)


@pytest.fixture(scope="module")
def baseline_run(prepared, model_dir, tmp_path_factory):
    """Default options, one actor, Parquet."""
    out = tmp_path_factory.mktemp("runs") / "base"
    manifest = recommend(model_dir, prepared.path, top_n=TOP_N, output=str(out), batch_size=64,
                         verbose=False)
    return str(out), manifest


# -----------------------------------------------------------------------------
# reference and readers


def sequences(data):
    table = data.sequences()
    return dict(zip(table["user_id"].to_pylist(), table["item_indices"].to_pylist()))


def reference(model, data, histories, top_n, *, include_seen=False, exclude=(),
              candidates=None):
    """Brute force: every item scored as the float32 products summed in float64 in index
    order (the documented exact score), sorted by score desc then index, exclusions applied.

    histories: {raw user id: list of item indices} -> {raw user id: (raw item ids, scores)}."""
    users = list(histories)
    vecs = user_vectors(model, [np.array(histories[u], np.int64) for u in users])
    table = model.item_embeddings().numpy().astype(np.float64)
    scores = np.zeros((len(users), table.shape[0]))
    for j in range(table.shape[1]):
        scores += vecs[:, j, None].astype(np.float64) * table[None, :, j]
    scores = scores.astype(np.float32)
    raw_items = data.items().sort_by("index")["raw_id"].to_pylist()
    index = np.arange(table.shape[0])
    out = {}
    for b, user in enumerate(users):
        allowed = np.ones(table.shape[0], bool) if candidates is None else np.isin(index,
                                                                                   candidates)
        allowed[0] = False
        allowed[list(exclude)] = False
        if not include_seen:
            allowed[histories[user]] = False
        order = np.lexsort((index, -scores[b].astype(np.float64)))
        top = [i for i in order if allowed[i]][:top_n]
        out[user] = ([raw_items[i - 1] for i in top], scores[b, top])
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for user in want:
        assert got[user][0] == want[user][0], user
        np.testing.assert_array_equal(got[user][1], want[user][1])


# -----------------------------------------------------------------------------
# tests


def test_user_vectors_match_model_and_do_not_depend_on_batch(prepared, model_dir):
    model = load_model(model_dir)
    seqs = [np.array(s) for s in sequences(prepared).values()]
    vecs = user_vectors(model, seqs)
    np.testing.assert_allclose(vecs, model.user_embeddings(left_pad(seqs, 8)).numpy(), atol=1e-5)
    for rows in (slice(0, 1), slice(3, 40), slice(17, None, 3)):
        np.testing.assert_array_equal(user_vectors(model, seqs[rows]), vecs[rows])
    with ThreadPoolExecutor(3) as pool:  # the encoder calls run concurrently in BatchScorer
        np.testing.assert_array_equal(user_vectors(model, seqs, executor=pool), vecs)


def test_recommend_matches_numpy_reference(prepared, model_dir, baseline_run):
    out, manifest = baseline_run
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == json.loads(json.dumps(manifest, default=str))
    assert manifest["counts"]["users_scored"] == prepared.num_users
    assert manifest["model"]["path"] == os.path.abspath(model_dir)
    assert manifest["model"]["trained_at"] and manifest["model"]["weights_sha256"]
    assert manifest["timings"]["users_per_s"] > 0
    got = read_results(out)
    history = sequences(prepared)
    raw_items = prepared.items().sort_by("index")["raw_id"].to_pylist()
    assert len(got) == prepared.num_users
    for user, (items, scores) in got.items():
        assert len(items) == TOP_N
        assert not set(items) & {raw_items[i - 1] for i in history[user]}  # history excluded
        assert np.all(np.diff(scores.astype(np.float64)) <= 0)
    want = reference(load_model(model_dir), prepared, history, TOP_N)
    assert_same(got, want)
    # the planted duplicate item rows give exact ties somewhere, broken by item index
    assert any(len(set(s.tolist())) < len(s) for _, s in got.values())


def test_identical_for_two_actors_and_other_batch_and_chunk_sizes(prepared, model_dir,
                                                                   baseline_run, tmp_path):
    out = tmp_path / "two"
    recommend(model_dir, prepared.path, top_n=TOP_N, output=str(out), actors=2, batch_size=37,
              chunk_size=7, format="jsonl", verbose=False)
    assert_same(read_results(str(out), "jsonl"), read_results(baseline_run[0]))


def test_tensorflow_scan_writes_the_numpy_scans_output(prepared, model_dir, baseline_run,
                                                       tmp_path):
    # the GPU actor's code path, with TensorFlow on the CPU: the same file, item for item
    out = tmp_path / "tf"
    manifest = recommend(model_dir, prepared.path, top_n=TOP_N, output=str(out), batch_size=50,
                         scan="tensorflow", verbose=False)
    assert manifest["options"]["scan"] == "tensorflow"
    assert baseline_run[1]["options"]["scan"] == "numpy"
    assert_same(read_results(str(out)), read_results(baseline_run[0]))


def test_cli_options_users_holdout_exclusions_candidates(prepared, model_dir, tmp_path,
                                                         capsys):
    data = prepared
    history = sequences(data)
    user_ids = sorted(history)[::5]
    raw_items = data.items().sort_by("index")["raw_id"].to_pylist()
    (tmp_path / "users.txt").write_text("\n".join(map(str, user_ids + user_ids[:2])) + "\n")
    exclude = [3, 5, 8]
    candidates = list(range(1, data.num_items + 1, 2))
    (tmp_path / "exclude.txt").write_text(
        "\n".join([str(raw_items[i - 1]) for i in exclude] + ["no-such-item", "999999"]))
    (tmp_path / "cands.txt").write_text(
        "\n".join([str(raw_items[i - 1]) for i in candidates] + ["nope"]))
    out = tmp_path / "opts"
    rc = cli_main(["score", "--data", data.path, "--model", model_dir, "--output", str(out),
                   "--top-n", "7", "--holdout", "test", "--users", str(tmp_path / "users.txt"),
                   "--exclude-items", str(tmp_path / "exclude.txt"),
                   "--candidates", str(tmp_path / "cands.txt"), "--batch-size", "16",
                   "--format", "csv"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "users scored" in printed and "users/s" in printed and str(out) in printed
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["exclude_items"]["unknown"] == 2
    assert set(counts["exclude_items"]["unknown_examples"]) == {"no-such-item", "999999"}
    assert counts["candidates"]["unknown"] == 1 and counts["candidates"]["known"] == len(
        candidates)
    table = data.sequences()
    test_users = {u for u, t in zip(table["user_id"].to_pylist(),
                                    table["train_only"].to_pylist()) if not t}
    scored = [u for u in user_ids if u in test_users]
    assert counts["users_scored"] == len(scored)
    assert counts["users_skipped_no_target"] == len(user_ids) - len(scored)
    got = read_results(str(out), "csv")
    allowed = {raw_items[i - 1] for i in candidates} - {raw_items[i - 1] for i in exclude}
    for items, _ in got.values():
        assert set(items) <= allowed
    before_target = {u: history[u][:-1] for u in scored}
    want = reference(load_model(model_dir), data, before_target, 7, exclude=exclude,
                     candidates=candidates)
    assert_same(got, want)


def test_returns_dataset_with_loaded_model_and_include_seen(prepared, model_dir):
    model = load_model(model_dir)
    # a loaded model's own weights are scored (they travel through the object store), not the
    # files it came from: change them in memory
    model.item_emb.embeddings.assign(-model.item_emb.embeddings.numpy())
    frame = recommend(model, prepared, top_n=12, include_seen=True, batch_size=100).to_pandas()
    got = {u: (list(i), np.asarray(s, np.float32))
           for u, i, s in zip(frame["user_id"], frame["item_ids"], frame["scores"])}
    assert_same(got, reference(model, prepared, sequences(prepared), 12, include_seen=True))


def test_actor_crash_is_retried_output_complete_and_unduplicated(prepared, model_dir,
                                                                 baseline_run, tmp_path,
                                                                 monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    out = tmp_path / "crash"
    manifest = recommend(model_dir, prepared.path, top_n=TOP_N, output=str(out), batch_size=40,
                         verbose=False)
    assert marker.exists()  # an actor did die
    assert manifest["counts"]["users_scored"] == prepared.num_users
    assert_same(read_results(str(out)), read_results(baseline_run[0]))


def test_bad_inputs_give_clear_errors(prepared, model_dir, baseline_run, tmp_path):
    other = random_model_dir(tmp_path / "other", prepared, fingerprint="0" * 64)
    with pytest.raises(EzSASRecError, match="other vocabularies"):
        recommend(other, prepared.path, output=str(tmp_path / "x"))
    users = tmp_path / "users.txt"
    known = prepared.users()["raw_id"][0].as_py()
    users.write_text(f"{known}\nghost-user\n")
    with pytest.raises(EzSASRecError, match="unknown user.*ghost-user"):
        recommend(model_dir, prepared.path, output=str(tmp_path / "y"), users=str(users))
    with pytest.raises(EzSASRecError, match="already exists.*--overwrite"):
        recommend(model_dir, prepared.path, output=baseline_run[0])
    with pytest.raises(EzSASRecError, match="none of the"):
        recommend(model_dir, prepared.path, output=str(tmp_path / "z"), candidates=["nope"])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_score_pairs_matches_numpy_and_recommend(prepared, model_dir, baseline_run):
    model = load_model(model_dir)
    history = sequences(prepared)
    users = sorted(history)[:5]
    raw_items = prepared.items().sort_by("index")["raw_id"].to_pylist()
    items = raw_items[:20][::-1]
    frame = score_pairs(model_dir, prepared.path, users, items)
    assert list(frame.index) == users and list(frame.columns) == items
    vecs = model.user_embeddings(left_pad([history[u] for u in users], 8)).numpy()
    table = model.item_embeddings().numpy()
    rows = [raw_items.index(i) + 1 for i in items]
    np.testing.assert_allclose(frame.to_numpy(), vecs @ table[rows].T, rtol=1e-4, atol=1e-5)
    top = read_results(baseline_run[0])[users[0]]
    again = score_pairs(model, prepared, [users[0]], top[0])
    np.testing.assert_array_equal(again.to_numpy()[0], top[1])
    with pytest.raises(EzSASRecError, match="unknown item"):
        score_pairs(model, prepared, users, ["no-such-item"])


def test_sequences_read_as_row_ranges_so_actors_share_one_file(prepared):
    from ezsasrec_ray.score import _sequences_dataset

    files = [f for f in os.listdir(prepared.sequences_path) if f.endswith(".parquet")]
    dataset = _sequences_dataset(prepared, blocks=4 * len(files), min_rows=10).materialize()
    assert dataset.num_blocks() >= 4 * len(files)
    sizes = [table.num_rows for table in ray.get(dataset.to_arrow_refs())]
    assert sum(size % 10 != 0 for size in sizes) <= len(files)  # whole batches but a file's end
    users = sorted(dataset.to_pandas()["user_index"].tolist())
    assert users == sorted(prepared.sequences(["user_index"])["user_index"].to_pylist())
    # at least min_rows users a block: never more blocks than that allows
    few = _sequences_dataset(prepared, blocks=1000, min_rows=100).materialize()
    assert few.num_blocks() <= len(files) + prepared.num_users // 100


def test_row_ranges_share_each_file_in_even_whole_batches():
    from ezsasrec_ray.score import _row_ranges

    # 10 batches of 4096 (the last short) in 4 ranges: 3, 3, 2, 2 batches, not 3, 3, 3, 1
    assert _row_ranges([40_226], 4, 4096) == [(0, 0, 12288), (0, 12288, 24576),
                                              (0, 24576, 32768), (0, 32768, 40226)]
    ranges = _row_ranges([5, 0, 7, 1], 8, 2)
    assert [r for r in ranges if r[0] == 0] == [(0, 0, 2), (0, 2, 4), (0, 4, 5)]
    assert not [r for r in ranges if r[0] == 1]  # an empty file: no range
    assert [r for r in ranges if r[0] == 3] == [(3, 0, 1)]
    for counts, blocks, rows in (([1000], 7, 30), ([999, 5, 64], 16, 8), ([1], 3, 10)):
        ranges = _row_ranges(counts, blocks, rows)
        for f, count in enumerate(counts):
            mine = [(a, b) for g, a, b in ranges if g == f]
            assert mine[0][0] == 0 and mine[-1][1] == count  # contiguous, complete
            assert all(b == c for (_, b), (c, _) in zip(mine, mine[1:]))
            assert all(a % rows == 0 for a, _ in mine)  # whole batches
            whole = [-(-(b - a) // rows) for a, b in mine]
            assert max(whole) - min(whole) <= 1  # even


def test_busy_seconds_is_the_union_of_each_actors_batch_windows():
    from ezsasrec_ray.score import _busy_seconds

    records = [{"actor": "a", "window": (0.0, 2.0)}, {"actor": "a", "window": (1.0, 3.0)},
               {"actor": "a", "window": (5.0, 6.0)}, {"actor": "b", "window": (0.5, 1.5)},
               {"actor": "b", "window": (0.7, 1.0)}]
    assert _busy_seconds(records) == pytest.approx(3.0 + 1.0 + 1.0)
    assert _busy_seconds([]) == 0.0


@pytest.mark.parametrize("name, text, message", [
    ("metrics.json", "{not json", "metrics.json: unreadable JSON"),
    ("metrics.json", "[1, 2]", "metrics.json: expected a JSON object, got list"),
    ("config.json", "{\"num_items\": 5, \"dim\": \"big\"", "config.json: unreadable JSON"),
    ("config.json", "{\"num_items\": 5, \"colour\": 1}", "config.json: not a model config"),
])
def test_a_corrupt_model_directory_is_one_line(prepared, tmp_path, name, text, message):
    from ezsasrec_ray.model_io import load_model, model_info

    model = random_model_dir(tmp_path / "m", prepared)
    (tmp_path / "m" / name).write_text(text)
    for read in (model_info, load_model):
        with pytest.raises(EzSASRecError, match=message) as info:
            read(model)
        assert "\n" not in str(info.value)


def test_faiss_index_with_the_recall_check(prepared, model_dir, baseline_run, tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "hnsw"
    manifest = recommend(model_dir, prepared.path, top_n=TOP_N, output=str(out), batch_size=64,
                         index="faiss-hnsw", check_recall=100, verbose=False)
    index = manifest["index"]
    assert index["kind"] == "faiss-hnsw" and index["bytes"] > 0 and index["build_s"] >= 0
    # 90 items: FAISS is asked for more candidates than the catalog holds, so every list is
    # the exact one, and the check says so
    assert index[f"recall@{TOP_N}"] == 1.0
    assert 0 < index["recall_items_checked"] <= 240 * TOP_N
    assert_same(read_results(str(out)), read_results(baseline_run[0]))
    assert baseline_run[1]["index"] == {"kind": "exact", "build_s": 0.0, "bytes": 0}
