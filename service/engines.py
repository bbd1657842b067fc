"""Engines: run the artifact's graphs on one padded batch, and score against its item table.

An engine runs the fused adapt-then-score graph (`run`) and, for artifacts with an item
table, the adapt graph (`adapt`, the support only) and its `scorer`, the score step
against the table on the engine's device (service/scoring.py: numpy on CPU, torch where
the torch engine runs).

Two implementations with one interface, chosen by configuration:

- onnxruntime on model.onnx: the CPU provider, or CUDA where onnxruntime-gpu finds a GPU;
- torch on the artifact's torch program (`warmstart.torch_program.load_program`, which
  reads it without unpickling anything), on CUDA when there is a GPU, else on CPU.
  torch is imported only here, only when this engine is chosen, so an onnxruntime-only
  deployment does not need it. On CUDA it runs as `CudaGraphEngine`:
  one CUDA graph captured per shape bucket and replayed, so that a batch costs a few
  copies and one graph launch instead of hundreds of kernel launches from Python.

Each engine checks the graph it loaded against the manifest's GraphSpec before use. The
torch engines can run matmuls in TF32 or bfloat16 (`precision`), but only if a check at
load finds the query scores within PRECISION_TOLERANCE of float32; otherwise they log
why and run float32.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Hashable, Iterator, Literal, NamedTuple, Protocol, Sequence, TypeVar

import numpy as np

from service.artifact import INPUT_NAMES, Artifact, GraphMismatchError, TensorSignature
from service.padding import (
    AdaptInputs,
    AdaptOutputs,
    EngineInputs,
    EngineOutputs,
    batch_bucket,
    batch_slices,
    concat_outputs,
    fill_padded,
    powers_of_two,
    take_users,
)
from service.scoring import LabelUnits, NumpyScorer, Scorer, TorchScorer
from warmstart.contract import ADAPT_INPUT_NAMES, random_codes, random_support
from warmstart.torch_program import ProgramFormatError, load_program

log = logging.getLogger(__name__)

EngineKind = Literal["onnxruntime", "torch"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "tf32", "bf16"]
ENGINE_KINDS: tuple[str, ...] = ("onnxruntime", "torch")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
PRECISION_TOLERANCE = 1e-3  # largest query-score difference from float32 a reduced precision may make


class EngineError(RuntimeError):
    """The engine could not be created on the requested device."""


class Engine(Protocol):
    """What the batcher needs from an engine."""

    description: str  # e.g. "onnxruntime:CPUExecutionProvider", "torch:cuda:0"
    on_gpu: bool
    # The score step against the artifact's item table (on the engine's device); None when
    # the artifact has none: then the fused graph serves every request.
    scorer: Scorer | None

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        """Runs one padded batch through the fused graph; safe to call from several threads at once."""
        ...

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        """Runs one padded batch through the adapt graph (only when `scorer` is set)."""
        ...

    def gpu_memory_bytes(self) -> dict[str, int]:
        """GPU memory held, by kind ("allocated", "reserved"); empty when not on a GPU."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    kind: EngineKind = "onnxruntime"
    device: Device = "auto"  # auto = CUDA when a GPU is usable, else CPU
    ort_intra_op_threads: int = 1  # threads inside one operator; 0 = onnxruntime's default (one per core)
    ort_inter_op_threads: int = 1  # threads across operators (the graph is a chain: 1 is right)
    torch_threads: int = 1  # torch.set_num_threads on CPU; 0 = leave torch's default
    cuda_graphs: bool = True  # torch on CUDA: one captured CUDA graph per shape bucket (else eager)
    precision: Precision = "fp32"  # torch: tf32 / bf16 matmuls, kept only if scores stay within PRECISION_TOLERANCE
    max_graph_batch: int = 1024  # largest batch bucket of the CUDA graphs; larger batches run in chunks
    max_cuda_graphs: int = 512  # captured graphs kept; beyond, the least recently used is dropped

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {self.kind!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("ort_intra_op_threads", "ort_inter_op_threads", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_graph_batch", "max_cuda_graphs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def create_engine(artifact: Artifact, config: EngineConfig) -> Engine:
    """The configured engine over an artifact's graph (checked against the manifest)."""
    if config.kind == "onnxruntime":
        return OnnxRuntimeEngine(artifact, config)
    if config.cuda_graphs and _torch_device(config).type == "cuda":
        return CudaGraphEngine(artifact, config)
    return TorchEngine(artifact, config)


def label_units(artifact: Artifact) -> LabelUnits:
    return LabelUnits(artifact.label.kind, artifact.label.min_value, artifact.label.max_value)


def adapt_outputs(names: Sequence[str], arrays: Sequence[np.ndarray]) -> AdaptOutputs:
    """The adapt graph's outputs (in contract order, `names`) as AdaptOutputs."""
    by_name = dict(zip(names, arrays))
    return AdaptOutputs(
        by_name["user_bias"],
        by_name["user_factors"],
        by_name.get("user_engagement"),
        by_name["support_loss_before"],
        by_name["support_loss_after"],
    )


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver reports a GPU (checked before asking onnxruntime for
    CUDA, whose failed attempt on a CPU machine logs alarming errors)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32"}


class OnnxRuntimeEngine:
    """model.onnx in an onnxruntime InferenceSession."""

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.ort_intra_op_threads
        options.inter_op_num_threads = config.ort_inter_op_threads
        # Spinning workers would steal the cores the gRPC threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        want_cuda = config.device == "cuda" or (
            config.device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_gpu_present()
        )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        file = artifact.manifest.graph.onnx_file
        self._session = ort.InferenceSession(str(artifact.onnx_path), options, providers=providers)
        provider = self._session.get_providers()[0]
        if config.device == "cuda" and provider != "CUDAExecutionProvider":
            raise EngineError(f"device cuda requested but onnxruntime runs {file} on {provider}")
        self.on_gpu = provider == "CUDAExecutionProvider"
        self.description = f"onnxruntime:{provider}"
        artifact.check_graph(
            file,
            [_ort_signature(i) for i in self._session.get_inputs()],
            [_ort_signature(o) for o in self._session.get_outputs()],
        )
        self._feeds = [(i, name) for i, name in enumerate(INPUT_NAMES) if name in {t.name for t in artifact.inputs}]
        self._outputs = list(artifact.output_names)
        self.scorer: Scorer | None = None
        if artifact.item_table is not None:
            adapt_file = artifact.manifest.adapt_graph.onnx_file
            self._adapt_session = ort.InferenceSession(str(artifact.adapt_onnx_path), options, providers=providers)
            artifact.check_adapt_graph(
                adapt_file,
                [_ort_signature(i) for i in self._adapt_session.get_inputs()],
                [_ort_signature(o) for o in self._adapt_session.get_outputs()],
            )
            present = {t.name for t in artifact.adapt_inputs}
            self._adapt_feeds = [(i, name) for i, name in enumerate(ADAPT_INPUT_NAMES) if name in present]
            self._adapt_outputs = list(artifact.adapt_output_names)
            self.scorer = NumpyScorer(artifact.item_table, label_units(artifact))

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        outputs = self._session.run(self._outputs, {name: inputs[i] for i, name in self._feeds})
        return EngineOutputs(*outputs)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        outputs = self._adapt_session.run(self._adapt_outputs, {name: inputs[i] for i, name in self._adapt_feeds})
        return adapt_outputs(self._adapt_outputs, outputs)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}  # onnxruntime exposes no allocator statistics to Python


