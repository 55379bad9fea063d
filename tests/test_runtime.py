"""Process set-up: what a user reads in the console (TensorFlow's C++ start-up lines and Ray's
INFO lines kept out, our own lines and real errors kept in)."""

import os
import re
import sys

from conftest import run_cli, synth_prepared

from ezsasrec_ray.runtime import quiet_native_logs


def test_native_noise_goes_to_debug_and_other_lines_pass_through(capfd):
    with quiet_native_logs():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")
        os.write(2, b"I0000 00:00:1796661310.647222   21286 port.cc:153] oneDNN custom ops\n")
        os.write(2, b"E0000 00:00:1796661353.805463   21286 cuda_platform.cc:52] failed call "
                    b"to cuInit: INTERNAL\n")
        os.write(2, b"E0000 00:00:1.0  1 something.cc:1] a real native error\n")
        os.write(2, b"Traceback (most recent call last):\n")
    err = capfd.readouterr().err.splitlines()
    assert err == ["E0000 00:00:1.0  1 something.cc:1] a real native error",
                   "Traceback (most recent call last):"]


def test_tensorflow_import_prints_nothing_in_a_fresh_process():
    import subprocess

    proc = subprocess.run([sys.executable, "-c", "import ezsasrec_ray.model"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and proc.stdout.strip() == ""


def test_a_training_log_is_one_line_per_epoch_and_a_summary(tmp_path, ray_session):
    prepared = synth_prepared(tmp_path, users=150, items=60, events=3000)
    env = dict(os.environ, RAY_ADDRESS="")
    proc = run_cli("train", "--data", prepared, "--output", tmp_path / "model", "--epochs", 3,
                   "--dim", 16, "--maxlen", 10, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The placement-group cleaner's thread dies with a traceback when two Ray instances run on
    # one machine (this test's and the session's); a user's machine runs one.
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "PlacementGroupCleaner" not in line]
    epochs = [line for line in lines if re.search(r"epoch +\d+: loss", line)]
    assert len(epochs) == 3, lines
    assert proc.stdout.strip().splitlines()[-1].startswith(
        f"model written to {tmp_path / 'model'}")
    for noise in ("Reporting training result", "Checkpoint successfully created", "I0000 ",
                  "absl::InitializeLog", "Failed to query Ray Train Controller", "cuInit"):
        assert not any(noise in line for line in lines), noise
    assert len(lines) <= 3 + 8, lines  # epochs, summary and a few of Ray's own start-up lines
