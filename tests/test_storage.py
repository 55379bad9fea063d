"""Model directories on object storage (ezsasrec_ray.storage) against a real S3 server (moto)."""

import json
import os
import posixpath

import numpy as np
import pyarrow.fs as pafs
import pytest
from conftest import random_model_dir, read_results, synth_prepared

from ezsasrec_ray import recommend
from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.evaluate import evaluate
from ezsasrec_ray.model_io import load_model
from ezsasrec_ray.serve import Query, Recommender, ServeConfig
from ezsasrec_ray.storage import is_remote, local_dir, upload_dir


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("storage_data")
    return load_prepared(synth_prepared(root, users=120, items=50, events=2000, seed=7,
                                        themes=3))


@pytest.fixture(scope="module")
def model_dir(prepared, tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("storage_model") / "m", prepared)


@pytest.fixture(scope="module")
def remote_model(s3_server, model_dir):
    uri = f"{s3_server.bucket}/models/m"
    upload_dir(model_dir, uri, overwrite=False)
    return uri


@pytest.fixture(scope="module")
def local_scores(model_dir, prepared, tmp_path_factory):
    """Top-5 of every user by the local model on the local dataset (what S3 runs must match)."""
    out = str(tmp_path_factory.mktemp("local_scores") / "s")
    recommend(model_dir, prepared.path, top_n=5, output=out, verbose=False)
    return read_results(out)


def listing(uri):
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {posixpath.relpath(i.path, root): i.size for i in infos if i.type == pafs.FileType.File}


def local_listing(path):
    return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


def test_is_remote():
    assert is_remote("s3://b/k") and is_remote("gs://b/k")
    assert not is_remote("/tmp/x") and not is_remote("file:///tmp/x") and not is_remote("m")


def test_a_published_directory_comes_back_whole_and_is_copied_once(remote_model, model_dir):
    files = {k: v for k, v in local_listing(model_dir).items() if k != "_SUCCESS"}
    remote = listing(remote_model)
    assert "_SUCCESS" in remote and {k: v for k, v in remote.items() if k != "_SUCCESS"} == files
    copy = local_dir(remote_model)
    with open(os.path.join(copy, "_SUCCESS")) as f:
        assert json.load(f)["upload_id"]  # each upload its own: readers tell them apart
    assert {k: v for k, v in local_listing(copy).items() if k != "_SUCCESS"} == files
    assert os.path.basename(copy) == "m"
    assert local_dir(remote_model) == copy  # the same version: no second copy


def test_incomplete_or_missing_directories_are_one_line(s3_server, model_dir):
    uri = f"{s3_server.bucket}/half/m"
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(posixpath.join(root, "metrics.json")) as f:
        f.write(b"{}")  # a writer that died before _SUCCESS
    for path in (uri, f"{s3_server.bucket}/nothing/here"):
        with pytest.raises(EzSASRecError, match="not found, or incomplete"):
            local_dir(path)
    with pytest.raises(EzSASRecError, match="did not write"):
        upload_dir(model_dir, uri, overwrite=True)  # not ours: left untouched
    assert listing(uri) == {"metrics.json": 2}


def test_republishing_needs_overwrite_and_gives_readers_the_new_version(s3_server, model_dir,
                                                                        prepared, tmp_path):
    uri = f"{s3_server.bucket}/models/again"
    upload_dir(model_dir, uri, overwrite=False)
    first = local_dir(uri)
    with pytest.raises(EzSASRecError, match="already exists"):
        upload_dir(model_dir, uri, overwrite=False)
    upload_dir(random_model_dir(tmp_path / "again", prepared, seed=1), uri, overwrite=True)
    second = local_dir(uri)
    assert second != first
    assert not np.array_equal(np.load(os.path.join(first, "item_embeddings.npy")),
                              np.load(os.path.join(second, "item_embeddings.npy")))


