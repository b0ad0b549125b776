"""MoE all-to-all on the CPU: the torch references and the Python-side validation (issue 5).

The kernels need a GPU (tests/test_moe_gpu.py). Here: the references the GPU tests trust are
checked against naive loops, every bad argument to `AllToAll` raises its typed error before
anything reaches the native layer, and building one without CUDA fails clearly.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stolon.errors import (  # noqa: E402
    AllToAllError,
    CudaUnavailableError,
    InvalidArgumentError,
    StolonError,
)
from stolon.moe import (  # noqa: E402
    AllToAll,
    dequantize_fp8,
    expected_rows,
    moe_reference,
    quantize_fp8,
)


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(1, 5),
    epr=st.integers(1, 9),
    topk=st.integers(1, 6),
    tokens=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_expected_rows_matches_a_naive_loop(world, epr, topk, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    experts = world * epr
    idx = [
        torch.randint(0, experts, (tokens[r % len(tokens)], topk), generator=g)
        for r in range(world)
    ]
    for rank in range(world):
        rows = expected_rows(idx, experts, rank)
        assert [r.expert for r in rows] == list(range(rank * epr, (rank + 1) * epr))
        offset = 0
        for r in rows:
            assert r.offset == offset
            naive = [
                {
                    (t, k)
                    for t in range(idx[s].shape[0])
                    for k in range(topk)
                    if idx[s][t, k] == r.expert
                }
                for s in range(world)
            ]
            assert r.by_source == naive
            offset += r.count
        assert offset == sum(int(((i // epr) == rank).sum()) for i in idx)


@pytest.mark.parametrize("hidden", [16, 128, 130, 7168])
def test_fp8_quantisation_round_trip(hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn((33, hidden), generator=g) * 10
    x[3] = 0  # an all-zero row gets scale 1
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (33, -(-hidden // 128)) and s.dtype == torch.float32
    assert torch.all(s[3] == 1)
    back = dequantize_fp8(q, s)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of each block's max.
    blockmax = torch.repeat_interleave(s * 448, 128, dim=1)[:, :hidden]
    assert torch.all((back - x).abs() <= blockmax * 2**-4 + 1e-6)


def test_moe_reference_matches_a_naive_sum():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn((5, 8), generator=g) for _ in range(2)]
    idx = [
        torch.tensor([[0, 3], [1, 1], [2, 0], [3, 2], [1, 0]]),
        torch.zeros((5, 2), dtype=torch.int64),
    ]
    ws = [torch.rand((5, 2), generator=g) for _ in range(2)]
    f = lambda e, rows: rows * (e + 1) + e  # noqa: E731
    out = moe_reference(xs, idx, ws, f, torch.float32)
    for r in range(2):
        for t in range(5):
            want = sum(ws[r][t, k] * f(int(idx[r][t, k]), xs[r][t]) for k in range(2))
            assert torch.allclose(out[r][t], want, atol=1e-5)


def _build(world: int = 1, **kw) -> AllToAll:
    """A small all-to-all for rank 0 of `world`, handles exchanged in-process."""
    args = dict(num_experts=8, topk=2, hidden=64, max_tokens=4, rank=0, world_size=world)
    return AllToAll(**args, exchange=lambda h: [h] * world, **kw)


def test_no_cuda_device_is_a_typed_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CudaUnavailableError, match="no CUDA device"):
        _build()


def test_building_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU tests cover construction")
    with pytest.raises((CudaUnavailableError, InvalidArgumentError)) as ei:
        _build(device="cuda:0")
    assert isinstance(ei.value, StolonError)


def test_other_nodes_need_an_engine():
    with pytest.raises(InvalidArgumentError, match="reached through a TransferEngine"):
        _build(2, ranks_per_node=1, device="cuda:0")
    with pytest.raises(InvalidArgumentError, match="must divide the world"):
        _build(4, ranks_per_node=3, device="cuda:0")


def test_bad_config_is_rejected_before_cuda():
    with pytest.raises(InvalidArgumentError, match="dispatch_dtype"):
        _build(dispatch_dtype=torch.int8)
    with pytest.raises(InvalidArgumentError, match="combine_dtype"):
        _build(combine_dtype=torch.float8_e4m3fn)
    with pytest.raises(InvalidArgumentError, match="rank= and world_size="):
        AllToAll(num_experts=8, topk=2, hidden=64, max_tokens=4, exchange=lambda h: [h])
    with pytest.raises(InvalidArgumentError, match="CUDA device"):
        _build(device="cpu")


class _RecordingNative:
    """Test double for the native kernels: records launches. It stands in for the GPU only to
    check what reaches it (or that nothing does); the kernels are tested on GPUs."""

    def __init__(self) -> None:
        self.calls: list = []

    def __getattr__(self, name):
        return lambda *a: self.calls.append((name, a))


def _a2a(fp8: bool = False, **kw) -> AllToAll:
    """An AllToAll on the CPU whose launches go to the recording double."""
    a = object.__new__(AllToAll)
    a._torch = torch
    a.device = torch.device("cpu")
    a.rank, a.world_size = 0, 2
    a.num_experts, a.topk, a.hidden, a.max_tokens = 8, 2, 64, 16
    a.dispatch_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    a.combine_dtype = torch.bfloat16
    a.fp8 = fp8
    a.scales_per_token = 1 if fp8 else 0
    a.capacity, a.experts_per_rank, a.timeout = 64, 4, 1.0
    a._native = _RecordingNative()
    a._next, a._graph_tokens, a._ntok, a._keep = 0, False, 0, ()
    a._stream = lambda: 0
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _inputs(n=4, fp8=False):
    x = torch.zeros((n, 64), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
    return x, torch.zeros((n, 2), dtype=torch.int64), torch.zeros((n, 2))


BAD_DISPATCH = [
    ("x must be a torch.Tensor", lambda x, i, w: ([1, 2], i, w)),
    ("dtype", lambda x, i, w: (x.float(), i, w)),
    ("shape", lambda x, i, w: (x[:, :32], i, w)),
    ("contiguous", lambda x, i, w: (torch.zeros((64, 4), dtype=x.dtype).t(), i, w)),
    (
        "more than|at most",
        lambda x, i, w: (
            torch.zeros((17, 64), dtype=x.dtype),
            torch.zeros((17, 2), dtype=torch.int64),
            torch.zeros((17, 2)),
        ),
    ),
    ("topk_idx has dtype", lambda x, i, w: (x, i.float(), w)),
    ("topk_idx must have shape", lambda x, i, w: (x, i[:, :1], w)),
    ("topk_idx must have 4 rows", lambda x, i, w: (x, i[:3], w)),
    ("topk_weights has dtype", lambda x, i, w: (x, i, w.double())),
    (
        "aligned",
        lambda x, i, w: (
            torch.zeros((5, 68), dtype=x.dtype)[:, 4:],
            torch.zeros((5, 2), dtype=torch.int64),
            torch.zeros((5, 2)),
        ),
    ),
]


@pytest.mark.parametrize("msg,mutate", BAD_DISPATCH, ids=[m for m, _ in BAD_DISPATCH])
def test_bad_dispatch_inputs_raise_before_launch(msg, mutate):
    a = _a2a()
    args = mutate(*_inputs())
    with pytest.raises(InvalidArgumentError, match=msg):
        a.dispatch_send(*args)
    assert a._native.calls == [] and a._next == 0


def test_scales_rules_and_token_counts():
    a = _a2a(fp8=True)
    x, i, w = _inputs(fp8=True)
    with pytest.raises(InvalidArgumentError, match="needs x_scales"):
        a.dispatch_send(x, i, w)
    with pytest.raises(InvalidArgumentError, match="x_scales has dtype"):
        a.dispatch_send(x, i, w, torch.zeros((4, 1), dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="num_tokens 5"):
        a.dispatch_send(x, i, w, torch.zeros((4, 1)), num_tokens=5)
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        a.dispatch_send(x, i, w, torch.zeros((4, 1)), num_tokens=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(InvalidArgumentError, match="outside 0..7"):
        a.dispatch_send(x, i + 8, w, torch.zeros((4, 1)), check_routing=True)
    assert a._native.calls == []
    b = _a2a()
    with pytest.raises(InvalidArgumentError, match="only for float8"):
        b.dispatch_send(*_inputs(), torch.zeros((4, 1)))
    b.dispatch_send(*_inputs(), num_tokens=3)
    name, args = b._native.calls[0]
    assert name == "dispatch_send" and args[10] == 3 and args[11] == 0


def test_phases_must_run_in_order():
    a = _a2a()
    with pytest.raises(AllToAllError, match="next phase of this step is dispatch_send"):
        a.combine_recv()
    a.dispatch_send(*_inputs())
    with pytest.raises(AllToAllError, match="dispatch_recv"):
        a.dispatch_send(*_inputs())
    out = a.dispatch_recv()
    assert out.x.shape == (64, 64) and out.counts.shape == (4,) and out.offsets.shape == (5,)
    with pytest.raises(InvalidArgumentError, match="expert_y must have 64 rows"):
        a.combine_send(torch.zeros((63, 64), dtype=torch.bfloat16))
    a.combine_send(torch.zeros((64, 64), dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match="needs out="):
        a.combine_recv(accumulate=True)
    res = a.combine_recv()
    assert res.shape == (4, 64)
    assert [c[0] for c in a._native.calls] == [
        "dispatch_send",
        "dispatch_recv",
        "combine_send",
        "combine_recv",
    ]


def test_whole_dispatch_is_one_native_call_and_both_phases():
    """`dispatch` checks inputs and outputs like the halves, passes `overlap` through, and
    counts as both dispatch phases."""
    a = _a2a()
    x, i, w = _inputs()
    with pytest.raises(InvalidArgumentError, match="topk_idx must have 4 rows"):
        a.dispatch(x, i[:3], w, overlap=True)
    bad_out = a._outputs(None)
    bad_out.counts = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(InvalidArgumentError, match="out.counts"):
        a.dispatch(x, i, w, out=bad_out)
    assert a._native.calls == [] and a._next == 0
    out = a.dispatch(x, i, w, num_tokens=2, overlap=True)
    assert out.x.shape == (64, 64) and a._next == 2
    ((name, args),) = a._native.calls
    assert name == "dispatch" and args[10] == 2 and args[-1] is True
    assert args[12:16] == (out.x.data_ptr(), 0, out.counts.data_ptr(), out.offsets.data_ptr())
    with pytest.raises(AllToAllError, match="combine_send"):
        a.dispatch(x, i, w)
    a.combine(torch.zeros((64, 64), dtype=torch.bfloat16))
    a.dispatch(x, i, w)
    assert a._native.calls[-1][1][-1] is None


def test_whole_combine_is_one_native_call_and_both_phases():
    """`combine` checks the expert outputs and the result like the halves, passes `overlap`
    and `accumulate` through, and counts as both combine phases; a bad argument sends
    nothing."""
    a = _a2a()
    x, i, w = _inputs()
    a.dispatch(x, i, w)
    a._native.calls.clear()
    y = torch.zeros((64, 64), dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="expert_y must have 64 rows"):
        a.combine(y[:63], overlap=True)
    with pytest.raises(InvalidArgumentError, match="out has 3 rows"):
        a.combine(y, out=torch.zeros((3, 64), dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match="needs out="):
        a.combine(y, accumulate=True)
    assert a._native.calls == [] and a._next == 2
    out = torch.zeros((4, 64), dtype=torch.bfloat16)
    assert a.combine(y, out=out, accumulate=True, overlap=True) is out
    ((name, args),) = a._native.calls
    assert name == "combine" and args[1:] == (
        y.data_ptr(),
        128,
        out.data_ptr(),
        128,
        True,
        True,
    )
    assert a._next == 0
    a.dispatch(x, i, w)
    res = a.combine(y)
    assert res.shape == (4, 64) and a._native.calls[-1][1][-2:] == (False, None)
