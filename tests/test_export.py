"""``ezsasrec export``: a SavedModel that a process without this package serves with the same
user vectors (1e-5) for histories of every length, and the item table."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import random_model_dir, synth_prepared

from ezsasrec_ray import cli
from ezsasrec_ray.batching import left_pad
from ezsasrec_ray.dataset import load_prepared
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.model_io import load_model

# run in a fresh interpreter that never imports ezsasrec_ray: TensorFlow alone
SERVE_ELSEWHERE = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    export, histories, indices, out = sys.argv[1:]
    loaded = tf.saved_model.load(export + "/saved_model")
    users = loaded.signatures["user_embeddings"](histories=tf.constant(np.load(histories)))
    items = loaded.signatures["item_embeddings"](item_indices=tf.constant(np.load(indices)))
    np.savez(out, users=users["user_embeddings"].numpy(), items=items["item_embeddings"].numpy())
    assert "ezsasrec_ray" not in sys.modules
""")


@pytest.fixture(scope="module")
def exported(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prepared = synth_prepared(root, users=80, items=30, events=1200, seed=3)
    model = random_model_dir(root / "model", load_prepared(prepared), duplicates=False)
    code = cli.main(["export", "--model", model, "--output", str(root / "export"),
                     "--data", prepared])
    assert code == 0
    return root, prepared, model


def test_a_fresh_tensorflow_process_serves_the_same_vectors(exported, tmp_path):
    root, prepared, model_dir = exported
    model = load_model(model_dir)
    maxlen, n = model.config.maxlen, model.config.num_items
    rng = np.random.default_rng(0)
    # every length from 1 to past maxlen (the caller keeps the last maxlen items)
    histories = [rng.integers(1, n + 1, size) for size in range(1, maxlen + 4)]
    padded = left_pad(histories, maxlen)
    np.save(tmp_path / "histories.npy", padded)
    indices = np.arange(n + 1, dtype=np.int32)
    np.save(tmp_path / "indices.npy", indices)
    run = subprocess.run([sys.executable, "-c", SERVE_ELSEWHERE, str(root / "export"),
                          str(tmp_path / "histories.npy"), str(tmp_path / "indices.npy"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    expected = model.user_embeddings(padded).numpy()
    np.testing.assert_allclose(served["users"], expected, atol=1e-5)
    table = model.item_embeddings().numpy()
    np.testing.assert_allclose(served["items"], table, atol=0)
    np.testing.assert_array_equal(np.load(root / "export" / "item_table.npy"), table)


def test_items_and_description_beside_the_saved_model(exported):
    root, prepared, _ = exported
    items = load_prepared(prepared).items().sort_by("index")
    lines = (root / "export" / "items.tsv").read_text().splitlines()
    assert lines == [f"{i}\t{r}" for i, r in zip(items["index"].to_pylist(),
                                                 items["raw_id"].to_pylist())]
    info = json.loads((root / "export" / "export.json").read_text())
    assert (info["maxlen"], info["dim"]) == (8, 16)
    assert set(info["signatures"]) == {"user_embeddings", "item_embeddings"}
    assert (root / "export" / "_SUCCESS").exists()


def test_an_existing_output_is_refused_before_loading(exported):
    root, _, model = exported
    from ezsasrec_ray.export import export

    with pytest.raises(EzSASRecError, match="exists"):
        export(model, str(root / "export"))
