"""The easy API (ezsasrec_ray.easy): ezSASRec's quickstart with only its imports changed."""

import os

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path, write_tsv

from ezsasrec_ray.easy import (
    SASREC,
    SASRecDataSet,
    WarpSampler,
    filter_k_core,
    load_model,
    to_sasrec_data,
)
from ezsasrec_ray.errors import EzSASRecError

SMALL = {"seq_max_len": 20, "num_blocks": 1, "embedding_dim": 32, "attention_dim": 32,
         "attention_num_heads": 2, "dropout_rate": 0.1, "conv_dims": [32, 32], "l2_reg": 1e-5}


def planted_log(users=300, items=100, seed=0):
    """Raw log (userID str, itemID = 10 x index) where the next item is mostly the one after."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        item = int(rng.integers(1, items + 1))
        for _ in range(int(rng.integers(6, 20))):
            rows.append((f"u{u:04d}", 10 * item))
            item = item % items + 1 if rng.random() < 0.9 else int(rng.integers(1, items + 1))
    return pd.DataFrame(rows, columns=["userID", "itemID"])


def quickstart_maps(filtered_df, filename):
    """ezSASRec's quickstart preprocessing, verbatim: maps from sets, apply, to_csv."""
    user_set, item_set = set(filtered_df["userID"].unique()), set(filtered_df["itemID"].unique())
    user_map, item_map = {}, {}
    for u, user in enumerate(user_set):
        user_map[user] = u + 1
    for i, item in enumerate(item_set):
        item_map[item] = i + 1
    filtered_df = filtered_df.copy()
    filtered_df["userID"] = filtered_df["userID"].apply(lambda x: user_map[x])
    filtered_df["itemID"] = filtered_df["itemID"].apply(lambda x: item_map[x])
    filtered_df.to_csv(filename, sep="\t", header=False, index=False)
    return user_map, item_map


def weights(model):
    return [w.copy() for w in model.sasrec.get_weights()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The issue's quickstart on a synthetic log (small dims): 300 users, batch 2048."""
    root = tmp_path_factory.mktemp("easy")
    path = str(root / "models")
    filtered_df = filter_k_core(planted_log(), 3)
    user_map, item_map = quickstart_maps(filtered_df, str(root / "sasrec_data.txt"))
    data = SASRecDataSet(str(root / "sasrec_data.txt"))
    data.split()
    model = SASREC(item_num=data.itemnum, **SMALL)
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum, batch_size=2048,
                          maxlen=20, n_workers=2)
    model.train(data, sampler, num_epochs=3, batch_size=2048, lr=0.001, val_epoch=1,
                val_target_user_n=1000, target_item_n=-1, auto_save=True, path=path,
                exp_name="exp_example")
    sampler.close()
    trained = model
    model = load_model(path, "exp_example")
    raw_user_ids = sorted(user_map)[:40]
    score = model.get_user_item_score(data, raw_user_ids, [10, 20, 30], user_map, item_map,
                                      batch_size=10)
    reco = model.recommend_item(data, user_map, raw_user_ids, is_test=True, top_n=5)
    return dict(root=root, path=path, data=data, trained=trained, model=model,
                user_map=user_map, item_map=item_map, raw_user_ids=raw_user_ids, score=score,
                reco=reco)


# --------------------------------------------------------------------------------------------
# the quickstart


def test_quickstart_trains_every_epoch_on_all_users(quickstart):
    data, history = quickstart["data"], quickstart["trained"].history
    eligible = sum(len(v) == 1 for v in data.user_valid.values())
    assert list(history["epoch"]) == [1, 2, 3]
    assert (history["steps"] == 1).all()  # ceil(300 / 2048); ezSASRec trained int() = 0
    assert (history["users"] == eligible).all() and eligible == 300  # not a 1,000 sample
    assert history["HR@10"].notna().all()
    saved = pd.read_csv(os.path.join(quickstart["path"], "exp_example", "history.csv"))
    assert list(saved["epoch"]) == [1, 2, 3]


def test_quickstart_score_dataframe(quickstart):
    score, raw = quickstart["score"], quickstart["raw_user_ids"]
    assert list(score.columns) == ["user_id", 10, 20, 30]
    assert list(score["user_id"]) == sorted(raw)
    assert score[[10, 20, 30]].to_numpy().dtype == np.float32
    assert np.isfinite(score[[10, 20, 30]].to_numpy()).all()
    again = quickstart["model"].get_user_item_score(
        quickstart["data"], list(reversed(raw)) + raw[:3], [30, 10], quickstart["user_map"],
        quickstart["item_map"], batch_size=4096)  # any batch size; duplicates collapse
    assert list(again["user_id"]) == sorted(raw)
    np.testing.assert_array_equal(again[[30, 10]].to_numpy(), score[[30, 10]].to_numpy())