def test_evaluate_score_and_serve_take_a_model_on_s3(remote_model, model_dir, prepared,
                                                     local_scores, tmp_path):
    remote, local = load_model(remote_model), load_model(model_dir)
    np.testing.assert_array_equal(remote.item_embeddings().numpy(),
                                  local.item_embeddings().numpy())
    assert evaluate(prepared.path, remote_model, split="test")["model"] == \
        evaluate(prepared.path, model_dir, split="test")["model"]
    # scoring actors copy the model from S3 themselves (the endpoint reaches them)
    manifest = recommend(remote_model, prepared.path, top_n=5, output=str(tmp_path / "s3"),
                         verbose=False)
    assert manifest["model"]["path"] == remote_model
    got, want = read_results(str(tmp_path / "s3")), local_scores
    assert got.keys() == want.keys()
    for user, (items, scores) in want.items():
        np.testing.assert_array_equal(got[user][0], items)
        np.testing.assert_array_equal(got[user][1], scores)
    users = prepared.users()["raw_id"].to_pylist()[:10]
    queries = [Query(user_id=u, k=5) for u in users]
    served = Recommender(ServeConfig(model=remote_model, data=prepared.path))
    assert served.recommend_many(queries) == Recommender(
        ServeConfig(model=model_dir, data=prepared.path)).recommend_many(queries)


def test_the_model_writer_publishes_on_s3_and_train_checks_there_first(s3_server, model_dir,
                                                                       prepared):
    from ezsasrec_ray.train import train

    uri = f"{s3_server.bucket}/models/written"
    random_model_dir(uri, prepared)  # model_io.write_model_dir, the writer train ends with
    np.testing.assert_array_equal(load_model(uri).item_embeddings().numpy(),
                                  load_model(model_dir).item_embeddings().numpy())
    with open(os.path.join(local_dir(uri), "_SUCCESS")) as f:
        assert json.load(f)["kind"] == "model"
    with pytest.raises(EzSASRecError, match="already exists"):
        train(prepared.path, uri, epochs=1)  # refused before any worker starts
    with pytest.raises(EzSASRecError, match="already exists"):
        random_model_dir(uri, prepared)


def test_a_prepared_dataset_on_s3_trains_evaluates_and_scores_like_the_local_one(
        s3_server, prepared, model_dir, local_scores, tmp_path):
    """prepare --output s3://... publishes (``_SUCCESS`` last) what a local prepare writes;
    evaluate, score and train take ``--data s3://...`` and give the local dataset's results;
    score --output s3://... publishes the same scores there."""
    from ezsasrec_ray.prepare import prepare
    from ezsasrec_ray.train import _training_dataset

    uri = f"{s3_server.bucket}/prepared/p"
    log = os.path.join(os.path.dirname(prepared.path), "log")
    manifest = prepare(log, uri, k_core=3, verbose=False)
    assert listing(uri).keys() == local_listing(prepared.path).keys()
    remote = load_prepared(uri)
    assert remote.uri == uri and remote.vocab_fingerprint() == prepared.vocab_fingerprint()
    assert manifest["counts"] == prepared.manifest["counts"]
    remote.verify()  # the local copy holds the published bytes
    with pytest.raises(EzSASRecError, match="already exists"):
        prepare(log, uri, k_core=3, verbose=False)
    assert evaluate(uri, model_dir, split="test")["model"] == \
        evaluate(prepared.path, model_dir, split="test")["model"]
    # scores written straight to S3 (manifest, then _SUCCESS), from data on S3
    scores = f"{s3_server.bucket}/scores/2026-12-08"
    manifest = recommend(model_dir, uri, top_n=5, output=scores, verbose=False)
    assert manifest["counts"]["users_scored"] == len(local_scores)
    assert manifest["output"] == scores and manifest["data"]["path"] == uri
    names = listing(scores)
    assert "manifest.json" in names and "_SUCCESS" in names
    with pytest.raises(EzSASRecError, match="already exists"):
        recommend(model_dir, uri, top_n=5, output=scores, verbose=False)
    got = read_results(local_dir(scores))
    assert got.keys() == local_scores.keys()
    for user, (items, scores) in local_scores.items():
        np.testing.assert_array_equal(got[user][0], items)
        np.testing.assert_array_equal(got[user][1], scores)
    # training reads the sequences from S3 itself, through Ray Data (read tasks on any node)
    rows = sorted(_training_dataset(remote).take_all(), key=lambda r: r["user_index"])
    assert [list(r["items"]) for r in rows] == prepared.training_sequences().to_pylist()
