"""An engine inherited through fork() refuses to work in the child instead of hanging, and the
parent's engine is unaffected."""

from __future__ import annotations

import os

import pytest

import stolon


@pytest.mark.timeout(60)
def test_forked_child_gets_an_error_and_parent_keeps_working() -> None:
    eng = stolon.TransferEngine("tcp")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = b"?"
        try:
            eng.write_imm(eng.address, 1)
            code = b"N"  # no error: wrong
        except stolon.ConfigError:
            code = b"E"
        except BaseException:
            code = b"X"
        eng.stop()  # must return at once in the child, not join the parent's worker
        os.write(w, code)
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"E"
    eng.write_imm(eng.address, 7).wait(10)
    eng.wait_imm(7, 1, timeout=10)
    eng.stop()
