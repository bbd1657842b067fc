"""Engines: run the artifact's adapt-then-score graph on one padded batch.

Two implementations with one interface, chosen by configuration:

- onnxruntime on model.onnx: the CPU provider, or CUDA where onnxruntime-gpu finds a GPU;
- torch on model.pt2 (`torch.export.load(...).module()`), on CUDA when there is a GPU,
  else on CPU. torch is imported only here, only when this engine is chosen, so an
  onnxruntime-only deployment does not need it.

Each engine checks the graph it loaded against the manifest's GraphSpec before use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from service.artifact import INPUT_NAMES, OUTPUT_NAMES, Artifact, GraphMismatchError, TensorSignature
from service.padding import EngineInputs, EngineOutputs

log = logging.getLogger(__name__)

EngineKind = Literal["onnxruntime", "torch"]
Device = Literal["auto", "cpu", "cuda"]
ENGINE_KINDS: tuple[str, ...] = ("onnxruntime", "torch")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class EngineError(RuntimeError):
    """The engine could not be created on the requested device."""


class Engine(Protocol):
    """What the batcher needs from an engine."""

    description: str  # e.g. "onnxruntime:CPUExecutionProvider", "torch:cuda:0"
    on_gpu: bool

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        """Runs one padded batch; safe to call from several threads at once."""
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

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {self.kind!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("ort_intra_op_threads", "ort_inter_op_threads", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def create_engine(artifact: Artifact, config: EngineConfig) -> Engine:
    """The configured engine over an artifact's graph (checked against the manifest)."""
    if config.kind == "onnxruntime":
        return OnnxRuntimeEngine(artifact, config)
    return TorchEngine(artifact, config)


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

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        outputs = self._session.run(OUTPUT_NAMES, {name: inputs[i] for i, name in self._feeds})
        return EngineOutputs(*outputs)

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}  # onnxruntime exposes no allocator statistics to Python


def _ort_signature(arg) -> TensorSignature:
    dims = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSignature(arg.name, _ORT_DTYPES.get(arg.type, arg.type), dims)  # type: ignore[arg-type]


class TorchEngine:
    """model.pt2, the torch.export program, run eagerly."""

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        import torch

        self._torch = torch
        if config.device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but torch sees no CUDA device")
        use_cuda = config.device != "cpu" and torch.cuda.is_available()
        self._device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if not use_cuda and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        file = artifact.manifest.graph.torch_export_file
        program = torch.export.load(str(artifact.torch_export_path))
        inputs, outputs = _program_signature(program)
        if [t.name for t in inputs] != list(INPUT_NAMES):
            raise GraphMismatchError(file, f"inputs {[t.name for t in inputs]}, expected {list(INPUT_NAMES)} in that order")
        if len(outputs) != len(OUTPUT_NAMES):
            raise GraphMismatchError(file, f"{len(outputs)} outputs, expected {len(OUTPUT_NAMES)}")
        # The program's outputs are unnamed: they are the manifest's outputs in OUTPUT_NAMES order.
        named_outputs = [TensorSignature(name, t.dtype, t.shape) for name, t in zip(OUTPUT_NAMES, outputs)]
        artifact.check_graph(file, inputs, named_outputs, extra_inputs_ok=True)
        self._module = program.module().to(self._device)
        self.on_gpu = use_cuda
        self.description = f"torch:{self._device}"

    def run(self, inputs: EngineInputs) -> EngineOutputs:
        torch = self._torch
        with torch.no_grad():
            args = [torch.from_numpy(a).to(self._device, non_blocking=True) for a in inputs]
            outputs = self._module(*args)
            return EngineOutputs(*(o.detach().cpu().numpy() for o in outputs))

    def gpu_memory_bytes(self) -> dict[str, int]:
        if not self.on_gpu:
            return {}
        torch = self._torch
        return {
            "allocated": int(torch.cuda.memory_allocated(self._device)),
            "reserved": int(torch.cuda.memory_reserved(self._device)),
        }


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

