"""The parallel test run's own rules (tests/conftest.py): how many workers, how many torch threads each."""

from __future__ import annotations

from conftest import auto_workers, worker_torch_threads

GIB = 1 << 30


def test_workers_follow_the_cores_up_to_four_and_the_memory():
    assert auto_workers(2, 20 * GIB) == 2  # the 2-core CI machine: one per core
    assert auto_workers(64, 512 * GIB) == 4  # a big machine: never 64 napari + torch processes
    assert auto_workers(16, 9 * GIB) == 2  # 4 GiB of free memory per worker
    assert auto_workers(8, 1 * GIB) == 1 and auto_workers(1, None) == 1  # never none


def test_each_worker_takes_its_share_of_the_cores():
    assert worker_torch_threads(2, 2) == 1
    assert worker_torch_threads(16, 4) == 4
    assert worker_torch_threads(2, 4) == 1 and worker_torch_threads(4, 0) == 4
