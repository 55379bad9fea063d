"""Training on Ray Train and evaluation: tiny models on a small planted-structure log."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from ezsasrec_ray.data import load_prepared, prepare
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.evaluate import evaluate
from ezsasrec_ray.model_io import load_model
from ezsasrec_ray.synth import synth
from ezsasrec_ray.train import epoch_batches, train

TINY = {"dim": 16, "maxlen": 8, "blocks": 1, "heads": 1, "dropout": 0.1, "batch_size": 64,
        "lr": 5e-3, "verbose": False}


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    synth(str(root / "log"), users=600, items=60, events=12_000, seed=1, themes=4,
          verbose=False)
    prepare(str(root / "log"), str(root / "prepared"), k_core=3, verbose=False)
    return str(root / "prepared")


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m1"
    metrics = train(prepared, str(out), epochs=8, patience=8,
                    storage_path=str(out.parent / "runs"), **TINY)
    return str(out), metrics


def test_train_writes_artifacts_loss_decreases_and_beats_popularity(prepared, trained):
    path, metrics = trained
    for name in ("config.json", "model.weights.h5", "item_embeddings.npy", "metrics.json",
                 "history.csv", "training_curves.png", "users", "items"):
        assert os.path.exists(os.path.join(path, name)), name
    history = pd.read_csv(os.path.join(path, "history.csv"))
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    result = evaluate(prepared, path, split="test")
    assert result["users"] == load_prepared(prepared).holdout_examples("test")[2].size
    assert result["model"]["NDCG@10"] > 1.5 * result["popularity"]["NDCG@10"]
    assert 0 < result["model"]["coverage@10"] <= 1
    assert metrics["valid"]["NDCG@10"] == pytest.approx(
        evaluate(prepared, path, split="valid", baselines=False)["model"]["NDCG@10"], abs=1e-9)


def test_loaded_model_matches_saved_embeddings(trained, prepared):
    path, _ = trained
    model = load_model(path)
    saved = np.load(os.path.join(path, "item_embeddings.npy"), allow_pickle=False)
    np.testing.assert_array_equal(saved, model.item_embeddings().numpy())
    histories = np.array([[0, 0, 0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]], np.int32)
    again = load_model(path)
    np.testing.assert_array_equal(model.user_embeddings(histories).numpy(),
                                  again.user_embeddings(histories).numpy())
    assert model.metadata["vocab_fingerprint"] == load_prepared(prepared).vocab_fingerprint()


def test_model_refused_with_other_vocabularies(trained, tmp_path):
    path, _ = trained
    synth(str(tmp_path / "log"), users=100, items=30, events=2000, seed=5, verbose=False)
    prepare(str(tmp_path / "log"), str(tmp_path / "other"), k_core=2, verbose=False)
    with pytest.raises(EzSASRecError, match="other vocabularies"):
        evaluate(str(tmp_path / "other"), path)


def test_resume_same_run_name_and_worker_kill(prepared, trained, tmp_path, monkeypatch):
    """Two workers; one dies after epoch 2 and the run resumes from its checkpoint. A later
    run with the same name and more epochs resumes from the latest checkpoint again, and the
    two-worker model ends as good as the one-worker model trained for as many epochs."""
    storage = str(tmp_path / "runs")
    marker = tmp_path / "killed"
    monkeypatch.setenv("EZSASREC_FAULT_KILL_AT_EPOCH", "2")
    monkeypatch.setenv("EZSASREC_FAULT_MARKER", str(marker))
    options = {**TINY, "num_workers": 2, "run_name": "resume", "storage_path": storage,
               "patience": 10, "max_failures": 1}
    train(prepared, str(tmp_path / "a"), epochs=3, **options)
    assert marker.exists()  # the worker really died
    state = _latest_state(storage, "resume")
    assert state["epoch"] == 3 and state["resumed_from_epoch"] in (1, 2)  # not from scratch
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    monkeypatch.delenv("EZSASREC_FAULT_KILL_AT_EPOCH")
    metrics = train(prepared, str(tmp_path / "b"), epochs=8, **options)
    state = _latest_state(storage, "resume")
    assert state["resumed_from_epoch"] == 3 and metrics["epochs_run"] == 8
    # two workers learn as well as one does on the same data, for the same number of epochs
    two = evaluate(prepared, str(tmp_path / "b"), split="test")
    one = evaluate(prepared, trained[0], split="test", baselines=False)
    assert two["model"]["NDCG@10"] > 1.2 * two["popularity"]["NDCG@10"]
    assert two["model"]["NDCG@10"] > 0.8 * one["model"]["NDCG@10"]


def _latest_state(storage, run_name):
    run_dir = os.path.join(storage, run_name)
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")
                         and os.path.isdir(os.path.join(run_dir, d)))
    states = []
    for name in checkpoints:
        with open(os.path.join(run_dir, name, "train_state.json")) as f:
            states.append(json.load(f))
    return max(states, key=lambda s: s["epoch"])


@pytest.mark.parametrize("options, message", [
    ({"dim": 10, "heads": 3}, "dim"),
    ({"maxlen": 1}, "maxlen"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"epochs": 0}, "--epochs"),
])
def test_bad_configs_fail_before_workers(prepared, tmp_path, options, message):
    with pytest.raises(EzSASRecError, match=message):
        train(prepared, str(tmp_path / "m"), **options)
    assert not os.path.exists(tmp_path / "m")


def test_bad_prepared_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EzSASRecError, match="no manifest.json"):
        train(str(tmp_path / "empty"), str(tmp_path / "m"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(
        json.dumps({"format_version": 0, "kind": "ezsasrec_ray.prepared"}))
    with pytest.raises(EzSASRecError, match="format_version 0"):
        train(str(tmp_path / "old"), str(tmp_path / "m"))


def test_epoch_batches_cover_every_row_once_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=1000)
    batches = epoch_batches(lengths, 32, rng, bucket_batches=4)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    spreads = [lengths[b].max() - lengths[b].min() for b in batches]
    assert np.mean(spreads) < 0.5 * (lengths.max() - lengths.min())