def test_quickstart_reco_meaning(quickstart):
    data, model, reco = quickstart["data"], quickstart["model"], quickstart["reco"]
    user_map, item_map = quickstart["user_map"], quickstart["item_map"]
    inv_item = {v: k for k, v in item_map.items()}
    assert set(reco) == set(quickstart["raw_user_ids"])
    for raw, pairs in reco.items():
        items = [i for i, _ in pairs]
        scores = [s for _, s in pairs]
        assert len(pairs) == 5 and all(isinstance(i, int) for i in items)
        assert scores == sorted(scores, reverse=True)
        assert all(1 <= i <= data.itemnum for i in items)  # encoded ids, as ezSASRec
        history = data.User[user_map[raw]][:-1]  # is_test: the last item is held out
        assert not set(items) & set(history)
        pair_scores = model.get_user_item_score(data, [raw], [inv_item[i] for i in items],
                                                user_map, item_map, is_test=True)
        assert pair_scores.iloc[0, 1:].tolist() == scores  # the same exact scores


def test_recommend_options(quickstart):
    data, model, user_map = quickstart["data"], quickstart["model"], quickstart["user_map"]
    raw = quickstart["raw_user_ids"][:10]
    full = model.recommend_item(data, user_map, raw, top_n=data.itemnum)
    seen_kept = model.recommend_item(data, user_map, raw, top_n=data.itemnum,
                                     exclude_purchased=False)
    for u in raw:
        history = set(data.User[user_map[u]])
        assert len(full[u]) == data.itemnum - len(history)  # fewer than top_n: shorter list
        assert len(seen_kept[u]) == data.itemnum
    sampled = model.recommend_item(data, user_map, raw, target_item_n=7, top_n=5, seed=1,
                                   item_map_dict=quickstart["item_map"])
    inv = {v: k for k, v in quickstart["item_map"].items()}
    for u, pairs in sampled.items():
        assert 1 <= len(pairs) <= 5
        assert not {quickstart["item_map"][i] for i, _ in pairs} & set(data.User[user_map[u]])
        full_scores = dict(full[u])
        for item, s in pairs:  # raw ids; same scores as the full ranking
            assert item in quickstart["item_map"] and inv[quickstart["item_map"][item]] == item
            assert full_scores[quickstart["item_map"][item]] == s


def test_evaluate_all_users_or_a_sample(quickstart):
    data, model = quickstart["data"], quickstart["model"]
    ndcg, hr = model.evaluate(data)
    assert 0 <= ndcg <= hr <= 1 and model._last_eval_users == 300
    model.evaluate(data, target_user_n=25, seed=0)
    assert model._last_eval_users == 25 and len(model.val_users) == 25
    ndcg_s, hr_s = model.evaluate(data, target_item_n=20, seed=0)
    assert 0 <= ndcg_s <= hr_s <= 1
    assert model.evaluate(data, rank_threshold=data.itemnum)[1] == 1.0


def test_learns_the_planted_sequence(quickstart, tmp_path):
    data = quickstart["data"]
    model = SASREC(item_num=data.itemnum, **SMALL)
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum, batch_size=32, maxlen=20)
    model.train(data, sampler, num_epochs=8, batch_size=32, lr=0.01, val_epoch=8,
                verbose=False, seed=0)
    ndcg, hr = model.evaluate(data)
    assert hr > 0.5, (ndcg, hr)  # random ranking: about 10 / 90


