"""Online serving (ezsasrec_ray.serve): real Ray Serve on 127.0.0.1, real HTTP.

A tiny random model on a small synthetic log; the nightly job (``recommend``) and
``score_pairs`` are the references the endpoint must match exactly.
"""

import asyncio
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
from ezsasrec_ray.serve import (
    API_KEY_ENV,
    REQUEST_ERRORS,
    Batcher,
    Query,
    Recommender,
    RecommendRequest,
    ScoreRequest,
    ServeConfig,
    build_app,
    deployment_options,
    strict_ids,
)

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


SECURED_BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def server(prepared, models):
    """One Serve instance on 127.0.0.1: the app at / and an API-key app at /secured.

    The secured app's key is $EZSASREC_API_KEY of this process (the driver) while the app is
    built, and only then: Ray's workers started before it was set, so the replica can only
    know the key through the deployment's arguments (issue 15: it used to read its own
    environment and answer everything without a key)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": models[0], "data": prepared.path, "num_cpus": 0,
                         "max_k": 20, "max_history": 30, "max_item_ids": 50}),
              name="ezsasrec", route_prefix="/")
    assert API_KEY_ENV not in os.environ
    os.environ[API_KEY_ENV] = "s3cret"
    try:
        secured = build_app({"model": models[0], "data": prepared.path, "num_cpus": 0,
                             "max_body_bytes": SECURED_BODY_LIMIT})
    finally:
        del os.environ[API_KEY_ENV]
    assert "s3cret" not in repr(secured)  # only the key's hash travels to the replicas
    serve.run(secured, name="secured", route_prefix="/secured")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, body, **kwargs):
    return requests.post(url, json=body, timeout=30, **kwargs)


def under_a_client_loop(ask, change, done, timeout: float = 60.0):
    """Run ``change()`` while a client calls ``ask() -> (status, value)`` in a loop, until
    ``done(values)`` or the timeout -> (values of the 200 answers, errors)."""
    values, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, value = ask()
                if status != 200:
                    errors.append(status)
                else:
                    values.append(value)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        change()
        deadline = time.time() + timeout
        while time.time() < deadline and (not values or not done(values)):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    return values, errors


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
    assert version["model_name"] == "m0" and version["user_data"] is True
    assert os.path.dirname(models[0]) not in repr(version)  # no filesystem paths
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
    """Many callers at once (batched by Batcher) get the same answers as one at a time."""
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
    assert got["ignored_counts"] == {"candidates": 1}
    got = post(server + "/recommend", {"history": [items[0], "nope", items[1]], "k": 5}).json()
    assert got["unknown_items"] == ["nope"] and got["fallback"] is False
    assert got["unknown_count"] == 1
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
    assert requests.get(url + "/readyz", timeout=10).status_code == 200
    assert post(server + "/recommend", user_body).status_code == 200  # the other app has none
    # the docs follow the key (docs_open: false by default)
    for path in ("/docs", "/openapi.json"):
        refused = requests.get(url + path, timeout=10)
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        assert requests.get(url + path, headers={"X-API-Key": "s3cret"},
                            timeout=10).status_code == 200
    version = requests.get(url + "/version", headers={"X-API-Key": "s3cret"}, timeout=10)
    assert version.status_code == 200 and "s3cret" not in version.text


def test_docs_open_and_key_checks_without_http():
    """The middleware's decisions on an app state, without a replica."""
    import hashlib
    from types import SimpleNamespace

    from ezsasrec_ray.serve import _UNAUTHORIZED, key_ok, precheck

    state = SimpleNamespace(key_sha256=hashlib.sha256(b"k3y").hexdigest(), max_body_bytes=100,
                            docs_open=False)
    assert precheck("/docs", {}, state) == (401, _UNAUTHORIZED)
    assert precheck("/openapi.json", {b"x-api-key": b"k3y"}, state) is None
    assert precheck("/openapi.json", {b"authorization": b"Bearer k3y"}, state) is None
    assert precheck("/recommend", {}, state) is None  # data routes: checked by the route
    assert precheck("/docs", {b"content-length": b"101"}, state)[0] == 413  # 413 before 401
    assert precheck("/recommend", {b"content-length": b"x"}, state)[0] == 400
    assert not key_ok({b"x-api-key": b"k3y "}, state)
    assert not key_ok({b"authorization": b"k3y"}, state)
    state.docs_open = True
    assert precheck("/docs", {}, state) is None and precheck("/openapi.json", {}, state) is None
    state.key_sha256 = None
    assert key_ok({}, state) and precheck("/docs", {}, state) is None


