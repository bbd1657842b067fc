"""Engine benchmark: adapt-then-score throughput and latency against two baselines.

For every cell of the grid (batch B, support S, candidates Q; the artifact's inner
steps) it times, interleaved round by round so that all see the same background load:

- the engines: onnxruntime CPU, torch CPU (torch program), and where CUDA is present torch
  CUDA eager, torch CUDA graphs and onnxruntime CUDA (if its provider is installed);
- baseline (a), the naive loop: per user a deep copy of an nn.Module holding the model,
  torch.optim.SGD for the inner steps, then predict (bench/reference.py);
- baseline (b), training's inner loop (torch.func grad inside vmap) run eagerly,

all on the same weights (the artifact's init.safetensors and manifest). Every method's
outputs are compared with (b) on the CPU: max |diff| must stay within 1e-4 (1e-3 for
reduced precisions). Ratios compare each engine with the baselines on its own device.
Peak memory per batch size is measured in a fresh process per method and batch (RSS
growth during one call; torch.cuda.max_memory_allocated on GPU). On a GPU it also counts
the flops and bytes of one call and reports the fraction of the measured matmul rate and
copy bandwidth reached.

    python bench/engine.py                       # builds an artifact (ml-100k if present), full grid
    python bench/engine.py --artifact models/warmstart/3 --quick
    python bench/engine.py --artifact A --batches 1,1024 --supports 10 --queries 100 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.artifact import Artifact, load_artifact  # noqa: E402
from service.padding import EngineInputs, EngineOutputs  # noqa: E402

ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
GRID = {"batches": (1, 8, 64, 256), "supports": (5, 10, 20), "queries": (100, 1000)}
QUICK = {"batches": (1, 64, 256), "supports": (10,), "queries": (100, 1000)}
GOAL_CELL = (64, 10, 100)  # onnxruntime CPU: >= 40x the naive loop, >= 4x torch.func eager
ONE_USER_CELL = (1, 10, 100)  # one user on CPU: <= 1 ms engine time
GPU_GOAL_CELL = (1024, 10, 100)  # torch CUDA on an H100: >= 100,000 users/s
FP32_TOLERANCE = 1e-4
REDUCED_TOLERANCE = 1e-3


# -- artifact --------------------------------------------------------------------------------------


def build_artifact(repository: Path, tiny: bool = False) -> Path:
    """A realistic artifact (factors 16, a few meta-steps): MovieLens-100K when the data is
    at ../shared/data/ml-100k, else synthetic data of MovieLens-100K's size (943 users,
    1682 items). tiny: the test suite's artifact (150 items, factors 8)."""
    from training import model as M
    from training.pipeline import JobConfig, train_and_export
    from training.synthetic import generate_synthetic

    config = JobConfig.default(meta_steps=40, eval_every=20)
    config.model = M.ModelConfig(kind="bias_factor", factors=16)
    if tiny:
        dataset, name = generate_synthetic(seed=3, n_users=240, n_items=150), "tiny"
        config = JobConfig.default(meta_steps=30, eval_every=10, meta_batch_size=16)
        config.model = M.ModelConfig(kind="bias_factor", factors=8)
    elif (ML100K / "u.data").exists():
        from training.data import load_dataset

        dataset, name = load_dataset("ml-100k", ML100K), "ml100k"
    else:
        dataset, name = generate_synthetic(seed=0, n_users=943, n_items=1682), "synthetic"
    return train_and_export(dataset, repository, name, config, version="1").export.path


def describe_artifact(artifact: Artifact) -> str:
    m = artifact.manifest
    factors = json.loads(m.model.hyperparameters.get("factors", "0"))
    return (
        f"{m.model_name}/{m.model_version} ({m.model.kind}, factors {factors}, {m.inner_loop.steps} inner steps, "
        f"item width {artifact.encoder.item_width}, catalog {artifact.catalog.size} items)"
    )