def _ort_signature(arg) -> TensorSignature:
    dims = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSignature(arg.name, _ORT_DTYPES.get(arg.type, arg.type), dims)  # type: ignore[arg-type]


def _torch_device(config: EngineConfig):
    """The torch device an EngineConfig asks for (raises EngineError for cuda without CUDA)."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device cuda requested but torch sees no CUDA device")
    if config.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_program(artifact: Artifact, device, adapt: bool = False):
    """The torch program (warmstart.torch_program: no pickle) as a module on `device`,
    checked against the manifest: the fused graph's, or the adapt graph's."""
    graph = artifact.manifest.adapt_graph if adapt else artifact.manifest.graph
    file = graph.torch_export_file
    try:
        program = load_program(artifact.adapt_torch_export_path if adapt else artifact.torch_export_path)
    except ProgramFormatError as exc:
        raise GraphMismatchError(file, f"not a warmstart torch program: {exc}") from exc
    inputs, outputs = _program_signature(program)
    input_names = ADAPT_INPUT_NAMES if adapt else INPUT_NAMES
    if [t.name for t in inputs] != list(input_names):
        raise GraphMismatchError(file, f"inputs {[t.name for t in inputs]}, expected {list(input_names)} in that order")
    expected = artifact.adapt_output_names if adapt else artifact.output_names
    if len(outputs) != len(expected):
        raise GraphMismatchError(file, f"{len(outputs)} outputs, expected {len(expected)} ({', '.join(expected)})")
    # The program's outputs are unnamed: they are the manifest's outputs in contract order.
    named_outputs = [TensorSignature(name, t.dtype, t.shape) for name, t in zip(expected, outputs)]
    check = artifact.check_adapt_graph if adapt else artifact.check_graph
    check(file, inputs, named_outputs, extra_inputs_ok=True)
    return program.module().to(device)


@contextlib.contextmanager
def numerics(precision: Precision, device) -> Iterator[None]:
    """The matmul precision for torch ops run (or captured) inside the block.

    fp32 pins IEEE float32 matmuls on CUDA, whatever the process-wide TF32 setting; tf32
    allows TF32 there; bf16 autocasts matmuls to bfloat16 (on CPU too)."""
    import torch

    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    if device.type == "cuda":
        matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        matmul.fp32_precision = previous


def sample_inputs(artifact: Artifact, batch: int, support: int, query: int, rng: np.random.Generator) -> EngineInputs:
    """A realistic random batch: catalog items, random user attribute codes, labels in the
    label range, ragged support sets (prefix masks; the first user has none)."""
    encoder = artifact.encoder

    def items(n: int) -> np.ndarray:
        catalog = artifact.catalog.codes
        if len(catalog) == 0:
            return random_codes(encoder.item_fields, encoder.item_width, (batch, n), rng)
        return catalog[rng.integers(0, len(catalog), size=(batch, n))]

    users = random_codes(encoder.user_fields, encoder.user_width, (batch,), rng)
    label = artifact.label
    labels, mask = random_support(batch, support, label.kind, label.min_value, label.max_value, rng)
    return EngineInputs(users, items(support), labels * mask, mask, items(query))


PRECISION_CHECK_SHAPES = ((1, 4, 16), (16, 32, 128))  # (batch, support, query) of the load-time check


def score_difference(reference: EngineOutputs, candidate: EngineOutputs) -> float:
    """Largest query-score difference (infinite when the candidate is not finite)."""
    if not np.all(np.isfinite(candidate.query_scores)):
        return float("inf")
    return float(np.max(np.abs(reference.query_scores - candidate.query_scores), initial=0.0))


def choose_precision(
    requested: Precision,
    device_type: str,
    run: Callable[[EngineInputs, Precision], EngineOutputs],
    batches: list[EngineInputs],
    tolerance: float = PRECISION_TOLERANCE,
) -> tuple[Precision, float]:
    """The precision to run: `requested` if its scores stay within `tolerance` of float32
    on `batches` (run(batch, precision) computes them), else fp32 with a log line.
    Returns it with the largest difference found (0 for fp32, inf when not applicable)."""
    if requested == "fp32":
        return "fp32", 0.0
    if requested == "tf32" and device_type != "cuda":
        log.warning("precision tf32 refused: TF32 is a CUDA matmul mode, this engine runs on %s; running fp32", device_type)
        return "fp32", float("inf")
    difference = max(score_difference(run(batch, "fp32"), run(batch, requested)) for batch in batches)
    if difference > tolerance:
        log.warning(
            "precision %s refused: query scores differ from fp32 by up to %.2e (tolerance %.0e); running fp32",
            requested,
            difference,
            tolerance,
        )
        return "fp32", difference
    log.info("precision %s accepted: query scores within %.2e of fp32", requested, difference)
    return requested, difference


def _check_batches(artifact: Artifact, precision: Precision) -> list[EngineInputs]:
    """The precision check's batches (none needed for fp32)."""
    if precision == "fp32":
        return []
    rng = np.random.default_rng(0)
    return [sample_inputs(artifact, b, s, q, rng) for b, s, q in PRECISION_CHECK_SHAPES]


