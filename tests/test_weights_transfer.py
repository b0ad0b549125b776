"""Weight updates between real processes over tcp on loopback (stolon.weights, CPU path).

Training ranks and inference ranks are separate processes (``multiprocessing`` spawn), one
engine each; descriptors, addresses and hellos travel as bytes through the parent. Every update
is checked on every inference rank: bf16 shards bit-exact against the reference sharding, fp8
shards and tile scales bit-exact against the whole tensor converted in one place. The double
buffer is checked too: a held version stays intact while the next one lands, and the update
after that waits for the release.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from conftest import require_provider
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procpool import Pool, WorkerError

ml_dtypes = pytest.importorskip("ml_dtypes")

from stolon.weights import (  # noqa: E402
    DimShard,
    FlatGroup,
    FlatShard,
    InferenceLayout,
    ParamSpec,
    TrainingLayout,
    build_plan,
    col_shard,
    ep_tp_inference,
    fsdp_pp_ep_training,
    moe_model,
    row_shard,
    whole,
)
from stolon.weights.convert import quantize_blockwise  # noqa: E402

pytestmark = pytest.mark.timeout(240)

WORKERS = 6
TIMEOUT = 60.0


def tensors_for(params, seed: int, version: int) -> Dict[str, np.ndarray]:
    """The full bf16 parameters of update ``version`` (every process computes the same)."""
    rng = np.random.default_rng([seed, version + 1])
    out = {}
    for p in params:
        x = rng.standard_normal(p.shape).astype(np.float32)
        x *= np.float32(2.0) ** rng.integers(-8, 8, size=p.shape).astype(np.float32)
        out[p.name] = x.astype(ml_dtypes.bfloat16)
    return out


# ------------------------------------------------------------------------------------------------
# the child process
# ------------------------------------------------------------------------------------------------


def _cmd_setup(state: dict, role: str, rank: int, spec: dict) -> dict:
    import stolon
    from stolon.engine import loopback_nodes
    from stolon.weights import WeightReceiver, WeightSender

    train, infer = spec["train"], spec["infer"]
    plan = build_plan(train, infer)
    n = spec.get("domains", 1)
    eng = stolon.TransferEngine("tcp", n, nodes=loopback_nodes("tcp", n), spin_us=200)
    state.update(engine=eng, plan=plan, spec=spec, role=role, rank=rank)
    if role == "train":
        bufs = train.shard_buffers(rank, tensors_for(train.params, spec["seed"], -1))
        state["buffers"] = bufs
        state["obj"] = WeightSender(
            eng, plan, rank, bufs, timeout=TIMEOUT, **spec.get("sender", {})
        )
    else:
        rx_kw = spec.get("receiver", {})
        if isinstance(rx_kw, list):  # per inference rank
            rx_kw = rx_kw[rank]
        state["obj"] = WeightReceiver(eng, plan, rank, timeout=TIMEOUT, **rx_kw)
    return {"info": state["obj"].info(), "fingerprint": plan.fingerprint()}


def _cmd_connect(state: dict, infos: List[bytes]) -> dict:
    return state["obj"].connect(infos)


def _cmd_accept(state: dict, hellos: List[bytes]) -> None:
    state["obj"].accept(hellos)


def _cmd_push(state: dict, version: int) -> dict:
    train = state["spec"]["train"]
    fresh = train.shard_buffers(
        state["rank"], tensors_for(train.params, state["spec"]["seed"], version)
    )
    for name, arr in state["buffers"].items():  # the optimizer step, in place
        np.copyto(arr, fresh[name])
    return state["obj"].push(version)


def _snapshot_bytes(snap) -> dict:
    return {
        "version": snap.version,
        "tensors": {k: v.tobytes() for k, v in snap.tensors.items()},
        "scales": {k: v.tobytes() for k, v in snap.scales.items()},
    }


def _cmd_wait(state: dict, version: int, timeout: float) -> dict:
    return _snapshot_bytes(state["obj"].wait(version, timeout))


def _cmd_read(state: dict, version: int) -> dict:
    """The slot of ``version`` as it is now, without waiting (reader's view of a held version)."""
    from stolon.weights.execute import unpack_slot

    rx = state["obj"]
    return _snapshot_bytes(unpack_slot(rx.layout, rx.slot(version), version))


def _cmd_wait_expect_timeout(state: dict, version: int, timeout: float) -> Tuple[str, float]:
    t0 = time.monotonic()
    try:
        state["obj"].wait(version, timeout)
    except Exception as e:  # the class name goes back to the parent
        return type(e).__name__, time.monotonic() - t0
    return "no error", time.monotonic() - t0


def _cmd_release(state: dict, version: int) -> None:
    state["obj"].release(version)


def _cmd_teardown(state: dict) -> None:
    eng = state.get("engine")
    state.clear()
    if eng is not None:
        eng.stop()


@pytest.fixture(scope="module")
def pool():
    require_provider("tcp")
    p = Pool(WORKERS, __name__, TIMEOUT)
    yield p
    p.close()


class Cluster:
    """Training ranks on workers ``0 .. Ts-1``, inference ranks on the next ``Ti`` workers."""

    def __init__(
        self,
        pool: Pool,
        train: TrainingLayout,
        infer: InferenceLayout,
        *,
        seed: int,
        domains: int = 1,
        sender: Optional[dict] = None,
        receiver: Any = None,
        connect: bool = True,
    ) -> None:
        assert train.world + infer.world <= WORKERS
        self.pool = pool
        self.train, self.infer, self.seed = train, infer, seed
        self.tw = list(range(train.world))
        self.iw = list(range(train.world, train.world + infer.world))
        spec = {
            "train": train,
            "infer": infer,
            "seed": seed,
            "domains": domains,
            "sender": sender or {},
            "receiver": receiver or {},
        }
        per = [{"role": "train", "rank": r} for r in range(train.world)]
        per += [{"role": "infer", "rank": d} for d in range(infer.world)]
        out = pool.all(self.tw + self.iw, "setup", per=per, spec=spec)
        assert len({o["fingerprint"] for o in out}) == 1  # every process built the same plan
        self.infos = [o["info"] for o in out]
        if connect:
            self.connect()

    def connect(self) -> None:
        pool, train, infer, infos = self.pool, self.train, self.infer, self.infos
        hellos: Dict[Tuple[str, int], List[bytes]] = {}
        for h in pool.all(self.tw, "connect", infos=infos):
            for k, b in h.items():
                hellos.setdefault(k, []).append(b)
        pool.all(
            self.tw,
            "accept",
            per=[{"hellos": hellos.get(("train", r), [])} for r in range(train.world)],
        )
        pool.all(
            self.iw,
            "accept",
            per=[{"hellos": hellos.get(("infer", d), [])} for d in range(infer.world)],
        )

    def start_push(self, v: int) -> None:
        for i in self.tw:
            self.pool.send(i, "push", version=v)

    def finish_push(self) -> List[dict]:
        return [self.pool.recv(i) for i in self.tw]

    def push(self, v: int) -> List[dict]:
        self.start_push(v)
        return self.finish_push()

    def wait(self, v: int) -> List[dict]:
        return self.pool.all(self.iw, "wait", version=v, timeout=TIMEOUT)

    def read(self, v: int) -> List[dict]:
        return self.pool.all(self.iw, "read", version=v)

    def release(self, v: int) -> None:
        self.pool.all(self.iw, "release", version=v)

    def check(self, v: int, snaps: List[dict]) -> int:
        """Asserts every inference rank holds exactly update ``v``; returns bytes checked."""
        full = tensors_for(self.train.params, self.seed, v)
        infer = self.infer
        checked = 0
        for d, snap in enumerate(snaps):
            assert snap["version"] == v
            for name, got in snap["tensors"].items():
                if infer.is_fp8(name):
                    q, sc = quantize_blockwise(full[name], infer.block)
                    want = np.ascontiguousarray(infer.reference_shard(name, d, q)).tobytes()
                    lo, hi = infer.scale_box(name, d)
                    want_sc = np.ascontiguousarray(sc[lo[0] : hi[0], lo[1] : hi[1]]).tobytes()
                    assert snap["scales"][name] == want_sc, (v, d, name, "scales")
                else:
                    want = np.ascontiguousarray(
                        infer.reference_shard(name, d, full[name])
                    ).tobytes()
                assert got == want, (v, d, name)
                checked += len(got)
        return checked

    def close(self) -> None:
        self.pool.all(self.tw + self.iw, "teardown")


def small_moe(layers: int = 3, experts: int = 8):
    return moe_model(
        layers=layers,
        dense_layers=1,
        experts=experts,
        hidden=64,
        expert_inter=32,
        dense_inter=96,
        shared_experts=1,
        vocab=160,
        heads=2,
        q_lora=48,
        kv_lora=32,
        qk_nope=16,
        qk_rope=8,
        v_head=16,
    )


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_moe_4_to_2_fp8_double_buffered(pool):
    """4 training ranks (PP2 x EP2, FSDP shards split unevenly so fp8 tiles are shared between
    ranks) to 2 inference ranks (EP2 / TP2, fp8 weights): four updates, each exact; a held
    version stays intact while the next lands, and the one after waits for the release."""
    model = small_moe()
    train = fsdp_pp_ep_training(model, pp=2, ep=2, fsdp=1, align=7)
    infer = ep_tp_inference(model, world=2, ep=2, tp=2)
    infer.block = (16, 16)
    plan = build_plan(train, infer)
    assert plan.shared_param.size > 0 and len(plan.scales) > 0
    c = Cluster(pool, train, infer, seed=11, sender={"staging_bytes": 8192, "depth": 3})
    try:
        c.push(0)
        c.check(0, c.wait(0))
        # hold 0; update 1 lands in the other slot, and 0 is untouched
        c.push(1)
        c.check(0, c.read(0))
        c.check(1, c.wait(1))
        # update 2 needs slot 0, which nobody released: the senders wait
        c.start_push(2)
        time.sleep(1.0)
        assert not any(pool.conns[i].poll(0) for i in c.tw), "update 2 did not wait for release"
        c.check(0, c.read(0))
        c.check(1, c.read(1))
        c.release(0)
        stats = c.finish_push()
        assert all(s["release_wait_s"] > 0.2 for s in stats if s["writes"] > 0)
        c.check(2, c.wait(2))
        c.check(1, c.read(1))
        c.release(1)
        c.push(3)
        assert c.check(3, c.wait(3)) > 0
        # a version nobody pushes times out, with stolon's timeout error
        name, took = pool.all(c.iw[:1], "wait_expect_timeout", version=9, timeout=0.3)[0]
        assert name == "TransferTimeoutError" and 0.25 < took < 5
    finally:
        c.close()


def test_2_to_3_staged_host_copy_two_domains(pool):
    """2 training ranks to 3 inference ranks, uneven shards, a 3-d tensor, replicated norms;
    every parameter through the staging ring (host copy), engines with 2 domains."""
    params = (
        ParamSpec("a", (37, 50)),
        ParamSpec("b", (64,)),
        ParamSpec("c", (9, 5, 13)),
        ParamSpec("d", (70, 33)),
        ParamSpec("e", (300, 260)),
    )
    train = TrainingLayout(
        params,
        2,
        {
            "a": (FlatShard("g"),),
            "b": (FlatShard("g"),),
            "c": (DimShard((1, 0), 1),),
            "d": (row_shard((1, 0)),),
            "e": (FlatShard("g"),),
        },
        {"g": FlatGroup("g", ("b", "e", "a"), (0, 1), align=3)},
    )
    infer = InferenceLayout(
        params,
        3,
        {
            "a": (col_shard((0, 1, 2)),),
            "b": tuple(whole(r) for r in range(3)),
            "c": (DimShard((2, 0, 1), 2),),
            "d": (row_shard((0, 1, 2)),),
            "e": (col_shard((1, 2)), whole(0)),
        },
        {"a": "float8_e4m3fn", "e": "float8_e4m3fn"},
        block=(32, 32),
    )
    c = Cluster(
        pool,
        train,
        infer,
        seed=5,
        domains=2,
        sender={"staging_bytes": 16384, "depth": 2, "host_copy": True},
    )
    try:
        for v in range(3):
            c.push(v)
            c.check(v, c.wait(v))
            c.release(v)
    finally:
        c.close()


def test_one_slot_updates_land_where_the_released_version_was(pool):
    """slots=1: half the inference memory. Update v + 1 waits until every receiver released v
    (whose bytes stay intact until then), then lands in the same slot, exact; 2 -> 2, fp8."""
    model = small_moe()
    train = fsdp_pp_ep_training(model, pp=2, ep=1, fsdp=1, align=5)
    infer = ep_tp_inference(model, world=2, ep=2, tp=2)
    infer.block = (16, 16)
    c = Cluster(pool, train, infer, seed=13, receiver={"slots": 1})
    try:
        c.push(0)
        c.check(0, c.wait(0))
        c.start_push(1)
        time.sleep(1.0)
        assert not any(pool.conns[i].poll(0) for i in c.tw), "update 1 did not wait for release"
        c.check(0, c.read(0))  # still whole: nothing of update 1 was written
        c.release(0)
        c.finish_push()
        c.check(1, c.wait(1))
        c.release(1)
        c.push(2)
        assert c.check(2, c.wait(2)) > 0
    finally:
        c.close()


def test_receivers_must_agree_on_the_number_of_slots(pool):
    """A sender refuses receivers with different slot counts (it could not tell which release
    frees which slot), naming them; nothing is written."""
    params = (ParamSpec("w", (64, 32)),)
    train = TrainingLayout(params, 1, {"w": (whole(0),)})
    infer = InferenceLayout(params, 2, {"w": (row_shard((0, 1)),)})
    c = Cluster(pool, train, infer, seed=1, receiver=[{"slots": 1}, {"slots": 2}], connect=False)
    try:
        with pytest.raises(WorkerError, match="must use the same number"):
            c.connect()
    finally:
        c.close()


def test_large_bf16_direct_writes_two_domains(pool):
    """Multi-MiB bf16 tensors written straight from the registered training buffers (no staging):
    writes above the engine's shard threshold are split over both domains; 4 -> 2 ranks. The
    column shard's rows are 64 KiB, long enough to go out one by one rather than packed."""
    params = (
        ParamSpec("big", (1536, 1024)),  # 3 MiB
        ParamSpec("col", (16, 65536)),
        ParamSpec("vec", (4096,)),
    )
    train = TrainingLayout(
        params,
        4,
        {"big": (FlatShard("g"),), "vec": (FlatShard("g"),), "col": (row_shard((2, 3, 0, 1)),)},
        {"g": FlatGroup("g", ("vec", "big"), (3, 1, 0, 2), align=1)},
    )
    infer = InferenceLayout(
        params,
        2,
        {"big": (row_shard((1, 0)),), "col": (col_shard((0, 1)),), "vec": (whole(0), whole(1))},
    )
    c = Cluster(pool, train, infer, seed=3, domains=2, sender={"depth": 2})
    try:
        for v in range(2):
            stats = c.push(v)
            assert sum(s["fill_s"] for s in stats) == 0.0  # nothing went through staging
            assert c.check(v, c.wait(v)) == 2 * (1536 * 1024 + 16 * 65536) + 2 * 2 * 4096
            c.release(v)
    finally:
        c.close()


def test_short_bf16_rows_of_column_shards_are_packed(pool):
    """bf16 column shards with short rows (resident, no conversion): the sender packs each
    range's rows through its staging buffer and writes it once; every byte lands; 2 -> 3."""
    params = (ParamSpec("col", (96, 384)), ParamSpec("row", (64, 64)))
    train = TrainingLayout(params, 2, {"col": (row_shard((1, 0)),), "row": (row_shard((0, 1)),)})
    infer = InferenceLayout(
        params, 3, {"col": (col_shard((0, 1, 2)),), "row": (row_shard((2, 1, 0)),)}
    )
    c = Cluster(pool, train, infer, seed=8, sender={"depth": 2, "staging_bytes": 8192})
    try:
        for v in range(2):
            stats = c.push(v)
            assert sum(s["fill_s"] for s in stats) > 0.0  # the column rows went through staging
            assert c.check(v, c.wait(v)) == 2 * (96 * 384 + 64 * 64)
            c.release(v)
    finally:
        c.close()


def _random_layouts():
    from test_weights_plan import random_layouts

    return random_layouts(max_world=3, max_dim=60)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(layouts=_random_layouts(), seed=st.integers(0, 2**31), host_copy=st.booleans())
def test_random_layouts_over_tcp(pool, layouts, seed, host_copy):
    train, infer = layouts
    c = Cluster(
        pool,
        train,
        infer,
        seed=seed,
        sender={"staging_bytes": 1024, "depth": 2, "host_copy": host_copy},
    )
    try:
        for v in range(2):
            c.push(v)
            c.check(v, c.wait(v))
            c.release(v)
    finally:
        c.close()


def test_handshake_refuses_mismatched_plans_and_missing_hellos():
    """In one process: a sender refuses a receiver built from another plan, a receiver refuses
    to start without a hello from every sender, and pushing before connecting is an error."""
    import stolon
    from stolon.engine import loopback_nodes
    from stolon.weights import WeightReceiver, WeightSender, WeightTransferError

    require_provider("tcp")
    params = (ParamSpec("w", (8, 8)),)
    train = TrainingLayout(params, 2, {"w": (row_shard((0, 1)),)})
    infer = InferenceLayout(params, 1, {"w": (whole(0),)})
    other = InferenceLayout(params, 1, {"w": (whole(0),)}, {"w": "float8_e4m3fn"}, (4, 4))
    plan, plan2 = build_plan(train, infer), build_plan(train, other)
    engines = [stolon.TransferEngine("tcp", 1, nodes=loopback_nodes("tcp", 1)) for _ in range(4)]
    try:
        full = tensors_for(params, 0, 0)
        s0 = WeightSender(engines[0], plan, 0, train.shard_buffers(0, full))
        s1 = WeightSender(engines[1], plan, 1, train.shard_buffers(1, full))
        rx = WeightReceiver(engines[2], plan, 0)
        rx_other = WeightReceiver(engines[3], plan2, 0)
        with pytest.raises(WeightTransferError, match="connect"):
            s0.push(0)
        with pytest.raises(WeightTransferError, match="plan differs"):
            s0.connect([rx_other.info()])
        with pytest.raises(WeightTransferError, match="no info"):
            s0.connect([s1.info()])
        h0 = s0.connect([rx.info()])
        assert set(h0) == {("infer", 0)}
        with pytest.raises(WeightTransferError, match="expected"):
            rx.accept([h0[("infer", 0)]])  # rank 1's hello is missing
        with pytest.raises(WeightTransferError, match="different plan"):
            rx_other.accept([h0[("infer", 0)], s1.connect([rx.info()])[("infer", 0)]])
        with pytest.raises(WeightTransferError, match="malformed"):
            rx.accept([b"not json"])
    finally:
        for e in engines:
            e.stop()
