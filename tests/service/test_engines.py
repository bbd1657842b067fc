"""Both engines give the same outputs on the same artifact; the server matches the torch program."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.artifact import load_artifact
from service.engines import EngineConfig, EngineError, create_engine, nvidia_gpu_present
from service.padding import EngineInputs, zero_batch
from tests.service.test_rpcs import Reference
from warmstart.v1 import recommender_pb2 as pb


@pytest.fixture(scope="module")
def engines(tiny_artifact: Path):
    artifact = load_artifact(tiny_artifact)
    return artifact, create_engine(artifact, EngineConfig(kind="onnxruntime")), create_engine(artifact, EngineConfig(kind="torch"))


def random_batch(artifact, b: int, s: int, q: int, rng: np.random.Generator) -> EngineInputs:
    encoder = artifact.encoder
    batch = zero_batch(b, s, q, encoder.user_width, encoder.item_width)
    for fields, array in ((encoder.user_fields, batch.user_features), (encoder.item_fields, batch.support_items), (encoder.item_fields, batch.query_items)):
        for f in fields:
            array[..., f.offset : f.offset + f.width] = rng.integers(0, f.num_codes, size=(*array.shape[:-1], f.width))
    lengths = rng.integers(0, s + 1, size=b)
    lengths[0] = 0  # one user with no interactions
    batch.support_mask[:] = np.arange(s)[None, :] < lengths[:, None]
    batch.support_labels[:] = rng.uniform(1, 5, size=(b, s)) * batch.support_mask
    return batch


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 8, 16), (16, 32, 128), (5, 4, 150)])
def test_onnxruntime_and_torch_agree(engines, shape):
    artifact, onnx_engine, torch_engine = engines
    batch = random_batch(artifact, *shape, np.random.default_rng(sum(shape)))
    for a, b in zip(onnx_engine.run(batch), torch_engine.run(batch)):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_engine_descriptions(engines):
    _, onnx_engine, torch_engine = engines
    assert onnx_engine.description == "onnxruntime:CPUExecutionProvider" and not onnx_engine.on_gpu
    assert torch_engine.description == "torch:cpu" and torch_engine.gpu_memory_bytes() == {}


def test_served_scores_equal_the_torch_program(shared_server, engines, tiny_artifact: Path, item_ids):
    """The server (onnxruntime, padded, batched) against the torch program on the unpadded batch."""
    _, _, torch_engine = engines
    reference = Reference(tiny_artifact)
    rng = np.random.default_rng(7)
    for n_support, n_query in ((0, 5), (1, 1), (9, 40), (32, 150)):
        chosen = [item_ids[k] for k in rng.choice(len(item_ids), n_support, replace=False)]
        request = pb.ScoreRequest(
            user_attributes={"age_group": "25-34"},
            interactions=[pb.Interaction(item_id=i, label=float(rng.integers(1, 6))) for i in chosen],
            items=[pb.Candidate(item_id=i) for i in item_ids[:n_query]],
        )
        served = shared_server.stub.Score(request)
        expected = torch_engine.run(EngineInputs(**reference.inputs(request, item_ids[:n_query])))
        np.testing.assert_allclose([i.score for i in served.items], expected.query_scores[0], atol=1e-5)
        if n_support:
            np.testing.assert_allclose(served.adaptation.support_loss_after, expected.support_loss_after[0], atol=1e-5)


def test_cuda_requested_without_a_gpu_is_refused(tiny_artifact: Path):
    if nvidia_gpu_present():
        pytest.skip("a GPU is present")
    with pytest.raises(EngineError, match="cuda"):
        create_engine(load_artifact(tiny_artifact), EngineConfig(kind="onnxruntime", device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_gpu_engines_agree_with_cpu(tiny_artifact: Path, kind: str):
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False on this machine)")
    if kind == "onnxruntime" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (CPU build)")
    artifact = load_artifact(tiny_artifact)
    cpu = create_engine(artifact, EngineConfig(kind="onnxruntime", device="cpu"))
    gpu = create_engine(artifact, EngineConfig(kind=kind, device="cuda", cuda_graphs=False))
    assert gpu.on_gpu
    rng = np.random.default_rng(0)
    for users, support, query in [(8, 16, 64), (1, 3, 10), (33, 7, 200)]:  # fresh inputs each time
        batch = random_batch(artifact, users, support, query, rng)
        for a, b in zip(cpu.run(batch), gpu.run(batch)):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="engine must be"):
        EngineConfig(kind="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ort_intra_op_threads"):
        EngineConfig(ort_intra_op_threads=-1)
