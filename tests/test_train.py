"""Training on Ray Train and evaluation: tiny models on a small planted-structure log."""

import json
import os
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import synth_prepared

from ezsasrec_ray.batching import epoch_batches
from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.evaluate import evaluate, format_table
from ezsasrec_ray.fit import Adam, make_train_step
from ezsasrec_ray.metrics import MarkovBaseline, PopularityBaseline, ranking_metrics
from ezsasrec_ray.model_io import load_model
from ezsasrec_ray.ranking import baseline_ranks
from ezsasrec_ray.train import train
from ezsasrec_ray.train_loop import (
    TrainConfig,
    _restore_checkpoint,
    _save_checkpoint,
    build_optimizer,
)

# eval_every_steps 1 and min_steps 0: a validation round (and checkpoint) every epoch, so the
# tests below can speak of epochs
TINY = {"dim": 16, "maxlen": 8, "blocks": 1, "heads": 1, "dropout": 0.1, "batch_size": 64,
        "lr": 5e-3, "verbose": False, "eval_every_steps": 1, "min_steps": 0}


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return synth_prepared(root, users=600, items=60, events=12_000, seed=1, themes=4)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m1"
    # a validation sample of half the users: the others train on their validation targets
    metrics = train(prepared, str(out), epochs=8, patience=8, valid_users=VALID_USERS,
                    storage_path=str(out.parent / "runs"), **TINY)
    return str(out), metrics


VALID_USERS = 300


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
    other = synth_prepared(tmp_path, users=100, items=30, events=2000, seed=5, k_core=2)
    with pytest.raises(EzSASRecError, match="other vocabularies"):
        evaluate(other, path)


def test_metrics_json_has_both_baselines_on_the_validation_examples(prepared, trained):
    """metrics.json["baselines"]: popularity and Markov fitted on the model's training items,
    ranked on the very validation users and targets the model was validated on."""
    path, metrics = trained
    with open(os.path.join(path, "metrics.json")) as f:
        saved = json.load(f)
    assert set(saved["baselines"]) == {"popularity", "markov"}
    assert saved["baselines"] == metrics["baselines"]
    data = load_prepared(prepared)
    share = data.valid_share(VALID_USERS)
    _, histories, targets = data.holdout_examples("valid", share)
    ragged = (histories.values.to_numpy(), histories.offsets.to_numpy())
    fitted_on = data.training_sequences("valid", share)
    assert metrics["valid"]["users"] == len(targets)  # the model's validation sample
    assert abs(len(targets) - VALID_USERS) < 60  # a hash sample: about VALID_USERS users
    for name, baseline in (("popularity", PopularityBaseline(data.num_items)),
                           ("markov", MarkovBaseline(data.num_items))):
        expected = ranking_metrics(baseline_ranks(baseline.fit(fitted_on), ragged, targets))
        assert expected.pop("users") == len(targets)
        assert saved["baselines"][name] == pytest.approx(expected, abs=1e-12)
        assert set(saved["baselines"][name]) == set(metrics["valid"]) - {"users"}
    # what `ezsasrec evaluate --split valid` reports for the same baselines
    result = evaluate(prepared, path, split="valid")
    for name in ("popularity", "markov"):
        assert saved["baselines"][name]["NDCG@10"] == pytest.approx(result[name]["NDCG@10"],
                                                                    abs=1e-12)
    assert saved["baselines"]["markov"]["NDCG@10"] != saved["baselines"]["popularity"]["NDCG@10"]
    assert os.path.getsize(os.path.join(path, "training_curves.png")) > 0


