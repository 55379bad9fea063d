"""Shared fixtures and builders.

* ``ray_session``: one local Ray instance for the whole test session.
* ``shared_path``: a file under ../shared/data, or skip.
* ``s3_server``: a real S3 server for the session (moto in server mode on 127.0.0.1), its
  endpoint and test credentials in the environment, one bucket.
* Builders several test files use: a tab-separated log (``write_tsv``), a prepared synthetic
  log (``synth_prepared``), a random model directory (``random_model_dir``), a scoring run's
  output read back (``read_results``), the ``ezsasrec`` command in a subprocess (``run_cli``),
  a free port on 127.0.0.1 (``free_port``), and the pieces of a killed run's temporary name
  (``dead_pid``, ``output_host``).

Package imports sit inside the builders: collecting a test file that uses none of them loads
neither Ray nor TensorFlow.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 and a free port (stopped after the session); pyarrow and
    boto3 reach it through AWS_ENDPOINT_URL. Remote model copies go to a temporary cache."""
    pytest.importorskip("moto")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true",
           "EZSASREC_CACHE": str(tmp_path_factory.mktemp("remote_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="ezsasrec-test")
        yield SimpleNamespace(endpoint=env["AWS_ENDPOINT_URL"], bucket="s3://ezsasrec-test")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


def shared_path(*parts):
    """Path under ../shared/data, or skip the test when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not available: {path}")
    return path


# --------------------------------------------------------------------------------------------
# Input data


def write_tsv(path, rows) -> str:
    """One tab-separated line per row (no header) -> ``str(path)``."""
    with open(path, "w") as f:
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")
    return str(path)


def synth_prepared(root, *, k_core: int = 3, **synth_options) -> str:
    """A synthetic log (``synth(root / "log", **synth_options)``) prepared into
    ``root / "prepared"`` with ``k_core`` -> the prepared directory. Needs Ray."""
    from ezsasrec_ray.prepare import prepare
    from ezsasrec_ray.synth import synth

    synth(str(root / "log"), verbose=False, **synth_options)
    prepare(str(root / "log"), str(root / "prepared"), k_core=k_core, verbose=False)
    return str(root / "prepared")


# --------------------------------------------------------------------------------------------
# Models


def random_model_dir(path, data, *, seed=0, fingerprint=None, duplicates=True) -> str:
    """A random (untrained) SASRec for a prepared dataset, written as a model directory by the
    package's one writer (``model_io.write_model_dir``, as train writes it) -> ``str(path)``.

    maxlen 8, dim 16, one block, two heads. With ``duplicates``, some item rows are copies of
    others, so exact score ties occur. ``fingerprint`` overrides the vocabulary fingerprint
    (a model of "other vocabularies")."""
    import keras
    import numpy as np

    from ezsasrec_ray.model import SASRecConfig, build_model
    from ezsasrec_ray.model_io import write_model_dir

    keras.utils.set_random_seed(seed)
    model = build_model(SASRecConfig(num_items=data.num_items, maxlen=8, dim=16, blocks=1,
                                     heads=2, dropout=0.0))
    if duplicates:
        table = model.item_emb.embeddings.numpy()
        rng = np.random.default_rng(seed)
        for source in rng.choice(np.arange(1, data.num_items + 1), 6, replace=False):
            table[rng.integers(1, data.num_items + 1, 3)] = table[source]
        model.item_emb.embeddings.assign(table)
    metadata = {"data": data.path, "vocab_fingerprint": fingerprint or data.vocab_fingerprint(),
                "model": model.config.to_dict(), "best_epoch": 0}
    write_model_dir(str(path), model, metadata, overwrite=False)
    return str(path)


# --------------------------------------------------------------------------------------------
# Outputs


def read_results(path, fmt="parquet"):
    """A scoring output directory -> {user_id: (item id list, float32 scores)}; asserts that
    every user appears once."""
    import numpy as np
    import pandas as pd

    results = os.path.join(path, "recommendations")
    if fmt == "parquet":
        frame = pd.read_parquet(results)
    else:
        frames = []
        for name in sorted(os.listdir(results)):
            file = os.path.join(results, name)
            if fmt == "jsonl":
                frames.append(pd.read_json(file, lines=True))
            else:
                frame = pd.read_csv(file)
                frame["item_ids"] = frame["item_ids"].map(json.loads)
                frame["scores"] = frame["scores"].map(json.loads)
                frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
    assert frame["user_id"].is_unique
    return {u: (list(i), np.asarray(s, np.float32))
            for u, i, s in zip(frame["user_id"], frame["item_ids"], frame["scores"])}


# --------------------------------------------------------------------------------------------
# Processes, ports and hosts


def run_cli(*argv, env=None) -> subprocess.CompletedProcess:
    """``python -m ezsasrec_ray.cli ARGV...`` in a subprocess (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "ezsasrec_ray.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=120)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    """The pid of a process that has exited (a killed run's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def output_host() -> str:
    """The host part of the temporaries ``outputs`` names ``.{name}.tmp-{host}-{pid}-{hex}``
    (its documented layout), read off a temporary that ``outputs.start`` makes and
    ``outputs.discard`` removes in a scratch directory."""
    from ezsasrec_ray import outputs

    with tempfile.TemporaryDirectory() as scratch:
        tmp = outputs.start(os.path.join(scratch, "probe"), overwrite=False)
        outputs.discard(tmp)
    name, prefix, pid = os.path.basename(tmp), ".probe.tmp-", f"-{os.getpid()}-"
    assert name.startswith(prefix) and pid in name, name
    return name[len(prefix):name.rindex(pid)]
