"""The dynamic batcher and padding, with a fake model whose answer identifies its input."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import BatcherConfig, DynamicBatcher
from service.errors import DeadlineExpired, EngineFailure, NotReady, Overloaded
from service.metrics import Metrics
from service.padding import EngineInputs, EngineOutputs, ShapeBuckets, UserInputs, UserOutputs, pad_batch, powers_of_two, split_batch

ITEM_WIDTH = 3


class FakeModel:
    """Scores each query item by (its first code + the user's support label sum), so every
    caller can check it got its own answer; records the shape of every batch."""

    def __init__(self, buckets: ShapeBuckets | None = None) -> None:
        self.buckets = buckets or ShapeBuckets.build(1, 64, 4, 1024)
        self.batches: list[tuple[int, int, int]] = []  # (users, support, query)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        if self.fail:
            raise RuntimeError("engine exploded")
        b, s, _ = inputs.support_items.shape
        q = inputs.query_items.shape[1]
        self.batches.append((b, s, q))
        label_sum = (inputs.support_labels * inputs.support_mask).sum(axis=1)
        scores = inputs.query_items[:, :, 0].astype(np.float32) + label_sum[:, None]
        return EngineOutputs(scores, inputs.support_mask.sum(axis=1), label_sum)

    def query_bucket(self, user: UserInputs) -> int:
        return self.buckets.query_length(user.query_size)

    def run_users(self, users: list[UserInputs], support_length: int, query_length: int) -> list[UserOutputs]:
        return split_batch(self.run(pad_batch(users, support_length, query_length)), users)


def user(n_support: int, n_query: int, seed: int) -> UserInputs:
    rng = np.random.default_rng(seed)
    return UserInputs(
        user_features=np.zeros(2, dtype=np.int64),
        support_items=rng.integers(2, 9, size=(n_support, ITEM_WIDTH)),
        support_labels=rng.uniform(1, 5, size=n_support).astype(np.float32),
        query_items=rng.integers(2, 1000, size=(n_query, ITEM_WIDTH)),
    )


def expected(u: UserInputs) -> np.ndarray:
    return u.query_items[:, 0].astype(np.float32) + u.support_labels.sum(dtype=np.float32)


def run(coroutine_fn, config: BatcherConfig):
    """Runs `coroutine_fn(batcher, metrics)` on a fresh loop with a started batcher."""

    async def main():
        metrics = Metrics()
        batcher = DynamicBatcher(config, metrics)
        batcher.start()
        try:
            return await coroutine_fn(batcher, metrics)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_every_caller_gets_its_own_answer():
    model = FakeModel()
    users = [user(n_support=k % 23, n_query=1 + (k * 7) % 300, seed=k) for k in range(300)]

    async def go(batcher, metrics):
        return await asyncio.gather(*(batcher.submit(model, u) for u in users))

    outputs = run(go, BatcherConfig(max_batch_size=16, max_wait_s=0.005, queue_size=512))
    for u, out in zip(users, outputs):
        np.testing.assert_allclose(out.query_scores, expected(u), rtol=1e-6)
        assert out.support_loss_before == u.support_size  # the fake's mask sum: padding was masked
    assert max(b for b, _, _ in model.batches) <= 16
    assert len(model.batches) < len(users)  # batching happened


def test_batches_group_by_query_bucket():
    """A user with 1000 candidates does not force small requests to pad to 1000."""
    model = FakeModel()
    small = [user(3, 10, seed=k) for k in range(8)]
    large = user(3, 1000, seed=99)

    async def go(batcher, metrics):
        return await asyncio.gather(*(batcher.submit(model, u) for u in [*small, large]))

    run(go, BatcherConfig(max_batch_size=16, max_wait_s=0.05))
    assert sorted(q for _, _, q in model.batches) == [16, 1024]
    assert {(b, q) for b, _, q in model.batches} == {(8, 16), (1, 1024)}


def test_padding_follows_the_buckets():
    model = FakeModel(ShapeBuckets.build(1, 32, 4, 64))

    async def go(batcher, metrics):
        return await batcher.submit(model, user(5, 9, seed=1))

    run(go, BatcherConfig())
    assert model.batches == [(1, 8, 16)]


def test_zero_interactions_pad_to_one_masked_slot():
    inputs = pad_batch([user(0, 2, seed=0), user(0, 3, seed=1)], support_length=1, query_length=4)
    assert inputs.support_items.shape == (2, 1, ITEM_WIDTH)
    assert not inputs.support_mask.any() and not inputs.support_items.any()
    assert not inputs.query_items[0, 2:].any()  # padding items are all-zero code rows


def test_pad_batch_places_each_user():
    a, b = user(2, 3, seed=0), user(4, 1, seed=1)
    inputs = pad_batch([a, b], support_length=4, query_length=4)
    np.testing.assert_array_equal(inputs.support_mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(inputs.support_items[0, :2], a.support_items)
    np.testing.assert_array_equal(inputs.query_items[1, :1], b.query_items)
    assert not inputs.support_labels[0, 2:].any()


def test_buckets():
    assert powers_of_two(1, 100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert powers_of_two(16, 16) == (16,)
    buckets = ShapeBuckets.build(1, 32, 16, 150)
    assert buckets.support_length(0) == 1 and buckets.support_length(5) == 8 and buckets.support_length(32) == 32
    assert buckets.query_length(1) == 16 and buckets.query_length(129) == 150
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        buckets.query_length(151)
    with pytest.raises(ValueError):
        ShapeBuckets((4, 2), (1,))


def test_engine_failure_reaches_every_caller_and_the_batcher_recovers():
    model = FakeModel()
    model.fail = True

    async def go(batcher, metrics):
        results = await asyncio.gather(*(batcher.submit(model, user(2, 5, seed=k)) for k in range(40)), return_exceptions=True)
        model.fail = False
        after = await batcher.submit(model, user(2, 5, seed=0))
        return results, after

    results, after = run(go, BatcherConfig(max_batch_size=8, max_wait_s=0.001))
    assert all(isinstance(r, EngineFailure) for r in results)
    np.testing.assert_allclose(after.query_scores, expected(user(2, 5, seed=0)), rtol=1e-6)


def test_full_queue_refuses_at_once():
    model = FakeModel()
    model.gate.clear()

    async def go(batcher, metrics):
        first = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=0)))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)  # first is in the engine
        queued = [asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=k))) for k in (1, 2)]
        await asyncio.sleep(0)  # let them enqueue
        assert metrics.registry.get_sample_value("warmstart_queue_depth") == 2
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            await batcher.submit(model, user(1, 4, seed=3))
        refused_in_s = time.perf_counter() - started
        model.gate.set()
        await asyncio.gather(first, *queued)
        return refused_in_s

    refused_in_s = run(go, BatcherConfig(max_batch_size=1, queue_size=2, max_wait_s=0.0))
    assert refused_in_s < 0.1


def test_cancelled_and_expired_requests_never_reach_the_engine():
    model = FakeModel()
    model.gate.clear()

    async def go(batcher, metrics):
        blocker = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=0)))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
        cancelled = asyncio.ensure_future(batcher.submit(model, user(1, 5, seed=1)))
        expired = asyncio.ensure_future(batcher.submit(model, user(1, 6, seed=2), deadline_s=time.monotonic() - 1))
        live = asyncio.ensure_future(batcher.submit(model, user(1, 7, seed=3)))
        await asyncio.sleep(0)
        cancelled.cancel()
        model.gate.set()
        await blocker
        with pytest.raises(DeadlineExpired):
            await expired
        await live
        return metrics.registry.get_sample_value("warmstart_rejects_total", {"reason": "cancelled"})

    cancelled_count = run(go, BatcherConfig(max_batch_size=8, max_wait_s=0.0))
    assert model.batches == [(1, 1, 4), (1, 1, 8)]  # the blocker, then the live request alone
    assert cancelled_count == 1


def test_close_answers_everyone_waiting():
    model = FakeModel()
    model.gate.clear()

    async def go(batcher, metrics):
        running = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=0)))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
        waiting = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=1)))
        await asyncio.sleep(0)
        await batcher.close()
        model.gate.set()
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(NotReady):
            await batcher.submit(model, user(1, 4, seed=2))
        return results

    results = run(go, BatcherConfig(max_batch_size=1, max_wait_s=0.0))
    assert all(isinstance(r, NotReady) for r in results)


def test_a_lone_request_does_not_wait_for_company():
    model = FakeModel()

    async def go(batcher, metrics):
        started = time.perf_counter()
        await batcher.submit(model, user(1, 4, seed=0))
        return time.perf_counter() - started

    assert run(go, BatcherConfig(max_batch_size=32, max_wait_s=0.5)) < 0.25


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_wait_s": -1.0}, "max_wait_s"),
        ({"max_wait_s": float("nan")}, "max_wait_s"),
    ],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**kwargs)


def test_under_load_a_batch_waits_for_company():
    """Requests arrived while the engine ran: the next batch waits (up to max_wait_s) to fill."""
    model = FakeModel()
    model.gate.clear()

    async def go(batcher, metrics):
        first = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=0)))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
        second = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=1)))  # arrives during the run
        await asyncio.sleep(0)
        model.gate.set()
        await first
        third = asyncio.ensure_future(batcher.submit(model, user(1, 4, seed=2)))  # after: still joins
        await asyncio.gather(second, third)

    run(go, BatcherConfig(max_batch_size=2, max_wait_s=10.0))  # full at two: no need to wait it out
    assert [b for b, _, _ in model.batches] == [1, 2]
