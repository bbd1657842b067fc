"""Meta-training over several processes (training.distributed) with real gloo process groups.

Two ranks of meta-batch B must train to the weights one process gets with a meta-batch of
2B (up to the order of float additions); a run with a killed rank resumes from rank 0's
checkpoint to the weights of an uninterrupted run; only rank 0 writes. The ranks are real
processes (torch.multiprocessing, spawn) on a tiny synthetic data set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from training import model as M
from training.distributed import Collective, ProcessGroupConfig, Ranks, process_group
from training.harness import fit_context
from training.initialisation import prepare
from training.learners import learner_config
from training.splits import Protocol, make_splits
from training.synthetic import generate_synthetic
from training.trainer import MetaTrainer, TrainConfig

B = 4  # meta-batch per rank
STEPS = 12
CONFIG = dict(meta_steps=STEPS, eval_every=4, checkpoint_every=4, patience=0)


def build_trainer(config: TrainConfig, checkpoint_dir: Path | None, collective: Collective | None = None) -> MetaTrainer:
    dataset = generate_synthetic(seed=11, n_users=240, n_items=120)
    split = make_splits(dataset, Protocol(folds=4, seed=0))[0]
    context = fit_context(dataset, split, (5, None))
    model_config = M.ModelConfig(factors=4)
    prep = prepare(dataset, context.train, context.valid_tasks, model_config, config, (5, None))
    return MetaTrainer(
        model_config,
        learner_config("warmstart"),
        config,
        prep.schema,
        dataset.label,
        prep.catalog,
        prep.sampler,
        context.valid_tasks,
        M.init_params(model_config, prep.schema, prep.stats, seed=config.seed),
        interactions=len(context.train),
        checkpoint_dir=checkpoint_dir,
        fingerprint=context.train.fingerprint(),
        collective=collective,
    )


def _rank_main(rank: int, world_size: int, port: int, out: str, kill_at: int) -> None:
    """One rank: trains B per step on a shared checkpoint directory, reports what it wrote."""
    import training.trainer as trainer_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    writes: list[str] = []
    real_save = trainer_module.save_file

    def counting_save(tensors, path, *args, **kwargs):
        writes.append(str(path))
        return real_save(tensors, path, *args, **kwargs)

    trainer_module.save_file = counting_save  # every checkpoint write goes through it

    def on_step(step: int) -> None:
        if rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no goodbye: as a lost machine

    base = Path(out)
    with process_group(Ranks(rank, world_size), ProcessGroupConfig(timeout_s=120)) as collective:
        trainer = build_trainer(TrainConfig(meta_batch_size=B, **CONFIG), base / "checkpoint", collective)
        result = trainer.run(log_path=base / "train_log.jsonl", on_step=on_step)
    report = {"writes": writes, "steps": result.steps_done, "history": result.history}
    (base / f"rank{rank}.json").write_text(json.dumps(report))
    save_file({k: v.detach().contiguous() for k, v in trainer.params.items()}, str(base / f"params-rank{rank}.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, kill_at: int = -1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(2, free_port(), str(out), kill_at), nprocs=2, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single process with 2B, two ranks of B, two ranks killed and resumed) output dirs."""
    base = tmp_path_factory.mktemp("distributed")
    single = build_trainer(TrainConfig(meta_batch_size=2 * B, **CONFIG), base / "single" / "checkpoint")
    single_result = single.run()
    save_file({k: v.detach().contiguous() for k, v in single.params.items()}, str(base / "single-params.safetensors"))
    run_ranks(base / "whole")
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(base / "killed", kill_at=7)
    killed_step = json.loads((base / "killed" / "checkpoint" / "checkpoint.json").read_text())["step"]
    run_ranks(base / "killed")  # the same command again: resumes
    return base, single_result, killed_step


def test_two_ranks_of_b_train_like_one_process_of_2b(runs):
    base, single, _ = runs
    one = load_file(str(base / "single-params.safetensors"))
    two = load_file(str(base / "whole" / "params-rank0.safetensors"))
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"max abs difference of the final parameters, 1 x {2 * B} vs 2 x {B}: {diff:.3g}")
    assert diff < 1e-5, diff
    moved = max(float((one[k] - p.detach()).abs().max()) for k, p in build_trainer(TrainConfig(**CONFIG), None).params.items())
    assert moved > 1e3 * max(diff, 1e-9), "the parameters must have moved far more than the ranks disagree"
    ranked = json.loads((base / "whole" / "rank0.json").read_text())
    assert ranked["steps"] == single.steps_done == STEPS
    for a, b in zip(ranked["history"], single.history, strict=True):
        assert a["step"] == b["step"] and a["valid_loss"] == pytest.approx(b["valid_loss"], abs=1e-5)


def test_every_rank_ends_with_the_same_parameters_and_decisions(runs):
    base, _, _ = runs
    zero = load_file(str(base / "whole" / "params-rank0.safetensors"))
    one = load_file(str(base / "whole" / "params-rank1.safetensors"))
    assert all(torch.equal(zero[k], one[k]) for k in zero)
    reports = [json.loads((base / "whole" / f"rank{r}.json").read_text()) for r in (0, 1)]
    decisions = [[{k: v for k, v in h.items() if k != "elapsed_s"} for h in r["history"]] for r in reports]
    assert decisions[0] == decisions[1]  # the validation loss was decided once


