"""Ray jobs and the nightly pipeline (ezsasrec_ray.pipeline, jobs/*.py).

* Config checks (no Ray): unknown keys and bad values fail before any stage, with one line.
* A real job server: a head started with ``ray start --head --block`` on 127.0.0.1 and its
  own ports and temp dir; the pipeline is submitted with ``JobSubmissionClient`` (working dir
  uploaded), re-run (every stage skipped), run with options that fail in prepare (FAILED, the
  previous outputs untouched) and with a bad config (FAILED, the reason in the logs).
* Two nodes on one machine (``ray.cluster_utils.Cluster``, 2 CPUs each) in a helper process;
  the pipeline runs as a driver connected to it, with 2 training workers and 2 scoring actors
  that must land on different nodes, checkpoints and outputs on a path both nodes share.

Isolation from the other Ray instances on this machine: each cluster runs with its own
``RAY_TMPDIR``, so its ``ray_current_cluster`` file is not the one a plain ``ray.init()``
elsewhere reads, and with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so that every Ray address is
127.0.0.1. Teardown stops exactly the processes started here: the tree under the process the
test launched, plus any process whose command line names the cluster's private temp dir
(never ``ray stop``).

Time on 2 shared cores: config tests ~15 s, job server ~85-100 s, two nodes ~80-100 s.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import dead_pid, free_port, random_model_dir, synth_prepared

from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError, find_user_error
from ezsasrec_ray.pipeline import (
    STAGES,
    Pipeline,
    StageFailed,
    check_date,
    latest_scores,
    load_config,
    parse_override,
    run_pipeline,
    section_keys,
    validate,
    workdir_lock,
)

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BIN = os.path.dirname(sys.executable)
TINY_TRAIN = {"epochs": 1, "dim": 16, "maxlen": 8, "blocks": 1, "heads": 1, "batch_size": 64,
              "verbose": False}


# --------------------------------------------------------------------------------------------
# Helpers


def write_log(path: Path, users: int = 300, items: int = 40, seed: int = 0) -> Path:
    """A small CSV log: each user walks forward along a ring of items (1-2 steps)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = int(rng.integers(6, 15))
        walk = (int(rng.integers(0, items)) + np.cumsum(rng.integers(1, 3, n))) % items
        rows += [(f"u{u}", f"i{i}", 1_600_000_000 + 60 * t + u) for t, i in enumerate(walk)]
    pd.DataFrame(rows, columns=["userID", "itemID", "time"]).to_csv(path, index=False)
    return path