class TorchEngine:
    """The torch program (torch_program.safetensors), run eagerly (CPU, or CUDA without graphs)."""

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        import torch

        self._torch = torch
        self._device = _torch_device(config)
        use_cuda = self._device.type == "cuda"
        if not use_cuda and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self._module = _load_program(artifact, self._device)
        self.on_gpu = use_cuda
        checks = _check_batches(artifact, config.precision)
        self.precision, _ = choose_precision(config.precision, self._device.type, self._run, checks)
        suffix = "" if self.precision == "fp32" else f" ({self.precision})"
        self.description = f"torch:{self._device}{suffix}"
        self.scorer: Scorer | None = None
        if artifact.item_table is not None:
            self._adapt_module = _load_program(artifact, self._device, adapt=True)
            self._adapt_names = artifact.adapt_output_names
            self.scorer = TorchScorer(artifact.item_table, label_units(artifact), self._device)

    def _run(self, inputs: EngineInputs, precision: Precision) -> EngineOutputs:
        torch = self._torch
        with torch.no_grad(), numerics(precision, self._device):
            args = [torch.from_numpy(a).to(self._device, non_blocking=True) for a in inputs]
            outputs = self._module(*args)
            return EngineOutputs(*(o.detach().float().cpu().numpy() for o in outputs))

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        return self._run(inputs, self.precision)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        torch = self._torch
        with torch.no_grad(), numerics(self.precision, self._device):
            outputs = self._adapt_module(*(torch.from_numpy(a).to(self._device, non_blocking=True) for a in inputs))
            return adapt_outputs(self._adapt_names, [o.detach().float().cpu().numpy() for o in outputs])

    def gpu_memory_bytes(self) -> dict[str, int]:
        return _cuda_memory(self._torch, self._device) if self.on_gpu else {}


