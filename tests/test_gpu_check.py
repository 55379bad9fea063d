"""benchmarks/gpu_check.py in its dry-run mode: the device check runs end to end on the CPU."""

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def test_gpu_check_dry_run_writes_one_json(ray_session, tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        import gpu_check
    finally:
        sys.path.remove(BENCHMARKS)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path / "work"), "--out", str(out),
                           "--epochs", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["gpus"] == []
    training, scoring = report["training"], report["scoring"]
    assert training["gpu_mixed_bfloat16"]["options"]["precision"] == "mixed_bfloat16"
    assert training["gpu_mixed_bfloat16"]["loss"] == pytest.approx(
        training["gpu_float32"]["loss"], rel=0.05)
    assert training["gpu_float32"]["sequences_per_s"] > 0
    assert "needs 2 GPUs" in training["two_gpus_float32"]["skipped"]
    # the device scan's file is the numpy scan's, item for item
    assert scoring["identical"] is True
    assert scoring["gpu"]["options"]["scan"] == "tensorflow"
    assert scoring["gpu"]["users"] == scoring["cpu"]["users"] > 0
    assert 0 < scoring["scan"]["share_of_peak"] < 1
    assert not (tmp_path / "gpu_check.json.tmp").exists()
