"""``ezsasrec tune``: the search space checks, a real search on Ray Tune (one trial stopped by
ASHA), best.json read back by ``train --params``, and resuming an unfinished search."""

import csv
import json
import os

import pytest
from conftest import synth_prepared

from ezsasrec_ray import cli
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.train_loop import TrainConfig, read_params
from ezsasrec_ray.tune import SEARCH_SPACE, check_space, fit_to_data, read_space, tune

# the model fixed tiny, only the learning rate searched: a grid runs its values in order, so
# the good rate reaches ASHA's first rung before the useless one
FIXED = {"dim": 16, "maxlen": 8, "blocks": 1, "heads": 1, "loss": "softmax", "negatives": 8,
         "l2": 0.0, "dropout": 0.1}
BASE = {"batch_size": 64, "epochs": 6, "eval_every_steps": 10, "min_steps": 0, "patience": 6}


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_data")
    return synth_prepared(root, users=300, items=40, events=6_000, seed=2, themes=4)


@pytest.fixture(scope="module")
def searched(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    space = root / "space.yaml"
    space.write_text(json.dumps({**FIXED, "lr": {"grid": [1e-2, 1e-7]}}))
    best = tune(prepared, str(root / "out"), train_options={**BASE,
                "storage_path": str(root / "runs")}, num_samples=1, max_concurrent=1,
                space=str(space), grace_rounds=1, reduction_factor=2, log=lambda *a: None)
    return root, best


def test_space_entries_are_checked_against_the_training_options(tmp_path):
    base = TrainConfig()
    assert check_space(read_space(None), base, "space") == SEARCH_SPACE
    for entry, message in (({"lr": {"choice": [0.001, -1]}}, "lr: --lr must be > 0"),
                           ({"dim": {"uniform": [1]}}, r"dim: uniform takes \[low, high\]"),
                           ({"dim": {"pick": [1, 2]}}, "dim: expected one of choice"),
                           ({"loss": "hinge"}, "loss:"),
                           ({"num_workers": 2}, "'num_workers' is not a searchable"),
                           ({"colour": 1}, "'colour' is not a searchable")):
        with pytest.raises(EzSASRecError, match=message):
            check_space({**SEARCH_SPACE, **entry}, base, "space.yaml")
    path = tmp_path / "space.yaml"
    path.write_text("dim: 64\nlr: {loguniform: [0.0005, 0.003]}\n")
    space = read_space(str(path))
    assert space["dim"] == 64 and space["lr"] == {"loguniform": [0.0005, 0.003]}
    assert space["dropout"] == SEARCH_SPACE["dropout"]  # entries not named stay
    path.write_text("- lr\n")
    with pytest.raises(EzSASRecError, match="space.yaml: expected a mapping"):
        read_space(str(path))


def test_maxlen_values_longer_than_every_history_are_not_searched():
    space = fit_to_data({"maxlen": {"choice": [50, 100, 200]}}, longest=120)
    assert space["maxlen"] == {"choice": [50, 100]}
    assert fit_to_data({"maxlen": {"grid": [50, 100]}}, longest=7)["maxlen"] == {"grid": [50]}


def test_tune_writes_trials_and_best_and_asha_stops_the_useless_trials(searched):
    root, best = searched
    out = root / "out"
    for name in ("trials.csv", "trials.png", "best.json", "space.json", "_SUCCESS"):
        assert (out / name).exists(), name
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    useless = [r for r in rows if float(r["lr"]) == 1e-7]
    good = [r for r in rows if float(r["lr"]) == 1e-2]
    # the good trial sets the rung; the useless one trails it there and is stopped early
    assert {r["stopped_by"] for r in useless} == {"scheduler"}
    assert all(int(r["epochs"]) < BASE["epochs"] for r in useless)
    assert [r["stopped_by"] for r in good] == ["epochs"]
    assert best["stopped_by_scheduler"] == 1 and best["params"]["lr"] == 1e-2
    assert best["valid"]["NDCG@10"] == max(float(r["valid_NDCG@10"]) for r in rows)
    assert json.loads((out / "best.json").read_text()) == best
    assert not (root / "runs" / "tune-out").exists()  # published: the experiment is removed


def test_train_params_reproduces_the_best_trial(prepared, searched, capsys):
    root, best = searched
    assert read_params(str(root / "out" / "best.json")) == best["params"]
    model = root / "model"
    code = cli.main(["train", "--data", prepared, "--output", str(model), "--params",
                     str(root / "out" / "best.json"), "--no-verbose",
                     "--storage-path", str(root / "runs")])
    assert code == 0
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["train"]["lr"] == best["params"]["lr"]  # from the file
    assert metrics["valid"]["NDCG@10"] == pytest.approx(best["valid"]["NDCG@10"], rel=0.02)


def test_flags_given_override_the_params_file(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"lr": 0.003, "dim": 32, "epochs": 7}))
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--data", "d", "--output", "o", "--params", str(path),
                              "--lr", "0.001"])  # --lr given at its default still wins
    options = cli._with_params(TrainConfig, args)
    assert (options["lr"], options["dim"], options["epochs"]) == (0.001, 32, 7)
    path.write_text(json.dumps({"params": {"dim": "big"}}))
    with pytest.raises(EzSASRecError, match="params.json: params.dim must be an integer"):
        read_params(str(path))
    path.write_text("{not json")
    with pytest.raises(EzSASRecError, match="--params .*cannot read it as JSON"):
        read_params(str(path))


def test_a_search_started_with_other_options_is_not_resumed_silently(prepared, tmp_path):
    from ezsasrec_ray.tune import _prepare_experiment

    storage = str(tmp_path)
    assert _prepare_experiment(storage, "tune-x", {"a": 1}, True, print) is False
    os.makedirs(tmp_path / "tune-x")
    # an experiment Ray Tune can restore, recorded with other options
    (tmp_path / "tune-x" / "tuner.pkl").write_bytes(b"")
    (tmp_path / "tune-x" / "experiment_state-0.json").write_text("{}")
    with pytest.raises(EzSASRecError, match="started with other options.*--no-resume"):
        _prepare_experiment(storage, "tune-x", {"a": 2}, True, print)
    assert _prepare_experiment(storage, "tune-x", {"a": 2}, False, print) is False
    assert not (tmp_path / "tune-x").exists()
