"""Floating-point operations and bytes of one adapt+score call, and the machine's ceilings.

`count_call` runs the exported torch program once under a dispatch mode that sees
every aten op the graph executes, and counts:

- flops: 2*M*N*K for matrix products, one per output element for elementwise ops, one
  per input element for reductions; gathers, copies and factories count none;
- graph bytes: what an op-by-op executor moves: every op's tensor inputs and outputs (a
  gather counts the rows it reads, not the whole table). A CUDA graph replays exactly
  these kernels, so this is the GPU engine's traffic;
- compulsory bytes: the least any implementation must move: the batch's inputs and
  outputs, and each table gathered from, read once (or only the rows gathered, when
  fewer).

`measure_ceilings` measures what the device can do: a large float32 matmul (FLOP/s) and
a large device-to-device copy (bytes/s, read + write). The fraction of roofline of a
call taking t seconds is max(flops / matmul rate, compulsory bytes / bandwidth) / t.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "mv", "addmv", "dot", "matmul"}
_GATHERS = {"embedding", "index", "index_select", "gather", "take_along_dim"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "linalg_vector_norm", "var", "std"}
_NO_FLOPS = {"cat", "clone", "copy", "copy_", "_to_copy", "to", "zeros_like", "ones_like", "empty_like", "full_like",
             "fill", "fill_", "zero_", "stack", "expand_copy", "split_with_sizes_copy", "unbind_copy", "slice_copy",
             "new_zeros", "new_empty", "scalar_tensor", "lift_fresh_copy", "alias_copy", "detach"}


@dataclass
class CallCount:
    flops: int
    graph_bytes: int  # every op's inputs + outputs
    compulsory_bytes: int  # batch inputs + outputs + each gathered row once
    ops: int  # aten ops executed


def _tensors(tree) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(tree)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.graph_bytes = 0
        self.tables: dict[int, int] = {}  # storage pointer -> bytes read from that table at most
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out  # no data moves
        name = func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        out_bytes = sum(_nbytes(t) for t in outputs)
        self.ops += 1
        if name in _GATHERS:
            indices = [t for t in inputs if not t.is_floating_point()]
            moved = out_bytes + sum(_nbytes(t) for t in indices)
            self.graph_bytes += moved + out_bytes  # rows read, indices read, output written
            table = inputs[0]  # embedding(weight, ...), index(self, ...), index_select(self, ...)
            key = table.untyped_storage().data_ptr()
            self.tables[key] = min(_nbytes(table), self.tables.get(key, 0) + out_bytes)
            return out
        self.graph_bytes += sum(_nbytes(t) for t in inputs) + out_bytes
        if name in _MATMULS:
            a = inputs[-2] if name in ("addmm", "baddbmm", "addmv") else inputs[0]
            reduced = a.shape[-1] if a.dim() else 1
            self.flops += 2 * sum(t.numel() for t in outputs) * int(reduced)
        elif name in _REDUCTIONS:
            self.flops += max((t.numel() for t in inputs), default=0)
        elif name not in _NO_FLOPS and inputs:  # factories (no tensor inputs) compute nothing
            self.flops += max((t.numel() for t in outputs), default=0)
        return out


def count_call(module: torch.nn.Module, inputs: Sequence[np.ndarray]) -> CallCount:
    """Counts one call of the program on CPU (the counts do not depend on the device)."""
    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    counter = _Counter()
    with torch.no_grad(), counter:
        outputs = module(*args)
    io_bytes = sum(_nbytes(t) for t in args) + sum(_nbytes(t) for t in _tensors(outputs))
    return CallCount(counter.flops, counter.graph_bytes, io_bytes + sum(counter.tables.values()), counter.ops)


@dataclass
class Ceilings:
    device: str
    matmul_flops_per_s: float  # float32 (IEEE, no TF32)
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written


def _timed(device: torch.device, fn, repeats: int) -> float:
    """Best seconds of one call of fn over `repeats` (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
    return best


def measure_ceilings(device: torch.device | str, matmul_size: int | None = None, copy_bytes: int | None = None) -> Ceilings:
    """A large float32 matmul and a large copy on `device` (defaults sized for the device)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    n = matmul_size or (8192 if on_cuda else 1024)
    size = copy_bytes or ((1 << 30) if on_cuda else (64 << 20))
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    if on_cuda:
        matmul.fp32_precision = "ieee"
    try:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        c = torch.empty(n, n, device=device)
        seconds = _timed(device, lambda: torch.mm(a, b, out=c), repeats=5)
        flops = 2.0 * n**3 / seconds
        del a, b, c
        src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        seconds = _timed(device, lambda: dst.copy_(src), repeats=10)
        bandwidth = 2.0 * src.numel() * 4 / seconds
        del src, dst
    finally:
        matmul.fp32_precision = previous
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    return Ceilings(name, flops, bandwidth)


def roofline_fraction(count: CallCount, seconds: float, ceilings: Ceilings) -> float:
    """The roofline bound's time over the measured time (1.0 = at the ceiling)."""
    bound = max(count.flops / ceilings.matmul_flops_per_s, count.compulsory_bytes / ceilings.copy_bytes_per_s)
    return bound / seconds
