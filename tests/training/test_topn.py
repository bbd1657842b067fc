"""The top-N protocol: task building, ranking with ties, metrics against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from training.dataset import AttributeField, AttributeTable, Dataset, LabelSpec
from training.splits import Protocol, Split, Task
from training.topn import (
    Ranker,
    Relevance,
    build_topn_tasks,
    catalog_items,
    default_liked_threshold,
    evaluate_topn,
    make_topn_methods,
    mean_popularity,
    parse_topn_sizes,
    popularity_percentiles,
    positive_counts,
    relevances,
    tie_order,
    top_n,
    topn_metrics,
)

LATER = Relevance("later", None)


def dataset(rows: list[tuple[str, str, float, int]], label: LabelSpec = LabelSpec("rating", 1.0, 5.0), extra_items=()) -> Dataset:
    users, items, labels, times = zip(*rows)
    known = sorted(set(items) | set(extra_items))
    return Dataset(
        name="hand",
        label=label,
        user_ids=np.array(users, dtype=object),
        item_ids=np.array(items, dtype=object),
        labels=np.array(labels, dtype=np.float64),
        timestamps=np.array(times, dtype=np.int64),
        users=AttributeTable(),
        items=AttributeTable([AttributeField("genre")], {i: {"genre": ("g",)} for i in known}),
    )


def split(data: Dataset, test: list[str], train: list[str], valid: list[str] = (), new_items: list[str] = ()) -> Split:
    return Split(Protocol(), 0, data.name, data.fingerprint(), list(train), list(valid), list(test), list(new_items))


# u's interactions in time order (rows deliberately not in time order):
# t=1 a(5), t=2 b(2), t=3 c(4), t=4 a(3) again, t=5 d(5), t=6 e(1)
U_ROWS = [
    ("u", "c", 4.0, 3),
    ("u", "a", 5.0, 1),
    ("u", "e", 1.0, 6),
    ("u", "b", 2.0, 2),
    ("u", "d", 5.0, 5),
    ("u", "a", 3.0, 4),
]
OTHER_ROWS = [("v", "a", 4.0, 1), ("v", "b", 4.0, 2), ("w", "a", 3.0, 1), ("w", "f", 2.0, 3)]


def test_support_is_the_first_k_in_time_and_relevant_everything_later() -> None:
    data = dataset(U_ROWS + OTHER_ROWS)
    s = split(data, test=["u"], train=["v", "w"])
    (task,) = build_topn_tasks(data, s, ["u"], 2, LATER)
    assert task.support_items.tolist() == ["a", "b"] and task.support_labels.tolist() == [5.0, 2.0]
    # a again at t=4 is in the support already: not relevant (it cannot be recommended)
    assert task.query_items.tolist() == ["c", "d", "e"] and task.query_labels.tolist() == [4.0, 5.0, 1.0]

    (zero,) = build_topn_tasks(data, s, ["u"], 0, LATER)
    assert len(zero.support_items) == 0 and zero.support_labels.dtype == np.float64
    assert zero.query_items.tolist() == ["a", "b", "c", "d", "e"]  # a counted once


def test_liked_keeps_later_ratings_at_the_threshold_and_drops_users_without_any() -> None:
    data = dataset(U_ROWS + OTHER_ROWS)
    s = split(data, test=["u", "v"], train=["w"])
    liked = Relevance("liked", 4.0)
    tasks = build_topn_tasks(data, s, ["u", "v"], 2, liked)
    assert [t.user for t in tasks] == ["u"]  # v has nothing after its first 2
    assert tasks[0].query_items.tolist() == ["c", "d"]  # 4 and 5; e (1) is not liked
    (only_d,) = build_topn_tasks(data, s, ["u"], 3, liked)
    assert only_d.query_items.tolist() == ["d"]
    assert build_topn_tasks(data, s, ["u"], 5, liked) == []  # only e (1) is left: user dropped
    assert build_topn_tasks(data, s, ["u"], 6, LATER) == []  # nothing later at all


def test_new_items_scenario_counts_only_withheld_items_and_they_are_candidates() -> None:
    data = dataset(U_ROWS + OTHER_ROWS)
    s = split(data, test=["u"], train=["u", "v", "w"], new_items=["d"])
    (task,) = build_topn_tasks(data, s, ["u"], 2, LATER)
    assert task.query_items.tolist() == ["d"]  # c and e are training data in this scenario

    class FavoursD:
        name = "favours_d"

        def fit(self, context) -> None:
            assert "d" not in set(context.train.item_ids.tolist())  # withheld from training

        def score_catalog(self, tasks, items):
            return np.tile((items == "d").astype(float), (len(tasks), 1))

    result = evaluate_topn(data, [s], lambda: [FavoursD()], support_sizes=(2,))
    (row,) = [r for r in result.rows if r["relevance"] == "later"]
    assert row["recall@10"] == 1.0 and row["ndcg@10"] == 1.0  # the withheld item was ranked first


def test_new_items_scenario_ranks_only_the_new_items() -> None:
    """With withheld new items the lists hold new items only, whatever the old items score:
    a method that prefers every old item still ranks the new one first."""
    data = dataset(U_ROWS + OTHER_ROWS, extra_items=["g"])
    s = split(data, test=["u"], train=["u", "v", "w"], new_items=["d", "g"])

    class PrefersOld:
        name = "prefers_old"

        def fit(self, context) -> None:
            pass

        def score_catalog(self, tasks, items):
            # old items 10, d 1, g 0: against the whole catalog d would come 5th
            return np.tile(np.where(np.isin(items, ["d", "g"]), (items == "d").astype(float), 10.0), (len(tasks), 1))

    result = evaluate_topn(data, [s], lambda: [PrefersOld()], support_sizes=(2,))
    (row,) = [r for r in result.rows if r["relevance"] == "later"]
    assert row["recall@10"] == 1.0 and row["ndcg@10"] == 1.0
    (cover,) = [c for c in result.coverage if c["scenario"] == s.protocol.scenario]  # the "later" section
    assert result.catalog_size == 2 and cover["coverage@20"] == 1.0  # both new items listed, nothing else
    ranker = Ranker(catalog_items(data), positive_counts(data, catalog_items(data)), np.isin(catalog_items(data), ["d", "g"]))
    (task,) = build_topn_tasks(data, s, ["u"], 2, LATER)
    (listed,) = ranker.lists(PrefersOld(), [task], 4)
    assert [ranker.items[j] if j >= 0 else None for j in listed] == ["d", "g", None, None]  # padded, no old item
    with pytest.raises(ValueError, match="non-empty"):
        Ranker(catalog_items(data), positive_counts(data, catalog_items(data)), np.zeros(len(catalog_items(data)), bool))


def test_catalog_is_every_known_item_sorted() -> None:
    data = dataset(OTHER_ROWS, extra_items=["z", "c"])
    assert catalog_items(data).tolist() == ["a", "b", "c", "f", "z"]


def test_default_liked_threshold_and_relevance_sections() -> None:
    data = dataset(OTHER_ROWS)
    assert default_liked_threshold(data) == 4.0
    assert [(r.name, r.min_label) for r in relevances(data)] == [("later", None), ("liked", 4.0)]
    assert relevances(data, 3.5)[1].min_label == 3.5
    with pytest.raises(ValueError, match="must lie in"):
        relevances(data, 6.0)
    clicks = dataset([("v", "a", 1.0, 1), ("v", "b", 0.0, 2)], label=LabelSpec.click())
    assert [(r.name, r.min_label) for r in relevances(clicks)] == [("clicked", 0.5)]
    with pytest.raises(ValueError, match="click data"):
        relevances(clicks, 0.5)


def test_click_data_relevant_is_later_positive_clicks() -> None:
    rows = [("u", "a", 1.0, 1), ("u", "b", 0.0, 2), ("u", "c", 1.0, 3), ("v", "a", 1.0, 1)]
    data = dataset(rows, label=LabelSpec.click())
    s = split(data, test=["u"], train=["v"])
    (task,) = build_topn_tasks(data, s, ["u"], 1, relevances(data)[0])
    assert task.query_items.tolist() == ["c"]
    assert positive_counts(data, catalog_items(data)).tolist() == [2.0, 0.0, 1.0]  # b's click is negative


def test_recall_and_ndcg_against_hand_computed_values() -> None:
    # catalog of 30 items; the user's relevant items are 0 and 5
    relevant = np.zeros((1, 30), dtype=bool)
    relevant[0, [0, 5]] = True
    lists = np.array([[5, 1, 0] + list(range(6, 23))])  # hits at ranks 1 and 3
    m = topn_metrics(lists, relevant, (10, 20))
    assert m["recall@10"][0] == 1.0  # 2 hits / min(10, 2)
    ideal = 1.0 + 1.0 / math.log2(3)
    assert m["ndcg@10"][0] == pytest.approx((1.0 + 1.0 / math.log2(4)) / ideal)

    # fewer relevant items than N: recall's denominator is |relevant|
    only_third = np.array([[1, 2, 5] + list(range(6, 23))])
    assert topn_metrics(only_third, relevant, (10,))["recall@10"][0] == 0.5
    # ideal ordering -> nDCG 1
    ideal_list = np.array([[0, 5] + list(range(6, 24))])
    assert topn_metrics(ideal_list, relevant, (10,))["ndcg@10"][0] == pytest.approx(1.0)

    # more relevant items than N: denominator N, ideal = N hits
    many = np.zeros((1, 30), dtype=bool)
    many[0, :25] = True
    top = np.array([list(range(20))])
    m = topn_metrics(top, many, (10, 20))
    assert m["recall@10"][0] == 1.0 and m["recall@20"][0] == 1.0 and m["ndcg@20"][0] == pytest.approx(1.0)
    half = np.array([list(range(25, 30)) + list(range(15))])  # 5 misses first, then 15 hits
    m = topn_metrics(half, many, (10, 20))
    assert m["recall@10"][0] == pytest.approx(5 / 10) and m["recall@20"][0] == pytest.approx(15 / 20)
    discount = 1.0 / np.log2(np.arange(2, 22))
    assert m["ndcg@10"][0] == pytest.approx(discount[5:10].sum() / discount[:10].sum())


def test_padding_never_counts_as_a_hit_and_no_relevant_is_nan() -> None:
    relevant = np.zeros((2, 4), dtype=bool)
    relevant[0, 0] = True
    lists = np.array([[1, -1, -1], [0, 1, -1]])
    m = topn_metrics(lists, relevant, (3,))
    assert m["recall@3"][0] == 0.0  # -1 pads are not item 0
    assert math.isnan(m["recall@3"][1]) and math.isnan(m["ndcg@3"][1])


def test_ties_at_the_cut_go_to_the_more_popular_then_the_earlier_item() -> None:
    counts = np.array([5.0, 9.0, 5.0, 100.0, 5.0])
    order = tie_order(counts)
    assert order.tolist() == [3, 1, 0, 2, 4]
    scores = np.array([[1.0, 1.0, 1.0, 0.0, 1.0]])
    none = np.zeros((1, 5), dtype=bool)
    assert top_n(scores, none, order, 2).tolist() == [[1, 0]]  # 4-way tie at the cut: 9 counts, then position
    assert top_n(scores, none, order, 3).tolist() == [[1, 0, 2]]
    excluded = none.copy()
    excluded[0, 1] = True
    assert top_n(scores, excluded, order, 3).tolist() == [[0, 2, 4]]
    # equal scores everywhere: the most-popular list
    assert top_n(np.zeros((1, 5)), none, order, 5).tolist() == [[3, 1, 0, 2, 4]]
    # fewer candidates than n: padded with -1
    all_but_one = np.ones((1, 5), dtype=bool)
    all_but_one[0, 2] = False
    assert top_n(scores, all_but_one, order, 3).tolist() == [[2, -1, -1]]
    with pytest.raises(ValueError, match="finite"):
        top_n(np.array([[np.nan, 0, 0, 0, 0]]), none, order, 2)


def test_popularity_percentiles_and_mean_popularity() -> None:
    percentiles = popularity_percentiles(np.array([0.0, 0.0, 5.0, 10.0]))
    assert percentiles.tolist() == pytest.approx([100 * 0.5 / 3, 100 * 0.5 / 3, 100 * 2 / 3, 100.0])
    lists = np.array([[3, 2], [0, -1]])
    assert mean_popularity(lists, percentiles, 2).tolist() == pytest.approx([(100 + 200 / 3) / 2, 50 / 3])


def test_parse_topn_sizes() -> None:
    assert parse_topn_sizes("0, 1,5") == (0, 1, 5)
    for bad in ("all", "-1", "1,1", ""):
        with pytest.raises(ValueError):
            parse_topn_sizes(bad)


@dataclass
class ScoresSupportFirst:
    """Scores its own support highest: the harness must mask it."""

    name: str = "support_first"

    def fit(self, context) -> None:
        pass

    def score_catalog(self, tasks, items):
        scores = np.zeros((len(tasks), len(items)))
        for t, task in enumerate(tasks):
            scores[t] = np.isin(items, task.support_items) * 10.0 + np.isin(items, ["f"])
        return scores


def test_evaluate_masks_the_support_and_pairs_the_same_users_for_every_method() -> None:
    data = dataset(U_ROWS + OTHER_ROWS + [("x", "a", 5.0, 1), ("x", "f", 5.0, 2)])
    s = split(data, test=["u", "x"], train=["v", "w"])
    result = evaluate_topn(
        data, [s], lambda: [*make_topn_methods(["popular"]), ScoresSupportFirst()], support_sizes=(0, 1, 2)
    )
    by_method: dict[str, set] = {}
    for row in result.rows:
        by_method.setdefault(row["method"], set()).add((row["scenario"], row["support_size"], row["user"]))
    assert by_method["popular"] == by_method["support_first"]
    keys = by_method["popular"]
    assert ("new_users", "2", "x") not in keys  # x has nothing after 2 interactions
    assert ("new_users", "1", "x") in keys
    x_k1 = [r for r in result.rows if r["method"] == "support_first" and r["user"] == "x" and r["support_size"] == "1"]
    # x's support is a; masked, so f (score 1) is ranked first and is x's only relevant item
    assert [r["recall@10"] for r in x_k1 if r["relevance"] == "later"] == [1.0]
    # coverage: catalog a..f (6 items); popular recommends every item not in the support
    (cover,) = [c for c in result.coverage if c["method"] == "popular" and c["support_size"] == "0" and c["scenario"] == "new_users"]
    assert cover["coverage@20"] == 1.0 and result.catalog_size == 6


def test_ranker_lists_checks_the_methods_scores() -> None:
    data = dataset(OTHER_ROWS)
    ranker = Ranker(catalog_items(data), positive_counts(data, catalog_items(data)))
    task = Task("u", np.array([], dtype=object), np.array([]), np.array(["a"], dtype=object), np.array([4.0]))

    class Wrong:
        name = "wrong"

        def score_catalog(self, tasks, items):
            return np.zeros((len(tasks), len(items) - 1))

    with pytest.raises(RuntimeError, match="shape"):
        ranker.lists(Wrong(), [task])