def make_inputs(artifact: Artifact, batch: int, support: int, query: int, seed: int) -> EngineInputs:
    """Catalog items, random user attributes; every user has exactly `support` interactions."""
    from service.engines import sample_inputs

    inputs = sample_inputs(artifact, batch, support, query, np.random.default_rng(seed))
    inputs.support_mask[:] = 1.0
    rng = np.random.default_rng(seed + 1)
    low, high = artifact.label.min_value, artifact.label.max_value
    labels = rng.integers(0, 2, size=inputs.support_labels.shape) if artifact.label.kind == "click" else rng.integers(
        int(low), int(high) + 1, size=inputs.support_labels.shape
    )
    inputs.support_labels[:] = labels
    return inputs


# -- methods ---------------------------------------------------------------------------------------


@dataclass
class Method:
    key: str  # naive | eager | onnxruntime | torch | torch-graphs (+ precision)
    device: str  # cpu | cuda
    name: str
    run: Callable[..., EngineOutputs]
    baseline: bool = False
    user_cap: int | None = None  # runs the first user_cap users only; time scaled to the batch
    tolerance: float = FP32_TOLERANCE

    def call(self, inputs: EngineInputs) -> tuple[EngineOutputs, int]:
        """Runs the method; returns its outputs and how many users it ran."""
        users = len(inputs.user_features)
        if self.user_cap is not None and users > self.user_cap:
            return self.run(inputs, users=self.user_cap), self.user_cap
        return self.run(inputs), users


METHOD_NAMES = {
    ("naive", "cpu"): "naive loop (CPU)",
    ("eager", "cpu"): "torch.func eager (CPU)",
    ("onnxruntime", "cpu"): "onnxruntime CPU",
    ("torch", "cpu"): "torch CPU (torch program)",
    ("naive", "cuda"): "naive loop (CUDA)",
    ("eager", "cuda"): "torch.func eager (CUDA)",
    ("torch", "cuda"): "torch CUDA eager (torch program)",
    ("torch-graphs", "cuda"): "torch CUDA graphs",
    ("onnxruntime", "cuda"): "onnxruntime CUDA",
}


def onnx_file_method(label: str, path: Path, threads: int) -> Method:
    """onnxruntime CPU on another model.onnx with the same inputs (e.g. the same weights
    exported by other code: the graph before a change), set up as the service's engine."""
    import onnxruntime as ort

    from service.artifact import INPUT_NAMES, OUTPUT_NAMES

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = [(i, n) for i, n in enumerate(INPUT_NAMES) if n in {x.name for x in session.get_inputs()}]

    def run(inputs: EngineInputs) -> EngineOutputs:
        return EngineOutputs(*session.run(list(OUTPUT_NAMES), {n: inputs[i] for i, n in feeds}))

    return Method("onnxruntime-file", "cpu", f"onnxruntime CPU ({label})", run)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    from service.engines import nvidia_gpu_present

    return "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_gpu_present()


