"""The engine benchmark's parts: its naive baseline computes what the engines compute, its
op counter counts what was hand-derived, and the script runs end to end on CPU.

No timings are asserted (they would be flaky): speed claims live in the bench output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import engine as bench_engine
from bench.reference import NaiveLoop, func_eager, load_reference, max_abs_diff
from bench.roofline import Ceilings, CallCount, count_call, roofline_fraction
from service.artifact import load_artifact
from service.engines import EngineConfig, create_engine, sample_inputs
from warmstart.torch_program import load_program

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tiny_artifact: Path):
    return load_artifact(tiny_artifact)


def test_the_naive_loop_equals_the_engine_and_training_on_the_same_weights(artifact):
    """Model copy + torch.optim.SGD with the gradients scaled per coordinate takes the
    artifact's learned, support-normalised, pulled and clipped steps: same outputs."""
    reference = load_reference(artifact.path)
    inputs = sample_inputs(artifact, 7, 9, 20, np.random.default_rng(0))  # ragged; user 0 has no support
    inputs.support_labels[1, : int(inputs.support_mask[1].sum())] = 5.0  # a large residual: the clip acts
    naive = NaiveLoop(reference).run(inputs)
    engine = create_engine(artifact, EngineConfig(kind="onnxruntime")).run(inputs)
    assert max_abs_diff(naive, engine) <= 1e-4
    assert max_abs_diff(naive, func_eager(reference, inputs)) <= 1e-4
    assert naive.support_loss_after[2:].mean() < naive.support_loss_before[2:].mean()


def test_the_naive_loop_can_run_the_first_users_only(artifact):
    inputs = sample_inputs(artifact, 5, 4, 6, np.random.default_rng(1))
    part = NaiveLoop(load_reference(artifact.path)).run(inputs, users=2)
    assert part.query_scores.shape == (2, 6) and part.support_loss_before.shape == (2,)


def test_op_counter_matches_hand_counts():
    class Tiny(torch.nn.Module):
        def forward(self, a, b, ids):
            table = torch.arange(40, dtype=torch.float32).reshape(10, 4)
            rows = torch.nn.functional.embedding(ids, table)  # (3, 4): 48 bytes gathered
            return (a @ b + 1.0).sum() + rows.sum()

    a, b, ids = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), np.array([1, 1, 7])
    count = count_call(Tiny(), [a, b, ids])
    # mm 2*2*4*3 = 48, add 8, sum 8, sum of rows 12, final add 1; arange/reshape/embedding count none.
    assert count.flops == 48 + 8 + 8 + 12 + 1
    io = a.nbytes + b.nbytes + ids.nbytes + 4
    assert count.compulsory_bytes == io + 48  # rows read, fewer than the 160-byte table
    assert count.graph_bytes > count.compulsory_bytes


def test_roofline_fraction_takes_the_binding_ceiling():
    count = CallCount(flops=10**9, graph_bytes=0, compulsory_bytes=10**9, ops=1)
    compute_bound = Ceilings("x", matmul_flops_per_s=1e9, copy_bytes_per_s=1e12)
    memory_bound = Ceilings("x", matmul_flops_per_s=1e12, copy_bytes_per_s=1e9)
    assert roofline_fraction(count, 2.0, compute_bound) == pytest.approx(0.5)
    assert roofline_fraction(count, 4.0, memory_bound) == pytest.approx(0.25)


def test_the_bench_runs_end_to_end_on_cpu(artifact, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_engine.main([
        "--artifact", str(artifact.path), "--device", "cpu", "--batches", "1,3", "--supports", "2", "--queries", "5",
        "--repeat", "1", "--min-time-s", "0", "--naive-users", "2", "--no-memory", "--cpu-roofline",
        "--compare-onnx", f"same graph={artifact.onnx_path}", "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert code == 0
    for title in ("Baselines", "onnxruntime CPU:", "torch CPU (torch program):", "onnxruntime CPU (same graph):", "Roofline", "Goals"):
        assert title in printed
    assert "every engine within tolerance of torch.func eager" in printed
    summary = json.loads(out.read_text())
    cell = summary["cells"]["3,2,5"]["onnxruntime CPU"]
    assert cell["max_abs_diff"] <= 1e-4 and cell["users_per_s"] > 0 and cell["flops"] > 0
    assert bench_engine.main(["--summary-only", str(out)]) == 0
    assert "Goals (issue 7)" in capsys.readouterr().out


def test_a_memory_probe_reports_the_peak_of_one_call(artifact):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--artifact", str(artifact.path),
         "--probe-memory", "onnxruntime@cpu", "--probe-shape", "4,3,16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] >= 0


def _pins(text: str) -> set[str]:
    return {token for token in text.replace("\\", " ").split() if "==" in token}


def test_gpu_check_parses_and_the_readme_lists_its_exact_wheels():
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    header = "\n".join(line[1:] for line in script.read_text().splitlines() if line.startswith("#"))
    readme = (ROOT / "bench" / "README.md").read_text()
    download = readme[readme.index("python -m pip download") :].split("```")[0]
    assert _pins(header) == _pins(download) and len(_pins(header)) >= 19
    # Every wheel the script may install has a pinned download.
    prefixes = [line.split('"')[5] for line in script.read_text().splitlines() if line.strip().startswith('("') and line.count('"') >= 6]
    pinned = {p.split("==")[0].replace("-", "_").lower() + "-" for p in _pins(header)}
    assert prefixes and set(p.lower() for p in prefixes) <= pinned


def test_the_graph_breakdown_runs_on_cpu_and_counts_the_programs_ops(artifact, capsys):
    from bench import graph_breakdown

    assert graph_breakdown.main(["--artifact", str(artifact.path), "--repeats", "2", "--cells", "1x2x5,3x2x5"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("1 ", "3 "))]
    assert [r[:3] for r in rows] == [["1", "2", "5"], ["3", "2", "5"]]
    expected_ops = count_call(load_program(artifact.torch_export_path).module(), sample_inputs(
        artifact, 1, 2, 5, np.random.default_rng(0))).ops
    for r in rows:
        engine_ms, stage_ms = float(r[4]), float(r[5])
        assert engine_ms > 0 and 0 < stage_ms < engine_ms
        assert int(r[-1]) == expected_ops  # no CUDA: no kernel or copy columns
    with pytest.raises(SystemExit):
        graph_breakdown.main(["--artifact", str(artifact.path), "--cells", "1x2"])


def test_gpu_check_refuses_an_unknown_step_before_doing_anything(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--steps", "tests,nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown step nope" in done.stderr
    assert list(tmp_path.iterdir()) == []
