"""Online serving (ezsasrec_ray.serve): real Ray Serve on 127.0.0.1, real HTTP.

A tiny random model on a small synthetic log; the nightly job (``recommend``) and
``score_pairs`` are the references the endpoint must match exactly.
"""

import os
import shutil
import threading
import time

import numpy as np
import pytest
import requests
import yaml
from conftest import free_port, random_model_dir, read_results, run_cli, synth_prepared

from ezsasrec_ray import recommend, score_pairs
from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.serve import Query, Recommender, ServeConfig, build_app, deployment_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_data")
    return load_prepared(synth_prepared(root, users=150, items=60, events=2500, seed=5,
                                        themes=4))


@pytest.fixture(scope="module")
def models(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_models")
    return [random_model_dir(root / f"m{seed}", prepared, seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def server(prepared, models):
    """One Serve instance on 127.0.0.1: the app at / and an API-key app at /secured."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": models[0], "data": prepared.path, "num_cpus": 0,
                         "max_k": 20, "max_history": 30, "max_item_ids": 50}),
              name="ezsasrec", route_prefix="/")
    serve.run(build_app({"model": models[0], "data": prepared.path, "num_cpus": 0,
                         "api_key": "s3cret"}), name="secured", route_prefix="/secured")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, body, **kwargs):
    return requests.post(url, json=body, timeout=30, **kwargs)


def raw_histories(data):
    """{raw user id: [raw item ids]} in time order."""
    table = data.sequences()
    items = data.items().sort_by("index")["raw_id"].to_pylist()
    return {u: [items[i - 1] for i in seq] for u, seq in
            zip(table["user_id"].to_pylist(), table["item_indices"].to_pylist())}


# -----------------------------------------------------------------------------
# routes


def test_health_ready_version_docs(server, models):
    assert requests.get(server + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(server + "/readyz", timeout=10).json()
    assert ready["ready"] is True
    version = requests.get(server + "/version", timeout=10).json()
    assert version["model_path"] == os.path.abspath(models[0])
    assert version["model_version"] == ready["model_version"]
    assert version["trained_at"] and version["format_version"] == 1
    assert requests.get(server + "/docs", timeout=10).status_code == 200
    spec = requests.get(server + "/openapi.json", timeout=10).json()
    assert {"/recommend", "/score", "/healthz", "/readyz", "/version"} <= set(spec["paths"])


def test_recommend_equals_nightly_job(server, prepared, models, tmp_path):
    """Every user: the endpoint's top-10 is exactly what the batch job wrote (ids and scores),
    with and without history exclusion and with exclude_items; a history request with the
    user's raw items gives the user-id answer."""
    histories = raw_histories(prepared)
    exclude = prepared.items().sort_by("index")["raw_id"].to_pylist()[:3]  # the 3 most popular
    (tmp_path / "exclude.txt").write_text("\n".join(str(x) for x in exclude))
    runs = {}
    for name, options in {"default": {}, "seen": {"include_seen": True},
                          "exclude": {"exclude_items": str(tmp_path / "exclude.txt")}}.items():
        recommend(models[0], prepared.path, top_n=10, output=str(tmp_path / name),
                  verbose=False, **options)
        runs[name] = read_results(str(tmp_path / name))
    users = sorted(runs["default"])
    assert len(users) == prepared.num_users
    for user in users:
        for name, body in (("default", {}), ("seen", {"exclude_seen": False}),
                           ("exclude", {"exclude_items": exclude})):
            got = post(server + "/recommend", {"user_id": user, "k": 10, **body}).json()
            want_items, want_scores = runs[name][user]
            assert got["items"] == want_items, (name, user)
            np.testing.assert_array_equal(np.asarray(got["scores"], np.float32), want_scores)
            assert got["fallback"] is False
    short = [u for u in users if len(histories[u]) <= 30][:20]  # max_history is 30 here
    assert short
    for user in short:
        by_history = post(server + "/recommend", {"history": histories[user], "k": 10}).json()
        assert by_history["items"] == runs["default"][user][0]
        assert by_history["unknown_items"] == []


def test_concurrent_requests_are_batched_and_exact(server, prepared):
    """Many callers at once (batched by @serve.batch) get the same answers as one at a time."""
    users = sorted(raw_histories(prepared))[:40]
    alone = {u: post(server + "/recommend", {"user_id": u, "k": 5}).json() for u in users}
    results, errors = {}, []

    def call(user):
        try:
            results[user] = post(server + "/recommend", {"user_id": user, "k": 5}).json()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == alone


def test_candidates_and_unknown_ids(server, prepared):
    items = prepared.items().sort_by("index")["raw_id"].to_pylist()
    user = sorted(raw_histories(prepared))[0]
    got = post(server + "/recommend", {"user_id": user, "k": 20, "exclude_seen": False,
                                       "candidates": items[10:15] + ["no-such-item"]}).json()
    assert sorted(got["items"]) == sorted(items[10:15])  # only candidates, all 5 of them
    assert got["scores"] == sorted(got["scores"], reverse=True)
    assert got["ignored_ids"] == {"candidates": ["no-such-item"]}
    got = post(server + "/recommend", {"history": [items[0], "nope", items[1]], "k": 5}).json()
    assert got["unknown_items"] == ["nope"] and got["fallback"] is False
    assert not {items[0], items[1]} & set(got["items"])  # history excluded


def test_score_equals_score_pairs(server, prepared, models):
    users = sorted(raw_histories(prepared))[:5]
    items = prepared.items().sort_by("index")["raw_id"].to_pylist()[:7]
    want = score_pairs(models[0], prepared, users, items)
    for user in users:
        got = post(server + "/score", {"user_id": user, "item_ids": items + [10**9]}).json()
        assert got["item_ids"] == items and got["unknown_items"] == [10**9]
        np.testing.assert_array_equal(np.asarray(got["scores"], np.float32),
                                      want.loc[user].to_numpy(np.float32))


def test_fallback_to_popular_items(server, prepared):
    vocab = prepared.items().sort_by("index")
    by_count = vocab.to_pandas().sort_values(["count", "index"], ascending=[False, True])
    popular = by_count["raw_id"].tolist()
    got = post(server + "/recommend", {"user_id": "no-such-user", "k": 5}).json()
    assert got["fallback"] is True and got["unknown_user"] is True
    assert got["items"] == popular[:5]
    assert got["scores"] == [float(c) for c in by_count["count"][:5]]
    got = post(server + "/recommend", {"history": [], "k": 3}).json()
    assert got["fallback"] is True and got["items"] == popular[:3]
    got = post(server + "/recommend", {"history": ["x", "y"], "k": 3,
                                       "exclude_items": popular[:1]}).json()
    assert got["fallback"] is True and got["unknown_items"] == ["x", "y"]
    assert got["items"] == popular[1:4]


@pytest.mark.parametrize("path,body,field", [
    ("/recommend", {"user_id": 1, "k": 0}, "k"),
    ("/recommend", {"user_id": 1, "k": 21}, "k"),  # max_k is 20 here
    ("/recommend", {"user_id": 1, "k": "ten"}, "k"),
    ("/recommend", {"user_id": 1, "k": 2.5}, "k"),
    ("/recommend", {"k": 3}, "user_id"),
    ("/recommend", {"user_id": 1, "history": [1]}, "user_id"),
    ("/recommend", {"user_id": [1, 2]}, "user_id"),
    ("/recommend", {"user_id": None}, "user_id"),
    ("/recommend", {"history": "1,2,3"}, "history"),
    ("/recommend", {"history": list(range(31))}, "history"),  # max_history is 30 here
    ("/recommend", {"history": [{"a": 1}]}, "history"),
    ("/recommend", {"user_id": 1, "exclude_seen": "maybe"}, "exclude_seen"),
    ("/recommend", {"user_id": 1, "candidates": list(range(51))}, "candidates"),
    ("/recommend", {"user_id": 1, "exclude_items": 5}, "exclude_items"),
    ("/recommend", {"user_id": 1, "colour": "red"}, "colour"),
    ("/score", {"user_id": 1}, "item_ids"),
    ("/score", {"user_id": 1, "item_ids": []}, "item_ids"),
    ("/score", {"history": [1], "item_ids": list(range(51))}, "item_ids"),
])
def test_bad_requests_get_4xx_naming_the_field(server, path, body, field):
    response = post(server + path, body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]


def test_malformed_bodies_and_unknown_user_score(server):
    bad_json = requests.post(server + "/recommend", data="{not json",
                             headers={"content-type": "application/json"}, timeout=10)
    assert bad_json.status_code == 422 and "JSON" in bad_json.json()["detail"]
    assert requests.post(server + "/recommend", data=b"\xff\x00", timeout=10).status_code == 422
    unknown = post(server + "/score", {"user_id": "who", "item_ids": [1]})
    assert unknown.status_code == 404 and "user_id" in unknown.json()["detail"]
    # the replica survived all of it
    assert requests.get(server + "/healthz", timeout=10).status_code == 200


def test_api_key(server):
    url = server + "/secured"
    user_body = {"history": [], "k": 2}
    assert post(url + "/recommend", user_body).status_code == 401
    assert post(url + "/recommend", user_body, headers={"X-API-Key": "wrong"}).status_code == 401
    assert requests.get(url + "/version", timeout=10).status_code == 401
    assert post(url + "/recommend", user_body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert post(url + "/recommend", user_body,
                headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert requests.get(url + "/healthz", timeout=10).status_code == 200  # probes stay open
    assert post(server + "/recommend", user_body).status_code == 200  # the other app has none


def test_redeploy_new_model_without_errors(server, prepared, models):
    """A client loop keeps getting answers while the app rolls over to a new model path."""
    from ray import serve

    user = sorted(raw_histories(prepared))[0]
    before = post(server + "/recommend", {"user_id": user, "k": 3}).json()["model_version"]
    seen, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = post(server + "/recommend", {"user_id": user, "k": 3})
                if response.status_code != 200:
                    errors.append(response.status_code)
                else:
                    seen.append(response.json()["model_version"])
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        serve.run(build_app({"model": models[1], "data": prepared.path, "num_cpus": 0,
                             "max_k": 20, "max_history": 30, "max_item_ids": 50}),
                  name="ezsasrec", route_prefix="/")
        deadline = time.time() + 60
        while time.time() < deadline and (not seen or seen[-1] == before):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:5]
    assert seen[0] == before and seen[-1] != before
    assert requests.get(server + "/version", timeout=10).json()["model_path"] == \
        os.path.abspath(models[1])


# -----------------------------------------------------------------------------
# configuration


def test_config_yaml_is_a_valid_serve_config(prepared, models):
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(ROOT, "serve", "config.yaml")) as f:
        config = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "ezsasrec_ray.serve:build_app"
    assert app.deployments[0].name == "Recommender"
    assert app.deployments[0].autoscaling_config["max_replicas"] >= 1
    assert schema.http_options.host == "127.0.0.1"
    args = dict(app.args, model=models[0], data=prepared.path)
    assert build_app(args) is not None  # the builder accepts every argument of the file


def test_bad_configurations_fail_before_deploying(prepared, models, tmp_path):
    with pytest.raises(EzSASRecError, match="max_k"):
        build_app({"model": models[0], "max_k": 0})
    with pytest.raises(EzSASRecError, match="not_an_option"):
        build_app({"model": models[0], "not_an_option": 1})
    with pytest.raises(EzSASRecError, match="directory not found"):
        build_app({"model": str(tmp_path / "missing")})
    with pytest.raises(EzSASRecError, match="autoscale"):
        deployment_options(autoscale="4")
    with pytest.raises(EzSASRecError, match="autoscale"):
        deployment_options(autoscale="3:1")
    assert deployment_options(autoscale="1:4")["autoscaling_config"]["max_replicas"] == 4
    assert deployment_options(replicas=2)["num_replicas"] == 2
    result = run_cli("serve", "--model", models[0], "--autoscale", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ezsasrec serve: error: --autoscale")


def test_recommender_without_user_data(prepared, models, tmp_path):
    """History-only serving (no --data): user ids are refused with a clear message."""
    with pytest.raises(EzSASRecError, match="items/ vocabulary"):
        Recommender(ServeConfig(model=models[0]))  # a model dir without its vocabulary
    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    shutil.copytree(os.path.join(prepared.path, "items"), model / "items")
    recommender = Recommender(ServeConfig(model=str(model)))
    with pytest.raises(EzSASRecError, match="user_id"):
        recommender.recommend_many([Query(user_id=1)])
    answer = recommender.recommend_many([Query(history=[], k=2)])[0]
    assert answer["fallback"] is True and len(answer["items"]) == 2
