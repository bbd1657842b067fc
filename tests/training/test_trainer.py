"""Meta-training: it learns what the synthetic data is built to reward, and a killed run
resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training import model as M
from training.harness import fit_context
from training.initialisation import meta_train, prepare
from training.learners import learner_config
from training.splits import Protocol, build_tasks, make_splits
from training.synthetic import generate_synthetic
from training.trainer import MetaTrainer, TrainConfig


@pytest.fixture(scope="module")
def synthetic_split():
    dataset = generate_synthetic(seed=11, n_users=400, n_items=200)
    split = make_splits(dataset, Protocol(folds=4, seed=0))[0]
    return dataset, split, fit_context(dataset, split, (5, 10, None))


def rmse(model, catalog, tasks) -> float:
    errors = [np.clip(p, 1, 5) - t.query_labels for p, t in zip(model.predict(catalog, tasks), tasks)]
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def test_meta_learned_model_beats_the_same_network_without_adaptation(synthetic_split):
    dataset, split, context = synthetic_split
    config = M.ModelConfig(factors=8)
    train = TrainConfig(meta_steps=300, eval_every=50, meta_batch_size=32, patience=0)
    meta, meta_result, prep = meta_train(
        dataset, context.train, context.valid_tasks, config, learner_config("warmstart"), train, support_sizes=(5, 10, None)
    )
    plain, _, _ = meta_train(
        dataset, context.train, context.valid_tasks, config, learner_config("none"), train, support_sizes=(5, 10, None)
    )
    tasks = [t.with_support_size(10) for t in build_tasks(dataset, split, split.test_users)]
    with_adaptation, without = rmse(meta, prep.catalog, tasks), rmse(plain, prep.catalog, tasks)
    # The generator gives every user a bias and tastes that only their own ratings reveal.
    print(f"RMSE at K=10: meta-learned {with_adaptation:.4f}, without adaptation {without:.4f}")
    assert with_adaptation < without - 0.02, (with_adaptation, without)
    assert meta_result.steps_done == 300
    assert meta_result.best_validation_loss < meta_result.history[0]["valid_loss"]


class Killed(Exception):
    pass


def make_trainer(dataset, context, checkpoint_dir, config: TrainConfig) -> MetaTrainer:
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
    )


def test_a_killed_run_resumes_to_the_same_weights(synthetic_split, tmp_path):
    dataset, _, context = synthetic_split
    config = TrainConfig(meta_steps=40, eval_every=10, checkpoint_every=10, patience=0, meta_batch_size=8)

    whole = make_trainer(dataset, context, tmp_path / "whole", config).run()

    def kill_at_25(step: int) -> None:
        if step == 25:
            raise Killed()

    with pytest.raises(Killed):
        make_trainer(dataset, context, tmp_path / "resumed", config).run(on_step=kill_at_25)
    saved = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())
    assert saved["step"] == 20  # the last checkpoint before the kill
    resumed = make_trainer(dataset, context, tmp_path / "resumed", config).run()

    assert resumed.steps_done == whole.steps_done == 40
    for name, value in whole.params.items():
        assert torch.equal(value, resumed.params[name]), name
    assert [h["valid_loss"] for h in resumed.history] == [h["valid_loss"] for h in whole.history]


def test_a_kill_between_the_checkpoint_files_resumes_from_one_consistent_step(synthetic_split, tmp_path):
    """A kill after checkpoint.safetensors is replaced and before checkpoint.json is: the
    run resumes from the step the tensors belong to, never from the tensors of one step
    with the counters, optimiser state and sampler of another."""
    dataset, _, context = synthetic_split
    config = TrainConfig(meta_steps=40, eval_every=10, checkpoint_every=10, patience=0, meta_batch_size=8)
    whole = make_trainer(dataset, context, tmp_path / "whole", config).run()
    directory = tmp_path / "torn"
    copies: dict[int, str] = {}

    def keep_json_then_kill(step: int) -> None:
        if step in (10, 20):  # on_step runs just after the checkpoint of its step
            copies[step] = (directory / "checkpoint.json").read_text()
        if step == 25:
            raise Killed()

    with pytest.raises(Killed):
        make_trainer(dataset, context, directory, config).run(on_step=keep_json_then_kill)
    (directory / "checkpoint.json").write_text(copies[10])  # the step-20 save "killed" before its json
    resumed_trainer = make_trainer(dataset, context, directory, config)
    resumed_trainer.load_checkpoint(directory)
    assert resumed_trainer.step == 20  # the state inside the tensors' file, not the stale copy
    resumed = make_trainer(dataset, context, directory, config).run()
    for name, value in whole.params.items():
        assert torch.equal(value, resumed.params[name]), name


def test_a_checkpoint_without_its_state_is_refused(synthetic_split, tmp_path):
    """A checkpoint.safetensors whose header does not carry the state it belongs to (a
    foreign or older file) is refused, not resumed with a state from elsewhere."""
    from safetensors.torch import save_file

    dataset, _, context = synthetic_split
    save_file({"params.x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(ValueError, match="no training state"):
        make_trainer(dataset, context, tmp_path, TrainConfig(meta_steps=5, eval_every=5, patience=0, meta_batch_size=4)).run()


def test_a_checkpoint_from_another_configuration_is_refused(synthetic_split, tmp_path):
    dataset, _, context = synthetic_split
    config = TrainConfig(meta_steps=5, eval_every=5, checkpoint_every=5, patience=0, meta_batch_size=4)
    make_trainer(dataset, context, tmp_path, config).run()
    with pytest.raises(ValueError, match="different train_config"):
        make_trainer(dataset, context, tmp_path, replace(config, outer_lr=0.5)).run()


def test_checkpoints_are_safetensors_and_json_without_pickle(synthetic_split, tmp_path):
    dataset, _, context = synthetic_split
    config = TrainConfig(meta_steps=3, eval_every=3, patience=0, meta_batch_size=4)
    make_trainer(dataset, context, tmp_path, config).run()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.json", "checkpoint.safetensors"]
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["model_config"]["factors"] == 4 and meta["schema"]["item_fields"]
    with (tmp_path / "checkpoint.safetensors").open("rb") as fh:
        assert b"pickle" not in fh.read(4096)


def test_train_config_rejects_bad_settings():
    with pytest.raises(ValueError):
        TrainConfig(meta_batch_size=0)
    with pytest.raises(ValueError):
        TrainConfig(outer_lr=0.0)
    with pytest.raises(ValueError):
        TrainConfig(eval_every=0)


def test_a_run_killed_between_the_two_checkpoint_files_resumes_to_the_same_weights(synthetic_split, tmp_path, monkeypatch):
    """The tensors file carries the metadata: a kill after it replaced the old one but before
    checkpoint.json did leaves a checkpoint that still resumes exactly."""
    import training.trainer as trainer_module

    dataset, _, context = synthetic_split
    config = TrainConfig(meta_steps=30, eval_every=10, checkpoint_every=10, patience=0, meta_batch_size=8)
    whole_trainer = make_trainer(dataset, context, tmp_path / "whole", config)
    whole = whole_trainer.run()

    real_replace = os.replace

    def replace_then_die_at_step_20(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("checkpoint.safetensors") and trainer_module._read_unit(Path(dst).parent)[0]["step"] == 20:
            raise Killed()  # the tensors of step 20 are in place, checkpoint.json still says 10

    monkeypatch.setattr(trainer_module.os, "replace", replace_then_die_at_step_20)
    with pytest.raises(Killed):
        make_trainer(dataset, context, tmp_path / "torn", config).run()
    monkeypatch.setattr(trainer_module.os, "replace", real_replace)
    assert json.loads((tmp_path / "torn" / "checkpoint.json").read_text())["step"] == 10
    resumed_trainer = make_trainer(dataset, context, tmp_path / "torn", config)
    resumed = resumed_trainer.run()
    assert resumed.steps_done == whole.steps_done == 30
    for name, value in whole_trainer.params.items():  # the last parameters, not only the best
        assert torch.equal(value, resumed_trainer.params[name]), name
    assert [h["valid_loss"] for h in resumed.history] == [h["valid_loss"] for h in whole.history]


def test_engagement_id_dropout_hides_a_seeded_share_of_ids_per_step(synthetic_split, tmp_path):
    from training.features import OOV

    dataset, _, context = synthetic_split
    trainer = make_trainer(dataset, context, tmp_path, TrainConfig(meta_steps=1, seed=3))
    assert trainer._ranked_codes_for_step() is trainer.ranked_codes  # off by default: nothing hidden
    trainer.model_config = replace(trainer.model_config, engagement_id_dropout=0.5)
    slot = trainer.schema.item_id_field.offset
    first = trainer._ranked_codes_for_step()
    hidden = first[:, slot] == OOV
    assert not (trainer.ranked_codes[:, slot] == OOV).any()  # every ranked item has a known id
    assert 0.35 < hidden.float().mean().item() < 0.65, hidden.float().mean()
    others = [c for c in range(first.shape[1]) if c != slot]
    assert torch.equal(first[:, others], trainer.ranked_codes[:, others])  # attributes untouched
    assert torch.equal(first[~hidden], trainer.ranked_codes[~hidden])
    assert torch.equal(trainer._ranked_codes_for_step(), first)  # a step draws the same again (resume)
    trainer.step += 1
    assert not torch.equal(trainer._ranked_codes_for_step(), first)
    with pytest.raises(ValueError, match="engagement_id_dropout"):
        M.ModelConfig(engagement_id_dropout=1.0)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_only_id_dropout_trains_the_out_of_vocabulary_row_new_items_read(synthetic_split, rate):
    """The engagement head's id row that every new item reads moves only when ids are hidden
    in training: without dropout no training item ever reads it."""
    from training.features import OOV

    dataset, _, context = synthetic_split
    config = M.served_config(factors=4, engagement_factors=4, engagement_id_dropout=rate)
    train = TrainConfig(meta_steps=10, eval_every=5, meta_batch_size=8, patience=0)
    model, _, prep = meta_train(dataset, context.train, context.valid_tasks, config, learner_config("warmstart", 1), train, support_sizes=(5, None))
    start = M.init_params(model.model_config, prep.schema, prep.stats, seed=train.seed)["eng.item.id"][OOV]
    moved = not torch.allclose(model.params["eng.item.id"][OOV], start)
    assert moved == (rate > 0), (model.params["eng.item.id"][OOV], start)