def test_saved_model_has_no_pickle_and_reloads_identically(quickstart, tmp_path):
    import ezsasrec_ray

    data, model, user_map = quickstart["data"], quickstart["trained"], quickstart["user_map"]
    directory = model.save(str(tmp_path), "again")
    names = sorted(os.listdir(directory))
    assert names == ["_SUCCESS", "config.json", "history.csv", "item_embeddings.npy",
                     "metrics.json", "model.weights.h5"]
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            head = f.read(2)
        assert not (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"), name
    np.load(os.path.join(directory, "item_embeddings.npy"), allow_pickle=False)
    loaded = load_model(str(tmp_path), "again")
    raw = quickstart["raw_user_ids"]
    assert loaded.recommend_item(data, user_map, raw, top_n=5) == \
        model.recommend_item(data, user_map, raw, top_n=5)
    assert loaded.args() == model.args() and loaded.epoch == model.epoch == 3
    keras_model = ezsasrec_ray.load_model(directory)  # the package's loader reads it too
    np.testing.assert_array_equal(keras_model.item_embeddings().numpy(),
                                  loaded.sasrec.item_embeddings().numpy())


# --------------------------------------------------------------------------------------------
# ezSASRec's faults


def test_few_users_and_a_big_batch_still_train(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [(u, int(i)) for u in range(1, 21) for i in rng.integers(1, 30, 8)]
    data = SASRecDataSet(write_tsv(tmp_path / "d.txt", pairs))
    data.split()
    model = SASREC(item_num=data.itemnum, **SMALL)
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum, batch_size=2048, maxlen=20)
    before = weights(model)
    model.train(data, sampler, num_epochs=1, batch_size=2048, val_epoch=1, verbose=False)
    assert model.history["steps"].tolist() == [1]
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights(model)))


def test_sampler_terminates_on_a_user_who_rated_every_item(tmp_path):
    pairs = [(1, i) for i in range(1, 7)] * 2 + [(2, 1), (2, 2), (2, 3), (2, 4), (3, 5), (3, 6),
                                                  (3, 1)]
    data = SASRecDataSet(write_tsv(tmp_path / "d.txt", pairs))
    data.split()
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum, batch_size=64, maxlen=5,
                          seed=0)
    u, seq, pos, neg = sampler.next_batch()
    assert seq.shape == pos.shape == neg.shape == (64, 5) and u.shape == (64,)
    assert (neg[u == 1] == 0).all()  # user 1 trained on all 6 items: no negative exists
    for user, row in zip(u, neg):
        assert not set(row[row > 0].tolist()) & set(data.user_train[int(user)])
    plain = WarpSampler({k: list(v) for k, v in data.user_train.items()}, 3, 6, seed=0)
    assert plain.next_batch()[1].shape == (64, 10)  # a plain dict works too
    model = SASREC(item_num=data.itemnum, **SMALL)
    model.train(data, sampler, num_epochs=1, val_epoch=1, verbose=False)  # returns
    reco = model.recommend_item(data, {1: 1}, [1], target_item_n=5)
    assert reco == {1: []}  # nothing left to recommend to user 1


def test_sample_unseen_is_exact():
    rng = np.random.default_rng(0)
    n = 12
    rows = [rng.choice(np.arange(1, n + 1), rng.integers(0, n), replace=False) for _ in range(30)]
    rows.append(np.arange(1, n + 1))  # has seen everything
    rows.append(np.array([3, 3, 3]))  # repeats
    # every row's items are its user's training items; the sampler draws the negatives
    sampler = WarpSampler({u: list(r) for u, r in enumerate(rows, 1)}, len(rows), n)
    draws = sampler.negatives(np.arange(len(rows)), (len(rows), 400), rng)
    for row, seen in zip(draws, rows):
        unseen = set(range(1, n + 1)) - set(seen.tolist())
        assert set(row.tolist()) == (unseen or {0})  # every unseen item, nothing else


def test_filter_k_core_matches_the_original_and_keeps_order(capsys):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"userID": rng.integers(0, 80, 3000),  # skewed items: a partial core
                       "itemID": (rng.pareto(1.0, 3000) * 10).astype(int), "t": np.arange(3000)})
    reference = df.copy()  # ezSASRec's loop: groupby-filter items, then users, until stable
    while True:
        reference = reference.groupby("itemID").filter(lambda x: len(x) >= 20)
        reference = reference.groupby("userID").filter(lambda x: len(x) >= 20)
        if (reference.groupby("itemID").size() >= 20).all() and \
                (reference.groupby("userID").size() >= 20).all():
            break
    out = filter_k_core(df, 20)
    assert set(out.index) == set(reference.index)
    assert 0 < out.userID.nunique() < df.userID.nunique()
    assert 0 < out.itemID.nunique() < df.itemID.nunique()
    assert list(out.columns) == ["userID", "itemID", "t"]
    assert out["userID"].is_monotonic_increasing
    assert (out.groupby("userID")["t"].apply(lambda t: t.is_monotonic_increasing)).all()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"Original: {df.userID.nunique()} users and {df.itemID.nunique()} items",
                       f"Final: {out.userID.nunique()} users and {out.itemID.nunique()} items"]
    assert len(filter_k_core(df)) == len(df)  # core_num=0 keeps everything