def method_keys(devices: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    keys = [("naive", "cpu"), ("eager", "cpu"), ("onnxruntime", "cpu"), ("torch", "cpu")]
    if "cuda" in devices:
        keys += [("naive", "cuda"), ("eager", "cuda"), ("torch", "cuda"), ("torch-graphs", "cuda")]
        keys += [(f"torch-graphs:{p}", "cuda") for p in precisions if p != "fp32"]
        if ort_cuda_available():
            keys.append(("onnxruntime", "cuda"))
    return keys


def build_method(key: str, device: str, artifact: Artifact, args: argparse.Namespace) -> Method | None:
    """One method on one device (None when a reduced precision was refused at load)."""
    from bench.reference import NaiveLoop, func_eager, load_reference
    from service.engines import CudaGraphEngine, EngineConfig, create_engine

    threads = args.threads
    if key in ("naive", "eager"):
        reference = load_reference(artifact.path)
        if key == "naive":
            loop = NaiveLoop(reference, device)
            return Method(key, device, METHOD_NAMES[key, device], loop.run, baseline=True, user_cap=args.naive_users)
        if device == "cuda":
            reference = dataclasses.replace(reference, params={k: v.to(device) for k, v in reference.params.items()})
        return Method(key, device, METHOD_NAMES[key, device], lambda x: func_eager(reference, x, device), baseline=True)
    if key == "onnxruntime":
        config = EngineConfig(kind="onnxruntime", device=device, ort_intra_op_threads=threads)  # type: ignore[arg-type]
        return Method(key, device, METHOD_NAMES[key, device], create_engine(artifact, config).run)
    if key == "torch":
        config = EngineConfig(kind="torch", device=device, torch_threads=threads, cuda_graphs=False)  # type: ignore[arg-type]
        return Method(key, device, METHOD_NAMES[key, device], create_engine(artifact, config).run)
    precision = key.split(":")[1] if ":" in key else "fp32"
    engine = CudaGraphEngine(artifact, EngineConfig(kind="torch", device="cuda", precision=precision))  # type: ignore[arg-type]
    if engine.precision != precision:
        print(f"note: {precision} refused by the precision check (see the log line); not benchmarked", file=sys.stderr)
        return None
    name = METHOD_NAMES["torch-graphs", "cuda"] + ("" if precision == "fp32" else f" ({precision})")
    tolerance = FP32_TOLERANCE if precision == "fp32" else REDUCED_TOLERANCE
    return Method(key, device, name, engine.run, tolerance=tolerance)


# -- measurement -----------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # per call, scaled to the whole batch
    max_abs_diff: float = 0.0
    gpu_peak_bytes: int | None = None

    def p(self, q: float) -> float:
        return float(np.percentile(self.seconds, q))


def _sync(method: Method) -> None:
    if method.device == "cuda":
        import torch

        torch.cuda.synchronize()


def first_call(method: Method, inputs: EngineInputs, reference: EngineOutputs) -> Timing:
    """The untimed first call: correctness against the reference, GPU peak memory."""
    timing = Timing()
    if method.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    outputs, users = method.call(inputs)
    if method.device == "cuda":
        timing.gpu_peak_bytes = int(torch.cuda.max_memory_allocated() - base)
    from bench.reference import max_abs_diff

    timing.max_abs_diff = max_abs_diff(outputs, reference, users)
    return timing


def time_slice(method: Method, inputs: EngineInputs, min_time_s: float, timing: Timing) -> None:
    """Calls until min_time_s has passed (at least once), appending seconds per batch."""
    batch = len(inputs.user_features)
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        _, users = method.call(inputs)
        _sync(method)
        timing.seconds.append((time.perf_counter() - t0) * batch / users)
        if time.perf_counter() - started >= min_time_s:
            return


def run_grid(methods: list[Method], artifact: Artifact, cells: list[tuple[int, int, int]], args) -> dict:
    from bench.reference import func_eager, load_reference

    reference_model = load_reference(artifact.path)
    results: dict[tuple[int, int, int], dict[str, Timing]] = {}
    for cell in cells:
        inputs = make_inputs(artifact, *cell, seed=sum(cell))
        reference = func_eager(reference_model, inputs)
        timings = {m.name: first_call(m, inputs, reference) for m in methods}
        for r in range(args.repeat):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate who goes first
            for m in order:
                time_slice(m, inputs, args.min_time_s, timings[m.name])
        results[cell] = timings
        print(f"  measured B={cell[0]} S={cell[1]} Q={cell[2]}", file=sys.stderr, flush=True)
    return results


# -- memory probes (a fresh process per method and batch) ------------------------------------------


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def probe_memory(args) -> int:
    """(Subprocess) peak memory of one call: RSS growth, or CUDA allocation on GPU."""
    artifact = load_artifact(args.artifact)
    key, device = args.probe_memory.split("@")
    method = build_method(key, device, artifact, args)
    assert method is not None
    b, s, q = (int(x) for x in args.probe_shape.split(","))
    inputs = make_inputs(artifact, b, s, q, seed=b + s + q)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method.call(inputs)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
        before = _status_kib("VmRSS")
        method.call(inputs)
        peak = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"peak_bytes": int(peak)}))
    return 0


