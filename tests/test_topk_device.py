"""The device catalog scan (ezsasrec_ray.topk_device) gives the host TopK's results exactly.

Run here on the CPU as the device: the same code a GPU scoring actor runs."""

import numpy as np
import pytest
import tensorflow as tf
from test_topk import all_scores, allowed_mask, assert_same, brute_top_k, float_data, int_data

from ezsasrec_ray.topk import TopK
from ezsasrec_ray.topk_device import DeviceTopK


@pytest.mark.parametrize("data", [int_data, float_data])
def test_device_scan_matches_brute_force_and_the_host_scan(data):
    rng = np.random.default_rng(11)
    for _trial in range(4):
        num_users, num_items = int(rng.integers(1, 9)), int(rng.integers(1, 80))
        users, table = data(rng, num_users, num_items, int(rng.integers(1, 6)))
        histories = rng.integers(0, num_items + 1, (num_users, 5))
        ok = allowed_mask(num_users, num_items, histories)
        host = TopK(table, chunk_size=7)
        for max_block in (1, 64, 1 << 20):  # a chunk of `keep` items, a few, one chunk
            index = DeviceTopK(table, device="/CPU:0", max_block=max_block)
            for k in {0, 1, int(rng.integers(1, num_items + 3)), num_items + 2}:
                want = brute_top_k(all_scores(users, table), ok, k)
                assert_same(index(users, k, histories=histories), want)
                assert_same(host(users, k, histories=histories), want)


def test_device_scan_where_float32_rounding_differs_and_with_options():
    # multiples of 0.1: device and exact scores differ in the last bit, with many near-ties
    rng = np.random.default_rng(12)
    users = (rng.integers(-5, 6, (40, 20)) * 0.1).astype(np.float32)
    table = (rng.integers(-5, 6, (901, 20)) * 0.1).astype(np.float32)
    table[rng.integers(1, 901, 200)] = table[rng.integers(1, 901)]
    histories = rng.integers(0, 901, (40, 25))
    exclude = [rng.integers(0, 901, 10) if b % 3 else None for b in range(40)]
    candidates = [rng.integers(0, 901, 50) if b % 4 == 1 else None for b in range(40)]
    host = TopK(table, exclude_items=np.arange(1, 50))
    for max_block in (30 * 40, 1 << 20):
        index = DeviceTopK(table, exclude_items=np.arange(1, 50), device="/CPU:0",
                           max_block=max_block)
        assert_same(index(users, 30, histories=histories, exclude=exclude,
                          candidates=candidates),
                    host(users, 30, histories=histories, exclude=exclude,
                         candidates=candidates))


def test_device_scan_takes_every_path_of_the_exact_rescore():
    # duplicates straddling the k-th place: re-score the fast top k, the kept k + 16, or
    # search exactly on the host; all three give the brute-force answer
    rng = np.random.default_rng(4)
    dim, k = 8, 10
    users = rng.standard_normal((3, dim), dtype=np.float32)
    base = rng.standard_normal((400, dim), dtype=np.float32) * 0.1
    best = users.sum(0)
    for num_dup in (0, 5, 40):
        table = np.vstack([np.zeros((1, dim), np.float32), base])
        table[1 : k - 3] = best * 2
        table[200 : 200 + num_dup] = best
        want = brute_top_k(all_scores(users, table), allowed_mask(3, 400), k)
        assert_same(DeviceTopK(table, device="/CPU:0", max_block=100)(users, k), want)


def test_device_scan_turns_tensor_float_32_off():
    DeviceTopK(np.ones((3, 2), np.float32), device="/CPU:0")
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