def test_dataset_split_and_formats(tmp_path):
    # users 2 and 9 (gaps in ids), 1 / 2 / 3 / 5 items
    pairs = [(9, 4), (2, 1), (9, 5), (2, 2), (9, 6), (2, 3), (2, 4), (2, 5), (5, 7), (5, 8),
             (7, 1)]
    data = SASRecDataSet(write_tsv(tmp_path / "d.txt", pairs))
    data.split()
    assert (data.usernum, data.itemnum) == (9, 8)
    assert dict(data.User) == {2: [1, 2, 3, 4, 5], 5: [7, 8], 7: [1], 9: [4, 5, 6]}
    assert dict(data.user_train) == {2: [1, 2, 3], 5: [7, 8], 7: [1], 9: [4]}
    assert dict(data.user_valid) == {2: [4], 5: [], 7: [], 9: [5]}
    assert dict(data.user_test) == {2: [5], 5: [], 7: [], 9: [6]}
    assert data.Items == {1, 2, 3, 4, 5, 6, 7, 8}
    with open(tmp_path / "t.txt", "w") as f:  # with a time column: sorted by time per user
        f.write("1\t3\t30\n1\t1\t10\n1\t2\t20\n")
    timed = SASRecDataSet(str(tmp_path / "t.txt"))
    timed.split()
    assert timed.with_time and dict(timed.User) == {1: [1, 2, 3]}
    with open(tmp_path / "s.txt", "w") as f:  # space-separated (ezSASRec's older default)
        f.write("1 2\n1 3\n")
    spaced = SASRecDataSet(str(tmp_path / "s.txt"))
    spaced.split()
    assert dict(spaced.User) == {1: [2, 3]}


def test_to_sasrec_data_round_trip(tmp_path):
    df = planted_log(users=20, items=15)
    user_map, item_map = to_sasrec_data(df, str(tmp_path / "d.txt"))
    data = SASRecDataSet(str(tmp_path / "d.txt"))
    data.split()
    for raw, rows in df.groupby("userID", sort=False):
        assert data.User[user_map[raw]] == [item_map[i] for i in rows["itemID"]]


# --------------------------------------------------------------------------------------------
# clear errors


def test_bad_arguments_give_clear_errors(quickstart, tmp_path):
    data, model = quickstart["data"], quickstart["model"]
    user_map, item_map = quickstart["user_map"], quickstart["item_map"]
    small = {**SMALL, "item_num": 10}
    with pytest.raises(EzSASRecError, match="attention_dim .* must equal embedding_dim"):
        SASREC(**{**small, "attention_dim": 64})
    with pytest.raises(EzSASRecError, match="conv_dims"):
        SASREC(**{**small, "conv_dims": [64, 32]})
    with pytest.raises(EzSASRecError, match="divisible by attention_num_heads"):
        SASREC(**{**small, "attention_num_heads": 3})
    with pytest.raises(EzSASRecError, match="seq_max_len must be >= 2"):
        SASREC(**{**small, "seq_max_len": 1})
    with pytest.raises(TypeError):
        SASREC(**{**small, "embeding_dim": 32})  # a typo is not silently ignored
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum)
    for kwargs, message in (({"batch_size": 0}, "batch_size must be >= 1"),
                            ({"lr": 0}, "lr must be a number > 0"),
                            ({"loss": "hinge"}, "unknown loss"),
                            ({"target_item_n": 0}, "target_item_n")):
        with pytest.raises(EzSASRecError, match=message):
            model.train(data, sampler, verbose=False, **kwargs)
    with pytest.raises(EzSASRecError, match="user id.* not in user_map .*'nobody'"):
        model.recommend_item(data, user_map, ["nobody"])
    with pytest.raises(EzSASRecError, match="item id.* not in item_map .*12345"):
        model.get_user_item_score(data, list(user_map)[:2], [12345], user_map, item_map)
    with pytest.raises(EzSASRecError, match="duplicate"):
        model.get_user_item_score(data, list(user_map)[:2], [10, 10], user_map, item_map)
    with pytest.raises(EzSASRecError, match="model directory not found"):
        load_model(str(tmp_path), "missing")
    unsplit = SASRecDataSet(str(quickstart["root"] / "sasrec_data.txt"))
    with pytest.raises(EzSASRecError, match="call data.split"):
        _ = unsplit.user_train
    with pytest.raises(EzSASRecError, match="call data.split"):
        model.evaluate(unsplit)
    with pytest.raises(EzSASRecError, match="item_num=10"):
        SASREC(**small).evaluate(data)
    with pytest.raises(EzSASRecError, match=r"bad.txt:2: item 'x' is not an integer id"):
        SASRecDataSet(write_tsv(tmp_path / "bad.txt", [(1, 2), (1, "x")])).split()
    with pytest.raises(EzSASRecError, match=r"zero.txt:1: item id 0 < 1"):
        SASRecDataSet(write_tsv(tmp_path / "zero.txt", [(1, 0)])).split()
    with pytest.raises(EzSASRecError, match="file not found"):
        SASRecDataSet(str(tmp_path / "nope.txt")).split()
    with pytest.raises(EzSASRecError, match="nothing to train on"):
        WarpSampler({1: [3], 2: [4]}, 2, 5)
    with pytest.raises(EzSASRecError, match=r"item ids must be in 1..itemnum"):
        WarpSampler({1: [3, 9]}, 1, 5)
    with pytest.raises(EzSASRecError, match="column"):
        filter_k_core(pd.DataFrame({"user": [1], "item": [2]}), 2)
    with pytest.raises(EzSASRecError, match="core_num must be >= 0"):
        filter_k_core(pd.DataFrame({"userID": [1], "itemID": [2]}), -1)