def memory_table(keys: list[tuple[str, str]], artifact_path: Path, batches, support: int, query: int, args) -> dict:
    """Peak bytes by (method name, batch), each from a fresh process."""
    out: dict[tuple[str, int], int | None] = {}
    for key, device in keys:
        for b in batches:
            command = [
                sys.executable, str(Path(__file__).resolve()), "--artifact", str(artifact_path),
                "--probe-memory", f"{key}@{device}", "--probe-shape", f"{b},{support},{query}",
                "--threads", str(args.threads), "--naive-users", str(args.naive_users),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
            name = _display_name(key, device)
            try:
                out[name, b] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
            except (IndexError, ValueError, KeyError):
                print(f"memory probe {key}@{device} B={b} failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
                out[name, b] = None
    return out


def _display_name(key: str, device: str) -> str:
    if key.startswith("torch-graphs:"):
        return METHOD_NAMES["torch-graphs", device] + f" ({key.split(':')[1]})"
    return METHOD_NAMES[key, device]


# -- reporting -------------------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def print_tables(methods: list[Method], results: dict, args) -> dict:
    """The per-engine tables; returns the summary (goal cells) as plain data."""
    baselines = {(m.key, m.device): m for m in methods if m.baseline}
    summary: dict = {"cells": {}}
    print("\nBaselines (same weights, same run); users/s = B / median seconds per batch")
    header = f"{'B':>5} {'S':>3} {'Q':>5} | " + " | ".join(f"{m.name:>26}" for m in baselines.values())
    print(header)
    print(f"{'':>15} | " + " | ".join(f"{'users/s':>10} {'p50 ms':>9} {'|d|':>5}" for _ in baselines.values()))
    for cell, timings in results.items():
        row = []
        for m in baselines.values():
            t = timings[m.name]
            approx = "~" if m.user_cap is not None and cell[0] > m.user_cap else " "
            row.append(f"{_fmt_rate(cell[0] / t.p(50)):>10} {approx}{1e3 * t.p(50):>8.2f} {t.max_abs_diff:>5.0e}")
        print(f"{cell[0]:>5} {cell[1]:>3} {cell[2]:>5} | " + " | ".join(row))
    if any(m.user_cap for m in baselines.values()):
        cap = next(m.user_cap for m in baselines.values() if m.user_cap)
        print(f"~ naive loop: timed on the first {cap} users of the batch, seconds scaled to B (a loop's cost is per user)")
    for m in methods:
        if m.baseline:
            continue
        naive, eager = baselines.get(("naive", m.device)), baselines.get(("eager", m.device))
        print(f"\n{m.name}: users/s, engine time per batch (median, p90), ratio of users/s to the {m.device.upper()} baselines")
        print(f"{'B':>5} {'S':>3} {'Q':>5} | {'users/s':>10} {'p50 ms':>9} {'p90 ms':>9} | {'x naive':>8} {'x eager':>8} | {'max |d|':>8}")
        for cell, timings in results.items():
            t = timings[m.name]
            rate = cell[0] / t.p(50)
            x_naive = timings[naive.name].p(50) / t.p(50) if naive else float("nan")
            x_eager = timings[eager.name].p(50) / t.p(50) if eager else float("nan")
            flag = "" if t.max_abs_diff <= m.tolerance else "  EXCEEDS TOLERANCE"
            print(
                f"{cell[0]:>5} {cell[1]:>3} {cell[2]:>5} | {_fmt_rate(rate):>10} {1e3 * t.p(50):>9.3f} {1e3 * t.p(90):>9.3f} |"
                f" {x_naive:>8.1f} {x_eager:>8.1f} | {t.max_abs_diff:>8.1e}{flag}"
            )
            summary["cells"].setdefault(f"{cell[0]},{cell[1]},{cell[2]}", {})[m.name] = {
                "users_per_s": rate, "p50_ms": 1e3 * t.p(50), "p90_ms": 1e3 * t.p(90),
                "x_naive": x_naive, "x_eager": x_eager, "max_abs_diff": t.max_abs_diff, "tolerance": m.tolerance,
                "gpu_peak_bytes": t.gpu_peak_bytes,
            }
    return summary


def print_memory(memory: dict, batches, support: int, query: int) -> None:
    names = list(dict.fromkeys(name for name, _ in memory))
    print(f"\nPeak memory of one call at S={support}, Q={query} (fresh process each: RSS growth on CPU, "
          "CUDA allocations on GPU), MiB")
    print(f"{'method':<30} " + " ".join(f"{'B=' + str(b):>9}" for b in batches))
    for name in names:
        cells = [memory.get((name, b)) for b in batches]
        print(f"{name:<30} " + " ".join(f"{'n/a':>9}" if c is None else f"{c / 2**20:>9.1f}" for c in cells))


def print_gpu_memory(methods: list[Method], results: dict) -> None:
    gpu = [m for m in methods if m.device == "cuda"]
    if not gpu:
        return
    print("\nPeak CUDA memory of the first call of each cell (torch.cuda.max_memory_allocated growth; graphs: capture included), MiB")
    print(f"{'B':>5} {'S':>3} {'Q':>5} | " + " ".join(f"{m.name[:24]:>24}" for m in gpu))
    for cell, timings in results.items():
        cells = [timings[m.name].gpu_peak_bytes for m in gpu]
        print(f"{cell[0]:>5} {cell[1]:>3} {cell[2]:>5} | " + " ".join(
            f"{'n/a':>24}" if c is None else f"{c / 2**20:>24.1f}" for c in cells))


def print_roofline(methods: list[Method], results: dict, artifact: Artifact, args, summary: dict) -> None:
    """Flops and bytes of one call, and the fraction of the device's ceilings reached."""
    import torch

    from bench.roofline import count_call, measure_ceilings, roofline_fraction

    devices = sorted({m.device for m in methods if not m.baseline})
    ceilings = {}
    for device in devices:
        if device == "cpu" and not args.cpu_roofline:
            continue
        ceilings[device] = measure_ceilings(device)
    if not ceilings:
        return
    from warmstart.torch_program import load_program

    module = load_program(artifact.torch_export_path).module()
    print("\nRoofline. Ceilings measured now: " + "; ".join(
        f"{d} ({c.device}): float32 matmul {c.matmul_flops_per_s / 1e12:.2f} TFLOP/s, copy {c.copy_bytes_per_s / 1e9:.0f} GB/s"
        for d, c in ceilings.items()))
    print("flops and bytes per call counted from the torch program's ops; graph bytes = every op's inputs + outputs; "
          "compulsory = inputs + outputs + each table once")
    print(f"{'B':>5} {'S':>3} {'Q':>5} {'engine':<30} {'MFLOP':>8} {'graph MB':>9} {'comp. MB':>9} {'GFLOP/s':>8} "
          f"{'% matmul':>8} {'graph GB/s':>10} {'% bw':>6} {'% roofline':>10}")
    summary["ceilings"] = {d: dataclasses.asdict(c) for d, c in ceilings.items()}
    for cell, timings in results.items():
        count = count_call(module, make_inputs(artifact, *cell, seed=0))
        for m in methods:
            if m.baseline or m.device not in ceilings or m.key == "onnxruntime-file":
                continue  # (another graph's ops were not counted)
            c, seconds = ceilings[m.device], timings[m.name].p(50)
            print(
                f"{cell[0]:>5} {cell[1]:>3} {cell[2]:>5} {m.name[:30]:<30} {count.flops / 1e6:>8.2f} {count.graph_bytes / 1e6:>9.2f} "
                f"{count.compulsory_bytes / 1e6:>9.2f} {count.flops / seconds / 1e9:>8.2f} "
                f"{100 * count.flops / seconds / c.matmul_flops_per_s:>8.3f} {count.graph_bytes / seconds / 1e9:>10.2f} "
                f"{100 * count.graph_bytes / seconds / c.copy_bytes_per_s:>6.2f} {100 * roofline_fraction(count, seconds, c):>10.3f}"
            )
            entry = summary["cells"].setdefault(f"{cell[0]},{cell[1]},{cell[2]}", {}).setdefault(m.name, {})
            entry.update({"flops": count.flops, "graph_bytes": count.graph_bytes, "compulsory_bytes": count.compulsory_bytes,
                          "roofline_fraction": roofline_fraction(count, seconds, c)})


def print_goals(summary: dict) -> None:
    """The issue's goals, read off the measured cells (only those that were measured)."""
    cells = summary["cells"]
    lines = []
    goal = cells.get(",".join(map(str, GOAL_CELL)), {}).get("onnxruntime CPU")
    if goal:
        ok = goal["x_naive"] >= 40 and goal["x_eager"] >= 4
        lines.append(f"onnxruntime CPU at B=64 S=10 Q=100: {goal['x_naive']:.0f}x naive (goal >= 40), "
                     f"{goal['x_eager']:.1f}x torch.func eager (goal >= 4): {'met' if ok else 'MISSED'}")
    for name in ("onnxruntime CPU", "torch CUDA graphs"):
        one = cells.get(",".join(map(str, ONE_USER_CELL)), {}).get(name)
        if one:
            lines.append(f"{name}, one user (B=1 S=10 Q=100): {one['p50_ms']:.3f} ms median engine time (goal <= 1 ms): "
                         f"{'met' if one['p50_ms'] <= 1 else 'MISSED'}")
    gpu = cells.get(",".join(map(str, GPU_GOAL_CELL)), {}).get("torch CUDA graphs")
    if gpu:
        lines.append(f"torch CUDA graphs at B=1024 S=10 Q=100: {gpu['users_per_s']:,.0f} users/s (goal >= 100,000 on an H100): "
                     f"{'met' if gpu['users_per_s'] >= 1e5 else 'MISSED'}")
    bad = [(cell, name) for cell, row in cells.items() for name, e in row.items()
           if "max_abs_diff" in e and e["max_abs_diff"] > e["tolerance"]]
    lines.append("outputs: every engine within tolerance of torch.func eager" if not bad else f"outputs EXCEED tolerance: {bad}")
    print("\nGoals (issue 7)")
    for line in lines:
        print("  " + line)
    summary["goals"] = lines


def print_short_table(summary: dict) -> None:
    """Users/s (median ms per batch) of every engine at every cell: the check's last table."""
    cells = summary["cells"]
    engines = list(dict.fromkeys(name for row in cells.values() for name, e in row.items() if "users_per_s" in e))
    print(f"\n{summary.get('machine', '')}")
    print("users/s (median ms per batch); x = ratio to the naive loop / torch.func eager on the same device")
    print(f"{'B':>5} {'S':>3} {'Q':>5}  " + "  ".join(f"{name[:30]:>30}" for name in engines))
    for cell, row in cells.items():
        b, s, q = cell.split(",")
        parts = []
        for name in engines:
            e = row.get(name)
            text = "" if e is None else f"{e['users_per_s']:,.0f} ({e['p50_ms']:.2f}) x{e['x_naive']:.0f}/x{e['x_eager']:.1f}"
            parts.append(f"{text:>30}")
        print(f"{b:>5} {s:>3} {q:>5}  " + "  ".join(parts))


def machine_line(args) -> str:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    parts = [f"{os.cpu_count()} cores ({cpu})", f"load average {os.getloadavg()[0]:.2f}",
             f"torch {torch.__version__} ({args.threads} thread{'s' if args.threads != 1 else ''})",
             f"onnxruntime {onnxruntime.__version__}"]
    if torch.cuda.is_available():
        parts.insert(1, f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


# -- main ------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory <repo>/<name>/<version> (default: build one)")
    parser.add_argument("--repository", type=Path, help="where to build the artifact (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="build the test suite's tiny artifact instead (fast, unrealistic)")
    parser.add_argument("--quick", action="store_true", help=f"reduced grid {QUICK}")
    parser.add_argument("--batches", type=_ints, help="comma-separated batch sizes (overrides the grid's)")
    parser.add_argument("--supports", type=_ints, help="comma-separated support sizes")
    parser.add_argument("--queries", type=_ints, help="comma-separated candidate counts")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per cell (default 3)")
    parser.add_argument("--min-time-s", type=float, default=0.1, help="seconds each method runs per round (at least one call)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime CPU threads (default 1)")
    parser.add_argument("--naive-users", type=int, default=64, help="the naive loop runs at most this many users per batch")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: skip CUDA even when present")
    parser.add_argument("--precisions", default="fp32", help="torch CUDA graphs precisions to try: fp32,tf32,bf16")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--cpu-roofline", action="store_true", help="also report the roofline of the CPU engines")
    parser.add_argument(
        "--compare-onnx", action="append", default=[], metavar="LABEL=PATH",
        help="also time onnxruntime CPU on another model.onnx of the same weights (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write the results (summary and goals) here")
    parser.add_argument("--summary-only", type=Path, help="print the short table and goals of a --json file and exit")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    parser.add_argument("--probe-shape", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_only:
        summary = json.loads(args.summary_only.read_text())
        print_short_table(summary)
        print_goals(summary)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if args.probe_memory:
        return probe_memory(args)
    grid = dict(QUICK if args.quick else GRID)
    devices = ["cpu"] + (["cuda"] if args.device == "auto" and cuda_available() else [])
    if "cuda" in devices and not args.batches:
        grid["batches"] = (*grid["batches"], 1024)
    for name in ("batches", "supports", "queries"):
        if getattr(args, name):
            grid[name] = getattr(args, name)
    cells = [(b, s, q) for b in grid["batches"] for s in grid["supports"] for q in grid["queries"]]
    with tempfile.TemporaryDirectory(prefix="warmstart-engine-bench-") as tmp:
        artifact_path = args.artifact
        if artifact_path is None:
            print("building an artifact (MovieLens-100K if present, ~1-2 min) ...", file=sys.stderr, flush=True)
            artifact_path = build_artifact(args.repository or Path(tmp), tiny=args.tiny)
        args.artifact = artifact_path.resolve()
        artifact = load_artifact(args.artifact)
        keys = method_keys(devices, args.precisions.split(","))
        methods = [m for m in (build_method(k, d, artifact, args) for k, d in keys) if m is not None]
        for spec in args.compare_onnx:
            label, _, path = spec.partition("=")
            methods.append(onnx_file_method(label, Path(path), args.threads))
        machine = machine_line(args)
        print(f"engine benchmark: {machine}")
        print(f"artifact {args.artifact}: {describe_artifact(artifact)}")
        print(f"grid B={grid['batches']} S={grid['supports']} Q={grid['queries']}; {args.repeat} interleaved rounds of "
              f">= {args.min_time_s:g} s per method per cell; every user has exactly S interactions")
        started = time.perf_counter()
        results = run_grid(methods, artifact, cells, args)
        summary = print_tables(methods, results, args)
        summary["machine"] = f"{machine}; artifact {describe_artifact(artifact)}"
        print_gpu_memory(methods, results)
        if not args.no_memory:
            support, query = max(grid["supports"]), max(grid["queries"])
            cpu_keys = [(k, d) for k, d in keys if d == "cpu"]
            memory = memory_table(cpu_keys, args.artifact, grid["batches"], support, query, args)
            print_memory(memory, grid["batches"], support, query)
            summary["memory"] = {f"{n}@{b}": v for (n, b), v in memory.items()}
        print_roofline(methods, results, artifact, args, summary)
        print(f"\n(measured in {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f})")
        print_goals(summary)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
