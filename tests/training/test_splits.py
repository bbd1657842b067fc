"""Cold-start splits: exact tasks on hand-built logs, and no leakage on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.dataset import AttributeTable, Dataset, LabelSpec
from training.splits import (
    SCENARIOS,
    Protocol,
    Split,
    Task,
    build_tasks,
    load_or_make_splits,
    load_splits,
    make_splits,
    newest_items,
    save_splits,
    time_order,
    training_rows,
)
from training.synthetic import generate_synthetic


def make_log(rows: list[tuple[str, str, float, int]], name: str = "hand") -> Dataset:
    """A dataset from (user, item, label, timestamp) rows, in the given row order."""
    users, items, labels, times = zip(*rows)
    return Dataset(
        name=name,
        label=LabelSpec("rating", 1.0, 5.0),
        user_ids=np.array(users, dtype=object),
        item_ids=np.array(items, dtype=object),
        labels=np.array(labels, dtype=np.float64),
        timestamps=np.array(times, dtype=np.int64),
        users=AttributeTable(),
        items=AttributeTable(),
    )


# --- new users: a hand-built log ---------------------------------------------------------
# Four users with 4 interactions each (eligible for min 3 .. max 5), a heavy user H with 6
# and a light user L with 2 (both only train). Rows are not in time order, and user A has
# a timestamp tie that the row index breaks: A's time order is a1 (t=10, row 1),
# a2 (t=10, row 3), a3 (t=30), a4 (t=40).
USERS_LOG = [
    ("A", "a4", 4.0, 40),
    ("A", "a1", 1.0, 10),
    ("B", "b1", 1.0, 5),
    ("A", "a3", 3.0, 30),
    ("A", "a2", 2.0, 10),
    ("B", "b2", 2.0, 6),
    ("B", "b4", 4.0, 80),
    ("B", "b3", 3.0, 7),
    ("C", "c3", 3.0, 3),
    ("C", "c1", 1.0, 1),
    ("C", "c2", 2.0, 2),
    ("C", "c4", 4.0, 4),
    ("D", "d1", 1.0, 100),
    ("D", "d2", 2.0, 200),
    ("D", "d3", 3.0, 300),
    ("D", "d4", 4.0, 400),
    *[("H", f"h{i}", 3.0, 50 + i) for i in range(6)],
    ("L", "l1", 5.0, 60),
    ("L", "l2", 5.0, 61),
]
USERS_PROTOCOL = Protocol(min_interactions=3, max_interactions=5, query_size=2, folds=2, seed=0)
# support (earliest two) and query (last two) of each eligible user
USERS_TASKS = {
    "A": (["a1", "a2"], ["a3", "a4"]),
    "B": (["b1", "b2"], ["b3", "b4"]),
    "C": (["c1", "c2"], ["c3", "c4"]),
    "D": (["d1", "d2"], ["d3", "d4"]),
}

# --- new items: a hand-built log ---------------------------------------------------------
# Items appear first at o1 t=1, o2 t=2, o3 t=3, n1 t=100, n2 t=120: with
# new_item_fraction 0.4 the newest round(5 * 0.4) = 2 items, n1 and n2, are new.
# query_size 1: the query is a user's last new-item interaction, the support every
# old-item interaction before it (new items before it are not support).
ITEMS_LOG = [
    ("E1", "o1", 1.0, 1),
    ("E2", "o2", 2.0, 2),
    ("E3", "o3", 3.0, 3),
    ("E1", "o2", 2.0, 5),
    ("E2", "o3", 3.0, 6),
    ("E3", "o1", 1.0, 7),
    ("E4", "o1", 1.0, 8),
    ("E1", "n1", 4.0, 100),
    ("E1", "o3", 3.0, 110),
    ("E1", "n2", 5.0, 120),
    ("E4", "n2", 5.0, 125),
    ("E2", "n1", 4.0, 130),
    ("E3", "n2", 5.0, 140),
    ("E3", "n1", 4.0, 150),
    ("E4", "o2", 2.0, 160),  # after E4's query: neither support nor query
    ("X", "n1", 4.0, 170),  # X's only new-item interaction has nothing before it: not eligible
    ("X", "o1", 1.0, 180),
    ("X", "o2", 2.0, 190),
    ("W", "o1", 1.0, 12),  # W never meets a new item: not eligible, trains
    ("W", "o2", 2.0, 13),
    ("W", "o3", 3.0, 14),
]
ITEMS_PROTOCOL = dict(min_interactions=3, max_interactions=5, query_size=1, folds=2, new_item_fraction=0.4, seed=0)
ITEMS_TASKS = {
    "E1": (["o1", "o2", "o3"], ["n2"]),  # n1 came before the query but is new: not support
    "E2": (["o2", "o3"], ["n1"]),
    "E3": (["o3", "o1"], ["n1"]),
    "E4": (["o1"], ["n2"]),
}


def assert_task(task: Task, dataset: Dataset, support: list[str], query: list[str]) -> None:
    assert task.support_items.tolist() == support
    assert task.query_items.tolist() == query
    label = {(u, i): y for u, i, y in zip(dataset.user_ids, dataset.item_ids, dataset.labels)}
    assert task.support_labels.tolist() == [label[(task.user, i)] for i in support]
    assert task.query_labels.tolist() == [label[(task.user, i)] for i in query]


def test_time_order_breaks_ties_by_row():
    dataset = make_log(USERS_LOG)
    a_rows = [r for r in time_order(dataset) if dataset.user_ids[r] == "A"]
    assert a_rows == [1, 4, 3, 0]


def test_new_users_hand_built_tasks_and_partition():
    dataset = make_log(USERS_LOG)
    splits = make_splits(dataset, USERS_PROTOCOL)
    assert [s.fold for s in splits] == [0, 1]
    tests = [set(s.test_users) for s in splits]
    assert tests[0] | tests[1] == {"A", "B", "C", "D"}  # H (too many) and L (too few) never test
    assert tests[0].isdisjoint(tests[1]) and [len(t) for t in tests] == [2, 2]
    for split in splits:
        assert split.new_items == []
        assert split.dataset == "hand" and split.dataset_fingerprint == dataset.fingerprint()
        # valid: round(2 * 0.1) -> at least 1 user from the other fold
        assert len(split.valid_users) == 1
        assert set(split.valid_users) <= {"A", "B", "C", "D"} - set(split.test_users)
        held = set(split.test_users) | set(split.valid_users)
        assert split.train_users == sorted({"A", "B", "C", "D", "H", "L"} - held)
        for task in build_tasks(dataset, split, split.test_users + split.valid_users):
            assert_task(task, dataset, *USERS_TASKS[task.user])
        mask = training_rows(dataset, split)
        assert set(dataset.user_ids[mask]) == set(split.train_users)
        assert mask.sum() == sum(u in split.train_users for u in dataset.user_ids)


def test_new_items_hand_built_tasks():
    dataset = make_log(ITEMS_LOG)
    assert newest_items(dataset, 0.4) == ["n1", "n2"]
    splits = make_splits(dataset, Protocol(scenario="new_items", **ITEMS_PROTOCOL))
    assert set(splits[0].test_users) | set(splits[1].test_users) == {"E1", "E2", "E3", "E4"}
    for split in splits:
        assert split.new_items == ["n1", "n2"]
        # Test and validation users are known users: they train on old items.
        assert split.train_users == sorted({"E1", "E2", "E3", "E4", "W", "X"})
        for task in build_tasks(dataset, split, split.test_users + split.valid_users):
            assert_task(task, dataset, *ITEMS_TASKS[task.user])
        mask = training_rows(dataset, split)
        expected = [u in split.train_users and i.startswith("o") for u, i in zip(dataset.user_ids, dataset.item_ids)]
        assert mask.tolist() == expected


def test_new_users_items_hand_built_tasks():
    dataset = make_log(ITEMS_LOG)
    splits = make_splits(dataset, Protocol(scenario="new_users_items", **ITEMS_PROTOCOL))
    for split in splits:
        held = set(split.test_users) | set(split.valid_users)
        assert split.train_users == sorted({"E1", "E2", "E3", "E4", "W", "X"} - held)
        for task in build_tasks(dataset, split, split.test_users):
            assert_task(task, dataset, *ITEMS_TASKS[task.user])
        mask = training_rows(dataset, split)
        expected = [u not in held and i.startswith("o") for u, i in zip(dataset.user_ids, dataset.item_ids)]
        assert mask.tolist() == expected


def test_build_tasks_refuses_a_user_without_query():
    dataset = make_log(ITEMS_LOG)
    split = make_splits(dataset, Protocol(scenario="new_items", **ITEMS_PROTOCOL))[0]
    with pytest.raises(ValueError, match="'W' has no support or no query"):
        build_tasks(dataset, split, ["W"])
    with pytest.raises(ValueError, match="'X' has no support or no query"):
        build_tasks(dataset, split, ["X"])


def test_too_few_eligible_users_is_an_error():
    dataset = make_log(USERS_LOG)
    with pytest.raises(ValueError, match="only 4 users have 3-5 interactions: too few for 3 folds"):
        make_splits(dataset, Protocol(min_interactions=3, max_interactions=5, query_size=2, folds=3))


def test_training_rows_for_other_users():
    dataset = make_log(USERS_LOG)
    split = make_splits(dataset, USERS_PROTOCOL)[0]
    assert training_rows(dataset, split, ["L"]).tolist() == [u == "L" for u in dataset.user_ids]


# --- with_support_size ------------------------------------------------------------------


def test_with_support_size_keeps_the_earliest_k():
    dataset = make_log(USERS_LOG)
    split = make_splits(dataset, USERS_PROTOCOL)[0]
    task = build_tasks(dataset, split, ["A"])[0]
    one = task.with_support_size(1)
    assert one.support_items.tolist() == ["a1"] and one.support_labels.tolist() == [1.0]
    assert one.query_items.tolist() == ["a3", "a4"] and one.query_labels.tolist() == [3.0, 4.0]
    assert one.user == "A"
    assert task.with_support_size(None) is task
    assert task.with_support_size(2) is task
    assert task.with_support_size(10) is task


def test_with_support_size_on_a_longer_support():
    task = Task(
        "u",
        np.array(["x1", "x2", "x3", "x4"], dtype=object),
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.array(["q"], dtype=object),
        np.array([5.0]),
    )
    three = task.with_support_size(3)
    assert three.support_items.tolist() == ["x1", "x2", "x3"]
    assert three.support_labels.tolist() == [1.0, 2.0, 3.0]


# --- every scenario on synthetic data -----------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    return generate_synthetic(seed=5, n_users=60, n_items=50)


def synthetic_protocol(scenario: str, seed: int = 0) -> Protocol:
    return Protocol(scenario=scenario, min_interactions=15, max_interactions=40, query_size=5, folds=3, seed=seed)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_leakage(synthetic, scenario):
    dataset = synthetic
    rank = np.empty(len(dataset), dtype=np.int64)
    rank[time_order(dataset)] = np.arange(len(dataset))
    splits = make_splits(dataset, synthetic_protocol(scenario))
    new_items = set(splits[0].new_items)
    assert bool(new_items) == (scenario != "new_users")
    for split in splits:
        held = set(split.test_users) | set(split.valid_users)
        mask = training_rows(dataset, split)
        trained_users = set(dataset.user_ids[mask])
        if scenario != "new_items":
            assert held.isdisjoint(split.train_users)
            assert held.isdisjoint(trained_users)
        else:  # known users: their old-item interactions train, their new-item query does not
            assert held <= set(split.train_users)
        if new_items:
            assert new_items.isdisjoint(dataset.item_ids[mask])
        for task in build_tasks(dataset, split, split.test_users + split.valid_users):
            rows = np.flatnonzero(dataset.user_ids == task.user)
            rank_of = {dataset.item_ids[r]: rank[r] for r in rows}  # synthetic users rate an item once
            support_ranks = [rank_of[i] for i in task.support_items]
            query_ranks = [rank_of[i] for i in task.query_items]
            assert max(support_ranks) < min(query_ranks)
            assert support_ranks == sorted(support_ranks) and query_ranks == sorted(query_ranks)
            if new_items:
                # the last (up to) five new-item interactions; fewer when the user has fewer
                assert 1 <= len(task.query_items) <= 5
                assert set(task.query_items) <= new_items
                assert new_items.isdisjoint(task.support_items)
            else:
                # the query is the user's last five interactions, the support everything before
                assert len(task.query_items) == 5
                assert len(task.support_items) + 5 == len(rows)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_test_folds_partition_the_eligible_users(synthetic, scenario):
    dataset = synthetic
    protocol = synthetic_protocol(scenario)
    splits = make_splits(dataset, protocol)
    tested = [u for s in splits for u in s.test_users]
    assert len(tested) == len(set(tested))  # no user is tested twice
    assert max(len(s.test_users) for s in splits) - min(len(s.test_users) for s in splits) <= 1
    counts = dict(zip(*np.unique(dataset.user_ids, return_counts=True)))
    # Every tested user is eligible; every eligible user not tested has no valid task.
    for user, n in counts.items():
        in_range = protocol.min_interactions <= n <= protocol.max_interactions
        if user in tested:
            assert in_range
            build_tasks(dataset, splits[0], [user])
        elif in_range:
            with pytest.raises(ValueError, match="no support or no query"):
                build_tasks(dataset, splits[0], [user])
    assert any(counts[u] > protocol.max_interactions for u in counts)  # heavy users exist, and train
    heavy = [u for u, n in counts.items() if n > protocol.max_interactions]
    for split in splits:
        assert set(heavy) <= set(split.train_users)
        assert set(split.valid_users) <= set(tested) - set(split.test_users)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_seed_same_splits_other_seed_other_splits(synthetic, scenario):
    a = [s.to_dict() for s in make_splits(synthetic, synthetic_protocol(scenario, seed=1))]
    b = [s.to_dict() for s in make_splits(synthetic, synthetic_protocol(scenario, seed=1))]
    c = [s.to_dict() for s in make_splits(synthetic, synthetic_protocol(scenario, seed=2))]
    assert a == b
    assert [s["test_users"] for s in a] != [s["test_users"] for s in c]


# --- on disk ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path, synthetic):
    protocol = synthetic_protocol("new_users_items")
    splits = make_splits(synthetic, protocol)
    save_splits(splits, tmp_path / "splits")
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["split-0.json", "split-1.json", "split-2.json"]
    loaded = load_splits(tmp_path / "splits", synthetic, protocol)
    assert [s.to_dict() for s in loaded] == [s.to_dict() for s in splits]
    assert all(isinstance(s.protocol, Protocol) for s in loaded)
    assert json.loads((tmp_path / "splits" / "split-1.json").read_text())["format"] == 1


def test_load_or_make_reuses_what_is_on_disk(tmp_path: Path, synthetic):
    protocol = synthetic_protocol("new_users")
    made = load_or_make_splits(synthetic, protocol, tmp_path)
    # Tamper with the saved file: a reuse returns the file's content, not a fresh split.
    path = tmp_path / "split-0.json"
    d = json.loads(path.read_text())
    d["valid_users"] = ["someone"]
    path.write_text(json.dumps(d))
    reused = load_or_make_splits(synthetic, protocol, tmp_path)
    assert reused[0].valid_users == ["someone"]
    assert reused[1].to_dict() == made[1].to_dict()
    assert [s.to_dict() for s in load_or_make_splits(synthetic, protocol, None)] == [s.to_dict() for s in made]


def test_load_refuses_other_data(tmp_path: Path, synthetic):
    protocol = synthetic_protocol("new_users")
    save_splits(make_splits(synthetic, protocol), tmp_path)
    changed = synthetic.subset(np.arange(len(synthetic)))
    changed.labels = changed.labels.copy()
    changed.labels[0] = 6.0 - changed.labels[0]
    with pytest.raises(ValueError, match="split-0.json: made from different data"):
        load_splits(tmp_path, changed, protocol)


@pytest.mark.parametrize("change", [{"seed": 9}, {"query_size": 4}, {"scenario": "new_items"}])
def test_load_refuses_another_protocol(tmp_path: Path, synthetic, change):
    protocol = synthetic_protocol("new_users")
    save_splits(make_splits(synthetic, protocol), tmp_path)
    other = Protocol(**{**protocol.__dict__, **change})
    with pytest.raises(ValueError, match="split-0.json: made with protocol"):
        load_splits(tmp_path, synthetic, other)


def test_from_dict_refuses_another_format(synthetic):
    d = make_splits(synthetic, synthetic_protocol("new_users"))[0].to_dict()
    d["format"] = 2
    with pytest.raises(ValueError, match="unsupported split format 2"):
        Split.from_dict(d)


# --- Protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scenario": "new_things"}, "scenario must be one of"),
        ({"min_interactions": 1, "query_size": 1}, "min_interactions must be >= 2"),
        ({"min_interactions": 20, "max_interactions": 19}, "max_interactions must be >= min_interactions"),
        ({"query_size": 0}, "query_size must be >= 1"),
        ({"min_interactions": 10, "query_size": 10}, "query_size must be >= 1 and < min_interactions"),
        ({"folds": 1}, "folds must be >= 2"),
        ({"valid_fraction": 0.0}, "valid_fraction"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"new_item_fraction": 0.0}, "new_item_fraction"),
        ({"new_item_fraction": 1.0}, "new_item_fraction"),
    ],
)
def test_protocol_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Protocol(**kwargs)


def test_protocol_defaults_are_valid():
    p = Protocol()
    assert (p.scenario, p.min_interactions, p.max_interactions, p.query_size, p.folds) == ("new_users", 13, 100, 10, 5)