def test_training_curves_draw_the_baselines_as_dashed_lines(tmp_path, monkeypatch):
    """The validation panel: SASRec's rounds (epochs between rounds have no valid_*) and one
    dashed horizontal line per baseline at its validation NDCG@10."""
    import matplotlib.pyplot as plt

    from ezsasrec_ray.train import _plot_curves

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    history = [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.5, "valid_NDCG@10": 0.2},
               {"epoch": 3, "loss": 2.0}, {"epoch": 4, "loss": 1.8, "valid_NDCG@10": 0.3}]
    baselines = {"popularity": {"NDCG@10": 0.05, "HR@10": 0.1},
                 "markov": {"NDCG@10": 0.15, "HR@10": 0.25}}
    _plot_curves(history, str(tmp_path / "curves.png"), baselines)
    assert (tmp_path / "curves.png").stat().st_size > 0
    panel = figures[0].axes[1]
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert set(lines) == {"SASRec", "popularity", "Markov"}
    assert list(lines["SASRec"].get_xdata()) == [2, 4]
    for name, label in (("popularity", "popularity"), ("markov", "Markov")):
        assert lines[label].get_linestyle() == "--"
        assert set(lines[label].get_ydata()) == {baselines[name]["NDCG@10"]}
    assert [t.get_text() for t in panel.get_legend().get_texts()] == \
        ["SASRec", "popularity", "Markov"]


def test_cli_evaluate_saves_evaluation_json_beside_the_model(prepared, trained, tmp_path,
                                                           capsys):
    """`ezsasrec evaluate` writes MODEL/evaluation.json: the same result --json prints."""
    from ezsasrec_ray import cli

    model = tmp_path / "model"
    shutil.copytree(trained[0], model)  # the shared model stays as trained
    saved = model / "evaluation.json"

    def run(*flags):
        argv = ["evaluate", "--data", prepared, "--model", str(model), *flags]
        assert cli.run(cli.build_parser().parse_args(argv)) == 0
        return capsys.readouterr()

    printed = json.loads(run("--json", "--no-save").out)
    assert not saved.exists()
    table, note = run().out.rstrip("\n").rsplit("\n", 1)
    assert table == format_table(printed)
    assert note == f"evaluation written to {saved}"
    assert json.loads(saved.read_text()) == printed
    assert set(printed) >= {"split", "users", "model", "popularity", "markov"}
    saved.unlink()
    both = run("--json")  # stdout stays one JSON object; the note goes to stderr
    assert json.loads(both.out) == printed == json.loads(saved.read_text())
    assert both.err.strip() == f"evaluation written to {saved}"


def test_resume_same_run_name_and_worker_kill(prepared, trained, tmp_path, monkeypatch):
    """Two workers; one dies after epoch 2 and the run resumes from its checkpoint. A later
    run with the same name and more epochs resumes from the latest checkpoint again, and the
    two-worker model ends as good as the one-worker model trained for as many epochs. The
    item table goes through the lazy Adam's cross-worker path (all-gathered rows; softmax's
    gradient has every row, so the update equals dense Adam's) and its checkpointed state."""
    storage = str(tmp_path / "runs")
    marker = tmp_path / "killed"
    monkeypatch.setenv("EZSASREC_FAULT_KILL_AT_EPOCH", "2")
    monkeypatch.setenv("EZSASREC_FAULT_MARKER", str(marker))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    options = {**TINY, "num_workers": 2, "run_name": "resume", "storage_path": storage,
               "patience": 10, "max_failures": 1, "optimizer": "lazy_adam"}
    tracking = (tmp_path / "mlruns").as_uri()
    train(prepared, str(tmp_path / "a"), epochs=3, tracking_uri=tracking, **options)
    assert marker.exists()  # the worker really died
    state = _latest_state(storage, "resume")
    assert state["epoch"] == 3 and state["resumed_from_epoch"] in (1, 2)  # not from scratch
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    _check_mlflow_run(tracking, state, tmp_path / "a")
    # both workers hold the same weights after every epoch (rank 0 vs the workers' mean)
    assert all(h["replica_weight_gap"] < 1e-12 for h in state["history"])
    monkeypatch.delenv("EZSASREC_FAULT_KILL_AT_EPOCH")
    metrics = train(prepared, str(tmp_path / "b"), epochs=8, **options)
    state = _latest_state(storage, "resume")
    assert all(h["replica_weight_gap"] < 1e-12 for h in state["history"])
    assert state["resumed_from_epoch"] == 3 and metrics["epochs_run"] == 8
    # two workers learn as well as one does on the same data, for the same number of epochs
    two = evaluate(prepared, str(tmp_path / "b"), split="test")
    one = evaluate(prepared, trained[0], split="test", baselines=False)
    assert two["model"]["NDCG@10"] > 1.2 * two["popularity"]["NDCG@10"]
    assert two["model"]["NDCG@10"] > 0.8 * one["model"]["NDCG@10"]


