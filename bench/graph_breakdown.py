"""Where the CUDA-graph engine's time goes: host staging, copies, the graph's replay.

For a few cells (batch B, support S, candidates Q) it runs the torch CUDA-graph engine
(service.engines.CudaGraphEngine) on one artifact and times, as medians over many
calls after a warm-up:

- engine:   one whole `engine.run` (wall clock: staging, copies, replay, the one wait);
- stage:    filling the page-locked host buffers from the request (host, numpy);
- copy in:  the five host-to-device input copies (device events on the engine's stream);
- replay:   the captured graph alone (device events);
- copy out: the three device-to-host output copies (device events);

and counts the aten ops of one call (bench/roofline.py's counter) and, on CUDA, the
device kernels one eager call launches (torch.profiler). replay / kernels is the mean
device time per kernel: near the few microseconds a small kernel costs, the graph is
bound by its kernel count rather than by arithmetic or memory traffic.

Without CUDA it runs the same engine's CPU machinery ("static buckets", eager "replays")
and times stage and replay by wall clock; the copy columns are empty.

    python bench/graph_breakdown.py --artifact models/warmstart/1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import make_inputs  # noqa: E402
from bench.roofline import count_call  # noqa: E402
from service.artifact import load_artifact  # noqa: E402
from service.engines import CudaGraphEngine, EngineConfig, _load_program, graph_key  # noqa: E402
from service.padding import fill_padded  # noqa: E402

CELLS = ((1, 10, 100), (64, 10, 100), (1024, 10, 100), (1024, 10, 1000))


def _median_wall(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _median_events(torch, stream, fn, repeats: int) -> float:
    """Median device seconds of fn's work queued on `stream`."""
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return statistics.median(seconds)


def count_kernels(torch, module, device_inputs) -> int:
    """Device kernels (and copies / fills) that one eager call of the program launches."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        module(*device_inputs)  # warm: lazy initialisation stays out of the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            module(*device_inputs)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def breakdown(engine: CudaGraphEngine, cpu_program, artifact, cell: tuple[int, int, int], repeats: int) -> dict:
    import torch

    inputs = make_inputs(artifact, *cell, seed=sum(cell))
    for _ in range(3):
        engine.run(inputs)  # captures the bucket's graph, then warms it
    graph = engine.graphs.get(graph_key(engine.batch_buckets, inputs), lambda: None)
    if graph is None:
        raise RuntimeError(f"no graph cached for {cell}: batch above the engine's largest bucket?")
    host_arrays = [t.numpy() for t in graph.host_inputs]

    def stage() -> None:
        for target, source in zip(host_arrays, inputs):
            fill_padded(target, source)

    row = {
        "cell": cell,
        "engine": _median_wall(lambda: engine.run(inputs), repeats),
        "stage": _median_wall(stage, repeats),
        "ops": count_call(cpu_program, inputs).ops,
    }
    if engine.on_gpu:
        stream = engine.stream

        def copy_in() -> None:
            for d, h in zip(graph.device_inputs, graph.host_inputs):
                d.copy_(h, non_blocking=True)

        def copy_out() -> None:
            for h, d in zip(graph.host_outputs, graph.device_outputs):
                h.copy_(d, non_blocking=True)

        row["copy_in"] = _median_events(torch, stream, copy_in, repeats)
        row["replay"] = _median_events(torch, stream, graph.graph.replay, repeats)
        row["copy_out"] = _median_events(torch, stream, copy_out, repeats)
        row["kernels"] = count_kernels(torch, engine.module, graph.device_inputs)
    else:
        row["replay"] = _median_wall(lambda: graph.run(inputs), repeats) - row["stage"]
    return row


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def print_table(rows: list[dict], device: str) -> None:
    print(f"\nCUDA-graph engine time, medians in ms ({device}); kernels = device ops of one eager call")
    print(f"{'B':>5} {'S':>3} {'Q':>5} | {'engine':>8} {'stage':>8} {'copy in':>8} {'replay':>8} {'copy out':>8} | "
          f"{'aten ops':>8} {'kernels':>8} {'us/kernel':>9}")
    for r in rows:
        per_kernel = f"{r['replay'] * 1e6 / r['kernels']:.2f}" if r.get("kernels") else ""
        print(f"{r['cell'][0]:>5} {r['cell'][1]:>3} {r['cell'][2]:>5} | {_ms(r['engine']):>8} {_ms(r['stage']):>8} "
              f"{_ms(r.get('copy_in')):>8} {_ms(r['replay']):>8} {_ms(r.get('copy_out')):>8} | "
              f"{r['ops']:>8} {r.get('kernels', ''):>8} {per_kernel:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory <repo>/<name>/<version>")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measure (default 50)")
    parser.add_argument("--cells", default=",".join("x".join(map(str, c)) for c in CELLS),
                        help="comma-separated BxSxQ cells (default %(default)s)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    if any(len(c) != 3 or min(c) < 1 for c in cells):
        parser.error(f"--cells: each cell is BxSxQ with positive integers, got {args.cells!r}")
    artifact = load_artifact(args.artifact)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = CudaGraphEngine(artifact, EngineConfig(kind="torch", device=device))  # type: ignore[arg-type]
    cpu_program = _load_program(artifact, torch.device("cpu"))  # the op counter runs on CPU
    rows = [breakdown(engine, cpu_program, artifact, cell, args.repeats) for cell in cells]  # type: ignore[arg-type]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, no CUDA: static buckets, eager replays"
    print_table(rows, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