# --------------------------------------------------------------------------------------------
# MovieLens


def test_quickstart_on_movielens_small(tmp_path, monkeypatch, capsys):
    ratings = shared_path("ml-latest-small", "ratings.csv")
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "models")
    df = pd.read_csv(ratings)
    df = df.rename({"userId": "userID", "movieId": "itemID", "timestamp": "time"}, axis=1) \
        .sort_values(by=["userID", "time"]).drop(["rating", "time"], axis=1) \
        .reset_index(drop=True)
    filtered_df = filter_k_core(df, 7)
    assert capsys.readouterr().out.startswith("Original: ")
    user_map, item_map = quickstart_maps(filtered_df, "sasrec_data.txt")
    data = SASRecDataSet("sasrec_data.txt")
    data.split()
    assert (data.usernum, data.itemnum) == (len(user_map), len(item_map))
    model = SASREC(item_num=data.itemnum, seq_max_len=50, num_blocks=1, embedding_dim=32,
                   attention_dim=32, attention_num_heads=2, dropout_rate=0.2, conv_dims=[32, 32],
                   l2_reg=0.00001)
    sampler = WarpSampler(data.user_train, data.usernum, data.itemnum, batch_size=2048,
                          maxlen=50, n_workers=2)
    model.train(data, sampler, num_epochs=2, batch_size=2048, lr=0.001, val_epoch=1,
                val_target_user_n=1000, target_item_n=-1, auto_save=True, path=path,
                exp_name="exp_example")
    history = model.history
    assert history["steps"].tolist() == [1, 1]  # ezSASRec: int(610 / 2048) = 0 steps
    assert (history["users"] == data.usernum).all()
    model = load_model(path, "exp_example")
    inv_user_map = {v: k for k, v in user_map.items()}
    model.sample_val_users(data, 100)
    raw_user_ids = [inv_user_map[u] for u in model.val_users]
    score = model.get_user_item_score(data, raw_user_ids, [1, 2, 3], user_map, item_map,
                                      batch_size=10)
    reco = model.recommend_item(data, user_map, raw_user_ids, is_test=True, top_n=5)
    assert list(score.columns) == ["user_id", 1, 2, 3] and len(score) == 100
    assert score["user_id"].is_monotonic_increasing
    assert set(reco) == set(raw_user_ids)
    assert all(len(v) == 5 and [s for _, s in v] == sorted((s for _, s in v), reverse=True)
               for v in reco.values())


def test_load_model_reads_a_train_model_directory(tmp_path):
    """A directory in ``ezsasrec train``'s format (no ``easy`` block) loads as a SASREC."""
    from ezsasrec_ray.model import SASRecConfig, build_model
    from ezsasrec_ray.model_io import write_model_dir

    net = build_model(SASRecConfig(num_items=12, maxlen=6, dim=8, blocks=1, heads=2))
    write_model_dir(str(tmp_path / "run"), net, {"best_epoch": 4, "valid": {"HR@10": 0.5}},
                    overwrite=False)  # train's writer
    model = load_model(str(tmp_path), "run")
    assert (model.item_num, model.seq_max_len, model.embedding_dim) == (12, 6, 8)
    assert (model.epoch, model.best_score) == (4, 0.5)
    np.testing.assert_array_equal(model.sasrec.item_embeddings().numpy(),
                                  net.item_embeddings().numpy())


def test_save_refuses_to_replace_a_users_directory(quickstart, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EzSASRecError, match="not written by ezsasrec_ray"):
        quickstart["trained"].save(str(tmp_path), "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