def _check_mlflow_run(tracking_uri, state, model_dir):
    """--tracking-uri: one MLflow run, the options as params, every validation round as a
    metric at its step (the restarted worker logged into the same run), the reports as
    artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ezsasrec").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["dim"] == str(TINY["dim"]) and run.data.params["num_workers"] == "2"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                  "valid_NDCG_at_10")}
    expected = {h["total_steps"]: h["valid_NDCG@10"] for h in state["history"]}
    assert logged == pytest.approx(expected, abs=1e-9)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.csv"} <= artifacts
    with open(model_dir / "metrics.json") as f:
        assert json.load(f)["best_epoch"] >= 1


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
    ({"loss": "hinge"}, "--loss must be one of .*; got 'hinge'"),
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


# --------------------------------------------------------------------------------------------
# optimizer: fused dense Adam and lazy (row-sparse) Adam for the item table


def _table_and_bias(seed=0):
    rng = np.random.default_rng(seed)
    table = tf.Variable(rng.normal(size=(10, 4)).astype(np.float32))
    bias = tf.Variable(rng.normal(size=(4,)).astype(np.float32))
    return table, bias


def _apply(optimizer, gradients):
    tf.function(lambda: optimizer.apply(gradients))()


def test_adam_matches_keras_adam_and_lazy_rows_match_on_touched_rows_only():
    grads = [tf.IndexedSlices(tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) - 5),
                              tf.constant([2, 7, 2]), (10, 4)),  # row 2 twice: they add up
             tf.constant([0.5, -1.0, 2.0, 0.0])]
    reference = [v.numpy() for v in _table_and_bias()]
    keras_vars = [tf.Variable(v) for v in reference]
    keras_adam = keras.optimizers.Adam(learning_rate=0.01)
    keras_adam.apply_gradients(zip([tf.convert_to_tensor(grads[0]), grads[1]], keras_vars))
    dense_vars, lazy_vars = _table_and_bias(), _table_and_bias()
    dense = Adam(list(dense_vars), 0.01)
    lazy = Adam(list(lazy_vars), 0.01, lazy=[lazy_vars[0]])
    _apply(dense, grads)
    _apply(lazy, grads)
    for ours in (dense_vars, lazy_vars):  # one step from zero moments: the same update
        for mine, theirs in zip(ours, keras_vars):
            np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7)
    untouched = [r for r in range(10) if r not in (2, 7)]
    np.testing.assert_array_equal(lazy_vars[0].numpy()[untouched], reference[0][untouched])
    # a second step on row 1 only: dense Adam moves rows 2 and 7 with their momentum, lazy
    # Adam leaves them (and their moments) alone and updates row 1 exactly as dense Adam does
    before = lazy_vars[0].numpy().copy()
    moments = [lazy.m[0].numpy().copy(), lazy.v[0].numpy().copy()]
    step2 = [tf.IndexedSlices(tf.ones((1, 4)), tf.constant([1]), (10, 4)), tf.zeros(4)]
    _apply(lazy, step2)
    _apply(dense, step2)
    keras_adam.apply_gradients(zip([tf.convert_to_tensor(step2[0]), step2[1]], keras_vars))
    after = lazy_vars[0].numpy()
    np.testing.assert_array_equal(after[[2, 7]], before[[2, 7]])
    np.testing.assert_array_equal(lazy.m[0].numpy()[[2, 7]], moments[0][[2, 7]])
    np.testing.assert_array_equal(lazy.v[0].numpy()[[2, 7]], moments[1][[2, 7]])
    assert not np.allclose(dense_vars[0].numpy()[[2, 7]], before[[2, 7]])
    np.testing.assert_allclose(after[1], dense_vars[0].numpy()[1], rtol=1e-6)
    for mine, theirs in zip(dense_vars, keras_vars):  # dense Adam = Keras Adam, step after step
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7)
    assert int(lazy.step.numpy()) == 2


def _optimizer_state(optimizer):
    return [v.numpy().copy() for v in [*optimizer.variables_to_train, *optimizer.variables]]


@pytest.mark.parametrize("lazy", [False, True])
def test_loss_scaled_adam_matches_adam_and_skips_non_finite_steps(lazy):
    """mixed_float16's loss scaling: gradients of the scaled loss, unscaled, give Adam's
    weights; a step with an inf or NaN gradient changes nothing but halves the scale (not
    below 1); growth_steps finite steps in a row double it."""
    grads = [tf.IndexedSlices(tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) - 5),
                              tf.constant([2, 7, 2]), (10, 4)),
             tf.constant([0.5, -1.0, 2.0, 0.0])]
    plain_vars, scaled_vars = _table_and_bias(), _table_and_bias()
    plain = Adam(list(plain_vars), 0.01, lazy=[plain_vars[0]] if lazy else [])
    scaled = Adam(list(scaled_vars), 0.01, lazy=[scaled_vars[0]] if lazy else [],
                  loss_scale=True, growth_steps=3)
    assert len(scaled.variables) == len(plain.variables) + 2  # the scale and its count
    assert float(scaled.loss_scale.numpy()) == 2.0 ** 15

    def times(factor):  # the gradients of the loss multiplied by factor
        return [tf.IndexedSlices(grads[0].values * factor, grads[0].indices, (10, 4)),
                grads[1] * factor]

    for step in range(1, 4):  # the third finite step in a row doubles the scale
        _apply(plain, grads)
        _apply(scaled, times(float(scaled.loss_scale.numpy())))
        for mine, theirs in zip(scaled_vars, plain_vars):
            np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7)
        assert int(scaled.good_steps.numpy()) == step % 3
    assert float(scaled.loss_scale.numpy()) == 2.0 ** 16 and int(scaled.step.numpy()) == 3
    _apply(scaled, times(2.0 ** 16))
    for bad in (np.inf, np.nan):
        before = _optimizer_state(scaled)[:-2]  # weights, step, m and v
        poisoned = times(2.0 ** 16)
        poisoned[1] = tf.tensor_scatter_nd_update(poisoned[1], [[1]], [bad])
        scale = float(scaled.loss_scale.numpy())
        _apply(scaled, poisoned)
        for old, new in zip(before, _optimizer_state(scaled)[:-2]):
            np.testing.assert_array_equal(old, new)
        assert float(scaled.loss_scale.numpy()) == scale / 2
        assert int(scaled.good_steps.numpy()) == 0 and int(scaled.step.numpy()) == 4
    scaled.loss_scale.assign(1.0)
    _apply(scaled, [grads[0], tf.constant([np.nan, 0.0, 0.0, 0.0])])
    assert float(scaled.loss_scale.numpy()) == 1.0  # the floor
    _apply(scaled, grads)
    assert int(scaled.step.numpy()) == 5 and int(scaled.good_steps.numpy()) == 1


def test_mixed_float16_sasrec_trains_with_loss_scaling_and_checkpoints_the_scale(tmp_path):
    """A tiny SASRec in float16 (on CPU too) through the real step: the loss stays finite and
    falls, a step whose scaled gradients overflow is skipped; the scale and its count are
    checkpointed (and refused by a float32 run's optimizer, which has neither)."""
    from ezsasrec_ray.fit import model_loss
    from ezsasrec_ray.losses import make_loss, sample_negatives
    from ezsasrec_ray.model import SASRecConfig, build_model

    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 31, (16, 6)).astype(np.int32),
                rng.integers(1, 31, (16, 6)).astype(np.int32)) for _ in range(4)]
    batches = [(i, p, sample_negatives(rng, p.shape, 30)) for i, p in batches]

    def setup(precision):
        keras.utils.set_random_seed(0)
        model = build_model(SASRecConfig(num_items=30, maxlen=6, dim=8, blocks=1,
                                         dropout=0.0))
        optimizer = build_optimizer(model, TrainConfig(loss="bce", lr=0.01,
                                                       precision=precision))
        step = make_train_step(optimizer, tf.distribute.get_strategy(),
                               model_loss(model, make_loss("bce")))
        return model, optimizer, step

    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model, optimizer, step = setup("mixed_float16")
        assert model.sequence_embeddings(batches[0][0]).dtype == tf.float16
        assert optimizer.loss_scale is not None
        losses = [float(step(*batches[s % 4])) for s in range(40)]
        _save_checkpoint(str(tmp_path), model, optimizer, {"epoch": 1})
        saved = [float(optimizer.loss_scale.numpy()), int(optimizer.good_steps.numpy())]
        optimizer.loss_scale.assign(8.0)
        optimizer.good_steps.assign(3)
        _restore_checkpoint(str(tmp_path), model, optimizer)
        assert [float(optimizer.loss_scale.numpy()), int(optimizer.good_steps.numpy())] == saved
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])  # 4 batches: one pass each
    # 2**15 overflows float16 once here (measured: one step of 40): the step is skipped and
    # the scale halved, the others count
    skipped = 40 - int(optimizer.step.numpy())
    assert 1 <= skipped <= 3 and int(optimizer.good_steps.numpy()) < 40 - skipped + 1
    assert float(optimizer.loss_scale.numpy()) == 2.0 ** (15 - skipped)
    _, plain, _ = setup("float32")
    assert plain.loss_scale is None
    with pytest.raises(EzSASRecError, match="--precision"):
        _restore_checkpoint(str(tmp_path), model, plain)