def _cuda_memory(torch, device) -> dict[str, int]:
    return {"allocated": int(torch.cuda.memory_allocated(device)), "reserved": int(torch.cuda.memory_reserved(device))}


class GraphKey(NamedTuple):
    """The shape a captured graph runs: padded batch, support length, candidate count."""

    batch: int
    support: int
    query: int


def graph_key(batch_buckets: tuple[int, ...], inputs: EngineInputs) -> GraphKey:
    """The graph that runs a batch: its user count rounded up to a batch bucket; support
    and query lengths as given (the batcher already padded them to its buckets)."""
    users, support = inputs.support_mask.shape
    return GraphKey(batch_bucket(batch_buckets, users), support, inputs.query_items.shape[1])


T = TypeVar("T")


class GraphCache(Generic[T]):
    """Captured graphs by key; beyond `capacity` the least recently used one is dropped
    (its memory returns to the shared pool). Not thread-safe: the engine holds a lock."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.captures = 0  # graphs ever built (a key dropped and needed again counts twice)
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        entry = build()
        self.captures += 1
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_INPUT_DTYPES = ("int64", "int64", "float32", "float32", "int64")  # the fused graph's; the adapt graph takes the first four


def graph_input_shapes(key: GraphKey, widths: tuple[int, int]) -> list[tuple[int, ...]]:
    """The input shapes of a bucket: the fused graph's, or (query 0) the adapt graph's."""
    b, s, q = key
    user_width, item_width = widths
    shapes = [(b, user_width), (b, s, item_width), (b, s), (b, s), (b, q, item_width)]
    return shapes if q else shapes[:4]


class StaticGraph:
    """One shape bucket: static device buffers the graph reads and writes, page-locked
    host buffers to stage them, and the captured CUDA graph.

    A run fills the host buffers (the request in the leading corner, zeros around it),
    copies them to the device, replays, copies the outputs back, all queued on one
    stream without waiting, and synchronises once, for the result. On CPU (tests) the
    same buffers are used and "replay" runs the module eagerly on them. A key with query
    0 is the adapt graph's bucket (four inputs, no query items)."""

    def __init__(self, torch, module, key: GraphKey, widths: tuple[int, int], device, precision: Precision, pool, stream) -> None:
        self._torch = torch
        self._module = module
        self._device = device
        self._precision = precision
        self._stream = stream
        self.key = key
        shapes = graph_input_shapes(key, widths)
        on_cuda = device.type == "cuda"
        dtypes = [getattr(torch, d) for d in _INPUT_DTYPES[: len(shapes)]]
        self.host_inputs = [torch.zeros(sh, dtype=dt, pin_memory=on_cuda) for sh, dt in zip(shapes, dtypes)]
        self.device_inputs = [torch.zeros(sh, dtype=dt, device=device) for sh, dt in zip(shapes, dtypes)]
        self._host_input_arrays = [t.numpy() for t in self.host_inputs]
        self.graph = None
        if on_cuda:
            self.device_outputs = self._capture(pool)
            # Once per bucket: the buffers' zero fills ran on the default stream, and
            # batches are copied in on the engine's own stream.
            torch.cuda.synchronize(device)
        else:
            self.device_outputs = self._forward()
        # float32 on the host whatever the graph computed in (bf16 matmuls still give float32 scores).
        self.host_outputs = [torch.empty(o.shape, dtype=torch.float32, pin_memory=on_cuda) for o in self.device_outputs]
        self._host_output_arrays = [t.numpy() for t in self.host_outputs]

    def _forward(self):
        torch = self._torch
        with torch.no_grad(), numerics(self._precision, self._device):
            return list(self._module(*self.device_inputs))

    def _capture(self, pool):
        torch = self._torch
        # One eager run first, on a side stream as capture requires: it allocates what the
        # graph's kernels need (cuBLAS workspaces, lazily built kernels) outside capture.
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self._device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            outputs = self._forward()
        return outputs

    def run_arrays(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for `inputs` (fewer users than the bucket is fine), copied
        out of the host buffers and cut to the batch's users (not along other axes)."""
        torch = self._torch
        users = len(inputs[0])
        for target, source in zip(self._host_input_arrays, inputs):
            fill_padded(target, source)
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            for device_tensor, host_tensor in zip(self.device_inputs, self.host_inputs):
                device_tensor.copy_(host_tensor, non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.device_outputs = self._forward()
            for host_tensor, device_tensor in zip(self.host_outputs, self.device_outputs):
                host_tensor.copy_(device_tensor, non_blocking=True)
        if self._stream is not None:
            self._stream.synchronize()  # the batch's one wait: its results are on the host
        # Copies: the host buffers are overwritten by the next batch.
        return [a[:users].copy() for a in self._host_output_arrays]

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        """A fused-graph bucket's outputs for one batch, cut to its users and candidates."""
        query = inputs.query_items.shape[1]
        scores, before, after, *engagement = self.run_arrays(inputs)
        return EngineOutputs(scores[:, :query], before, after, engagement[0][:, :query] if engagement else None)


class CudaGraphEngine:
    """The torch program with one captured CUDA graph per shape bucket (see StaticGraph).

    A batch is padded to the next batch bucket (powers of two up to max_graph_batch;
    larger batches run in chunks); padded users have no support and all-padding
    candidates, and their outputs are dropped. Graphs are captured when a shape is first
    seen (the model lifecycle's warm-up covers the batcher's buckets at batch 1 and at
    the largest batch) and share one memory pool: the engine runs one batch at a time.

    On a CPU device (`device="cpu"`, tests) everything but the capture runs: buckets,
    staging buffers, padding and splitting, with eager "replays"."""

    def __init__(self, artifact: Artifact, config: EngineConfig, device: str | None = None) -> None:
        import torch

        self._torch = torch
        self._device = torch.device(device) if device is not None else _torch_device(config)
        on_cuda = self._device.type == "cuda"
        if not on_cuda and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self._module = _load_program(artifact, self._device)
        self._adapt_module = _load_program(artifact, self._device, adapt=True) if artifact.item_table is not None else None
        self._adapt_names = artifact.adapt_output_names
        self._widths = (artifact.encoder.user_width, artifact.encoder.item_width)
        self.batch_buckets = powers_of_two(1, config.max_graph_batch)
        self.graphs: GraphCache[StaticGraph] = GraphCache(config.max_cuda_graphs)
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self._device) if on_cuda else None
        self._pool = torch.cuda.graph_pool_handle() if on_cuda else None
        self.on_gpu = on_cuda
        checks = _check_batches(artifact, config.precision)
        self.precision, _ = choose_precision(config.precision, self._device.type, self._eager, checks)
        kind = "CUDA graphs" if on_cuda else "static buckets"
        self.description = f"torch:{self._device} ({kind}, {self.precision})"
        self.scorer: Scorer | None = None
        if artifact.item_table is not None:
            self.scorer = TorchScorer(artifact.item_table, label_units(artifact), self._device)

    def _eager(self, inputs: EngineInputs, precision: Precision) -> EngineOutputs:
        """The program run directly (the precision check's reference)."""
        torch = self._torch
        with torch.no_grad(), numerics(precision, self._device):
            outputs = self._module(*(torch.from_numpy(a).to(self._device) for a in inputs))
            return EngineOutputs(*(o.float().cpu().numpy() for o in outputs))

    def _build(self, key: GraphKey) -> StaticGraph:
        what = "capturing a CUDA graph" if self.on_gpu else "allocating static buffers"
        log.info("%s for batch %d, support %d, query %d", what, *key)
        module = self._module if key.query else self._adapt_module
        return StaticGraph(self._torch, module, key, self._widths, self._device, self.precision, self._pool, self._stream)

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        users = len(inputs.user_features)
        parts = []
        with self._lock:
            for rows in batch_slices(users, self.batch_buckets[-1]):
                chunk = take_users(inputs, rows)
                key = graph_key(self.batch_buckets, chunk)
                parts.append(self.graphs.get(key, lambda: self._build(key)).run(chunk))
        return concat_outputs(parts)

    def adapt(self, inputs: AdaptInputs) -> AdaptOutputs:
        """The adapt graph, one captured graph per (batch bucket, support) with query 0."""
        users = len(inputs.user_features)
        parts = []
        with self._lock:
            for rows in batch_slices(users, self.batch_buckets[-1]):
                chunk = [a[rows] for a in inputs]
                key = GraphKey(batch_bucket(self.batch_buckets, len(chunk[0])), chunk[1].shape[1], 0)
                parts.append(self.graphs.get(key, lambda: self._build(key)).run_arrays(chunk))
        joined = [np.concatenate(arrays) if len(parts) > 1 else arrays[0] for arrays in zip(*parts)]
        return adapt_outputs(self._adapt_names, joined)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return _cuda_memory(self._torch, self._device) if self.on_gpu else {}

    @property
    def module(self):
        """The program the graphs were captured from (for benchmarks and diagnostics)."""
        return self._module

    @property
    def stream(self):
        """The CUDA stream batches run on (None on CPU)."""
        return self._stream


def _program_signature(program) -> tuple[list[TensorSignature], list[TensorSignature]]:
    """Inputs (by placeholder name) and outputs (in order) of an ExportedProgram."""
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = [_torch_signature(name, placeholders[name].meta.get("val")) for name in user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    results = output_node.args[0]
    outputs = [_torch_signature(f"output{i}", r.meta.get("val") if hasattr(r, "meta") else None) for i, r in enumerate(results)]
    return inputs, outputs


def _torch_signature(name: str, value) -> TensorSignature:
    import torch

    if value is None or not hasattr(value, "shape"):
        return TensorSignature(name, "unknown", ())  # type: ignore[arg-type]
    dtypes = {torch.int64: "int64", torch.float32: "float32"}
    dims = tuple(d if isinstance(d, int) else None for d in value.shape)
    return TensorSignature(name, dtypes.get(value.dtype, str(value.dtype)), dims)  # type: ignore[arg-type]