def test_rank_0_alone_writes_checkpoints_and_logs(runs):
    base, _, _ = runs
    zero, one = (json.loads((base / "whole" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["writes"] == []
    assert len(zero["writes"]) == STEPS // CONFIG["checkpoint_every"] + 1  # every 4 steps, and at the end
    meta = json.loads((base / "whole" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    log = (base / "whole" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [0, 4, 8, 12]  # one line per evaluation, not one per rank


def test_a_run_with_a_killed_rank_resumes_to_the_uninterrupted_weights(runs):
    base, _, killed_step = runs
    assert killed_step == 4  # rank 1 died after step 7; rank 0 could not finish step 8 without it
    whole = load_file(str(base / "whole" / "params-rank0.safetensors"))
    resumed = load_file(str(base / "killed" / "params-rank0.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    histories = [json.loads((base / d / "rank0.json").read_text())["history"] for d in ("whole", "killed")]
    assert [h["valid_loss"] for h in histories[0]] == [h["valid_loss"] for h in histories[1]]


def test_a_checkpoint_of_two_ranks_is_refused_by_one_process(runs, tmp_path):
    base, _, _ = runs
    trainer = build_trainer(TrainConfig(meta_batch_size=B, **CONFIG), base / "whole" / "checkpoint")
    with pytest.raises(ValueError, match="made by 2 processes"):
        trainer.run()


def test_ranks_come_from_torchruns_environment():
    assert Ranks.from_environment({}) == Ranks(0, 1, 0)
    assert Ranks.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        Ranks.from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError):
        Ranks(rank=2, world_size=2)
    with pytest.raises(ValueError, match="gloo"):
        ProcessGroupConfig(backend="mpi")


def test_a_collective_of_one_process_changes_nothing():
    alone = Collective()
    assert alone.shard([1, 2, 3]) == [1, 2, 3] and alone.shard_of == (0, 1)
    t = torch.ones(3, requires_grad=True)
    (t * 2).sum().backward()
    assert alone.average_gradients([t], 1.5, 4) == 1.5 and torch.equal(t.grad, torch.full((3,), 2.0))
    assert alone.mean_of_shards(0.25, 7) == 0.25


def test_shards_of_a_meta_batch_are_the_whole_batch():
    sampler = build_trainer(TrainConfig(meta_batch_size=9), None).sampler
    whole, whole_labels, _ = sampler.sample(np.random.default_rng(1), 9)
    parts = [sampler.sample(np.random.default_rng(1), 9, shard=(i, 3)) for i in range(3)]
    assert [p[0].support_items.shape[0] for p in parts] == [3, 3, 3]
    assert torch.equal(torch.cat([p[0].user_features for p in parts]), whole.user_features)
    assert torch.equal(torch.cat([p[0].support_mask.sum(1) for p in parts]), whole.support_mask.sum(1))
    assert torch.equal(torch.cat([p[1].sum(1) for p in parts]), whole_labels.sum(1))
    with pytest.raises(ValueError, match="cannot be split"):
        sampler.sample(np.random.default_rng(1), 2, shard=(0, 3))


def test_torchrun_train_writes_one_verified_artifact_from_rank_0(tmp_path):
    """The real entry point: torchrun with two processes, one export, a checkpoint of 2 ranks."""
    import subprocess
    import sys

    repository = tmp_path / "repository"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training.cli", "train", "--dataset", "synthetic", "--synthetic-users", "200",
        "--synthetic-items", "120", "--meta-steps", "6", "--eval-every", "3", "--meta-batch-size", "4",
        "--factors", "8", "--inner-steps", "1", "--no-progress", "--repository", str(repository), "--name", "t",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("artifact:") == 1, done.stdout  # rank 1 reports nothing
    assert sorted(p.name for p in (repository / "t").iterdir()) == ["1"]
    manifest = json.loads((repository / "t" / "1" / "manifest.json").read_text())
    assert manifest["model_version"] == "1" and int(manifest["training"]["meta_steps"]) == 6
    summary = json.loads((repository / "t" / "1" / "training_summary.json").read_text())
    assert summary["train"]["meta_batch_size"] == 4
    checkpoint = json.loads((repository / ".work" / "t" / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 6
    assert "rank 1/2" in done.stderr  # both ranks ran (and logged as such)


def test_export_under_torchrun_is_rank_0s_alone(tmp_path, monkeypatch, capsys):
    from training.cli import main

    command = ["export", "--checkpoint", str(tmp_path / "none"), "--repository", str(tmp_path / "repository")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(command) == 0  # rank 1 leaves the export to rank 0: it reads and writes nothing
    assert not (tmp_path / "repository").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 2  # rank 0 does the export (and here finds no checkpoint)
    assert "no checkpoint.safetensors" in capsys.readouterr().err