def test_two_workers_mixed_bfloat16_trains_like_float32(prepared, tmp_path):
    """Two workers on CPU (bfloat16 matmuls run in oneDNN): bfloat16 follows the float32 run's
    training loss epoch by epoch, and validates about as well."""
    options = {**TINY, "num_workers": 2, "epochs": 3, "storage_path": str(tmp_path / "runs")}
    runs = {}
    for precision in ("float32", "mixed_bfloat16"):
        out = tmp_path / precision
        metrics = train(prepared, str(out), precision=precision, **options)
        runs[precision] = (pd.read_csv(out / "history.csv")["loss"].to_numpy(), metrics)
    (loss32, metrics32), (loss16, metrics16) = runs["float32"], runs["mixed_bfloat16"]
    # measured: 0.1-0.3% apart each epoch, validation NDCG@10 5% apart (0.274 vs 0.288)
    assert not np.array_equal(loss16, loss32)  # the workers did run in bfloat16
    np.testing.assert_allclose(loss16, loss32, rtol=0.02)
    assert metrics16["valid"]["NDCG@10"] == pytest.approx(metrics32["valid"]["NDCG@10"],
                                                         rel=0.15)


@pytest.mark.parametrize("options, expected", [
    ({"loss": "bce"}, "adam"),  # auto: dense Adam for every loss (benchmarks/RESULTS.md)
    ({"loss": "softmax"}, "adam"),
    ({"loss": "bce", "optimizer": "lazy_adam"}, "lazy_adam"),
    ({"loss": "softmax", "optimizer": "adam"}, "adam"),
])
def test_optimizer_choice(options, expected):
    assert TrainConfig(**options).resolved_optimizer() == expected


