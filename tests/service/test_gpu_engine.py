"""The CUDA-graph engine: its CPU-runnable machinery on CPU, its CUDA paths on a GPU.

On CPU, CudaGraphEngine(device="cpu") runs everything but the capture itself: batch
buckets, staging buffers and their padding, batch splitting, the graph cache, and the
precision check. The tests marked gpu run the real CUDA graphs and are skipped, with the
reason, where torch sees no CUDA device.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from service.artifact import load_artifact
from service.engines import (
    PRECISION_TOLERANCE,
    CudaGraphEngine,
    EngineConfig,
    GraphCache,
    GraphKey,
    TorchEngine,
    choose_precision,
    create_engine,
    graph_key,
    numerics,
    sample_inputs,
    score_difference,
)
from service.padding import (
    EngineOutputs,
    batch_bucket,
    batch_slices,
    concat_outputs,
    fill_padded,
    powers_of_two,
    take_users,
    zero_batch,
)

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False on this machine)"
)


@pytest.fixture(scope="module")
def artifact(tiny_artifact: Path):
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def reference(artifact):
    """The CPU reference every engine is held to: onnxruntime on model.onnx."""
    return create_engine(artifact, EngineConfig(kind="onnxruntime", device="cpu"))


@pytest.fixture(scope="module")
def cpu_graphs(artifact):
    """The CUDA-graph engine's machinery on CPU, with small batch buckets (1, 2, 4)."""
    return CudaGraphEngine(artifact, EngineConfig(kind="torch", max_graph_batch=4, max_cuda_graphs=64), device="cpu")


def assert_same(actual: EngineOutputs, expected: EngineOutputs, atol: float = 1e-5) -> None:
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype == np.float32
        np.testing.assert_allclose(a, e, atol=atol, rtol=0)


# -- padding helpers --------------------------------------------------------------------------------


def test_batch_bucket_is_the_smallest_that_holds_the_users():
    buckets = powers_of_two(1, 1024)
    assert [batch_bucket(buckets, n) for n in (1, 2, 3, 5, 64, 65, 1000, 1024)] == [1, 2, 4, 8, 64, 128, 1024, 1024]
    with pytest.raises(ValueError, match="exceeds the largest bucket 1024"):
        batch_bucket(buckets, 1025)
    with pytest.raises(ValueError, match="at least one user"):
        batch_bucket(buckets, 0)


def test_batch_slices_cover_the_batch_in_order():
    assert batch_slices(5, 8) == [slice(0, 5)]
    assert batch_slices(8, 8) == [slice(0, 8)]
    assert batch_slices(19, 8) == [slice(0, 8), slice(8, 16), slice(16, 19)]
    with pytest.raises(ValueError):
        batch_slices(0, 8)