def test_api_key_that_cannot_work_is_refused(prepared, models, monkeypatch):
    with pytest.raises(EzSASRecError, match="printable ASCII"):
        build_app({"model": models[0], "api_key": "two words"})
    monkeypatch.setenv(API_KEY_ENV, " ")
    with pytest.raises(EzSASRecError, match=API_KEY_ENV):
        build_app({"model": models[0]})
    build_app({"model": models[0], "api_key": ""})  # explicitly none: the env var is not used


def test_body_over_the_limit_gets_413_before_auth(server):
    big = b'{"history": [' + b"1," * (600 * 1024) + b'1]}'  # 1.2 MB: over the 1 MiB default
    response = requests.post(server + "/recommend", data=big, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunked(data, size=64 * 1024):  # no Content-Length: counted while read
        for start in range(0, len(data), size):
            yield data[start:start + size]

    response = requests.post(server + "/recommend", data=chunked(big), timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 413
    url = server + "/secured"  # max_body_bytes 4096 there, and a key
    body = {"history": list(range(2000)), "k": 2}
    assert post(url + "/recommend", body).status_code == 413  # before the key is checked
    assert post(url + "/recommend", body, headers={"X-API-Key": "s3cret"}).status_code == 413
    assert requests.post(url + "/recommend", data=chunked(big[:8192], 1024), timeout=30,
                         headers={"X-API-Key": "s3cret"}).status_code == 413
    assert post(url + "/recommend", {"history": [], "k": 2}).status_code == 401
    assert requests.get(server + "/healthz", timeout=10).status_code == 200


ARABIC_INDIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666"
                                            "\u0667\u0668\u0669")


@pytest.mark.parametrize("form,taken", [
    ("{u}", True), (" {u} ", False), ("+{u}", False), ("0{u}", False), ("underscore", False),
    ("arabic-indic", False), ("{u}\n", False), ("{u}.0", False), ("-0", False), ("", False),
    ("9" * 30, False),
])
def test_strict_integer_ids(server, prepared, form, taken):
    """A raw integer id is ASCII digits with an optional leading minus, nothing else: " 17 ",
    "+17", "0017", "1_7" and "\u0661\u0667" are not user 17."""
    user = next(u for u in sorted(raw_histories(prepared)) if u >= 10)
    assert isinstance(user, int)
    text = str(user)
    raw = {"arabic-indic": text.translate(ARABIC_INDIC), "underscore": f"{text[0]}_{text[1:]}"
           }.get(form) or form.format(u=text)
    want = post(server + "/recommend", {"user_id": user, "k": 3}).json()
    got = post(server + "/recommend", {"user_id": raw, "k": 3}).json()
    assert (got.get("unknown_user") is None) is taken, (raw, got)
    if taken:
        assert got == want
    history = post(server + "/recommend", {"history": [raw], "k": 3}).json()
    assert (history["unknown_count"] == 0) is taken, (raw, history)
    assert strict_ids([raw], True) == ([user] if taken else [None])


def test_unknown_ids_are_counted_and_cut(server, prepared):
    long_ids = [f"{i:03d}" + "x" * 500 for i in range(25)]
    got = post(server + "/recommend", {"history": long_ids, "k": 3,
                                       "candidates": long_ids[:12] + [1, 2]})
    assert got.status_code == 200
    got = got.json()
    assert got["unknown_count"] == 25 and len(got["unknown_items"]) == 5
    assert all(len(x) <= 64 and x.endswith("...") for x in got["unknown_items"])
    assert got["unknown_items"][0].startswith("000x")
    assert got["ignored_counts"] == {"candidates": 12}
    assert len(got["ignored_ids"]["candidates"]) == 5
    assert len(json_text := str(got)) < 3000, json_text
    score = post(server + "/score", {"history": [1], "item_ids": long_ids[:20] + [1]}).json()
    assert score["unknown_count"] == 20 and len(score["unknown_items"]) == 5
    missing = post(server + "/score", {"user_id": "u" * 5000, "item_ids": [1]})
    assert missing.status_code == 404 and len(missing.text) < 300
    extra = post(server + "/recommend", {"user_id": 1, "y" * 5000: 1})
    assert extra.status_code == 422 and len(extra.text) < 300


@pytest.mark.parametrize("data", [
    b'{"user_id": "\xff\xfe", "k": 2}',  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
    b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"{not json",
    b"",
])
def test_undecodable_or_too_deep_json_gets_422(server, data):
    response = requests.post(server + "/recommend", data=data, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 422, (response.status_code, response.text[:200])
    assert response.json()["detail"].split(":")[0] in ("body", "history")


# -----------------------------------------------------------------------------
# hostile bodies without HTTP: the request models and the Recommender


@pytest.fixture(scope="module")
def recommender(prepared, models):
    return Recommender(ServeConfig(model=models[0], data=prepared.path,
                                   precompute_user_vectors=False))


def test_generated_bodies_raise_only_documented_errors(recommender):
    """Any JSON body through validation, the limits and the Recommender: an answer or one
    of the documented request errors (422/404 over HTTP), never anything else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    limits = ServeConfig(model=recommender.config.model, max_k=20, max_history=30,
                         max_item_ids=50)
    ids = st.one_of(st.integers(), st.integers(-3, 200), st.text(max_size=8),
                    st.from_regex(r"[ +0-]?[0-9\u0660-\u0669_]{1,4}\s?", fullmatch=True),
                    st.floats(), st.booleans(), st.none())
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())
    values = st.recursive(scalars | ids, lambda inner: st.lists(inner, max_size=5) |
                          st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=12)
    id_lists = st.lists(ids, max_size=40)
    keys = {"user_id": ids, "history": id_lists, "k": st.one_of(st.integers(-2, 30), values),
            "exclude_seen": st.one_of(st.booleans(), values), "exclude_items": id_lists,
            "candidates": id_lists, "item_ids": id_lists, "colour": values}
    bodies = st.one_of(values, st.fixed_dictionaries(
        {}, optional={k: st.one_of(v, values) for k, v in keys.items()}))

    @settings(max_examples=300, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["recommend", "score"]))
    def check(body, route):
        try:
            if route == "recommend":
                request = RecommendRequest.model_validate(body)
                request.check(limits)
                answer = recommender.recommend_many([Query(
                    user_id=request.user_id, history=request.history, k=request.k,
                    exclude_seen=request.exclude_seen, exclude_items=request.exclude_items,
                    candidates=request.candidates)])[0]
                assert len(answer["items"]) <= request.k
            else:
                request = ScoreRequest.model_validate(body)
                request.check(limits)
                answer = recommender.score_many([Query(
                    user_id=request.user_id, history=request.history,
                    item_ids=request.item_ids)])[0]
            assert len(answer["unknown_items"]) <= 5
        except REQUEST_ERRORS:
            pass

    check()


def test_redeploy_new_model_without_errors(server, prepared, models):
    """A client loop keeps getting answers while the app rolls over to a new model path."""
    from ray import serve

    user = sorted(raw_histories(prepared))[0]
    before = post(server + "/recommend", {"user_id": user, "k": 3}).json()["model_version"]

    def ask():
        response = post(server + "/recommend", {"user_id": user, "k": 3})
        return response.status_code, response.json().get("model_version")

    def redeploy():
        serve.run(build_app({"model": models[1], "data": prepared.path, "num_cpus": 0,
                             "max_k": 20, "max_history": 30, "max_item_ids": 50}),
                  name="ezsasrec", route_prefix="/")

    seen, errors = under_a_client_loop(ask, redeploy, lambda seen: seen[-1] != before)
    assert not errors, errors[:5]
    assert seen[0] == before and seen[-1] != before
    assert requests.get(server + "/version", timeout=10).json()["model_name"] == "m1"


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


def test_key_only_on_the_replicas_refuses_to_start(server, prepared, models):
    """$EZSASREC_API_KEY in the replicas' environment but not where the app was built: the
    key would not take effect, so the replica refuses to start (one line in the error)."""
    from ray import serve

    from ezsasrec_ray.serve import (
        _REPLICA_ENV_KEY,
        RecommenderDeployment,
        _auth_args,
        deployment_message,
    )

    config = ServeConfig(model=models[0], data=prepared.path)
    app = RecommenderDeployment.options(
        num_replicas=1, ray_actor_options={"num_cpus": 0, "runtime_env": {
            "env_vars": {API_KEY_ENV: "only-here"}}}).bind(
        {**config.__dict__, "api_key": None}, _auth_args(None))
    with pytest.raises(RuntimeError, match="replica-key failed"):
        serve.run(app, name="replica-key", route_prefix="/replica-key")
    assert _REPLICA_ENV_KEY in deployment_message("replica-key")  # what run_server prints
    serve.delete("replica-key")


def test_a_server_following_the_pipeline_swaps_to_a_new_night_without_errors(
        prepared, models, server, tmp_path):
    """--model <workdir> --follow-s: a client loop keeps getting answers while the pipeline
    publishes the next night, and /version names the night that answered."""
    from ray import serve

    from ezsasrec_ray.pipeline import Pipeline, load_config

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work")}))
    config = load_config(str(config_file))

    def publish(date, model):
        for target, source in ((config.prepared_dir, prepared.path), (config.model_dir, model)):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        Pipeline(config, date=date, log=lambda _: None)._publish_night(
            {"output": os.path.join(config.scores_dir, date), "fingerprint": date})

    publish("2026-01-01", models[0])
    with pytest.raises(EzSASRecError, match="follow a pipeline night"):
        build_app({"model": models[0], "follow_s": 0.2})
    serve.run(build_app({"model": config.workdir, "follow_s": 0.2, "num_cpus": 0}),
              name="follower", route_prefix="/follower")
    url = server + "/follower"
    user = sorted(raw_histories(prepared))[0]
    assert requests.get(url + "/version", timeout=10).json()["night"] == "2026-01-01"

    def ask():
        answer = post(url + "/recommend", {"user_id": user, "k": 3})
        return answer.status_code, requests.get(url + "/version", timeout=10).json()["night"]

    try:
        nights, errors = under_a_client_loop(ask, lambda: publish("2026-01-02", models[1]),
                                             lambda nights: nights[-1] == "2026-01-02")
    finally:
        serve.delete("follower")
    assert not errors, errors[:5]
    assert nights[0] == "2026-01-01" and nights[-1] == "2026-01-02"


def test_recommender_with_a_faiss_index_answers_as_the_exact_one(prepared, models, recommender):
    pytest.importorskip("faiss")
    approx = Recommender(ServeConfig(model=models[0], data=prepared.path, index="faiss-ivf",
                                     precompute_user_vectors=False))
    assert not approx.topk.is_exact() and approx.version()["index"] == "faiss-ivf"
    assert approx.memory_bytes()["faiss_index"] > 0
    users = prepared.users()["raw_id"].to_pylist()[:20]
    items = prepared.items()["raw_id"].to_pylist()
    queries = [Query(user_id=u, k=10) for u in users] + [Query(history=items[3:9], k=5)]
    # a small catalog: FAISS is asked for every item, so the answers are the exact ones
    assert approx.recommend_many(queries) == recommender.recommend_many(queries)


def test_batcher_answers_an_idle_call_at_once_and_batches_what_arrives_meanwhile():
    calls = []

    def run(queries):
        calls.append(list(queries))
        if "bad" in queries:
            raise ValueError("bad query")
        time.sleep(0.05)  # the model is busy: later arrivals queue for the next call
        return [q * 10 for q in queries]

    async def main():
        batcher = Batcher(run, max_batch_size=4)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.01)  # 1 is being answered alone, without waiting for company
        rest = [asyncio.ensure_future(batcher(q)) for q in range(2, 8)]
        gone = asyncio.ensure_future(batcher(99))
        await asyncio.sleep(0)
        gone.cancel()  # its caller left: it is not run
        answers = await asyncio.gather(first, *rest)
        failed = await asyncio.gather(batcher("bad"), return_exceptions=True)
        return answers, failed

    answers, failed = asyncio.run(main())
    assert answers == [10, 20, 30, 40, 50, 60, 70]
    assert calls[:3] == [[1], [2, 3, 4, 5], [6, 7]]  # at most max_batch_size a call
    assert isinstance(failed[0], ValueError) and calls[3] == ["bad"]