def test_bad_optimizer_name():
    with pytest.raises(EzSASRecError, match="--optimizer must be one of auto, adam, lazy_adam; got 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(EzSASRecError, match="--optimizer lazy_adam: not with --xla"):
        TrainConfig(optimizer="lazy_adam", xla=True)


def test_checkpoint_restores_lazy_optimizer_state(tmp_path):
    """Save after two steps, restore into a fresh model and optimizer: the next step gives the
    same weights in both; a checkpoint of the other optimizer is refused."""
    from ezsasrec_ray.losses import bce_loss, sample_negatives
    from ezsasrec_ray.model import SASRecConfig, build_model

    cfg = TrainConfig(loss="bce", dim=8, maxlen=6, blocks=1, dropout=0.0)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 31, (4, 5)).astype(np.int32),
                rng.integers(1, 31, (4, 5)).astype(np.int32)) for _ in range(3)]
    batches = [(i, p, sample_negatives(rng, p.shape, 30)) for i, p in batches]

    def setup():
        model = build_model(SASRecConfig(num_items=30, maxlen=6, dim=8, blocks=1, dropout=0.0))
        optimizer = build_optimizer(model, cfg)
        step = make_train_step(optimizer, tf.distribute.get_strategy(), lambda i, p, n: bce_loss(
            model.sequence_embeddings(i, training=True), model.item_embeddings(), p, n))
        return model, optimizer, step

    model, optimizer, step = setup()
    for batch in batches[:2]:
        step(*batch)
    _save_checkpoint(str(tmp_path), model, optimizer, {"epoch": 1})
    again, again_optimizer, again_step = setup()
    assert _restore_checkpoint(str(tmp_path), again, again_optimizer) == {"epoch": 1}
    assert int(again_optimizer.step.numpy()) == 2
    step(*batches[2])
    again_step(*batches[2])
    for a, b in zip(model.trainable_variables, again.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    smaller = Adam(model.trainable_variables[1:], 0.001)
    with pytest.raises(EzSASRecError, match="optimizer.npz: optimizer state"):
        _restore_checkpoint(str(tmp_path), model, smaller)


def test_holdout_test_trains_on_validation_targets_without_validation(prepared, tmp_path):
    from ezsasrec_ray.train import _training_dataset

    data = load_prepared(prepared)
    seq = data.sequences()
    n_train, n_events = seq["n_train"].to_numpy(), seq["n_events"].to_numpy()
    train_only = seq["train_only"].to_numpy(zero_copy_only=False)
    for holdout, expected in (("valid", n_train),
                              ("test", np.where(train_only, n_train, n_events - 1)),
                              ("none", n_events)):
        rows = _training_dataset(data, holdout).take_all()
        lengths = sorted(len(r["items"]) for r in rows)
        assert lengths == sorted(expected.tolist()), holdout
    out = tmp_path / "final"
    metrics = train(prepared, str(out), epochs=2, holdout="test",
                    storage_path=str(tmp_path / "runs"), **TINY)
    assert metrics["valid"] == {} and metrics["best_epoch"] == 2
    assert metrics["train"]["holdout"] == "test"
    assert "valid_NDCG@10" not in pd.read_csv(out / "history.csv").columns
    result = evaluate(prepared, str(out), split="test")
    assert result["fitted_on"] == "holdout test"
    with pytest.raises(EzSASRecError, match="trained on these targets"):
        evaluate(prepared, str(out), split="valid")
    with pytest.raises(EzSASRecError, match="--holdout must be one of valid, test, none; got 'all'"):
        train(prepared, str(tmp_path / "bad"), holdout="all")


def test_cosine_schedule_by_epochs_or_time_budget():
    constant = TrainConfig(epochs=10)
    assert constant.lr_factor(5, 100.0) == 1.0
    cosine = TrainConfig(epochs=10, lr_schedule="cosine")
    assert cosine.lr_factor(0, 0.0) == 1.0
    assert cosine.lr_factor(5, 0.0) == pytest.approx(0.5)
    assert cosine.lr_factor(10, 0.0) == pytest.approx(0.0)
    budget = TrainConfig(epochs=1000, lr_schedule="cosine", time_budget_s=600)
    assert budget.lr_factor(3, 300.0) == pytest.approx(0.5)  # time is the larger progress
    assert budget.lr_factor(3, 900.0) == pytest.approx(0.0)
    with pytest.raises(EzSASRecError, match="--lr-schedule must be one of constant, cosine; got 'step'"):
        TrainConfig(lr_schedule="step")


def test_validation_rounds_follow_steps_and_patience_waits_for_min_steps(prepared, tmp_path):
    """With more steps between rounds than an epoch has, epochs run without validation until
    a round ends (and the last epoch always ends one); steps are reported."""
    options = {**TINY, "eval_every_steps": 70, "storage_path": str(tmp_path / "runs")}
    metrics = train(prepared, str(tmp_path / "m"), epochs=5, **options)
    history = pd.read_csv(tmp_path / "m" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    steps = int(history["steps"].iloc[0])  # every epoch has the same number of steps
    assert (history["steps"] == steps).all() and steps > 0
    assert list(history["total_steps"]) == [steps * e for e in range(1, 6)]
    validated = list(history.loc[history["valid_NDCG@10"].notna(), "epoch"])
    assert steps < 35  # so that a round spans epochs (the data: about 28 windows of 64)
    expected = []  # a round ends once 70 steps have passed since the last one, and at the end
    since = 0
    for epoch in range(1, 6):
        since += steps
        if since >= 70 or epoch == 5:
            expected.append(epoch)
            since = 0
    assert validated == expected and len(validated) < 5
    assert metrics["best_epoch"] in validated


def test_patience_counts_rounds_but_never_stops_before_min_steps(prepared, tmp_path):
    """Every epoch ends a round here; the run must stop exactly where the rule says, read off
    its own validation history: after `patience` rounds without a better NDCG@10, once
    min_steps are done. lr ~ 0 makes rounds without improvement likely."""

    def expected_epochs(history, patience, min_steps, epochs):
        best, bad = -1.0, 0
        for epoch, steps, score in zip(history["epoch"], history["total_steps"],
                                       history["valid_NDCG@10"]):
            bad = 0 if score > best else bad + 1
            best = max(best, score)
            if bad >= patience and steps >= min_steps and epoch < epochs:
                return epoch
        return epochs

    options = {**TINY, "patience": 1, "lr": 1e-9, "storage_path": str(tmp_path / "runs")}
    quick = train(prepared, str(tmp_path / "a"), epochs=6, **options)
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert quick["epochs_run"] == expected_epochs(history, 1, 0, 6) == len(history)
    steps = int(history["steps"].iloc[0])
    slow = train(prepared, str(tmp_path / "b"), epochs=6, **{**options, "min_steps": 4 * steps})
    history = pd.read_csv(tmp_path / "b" / "history.csv")
    assert slow["epochs_run"] == expected_epochs(history, 1, 4 * steps, 6) == len(history)
    assert slow["epochs_run"] >= 4  # min_steps: no stop before 4 epochs of steps


def test_overwrite_twice_trains_afresh_and_a_named_run_resumes_only_with_its_options(
        prepared, tmp_path):
    storage = tmp_path / ".ezsasrec_runs"  # the default: beside the output
    out = tmp_path / "m"
    first = train(prepared, str(out), epochs=2, **TINY)
    again = train(prepared, str(out), epochs=2, overwrite=True, **TINY)
    # trained again from scratch (a resumed finished run would run no epoch at all)
    assert again["epochs_run"] == 2 and first["epochs_run"] == 2
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert not storage.exists() or os.listdir(storage) == []  # unnamed runs leave nothing
    named = {**TINY, "run_name": "nightly", "storage_path": str(tmp_path / "runs")}
    train(prepared, str(tmp_path / "a"), epochs=2, **named)
    with pytest.raises(EzSASRecError, match=r"--run-name nightly: .* trained with "
                                            r"dropout=0.1, not 0.5"):
        train(prepared, str(tmp_path / "b"), epochs=3, **{**named, "dropout": 0.5})
    resumed = train(prepared, str(tmp_path / "c"), epochs=3, **named)  # more epochs: fine
    assert resumed["epochs_run"] == 3
    assert _latest_state(str(tmp_path / "runs"), "nightly")["resumed_from_epoch"] == 2


def test_warm_start_copies_known_items_by_raw_id_and_every_other_weight(prepared, trained,
                                                                        tmp_path):
    """A night with other items: rows of items both know come from the parent (joined by raw
    id, not index), new items keep fresh rows, the rest of the weights are the parent's."""
    from ezsasrec_ray.model import build_model
    from ezsasrec_ray.train_loop import item_map, warm_start

    parent_dir, _ = trained
    other = load_prepared(synth_prepared(tmp_path, users=400, items=70, events=9000, seed=9,
                                         themes=4))
    parent = load_model(parent_dir)
    mapping, counts = item_map(parent_dir, other)
    old = dict(zip(*[load_prepared(prepared).items()[c].to_pylist()
                     for c in ("raw_id", "index")]))
    new = other.items()
    for raw, index in zip(new["raw_id"].to_pylist(), new["index"].to_pylist()):
        assert mapping[index] == old.get(raw, -1)
    assert counts["items_new"] == (mapping[1:] < 0).sum() > 0
    assert counts["items_copied"] + counts["items_dropped"] == len(old)
    keras.utils.set_random_seed(0)
    model = build_model(TrainConfig(**{k: v for k, v in TINY.items() if k in (
        "dim", "maxlen", "blocks", "heads", "dropout")}).model_config(other.num_items))
    fresh = model.item_embeddings().numpy().copy()
    warm_start(model, parent_dir, mapping)
    table, parent_table = model.item_embeddings().numpy(), parent.item_embeddings().numpy()
    known = np.flatnonzero(mapping >= 0)
    np.testing.assert_array_equal(table[known], parent_table[mapping[known]])
    np.testing.assert_array_equal(table[mapping < 0], fresh[mapping < 0])
    for new_weight, old_weight in zip(model.weights[1:], parent.weights[1:]):
        np.testing.assert_array_equal(new_weight.numpy(), old_weight.numpy())


def test_warm_started_run_records_its_parent_and_refuses_another_shape(prepared, trained,
                                                                       tmp_path):
    parent_dir, _ = trained
    options = {**TINY, "storage_path": str(tmp_path / "runs")}
    with pytest.raises(EzSASRecError, match="--init-from .*its dim is 16, this run's 32"):
        train(prepared, str(tmp_path / "bad"), init_from=parent_dir, **{**options, "dim": 32})
    assert not (tmp_path / "bad").exists()
    metrics = train(prepared, str(tmp_path / "warm"), epochs=1, init_from=parent_dir, **options)
    assert metrics["parent"]["model"] == os.path.abspath(parent_dir)
    assert metrics["parent"]["items_new"] == 0 and metrics["parent"]["items_dropped"] == 0
    # one epoch from the parent is ahead of the parent's own first epoch from scratch (same
    # data and options)
    cold = pd.read_csv(os.path.join(parent_dir, "history.csv"))
    assert metrics["valid"]["NDCG@10"] > cold["valid_NDCG@10"].iloc[0]
