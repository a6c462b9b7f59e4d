"""The reduce hook: `LOCAL` is the identity, and `DistributedReduce` over two gloo processes
(no Ray) makes a sharded fit equal the in-process fit on all rows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import build_calibrator
from pipeline.calibrators.reduce import LOCAL, DistributedReduce
from pipeline.calibrators.training import batch_plan
from tests.conftest import make_logits


def test_local_reduce_is_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert LOCAL.sum(x) is x
    assert LOCAL.gather(x) is x
    assert LOCAL.sum_floats(1.5, 2) == (1.5, 2)
    assert LOCAL.agree(0.25) == 0.25
    assert LOCAL.share(7) == 1.0
    assert (LOCAL.rank, LOCAL.world_size) == (0, 1)


@pytest.mark.parametrize(("n", "batch", "expected"), [
    pytest.param(10, 4, (4, 2, 1.0), id="batches"),
    pytest.param(3, 8, (3, 1, 1.0), id="fewer-rows-than-a-batch"),
])
def test_batch_plan_in_process(n, batch, expected):
    assert batch_plan(n, batch, LOCAL) == expected


def test_distributed_reduce_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        DistributedReduce()


# Fitted on 2 shards of unequal size; the in-process reference fits all rows.
NAMES = ("temperature", "vector", "ets", "meta_cal", "dirichlet")


def _pixels():
    logits, labels = make_logits(6, 5, 12, 12, scale=2.5, seed=4)
    return logits.movedim(1, -1).reshape(-1, 5), labels.reshape(-1)


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        reduce = DistributedReduce()
        x = torch.tensor([[1.0 + rank, 2.0]])
        checks = {
            "sum": reduce.sum(x).tolist(),
            "floats": reduce.sum_floats(1.0, rank),
            "gather": reduce.gather(torch.arange(rank + 1.0)).tolist(),
            "agree": reduce.agree(10.0 + rank),
            "share": reduce.share(1 + 2 * rank),
            "plan": batch_plan(3 + rank, 4, reduce),
        }
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.full((2,), 1.0 + rank)
        reduce.grads([param])
        checks["grads"] = param.grad.tolist()
        logits, labels = _pixels()
        cut = len(labels) // 3  # unequal shards: 1/3 and 2/3 of the rows
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        states = {}
        for name in NAMES:
            calibrator = build_calibrator(name, 5)
            calibrator.fit(logits[part], labels[part], seed=0, reduce=reduce)
            states[name] = calibrator.state_dict()
        if rank == 0:
            torch.save({"checks": checks, "states": states}, out_file)
        # Both ranks finish their collectives before either tears gloo down: a rank that
        # destroys the group while its peer still holds the connection can abort in gloo's
        # threads ("terminate called without an active exception", seen once in make test).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reduce")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "out.pt")), nprocs=2, join=True)
    return torch.load(tmp / "out.pt")


def test_distributed_reduce_collectives(two_workers):
    checks = two_workers["checks"]
    assert checks["sum"] == [[3.0, 4.0]]
    assert checks["floats"] == (2.0, 1.0)
    assert checks["gather"] == [0.0, 0.0, 1.0]
    assert checks["agree"] == 10.0
    assert checks["share"] == pytest.approx(0.25)
    assert checks["grads"] == [3.0, 3.0]
    # 7 rows, batches of 4: one step per epoch, each worker on its share of the batch.
    size, steps, weight = checks["plan"]
    assert (size, steps) == (2, 1)
    assert weight == pytest.approx(0.5)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_fit_equals_the_in_process_fit(two_workers, name):
    logits, labels = _pixels()
    local = build_calibrator(name, 5).fit(logits, labels, seed=0)
    sharded = build_calibrator(name, 5)
    sharded.load_state_dict(two_workers["states"][name])
    with torch.no_grad():
        nll_local = float(F.cross_entropy(local(logits), labels))
        nll_sharded = float(F.cross_entropy(sharded(logits), labels))
    # Newton / closed form (T, meta_cal's quantile): float summation order only. L-BFGS stops
    # where float32 loss changes vanish: the objective agrees, flat directions (e.g. Dirichlet
    # weights under ODIR) need not.
    assert nll_sharded == pytest.approx(nll_local, abs=1e-4)
    if name in ("temperature", "meta_cal"):
        for key, value in local.state_dict().items():
            torch.testing.assert_close(sharded.state_dict()[key], value, rtol=1e-5, atol=0)


class _Shards(type(LOCAL)):
    """A non-identity hook (one worker): what a Ray Train worker passes."""


def test_a_calibrator_without_the_capability_refuses_a_sharded_fit():
    logits, labels = _pixels()
    calibrator = build_calibrator("temperature", 5)
    calibrator.distributed = False
    with pytest.raises(RuntimeError, match="`distributed = True` for a sharded fit"):
        calibrator.fit(logits, labels, reduce=_Shards())


def test_selective_on_a_base_that_cannot_run_sharded_cannot_either(monkeypatch):
    from pipeline.calibrators import CALIBRATORS

    monkeypatch.setattr(CALIBRATORS["vector"], "distributed", False)
    assert build_calibrator("selective", 5).distributed
    assert not build_calibrator("selective", 5, base="vector").distributed


def test_sharded_hook_of_one_worker_fits_like_the_plain_loop():
    logits, labels = _pixels()
    plain = build_calibrator("vector", 5).fit(logits, labels, seed=0)
    hooked = build_calibrator("vector", 5).fit(logits, labels, seed=0, reduce=_Shards())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(hooked.state_dict()[key], value, rtol=0, atol=0)