def test_take_users_and_concat_outputs_round_trip():
    inputs = zero_batch(5, 2, 3, 4, 6)
    inputs.user_features[:] = np.arange(5)[:, None]
    parts = [take_users(inputs, rows) for rows in batch_slices(5, 2)]
    assert [p.user_features[:, 0].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    outputs = [EngineOutputs(p.user_features[:, :1].astype(np.float32), p.user_features[:, 0] * 1.0, p.user_features[:, 0] * 2.0) for p in parts]
    joined = concat_outputs(outputs)
    assert joined.query_scores[:, 0].tolist() == [0, 1, 2, 3, 4] and joined.support_loss_after.tolist() == [0, 2, 4, 6, 8]


def test_fill_padded_copies_the_corner_and_zeroes_everything_else():
    rng = np.random.default_rng(0)
    target = rng.integers(1, 9, size=(4, 5, 3))  # stale data from an earlier, larger batch
    source = rng.integers(1, 9, size=(2, 3, 3))
    fill_padded(target, source)
    np.testing.assert_array_equal(target[:2, :3], source)
    outside = np.ones(target.shape, dtype=bool)
    outside[:2, :3] = False
    assert np.all(target[outside] == 0)
    with pytest.raises(ValueError, match="cannot pad"):
        fill_padded(np.zeros((2, 2)), np.zeros((3, 2)))


# -- the graph cache --------------------------------------------------------------------------------


def test_graph_key_rounds_the_batch_up_and_keeps_support_and_query():
    buckets = powers_of_two(1, 64)
    assert graph_key(buckets, zero_batch(3, 8, 32, 4, 6)) == GraphKey(4, 8, 32)
    assert graph_key(buckets, zero_batch(64, 1, 16, 4, 6)) == GraphKey(64, 1, 16)


def test_graph_cache_builds_once_per_key_and_drops_the_least_recently_used():
    built = []
    cache: GraphCache[str] = GraphCache(capacity=2)

    def build(key):
        return lambda: built.append(key) or f"graph{key}"

    assert cache.get(GraphKey(1, 2, 3), build(1)) == "graph1"
    assert cache.get(GraphKey(1, 2, 3), build(99)) == "graph1"  # cached: not rebuilt
    cache.get(GraphKey(2, 2, 3), build(2))
    cache.get(GraphKey(1, 2, 3), build(99))  # touch: key 1 is now the most recent
    cache.get(GraphKey(4, 2, 3), build(4))  # over capacity: drops key 2
    assert built == [1, 2, 4] and cache.captures == 3
    assert cache.keys() == [GraphKey(1, 2, 3), GraphKey(4, 2, 3)]
    with pytest.raises(ValueError):
        GraphCache(0)


# -- the engine's machinery on CPU ------------------------------------------------------------------


def test_static_buckets_on_cpu_equal_the_reference_with_fresh_inputs_per_call(artifact, reference, cpu_graphs):
    """Every call with new random inputs: a replay must never return a previous call's
    results, and the padding of a smaller batch in a bucket must not leak into it."""
    rng = np.random.default_rng(1)
    for users, support, query in [(4, 8, 32), (3, 8, 32), (1, 8, 32), (4, 8, 32), (2, 4, 16), (3, 4, 16)]:
        inputs = sample_inputs(artifact, users, support, query, rng)
        assert_same(cpu_graphs.run(inputs), reference.run(inputs))
    assert {GraphKey(4, 8, 32), GraphKey(1, 8, 32), GraphKey(2, 4, 16), GraphKey(4, 4, 16)} <= set(cpu_graphs.graphs.keys())


def test_batches_beyond_the_largest_bucket_run_in_chunks(artifact, reference, cpu_graphs):
    inputs = sample_inputs(artifact, 11, 4, 16, np.random.default_rng(2))  # buckets end at 4: 4 + 4 + 3
    assert_same(cpu_graphs.run(inputs), reference.run(inputs))
    assert GraphKey(4, 4, 16) in cpu_graphs.graphs.keys()


def test_poisoned_buffers_are_overwritten(artifact, reference, cpu_graphs):
    inputs = sample_inputs(artifact, 4, 8, 32, np.random.default_rng(3))
    cpu_graphs.run(inputs)
    graph = cpu_graphs.graphs.get(GraphKey(4, 8, 32), lambda: pytest.fail("the bucket was not cached"))
    for tensor in (*graph.host_outputs, *graph.device_outputs):
        tensor.fill_(float("nan"))
    fresh = sample_inputs(artifact, 4, 8, 32, np.random.default_rng(4))
    assert_same(cpu_graphs.run(fresh), reference.run(fresh))


def test_the_engine_is_chosen_by_device_and_config(artifact, cpu_graphs):
    assert isinstance(create_engine(artifact, EngineConfig(kind="torch", device="cpu")), TorchEngine)
    assert cpu_graphs.description == "torch:cpu (static buckets, fp32)" and not cpu_graphs.on_gpu
    assert cpu_graphs.gpu_memory_bytes() == {} and cpu_graphs.batch_buckets == (1, 2, 4)


def test_engine_config_validates_the_gpu_settings():
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="fp16")  # type: ignore[arg-type]
    for name in ("max_graph_batch", "max_cuda_graphs"):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: 0})


# -- the precision check ----------------------------------------------------------------------------


