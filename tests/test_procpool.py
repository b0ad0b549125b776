"""The worker pool the GPU tests and benchmarks share (benchmarks/procpool.py): after a command
fails on one worker, the others' late answers must not be taken for the next command's."""

from __future__ import annotations

import time

import pytest
from procpool import Pool, WorkerError


def _cmd_echo(state: dict, value: int, delay: float = 0.0, fail: bool = False) -> int:
    time.sleep(delay)
    if fail:
        raise ValueError(f"failing on purpose with {value}")
    return value


@pytest.fixture(scope="module")
def pool():
    p = Pool(2, __name__, timeout=20)
    yield p
    p.close()


def test_a_failure_waits_for_every_answer_then_later_commands_get_their_own(pool):
    with pytest.raises(WorkerError, match="failing on purpose with 1"):
        pool.all([0, 1], "echo", per=[{"value": 1, "fail": True}, {"value": 2, "delay": 0.3}])
    assert pool.all([0, 1], "echo", per=[{"value": 3}, {"value": 4}]) == [3, 4]


def test_an_answer_that_arrives_after_its_timeout_is_dropped(pool):
    pool.send(1, "echo", value=5, delay=0.5)
    with pytest.raises(WorkerError, match="gave no answer"):
        pool.recv(1, timeout=0.05)
    assert pool.call(1, "echo", value=6) == 6