def write_config(path: Path, workdir: Path, log: Path, **sections) -> Path:
    config = {"workdir": str(workdir), "ray": {"address": None},
              "prepare": {"input": str(log), "k_core": 3, "verbose": False},
              "train": dict(TINY_TRAIN), "evaluate": {"ks": [10]},
              "score": {"top_n": 5, "verbose": False}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def isolated_env(tmp: str, token: str) -> dict:
    """Environment for a Ray process tree of its own (see the module docstring), with token
    authentication on and a token of its own (not the user's ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{PYTHON_BIN}:{env.get('PATH', '')}")
    return env


def our_processes(root: subprocess.Popen, tmp: str) -> list:
    """The processes a test started: ``root``'s descendants (now) and any process whose
    command line names ``tmp`` (a Ray daemon whose parent is gone)."""
    import psutil

    procs = {}
    try:
        parent = psutil.Process(root.pid)
        for proc in [parent, *parent.children(recursive=True)]:
            procs[proc.pid] = proc
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        if any(tmp in part for part in proc.info["cmdline"] or ()):
            procs.setdefault(proc.pid, proc)
    procs.pop(os.getpid(), None)
    return list(procs.values())


def stop(procs: list, timeout: float = 5):
    """SIGTERM, then SIGKILL what is left after ``timeout`` seconds."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def remove_tmp(tmp: str):
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(tmp):  # a straggler was still writing its logs
        time.sleep(2)
        shutil.rmtree(tmp, ignore_errors=True)


def short_tmp() -> str:
    """A short temp dir: Ray's unix socket paths under it must stay below 108 bytes."""
    return tempfile.mkdtemp(prefix="ezj-", dir="/tmp")


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def score_rows(directory) -> int:
    return len(pd.read_parquet(os.path.join(directory, "recommendations")))


# --------------------------------------------------------------------------------------------
# Config (no Ray)


@pytest.fixture
def config_file(tmp_path):
    log = write_log(tmp_path / "log.csv", users=20)
    return write_config(tmp_path / "config.yaml", tmp_path / "work", log)


def test_example_config_lists_every_option_and_is_valid():
    path = ROOT / "jobs" / "config.example.yaml"
    raw = yaml.safe_load(path.read_text())
    keys = section_keys()
    for stage in STAGES:
        assert set(raw[stage]) == set(keys[stage]), stage
    assert set(raw) == {"workdir", "ray", *STAGES}
    # prepare's input (a log made by the README's synth command) need not exist here
    validate(load_config(str(path)), stages=("train", "evaluate", "score"))


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'epoch' in section 'train'"),
    ("trian.epochs=3", "unknown section 'trian'"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.dim=true", "train.dim must be an integer, got True"),
    ("train.heads=3", "divisible by heads"),
    ("train.cpus_per_worker=many",
     "train.cpus_per_worker must be an integer or null, got 'many'"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("score.threads_per_actor=1.5",
     "score.threads_per_actor must be an integer or null, got 1.5"),
    ("prepare.dedupe=1", "prepare.dedupe must be a boolean, got 1"),
    ("train.loss=mse",
     "train.loss must be one of bce, sampled_softmax, softmax, gbce; got 'mse'"),
    ("prepare.split=random", "prepare.split must be one of loo, time; got 'random'"),
    ("prepare.output=/elsewhere", "'output' in section 'prepare' is set by the pipeline"),
    ("prepare.input=/no/such/log.csv", "prepare.input: /no/such/log.csv: input not found"),
    ("evaluate.ks=[0, 10]", "evaluate.ks must be >= 1, got [0, 10]"),
    ("evaluate.protocol=approx", "evaluate.protocol must be one of full, sampled; got 'approx'"),
    ("evaluate.holdout=none", "evaluate.holdout must be one of valid, test; got 'none'"),
    ("train.holdout=all", "train.holdout must be one of valid, test, none; got 'all'"),
    ("train.lr_schedule=step", "train.lr_schedule must be one of constant, cosine; got 'step'"),
    ("score.format=xml", "score.format must be one of parquet, jsonl, csv; got 'xml'"),
    ("score.top_n=0", "score.top_n must be >= 1, got 0"),
    ("score.users=/no/users.txt", "score.users: file not found"),
    ("score.users=5", "score.users must be a file path or a list of ids, got 5"),
    ("ray.port=1", "unknown key 'port' in section 'ray'"),
    ("workdir=s3://bucket/x", "workdir s3://bucket/x: use a filesystem path"),
])
def test_bad_config_fails_before_any_stage_naming_key_and_value(config_file, override, message):
    with pytest.raises(EzSASRecError) as info:
        validate(load_config(str(config_file), [override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (config_file.parent / "work").exists()


def test_overrides_are_read_as_yaml_and_dedicated_flags_win(config_file, tmp_path):
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
    assert parse_override("evaluate.ks=[5, 10]") == (["evaluate", "ks"], [5, 10])
    assert parse_override("prepare.k_core=null") == (["prepare", "k_core"], None)
    assert parse_override("prepare.user_col=0")[1] == 0
    with pytest.raises(EzSASRecError, match="expected SECTION.KEY=VALUE"):
        parse_override("train.epochs")
    broken = tmp_path / "broken.yaml"
    broken.write_text("workdir: /tmp/x\ntrain: [epochs\n")
    with pytest.raises(EzSASRecError, match=f"{broken}: invalid YAML at line 3"):
        load_config(str(broken))
    config = load_config(str(config_file), ["train.epochs=3", "prepare.user_col=0",
                                            "workdir=/tmp/a"],
                         workdir=str(tmp_path / "b"), address="127.0.0.1:1")
    validate(config)
    assert config.train["epochs"] == 3
    assert config.prepare["user_col"] == "0"  # a column position, as the CLI passes it
    assert config.workdir == str(tmp_path / "b") and config.address == "127.0.0.1:1"
    assert check_date("2026-02-28") == "2026-02-28"
    for bad in ("2026-02-30", "20260228", "yesterday"):
        with pytest.raises(EzSASRecError, match="--date"):
            check_date(bad)


def test_job_script_exit_codes_and_one_line_reason(config_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_file.read_text().replace("epochs: 1", "epochs: 1\n  epoch: 2"))
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "jobs/train.py" in line]
    assert lines == [f"jobs/train.py: error: {bad}: unknown key 'epoch' in section 'train'"]
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "score.py"), "--config",
                          str(config_file), "--check"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().endswith("missing or incomplete; run the prepare stage first")


def test_one_run_per_workdir(config_file):
    config = load_config(str(config_file))
    lock = Path(config.workdir) / ".pipeline.lock"
    with workdir_lock(config.workdir):  # another run holds the workdir
        with pytest.raises(EzSASRecError, match="another pipeline run holds this workdir"):
            run_pipeline(config, stages=("score",), log=lambda _: None)
    assert not lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with pytest.raises(StageFailed, match="stage score failed"):  # the stale lock is taken over
        run_pipeline(config, stages=("score",), log=lambda _: None)
    assert not lock.exists()


def test_latest_moves_forward_only(config_file):
    config = load_config(str(config_file))
    latest = Path(config.latest_path)
    for stage_output in (config.prepared_dir, config.model_dir):  # what a night links
        os.makedirs(stage_output)
        Path(stage_output, "part").write_text("x")

    def publish(date):
        record = {"output": os.path.join(config.scores_dir, date), "fingerprint": date,
                  "stamp": {"counts": {"users_scored": 7}}}
        Pipeline(config, date=date, log=lambda _: None)._publish_night(record)
        return read_json(latest)

    assert publish("2026-03-01")["date"] == "2026-03-01"
    assert publish("2026-02-27")["date"] == "2026-03-01"  # a back-fill does not move it back
    pointer = publish("2026-03-02")
    assert pointer["date"] == "2026-03-02" and pointer["users_scored"] == 7
    assert pointer["path"] == os.path.join(config.workdir, "scores", "2026-03-02")
    assert os.listdir(latest.parent) == ["latest"]  # no temporary file left behind
    # every date is published as a night, the back-filled one too
    assert sorted(os.listdir(config.nights_dir)) == ["2026-02-27", "2026-03-01", "2026-03-02"]
    assert pointer["night"] == os.path.join(config.nights_dir, "2026-03-02")


# --------------------------------------------------------------------------------------------
# A job server on 127.0.0.1


@pytest.fixture(scope="module")
def job_server():
    """``ray start --head --block`` with its own ports and temp dir -> (client, url)."""
    from ray.job_submission import JobSubmissionClient

    tmp, token = short_tmp(), secrets.token_hex(32)
    dashboard = free_port()
    ports = {name: free_port() for name in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    command = [os.path.join(PYTHON_BIN, "ray"), "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
               "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(os.path.join(tmp, "head.log"), "w")
    head = subprocess.Popen(command, env=isolated_env(tmp, token), stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        client, deadline = None, time.time() + 90
        while client is None:
            try:
                client = JobSubmissionClient(url, headers={"authorization": f"Bearer {token}"})
            except Exception:  # noqa: BLE001 - not up yet
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not start: "
                                       + Path(tmp, "head.log").read_text()[-2000:]) from None
                time.sleep(1)
        yield client, url, tmp
    finally:
        stop(our_processes(head, tmp))  # the head's daemons, its workers, the jobs' drivers
        head.wait(timeout=30)
        log.close()
        assert not os.path.exists("/tmp/ray/ray_current_cluster") or \
            f":{ports['port']}" not in Path("/tmp/ray/ray_current_cluster").read_text()
        remove_tmp(tmp)


def submit(client, args: list, timeout: float = 420):
    """Submit jobs/pipeline.py with the repository as working dir -> (status, logs)."""
    from ray.job_submission import JobStatus

    job = client.submit_job(
        entrypoint="python jobs/pipeline.py " + " ".join(args),
        runtime_env={"working_dir": str(ROOT),
                     "excludes": [".venv", ".git", "demo_output", "bench_output", "*.egg-info"],
                     "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {timeout}s:\n"
                        + client.get_job_logs(job)[-3000:])
        time.sleep(1)
    return status, client.get_job_logs(job)


@pytest.mark.slow
def test_pipeline_job_runs_skips_and_fails_safely(job_server, tmp_path):
    from ray.job_submission import JobStatus

    client, _, _ = job_server
    log = write_log(tmp_path / "log.csv")
    workdir = tmp_path / "work"
    config = write_config(tmp_path / "config.yaml", workdir, log)

    # 1. The whole pipeline as a Ray job.
    status, logs = submit(client, ["--config", str(config), "--date", "2026-01-01"])
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    for stage in ("prepare", "train", "evaluate", "score"):  # tune is off by default
        assert f"[pipeline] {stage}: running (no output yet)" in logs
    # the package uploaded with the working dir, not the checkout installed in the venv
    assert re.search(r"\[pipeline\] ezsasrec_ray \S+ from \S+/_ray_pkg_\w+/ezsasrec_ray;", logs)
    prepared = read_json(workdir / "prepared" / "manifest.json")
    users = prepared["counts"]["users_kept"]
    assert users == 300
    model = read_json(workdir / "model" / "metrics.json")
    assert model["epochs_run"] == 1 and model["data"] == str(workdir / "prepared")
    evaluation = read_json(workdir / "evaluation.json")
    assert evaluation["result"]["users"] == 300
    assert evaluation["result"]["model"]["HR@10"] > evaluation["result"]["popularity"]["HR@10"]
    day = workdir / "scores" / "2026-01-01"
    assert (day / "_SUCCESS").exists() and score_rows(day) == users
    latest = read_json(workdir / "scores" / "latest")
    assert latest["date"] == "2026-01-01" and latest["users_scored"] == users
    assert latest_scores(str(workdir)) == str(day)
    train_stamp = read_json(workdir / "stamps" / "train.json")
    (node,) = [n["node_id"] for n in train_stamp["nodes"]]
    assert train_stamp["placement"]["nodes"] == {node: 1}
    assert read_json(workdir / "stamps" / "score-2026-01-01.json")["placement"]["nodes"] == \
        {node: 1}
    assert any(p.name.startswith("checkpoint_") for p in
               (workdir / "runs").glob("pipeline-train-*/*"))
    outputs = {p: p.stat().st_mtime_ns for p in (
        workdir / "prepared" / "manifest.json", workdir / "model" / "metrics.json",
        workdir / "evaluation.json", day / "manifest.json", workdir / "scores" / "latest")}

    # 2. The same night again: every stage is skipped and nothing is rewritten (no Ray).
    lines = []
    records = run_pipeline(load_config(str(config)), date="2026-01-01", log=lines.append)
    assert [r["status"] for r in records] == ["skipped"] * 4, lines
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    # ... and a changed option reruns its stage and the ones after it
    plan = run_pipeline(load_config(str(config), ["train.epochs=2"]), date="2026-01-02",
                        check=True, log=lines.append)
    assert [r["status"] for r in plan] == ["skipped", "would run", "would run", "would run"]
    assert "[pipeline] train: would run (options changed)" in lines
    plan = run_pipeline(load_config(str(config)), date="2026-01-01", force=["evaluate"],
                        check=True, log=lines.append)
    assert [r["status"] for r in plan] == ["skipped", "skipped", "would run", "would run"]
    assert "[pipeline] evaluate: would run (forced)" in lines
    # a production model trained on every event: nothing left to evaluate it on
    plan = run_pipeline(load_config(str(config), ["train.holdout=none"]), date="2026-01-03",
                        check=True, log=lines.append)
    assert [r["stage"] for r in plan] == ["prepare", "train", "score"]
    assert any("evaluate skipped: train.holdout is 'none'" in line for line in lines)

    # 3. A stage that fails (an unknown user in score.users): one line naming the stage; the
    #    earlier stages are skipped, and last night's scores and scores/latest are kept.
    unknown = tmp_path / "users.txt"
    unknown.write_text("u1\nnobody\n")
    lines = []
    with pytest.raises(StageFailed, match="stage score failed") as failed:
        run_pipeline(load_config(str(config), [f"score.users={unknown}"]), date="2026-01-02",
                     log=lines.append)
    assert "1 unknown user id(s)" in find_user_error(failed.value).message
    assert [line.split(",")[0] for line in lines[1:]] == [
        "[pipeline] prepare: skipped", "[pipeline] train: skipped",
        "[pipeline] evaluate: skipped",
        f"[pipeline] score: running (no output yet) -> {workdir}/scores/2026-01-02"]
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    assert not (workdir / "scores" / "2026-01-02").exists()
    assert read_json(workdir / "scores" / "latest")["date"] == "2026-01-01"
    assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name]

    # 4. A bad config job: FAILED before any stage, the reason in the job's logs.
    status, logs = submit(client, ["--config", str(config), "--set", "train.epoch=3"])
    assert status == JobStatus.FAILED
    assert f"jobs/pipeline.py: error: {config}: unknown key 'epoch' in section 'train'" in logs
    assert "[pipeline] prepare" not in logs


# --------------------------------------------------------------------------------------------
# Two nodes on one machine

CLUSTER_SCRIPT = """
import json, sys
from ray.cluster_utils import Cluster
ports = json.loads(sys.argv[1])
node = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 200 << 20}
cluster = Cluster(initialize_head=True, head_node_args={
    **node, "gcs_server_port": ports[0], "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": ports[1],
    "dashboard_agent_listen_port": ports[2], "metrics_export_port": ports[3],
    "runtime_env_agent_port": ports[4]})
worker = cluster.add_node(**node, dashboard_agent_listen_port=ports[5],
                          metrics_export_port=ports[6], runtime_env_agent_port=ports[7])
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address,
                  "nodes": [cluster.head_node.node_id, worker.node_id]}), flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


@pytest.fixture
def two_nodes():
    """A head and a worker node (2 CPUs each) in a helper process -> (address, node ids)."""
    tmp = short_tmp()
    env = isolated_env(tmp, secrets.token_hex(32))
    log = open(os.path.join(tmp, "cluster.log"), "w")
    helper = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps([free_port() for _ in range(8)])],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp)
    try:
        line = helper.stdout.readline()
        if not line:
            pytest.fail("cluster did not start: " + Path(tmp, "cluster.log").read_text()[-2000:])
        info = json.loads(line)
        yield info["address"], info["nodes"], env
    finally:
        procs = our_processes(helper, tmp)
        helper.stdin.close()  # the helper shuts the cluster down ...
        try:
            helper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        stop(procs + our_processes(helper, tmp))  # ... and whatever is left is stopped here
        helper.wait(timeout=30)
        log.close()
        remove_tmp(tmp)


@pytest.mark.slow
def test_pipeline_on_two_nodes_spreads_workers_and_actors(two_nodes, tmp_path):
    address, nodes, env = two_nodes
    shared = tmp_path / "shared"  # on one machine every path is shared by both nodes
    config = write_config(tmp_path / "config.yaml", shared / "work", write_log(tmp_path / "l.csv"),
                          train={"num_workers": 2, "storage_path": str(shared / "runs")},
                          score={"actors": 2, "cpus_per_actor": 2})
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config",
                          str(config), "--address", address, "--date", "2026-03-01"],
                         env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    work = shared / "work"
    train = read_json(work / "stamps" / "train.json")
    score = read_json(work / "stamps" / "score-2026-03-01.json")
    assert sorted(n["node_id"] for n in train["nodes"]) == sorted(nodes)
    # each training worker and each scoring actor needs 2 CPUs: one per node
    assert train["placement"]["nodes"] == {node: 1 for node in nodes}, train["placement"]
    assert score["placement"]["nodes"] == {node: 1 for node in nodes}, score["placement"]
    assert read_json(work / "model" / "metrics.json")["train"]["num_workers"] == 2
    checkpoints = list((shared / "runs").glob("pipeline-train-*/checkpoint_*"))
    assert checkpoints and train["run"] == str(checkpoints[0].parent)
    day = work / "scores" / "2026-03-01"
    assert score_rows(day) == read_json(work / "prepared" / "manifest.json")["counts"][
        "users_kept"]
    assert read_json(day / "manifest.json")["options"]["actors"] == 2
    assert read_json(work / "scores" / "latest")["date"] == "2026-03-01"


def test_a_killed_runs_lock_never_blocks_and_a_live_one_always_does(config_file, tmp_path):
    """The lock is the kernel's (flock): held while its process lives, gone when it dies, so
    no run has to guess whether a lock is stale, and two runs cannot both take one over."""
    import signal
    import subprocess
    import sys
    import time

    config = load_config(str(config_file))
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\n"
        "from ezsasrec_ray.pipeline import workdir_lock\n"
        f"with workdir_lock({config.workdir!r}):\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(60)\n")])
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists()
        with pytest.raises(EzSASRecError, match=f"pid {holder.pid} on"):
            with workdir_lock(config.workdir):
                pass
        holder.send_signal(signal.SIGKILL)  # killed: no clean-up ran, the file stays
        holder.wait()
        assert (Path(config.workdir) / ".pipeline.lock").exists()
        with workdir_lock(config.workdir):  # taken at once, no stale-lock guessing
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("gate, previous, fails", [
    ({}, None, None),
    ({"min_ndcg": 0.2}, None, "evaluate.min_ndcg: test NDCG@10 0.1500 is below 0.2"),
    ({"min_ndcg": 0.1}, None, None),
    ({"min_vs_markov": 1.1}, None, "evaluate.min_vs_markov: test NDCG@10 0.1500 is below 1.1 x"),
    ({"min_vs_markov": 1.0}, None, None),
    ({"min_vs_previous": 0.95}, 0.2, "evaluate.min_vs_previous"),
    ({"min_vs_previous": 0.95}, None, None),  # the first night has nothing to compare with
    ({"min_vs_previous": 0.95}, 0.155, None),
])
def test_quality_gate(gate, previous, fails):
    from ezsasrec_ray.pipeline import quality_gate

    result = {"model": {"NDCG@10": 0.15}, "markov": {"NDCG@10": 0.14}}
    why = quality_gate(result, gate, previous)
    if fails is None:
        assert why is None
    else:
        assert fails in why and "scores/latest stays where it was" in why


def test_gate_keys_are_checked_with_the_rest_of_the_config(config_file):
    with pytest.raises(EzSASRecError, match="evaluate.min_ndcg must be >= 0"):
        validate(load_config(str(config_file), ["evaluate.min_ndcg=-1"]), stages=STAGES)
    config = validate(load_config(str(config_file), ["evaluate.min_vs_markov=1.05"]),
                      stages=STAGES)
    assert config.evaluate["min_vs_markov"] == 1.05


def test_a_failed_gate_stops_the_night_before_scoring(ray_session, tmp_path, config_file):
    """A model below the gate: the evaluate stage fails with one line, score never runs and
    scores/latest is not written."""
    config = load_config(str(config_file), ["evaluate.min_ndcg=0.99"])
    workdir = Path(config.workdir)
    data = synth_prepared(workdir / "src", users=120, items=40, events=2000, seed=5)
    shutil.copytree(data, config.prepared_dir)
    random_model_dir(config.model_dir, load_prepared(config.prepared_dir))
    with pytest.raises(StageFailed, match="stage evaluate failed") as info:
        run_pipeline(config, stages=("evaluate", "score"), log=lambda _: None)
    assert "quality gate evaluate.min_ndcg" in str(info.value.__cause__)
    assert not os.path.exists(config.latest_path)
    assert os.path.exists(config.evaluation_path)  # what was measured is kept
    passing = load_config(str(config_file), ["evaluate.min_ndcg=0"])
    records = run_pipeline(passing, stages=("evaluate",), log=lambda _: None)
    assert [r["status"] for r in records] == ["skipped"]  # same model and options: up to date


def test_the_tune_stage_searches_once_and_training_starts_from_its_best(ray_session, tmp_path):
    """tune.enabled: the first night searches and trains from best.json (the train section's
    own keys win); the next night with the same data skips the search; grown data past
    tune.drift searches again."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"grid": [0.01]}, "dim": 16, "maxlen": 8,
                                     "blocks": 1, "heads": 1, "dropout": 0.1}))
    log = write_log(tmp_path / "log.csv", users=150)
    config_file = write_config(
        tmp_path / "config.yaml", tmp_path / "work", log,
        tune={"enabled": True, "num_samples": 1, "space": str(space), "max_concurrent": 1},
        train={"epochs": 2, "eval_every_steps": 1, "min_steps": 0, "batch_size": 32})
    stages = ("prepare", "tune", "train")
    records = run_pipeline(load_config(str(config_file)), stages=stages, log=lambda _: None)
    assert [r["status"] for r in records] == ["ran", "ran", "ran"]
    work = tmp_path / "work"
    best = read_json(work / "tune" / "best.json")
    metrics = read_json(work / "model" / "metrics.json")
    assert metrics["train"]["lr"] == best["params"]["lr"] == 0.01  # from best.json
    assert metrics["train"]["epochs"] == 2 and metrics["train"]["batch_size"] == 32  # section
    records = run_pipeline(load_config(str(config_file)), stages=stages, log=lambda _: None)
    assert [r["status"] for r in records] == ["skipped"] * 3
    write_log(tmp_path / "log.csv", users=300)  # twice the users: past the 25% drift
    run_pipeline(load_config(str(config_file)), stages=("prepare",), log=lambda _: None)
    lines = []
    plan = run_pipeline(load_config(str(config_file)), stages=("tune",), check=True,
                        log=lines.append)
    assert plan[0]["status"] == "would run" and "[pipeline] tune: would run (inputs changed)" \
        in lines
    within = run_pipeline(load_config(str(config_file), ["tune.drift=1.5"]), stages=("tune",),
                          check=True, log=lambda _: None)
    assert within[0]["status"] == "skipped"  # a change within tune.drift: the search holds
    off = run_pipeline(load_config(str(config_file), ["tune.enabled=false"]), stages=stages,
                       check=True, log=lambda _: None)
    assert [r["stage"] for r in off] == ["prepare", "train"]


def test_a_night_is_published_whole_and_served_through_its_pointer(ray_session, tmp_path,
                                                                   config_file):
    """scores/latest names nights/<date>/, which holds that night's data, model and
    evaluation together. A later night that dies after prepare leaves prepared/ and model/
    with different vocabularies; the published night still pairs them right, and a server
    pointed at the workdir reads it."""
    from ezsasrec_ray.model_io import check_vocab, load_model, resolve_night

    config = load_config(str(config_file))
    workdir = Path(config.workdir)
    shutil.copytree(synth_prepared(workdir / "src1", users=120, items=40, events=2000, seed=5),
                    config.prepared_dir)
    random_model_dir(config.model_dir, load_prepared(config.prepared_dir))
    run_pipeline(config, stages=("evaluate", "score"), date="2026-01-01", log=lambda _: None)
    night = workdir / "nights" / "2026-01-01"
    latest = read_json(workdir / "scores" / "latest")
    assert latest["night"] == str(night) and (night / "night.json").exists()
    assert (night / "evaluation.json").exists() and (night / "_SUCCESS").exists()
    # the next night dies after prepare: tonight's data beside last night's model
    shutil.rmtree(config.prepared_dir)
    shutil.copytree(synth_prepared(workdir / "src2", users=150, items=45, events=2500, seed=6),
                    config.prepared_dir)
    with pytest.raises(EzSASRecError, match="other vocabularies"):
        check_vocab(load_model(config.model_dir), load_prepared(config.prepared_dir))
    for pointer in (workdir, workdir / "scores" / "latest", night):
        model, data = resolve_night(str(pointer))
        assert (model, data) == (str(night / "model"), str(night / "prepared"))
        check_vocab(load_model(model), load_prepared(data))  # the night's own pair
    assert resolve_night(config.model_dir, "d") == (config.model_dir, "d")  # a plain model dir


def test_only_the_newest_nights_are_kept_and_never_a_users_directory(tmp_path, config_file):
    from ezsasrec_ray.outputs import writing
    from ezsasrec_ray.pipeline import NIGHTS_KEPT, Pipeline

    config = load_config(str(config_file))
    dates = [f"2026-01-0{d}" for d in range(1, 7)]
    for date in dates[:-1]:
        with writing(os.path.join(config.nights_dir, date), overwrite=False, kind="night"):
            pass
    os.makedirs(os.path.join(config.nights_dir, dates[-1]))  # not ours (no marker)
    (Path(config.nights_dir) / dates[-1] / "notes.txt").write_text("mine")
    Pipeline(config, date=dates[0])._prune_nights(keep=os.path.join(config.nights_dir,
                                                                     dates[0]))
    left = sorted(os.listdir(config.nights_dir))
    # the user's directory, our newest NIGHTS_KEPT nights and the one latest names
    assert left == sorted({dates[-1], dates[0], *dates[-1 - NIGHTS_KEPT:-1]})


def test_warm_start_trains_from_the_last_published_night(config_file):
    """train.warm_start: the parent is the model latest's night holds (a cold start before
    the first night), recorded by content in the train stage's inputs."""
    from ezsasrec_ray.pipeline import Pipeline

    config = load_config(str(config_file), ["train.warm_start=true"])
    night = Pipeline(config, date="2026-01-02", log=lambda _: None)
    assert "init_from" not in night.train_options()  # nothing published yet: cold
    for stage_output in (config.prepared_dir, config.model_dir):
        os.makedirs(stage_output)
        Path(stage_output, "part").write_text("x")
    Pipeline(config, date="2026-01-01", log=lambda _: None)._publish_night(
        {"output": os.path.join(config.scores_dir, "2026-01-01"), "fingerprint": "f"})
    options = night.train_options()
    assert options["init_from"] == os.path.join(config.nights_dir, "2026-01-01", "model")
    assert "warm_start" not in options
    cold = Pipeline(load_config(str(config_file)), date="2026-01-02", log=lambda _: None)
    assert "init_from" not in cold.train_options()