def _outputs(scores: np.ndarray) -> EngineOutputs:
    return EngineOutputs(scores.astype(np.float32), np.zeros(len(scores), np.float32), np.zeros(len(scores), np.float32))


def test_choose_precision_keeps_a_reduced_precision_only_within_tolerance(caplog):
    batches = [zero_batch(2, 1, 3, 1, 1)]
    exact = np.full((2, 3), 3.0)

    def off_by(delta: float):
        return lambda batch, precision: _outputs(exact + (0.0 if precision == "fp32" else delta))

    with caplog.at_level(logging.INFO, logger="service.engines"):
        assert choose_precision("bf16", "cuda", off_by(5e-4), batches) == ("bf16", pytest.approx(5e-4, rel=1e-3))
        assert choose_precision("tf32", "cuda", off_by(2e-3), batches) == ("fp32", pytest.approx(2e-3, rel=1e-3))
        assert choose_precision("bf16", "cuda", off_by(float("nan")), batches) == ("fp32", float("inf"))
        assert choose_precision("tf32", "cpu", off_by(0.0), batches) == ("fp32", float("inf"))
        assert choose_precision("fp32", "cuda", off_by(1.0), batches) == ("fp32", 0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("precision bf16 accepted" in m for m in messages)
    assert any("precision tf32 refused" in m and "tolerance 1e-03" in m for m in messages)
    assert any("TF32 is a CUDA matmul mode" in m for m in messages)
    assert PRECISION_TOLERANCE == 1e-3


def test_score_difference_is_the_largest_query_score_gap():
    a, b = _outputs(np.array([[1.0, 2.0]])), _outputs(np.array([[1.0, 2.5]]))
    assert score_difference(a, b) == pytest.approx(0.5)
    assert score_difference(a, _outputs(np.array([[np.inf, 2.0]]))) == float("inf")


def test_bf16_on_cpu_runs_the_real_check_and_logs_its_decision(artifact, caplog):
    with caplog.at_level(logging.INFO, logger="service.engines"):
        engine = TorchEngine(artifact, EngineConfig(kind="torch", device="cpu", precision="bf16"))
    decision = [r.getMessage() for r in caplog.records if "precision bf16" in r.getMessage()]
    assert len(decision) == 1
    if engine.precision == "bf16":
        assert "accepted" in decision[0] and engine.description == "torch:cpu (bf16)"
    else:
        assert "refused" in decision[0] and engine.description == "torch:cpu"
        fp32 = TorchEngine(artifact, EngineConfig(kind="torch", device="cpu"))
        inputs = sample_inputs(artifact, 3, 4, 16, np.random.default_rng(5))
        for a, b in zip(engine.run(inputs), fp32.run(inputs)):
            np.testing.assert_array_equal(a, b)


def test_numerics_autocasts_bf16_and_restores_the_matmul_setting():
    before = torch.backends.cuda.matmul.fp32_precision
    with numerics("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with numerics("fp32", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.matmul.fp32_precision == before


def test_sample_inputs_are_catalog_items_with_prefix_masks(artifact):
    inputs = sample_inputs(artifact, 6, 5, 7, np.random.default_rng(6))
    catalog_rows = {tuple(r) for r in artifact.catalog.codes}
    assert all(tuple(r) in catalog_rows for r in inputs.query_items.reshape(-1, artifact.encoder.item_width))
    lengths = inputs.support_mask.sum(1)
    assert lengths[0] == 0
    np.testing.assert_array_equal(inputs.support_mask, np.arange(5)[None, :] < lengths[:, None])
    assert np.all(inputs.support_labels[inputs.support_mask == 0] == 0)


# -- on a GPU ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_graphs(artifact):
    return CudaGraphEngine(artifact, EngineConfig(kind="torch", device="cuda", max_graph_batch=64))


@pytest.mark.gpu
@requires_cuda
def test_cuda_graphs_equal_the_cpu_reference_on_fresh_inputs_every_replay(artifact, reference, cuda_graphs):
    rng = np.random.default_rng(10)
    shapes = [(1, 1, 16), (8, 16, 64), (5, 16, 64), (64, 32, 128), (33, 32, 128), (1, 1, 16), (130, 8, 16)]
    for users, support, query in shapes * 3:  # every bucket replayed several times, new inputs each time
        inputs = sample_inputs(artifact, users, support, query, rng)
        assert_same(cuda_graphs.run(inputs), reference.run(inputs), atol=1e-4)
    assert cuda_graphs.on_gpu and cuda_graphs.description.endswith("(CUDA graphs, fp32)")
    for key in cuda_graphs.graphs.keys():
        graph = cuda_graphs.graphs.get(key, lambda: pytest.fail("not cached"))
        assert graph.graph is not None and all(t.is_pinned() for t in graph.host_inputs + graph.host_outputs)


@pytest.mark.gpu
@requires_cuda
def test_cuda_adapt_graphs_and_device_scoring_equal_the_cpu_reference(artifact, reference, cuda_graphs):
    """The adapt graph's captured buckets and the top-k on the device (torch.topk) against
    onnxruntime's adapt graph and the numpy scorer, whole catalog and candidate rows."""
    from service.padding import AdaptInputs, Ranking, UserInputs

    rng = np.random.default_rng(12)
    none = np.zeros(0, dtype=np.int64)
    for users, support in ((1, 1), (5, 16), (64, 32), (70, 8)):
        inputs = sample_inputs(artifact, users, support, 1, rng)
        support_only = AdaptInputs(*inputs[:4])
        on_device, on_cpu = cuda_graphs.adapt(support_only), reference.adapt(support_only)
        for a, b in zip(on_device, on_cpu):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        size = artifact.catalog.size
        queries = [
            UserInputs(inputs.user_features[i], inputs.support_items[i], inputs.support_labels[i],
                       query_rows=None if i % 2 else rng.choice(size, size=min(20, size), replace=False),
                       ranking=Ranking(5, bool(i % 3), rng.choice(size, size=2, replace=False) if i % 2 else none))
            for i in range(users)
        ]
        for got, want in zip(cuda_graphs.scorer.score(queries, on_cpu), reference.scorer.score(queries, on_cpu)):
            assert got.order.tolist() == want.order.tolist()
            np.testing.assert_allclose(got.query_scores, want.query_scores, atol=1e-4, rtol=0)
            np.testing.assert_allclose(got.query_engagement, want.query_engagement, atol=1e-4, rtol=0)
    assert any(key.query == 0 for key in cuda_graphs.graphs.keys())  # the adapt buckets were captured


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_outputs_are_rewritten_after_poisoning(artifact, reference, cuda_graphs):
    rng = np.random.default_rng(11)
    cuda_graphs.run(sample_inputs(artifact, 8, 16, 64, rng))
    graph = cuda_graphs.graphs.get(GraphKey(8, 16, 64), lambda: pytest.fail("not cached"))
    for tensor in (*graph.device_outputs, *graph.host_outputs):
        tensor.fill_(float("nan"))
    torch.cuda.synchronize()
    fresh = sample_inputs(artifact, 8, 16, 64, rng)
    assert_same(cuda_graphs.run(fresh), reference.run(fresh), atol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_a_captured_batch_waits_on_the_device_at_most_once_per_chunk(artifact, cuda_graphs):
    rng = np.random.default_rng(12)
    cuda_graphs.run(sample_inputs(artifact, 8, 16, 64, rng))  # captured before the count
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cuda_graphs.run(sample_inputs(artifact, 8, 16, 64, rng))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_on_cuda_is_kept_only_within_tolerance(artifact, reference, precision):
    engine = CudaGraphEngine(artifact, EngineConfig(kind="torch", device="cuda", precision=precision, max_graph_batch=16))
    inputs = sample_inputs(artifact, 16, 32, 128, np.random.default_rng(13))
    if engine.precision == precision:
        assert score_difference(reference.run(inputs), engine.run(inputs)) <= PRECISION_TOLERANCE
    else:
        assert engine.precision == "fp32"
        assert_same(engine.run(inputs), reference.run(inputs), atol=1e-4)
