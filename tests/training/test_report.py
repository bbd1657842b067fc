"""Aggregation (pooling, pairing) and the rendered report."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from training.report import ResultRow, summarise, support_size_key, write_report

T_975_DF3 = 3.182446305284263  # 0.975 quantile of Student t, 3 dof


def _row(
    fold: int,
    user: str,
    method: str,
    ae: float,
    se: float | None = None,
    ndcg: float = 0.5,
    scenario: str = "new_users",
    support_size: str = "5",
    **extra: float,
) -> ResultRow:
    """One result row; se defaults to ae^2 (a user whose errors are all equal)."""
    row: ResultRow = {
        "scenario": scenario,
        "fold": fold,
        "support_size": support_size,
        "method": method,
        "user": user,
        "n": 4,
        "ae": ae,
        "se": ae * ae if se is None else se,
        "ndcg@3": ndcg,
        "ndcg@5": ndcg,
    }
    row.update(extra)  # type: ignore[typeddict-item]
    return row


def _pairing_rows() -> list[ResultRow]:
    # The same user ids appear in both folds (distinct people), and the method's rows come
    # in another order than the reference's: only (fold, user) pairs them correctly.
    reference = [
        _row(0, "u1", "bias", 1.0, se=1.0, ndcg=0.4),
        _row(0, "u2", "bias", 2.0, se=4.0, ndcg=0.6),
        _row(1, "u1", "bias", 3.0, se=9.0, ndcg=math.nan),
        _row(1, "u2", "bias", 5.0, se=25.0, ndcg=0.2),
    ]
    method = [
        _row(1, "u2", "maml", 5.6, se=24.0, ndcg=0.5),
        _row(0, "u2", "maml", 2.3, se=3.0, ndcg=0.9),
        _row(1, "u1", "maml", 2.8, se=7.0, ndcg=math.nan),
        _row(0, "u1", "maml", 1.1, se=1.5, ndcg=0.5),
    ]
    return reference + method


def test_summarise_pools_folds_and_pairs_by_fold_and_user() -> None:
    summary = summarise(_pairing_rows(), reference="bias")
    assert [(row["method"], row["n_users"], row["folds"]) for row in summary] == [
        ("bias", 4, [0, 1]),
        ("maml", 4, [0, 1]),
    ]
    maml = summary[1]["metrics"]

    # MAE pooled over the 4 users: (1.1 + 2.3 + 2.8 + 5.6) / 4; per fold 1.7 and 4.2.
    assert maml["mae"]["value"] == pytest.approx(2.95)
    assert maml["mae"]["per_fold"] == pytest.approx([1.7, 4.2])
    # paired differences (fold, user): (0,u1) +0.1, (0,u2) +0.3, (1,u1) -0.2, (1,u2) +0.6
    d = np.array([0.1, 0.3, -0.2, 0.6])
    half = T_975_DF3 * np.std(d, ddof=1) / 2.0
    assert maml["mae"]["diff"] == pytest.approx(0.2)
    assert maml["mae"]["diff_low"] == pytest.approx(0.2 - half)
    assert maml["mae"]["diff_high"] == pytest.approx(0.2 + half)
    assert not maml["mae"]["resolved"]

    # RMSE = sqrt(mean per-user MSE): sqrt((1.5 + 3 + 7 + 24) / 4) vs sqrt(39 / 4);
    # MSE differences 0.5, -1, -2, -1 mapped by 1 / (RMSE_maml + RMSE_bias).
    rmse_maml, rmse_bias = math.sqrt(35.5 / 4), math.sqrt(39.0 / 4)
    assert maml["rmse"]["value"] == pytest.approx(rmse_maml)
    assert summary[0]["metrics"]["rmse"]["value"] == pytest.approx(rmse_bias)
    d_mse = np.array([0.5, -1.0, -2.0, -1.0])
    half_mse = T_975_DF3 * np.std(d_mse, ddof=1) / 2.0
    assert maml["rmse"]["diff"] == pytest.approx(rmse_maml - rmse_bias)
    assert maml["rmse"]["diff_low"] == pytest.approx((-0.875 - half_mse) / (rmse_maml + rmse_bias))
    assert maml["rmse"]["diff_high"] == pytest.approx((-0.875 + half_mse) / (rmse_maml + rmse_bias))

    # nDCG skips the NaN user: (0.5 + 0.9 + 0.5) / 3; fold 1 has one finite user.
    assert maml["ndcg@5"]["value"] == pytest.approx(1.9 / 3)
    assert maml["ndcg@5"]["n"] == 3
    assert maml["ndcg@5"]["per_fold"] == pytest.approx([0.7, 0.5])
    assert maml["ndcg@5"]["diff"] == pytest.approx((0.1 + 0.3 + 0.3) / 3)

    # the reference has no difference with itself
    assert math.isnan(summary[0]["metrics"]["mae"]["diff"])
    assert not summary[0]["metrics"]["mae"]["resolved"]
    assert "auc" not in maml


def test_summarise_flags_resolved_differences() -> None:
    rows = [_row(0, f"u{i}", "bias", 1.0 + 0.1 * i) for i in range(6)]
    rows += [_row(0, f"u{i}", "item_mean", 1.5 + 0.1 * i + 0.01 * (i % 2)) for i in range(6)]
    item_mean = summarise(rows, reference="bias")[1]["metrics"]["mae"]
    assert item_mean["diff_low"] > 0.0
    assert item_mean["resolved"]


def test_summarise_raises_when_the_reference_is_missing_a_user() -> None:
    dropped = ("bias", 1, "u1")
    rows = [row for row in _pairing_rows() if (row["method"], row["fold"], row["user"]) != dropped]
    with pytest.raises(ValueError, match=r"reference method 'bias'.*fold=1 user='u1'"):
        summarise(rows, reference="bias")
    with pytest.raises(ValueError, match="reference method 'global_mean'"):
        summarise(_pairing_rows(), reference="global_mean")


def test_summarise_rejects_duplicate_rows() -> None:
    rows = _pairing_rows()
    rows.append(dict(rows[-1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two rows"):
        summarise(rows, reference="bias")


def test_support_sizes_are_ordered_numerically_with_all_last() -> None:
    shuffled = ["all", "20", "3", "10", "1", "5"]
    assert sorted(shuffled, key=support_size_key) == ["1", "3", "5", "10", "20", "all"]
    assert sorted(["20", "2", "0", "7"], key=support_size_key) == ["0", "2", "7", "20"]


def test_top_n_rows_get_top_n_metrics_and_no_best_popularity(tmp_path) -> None:
    rows = []
    for method, recall, popularity in (("ease", 0.30, 97.0), ("popular", 0.20, 99.0)):
        for user, jitter in (("u1", 0.0), ("u2", 0.1), ("u3", -0.05)):
            rows.append(
                {"scenario": "new_users", "fold": 0, "support_size": "0", "method": method, "user": user,
                 "recall@10": recall + jitter, "recall@20": recall + jitter, "ndcg@10": recall, "ndcg@20": recall,
                 "popularity@20": popularity + jitter}
            )
    (_, popular) = summarise(rows, reference="ease")
    assert list(popular["metrics"]) == ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "popularity@20"]
    assert popular["metrics"]["recall@20"]["diff"] == pytest.approx(-0.10)
    assert popular["metrics"]["popularity@20"]["diff"] == pytest.approx(2.0)
    path = write_report(rows, tmp_path, reference="ease", title="t", extra_summary={"coverage": [{"x": 1}]})
    text = path.read_text(encoding="utf-8")
    assert "### Recall@20" in text and "### Popularity percentile@20" in text and "Recall@N = hits" in text
    popularity_table = text.split("### Popularity percentile@20")[1]
    assert "**" not in popularity_table  # neither direction is "best"
    assert "| ease | **0.3167** (reference) |" in text  # higher recall is best
    assert json.loads((tmp_path / "summary.json").read_text())["coverage"] == [{"x": 1}]


def _report_rows() -> list[ResultRow]:
    rng = np.random.default_rng(3)
    rows: list[ResultRow] = []
    for scenario, click in (("new_users", False), ("new_items", True)):
        for support_size in ("all", "1", "5"):  # out of order on purpose
            for fold in (0, 1):
                for user in range(8):
                    base = rng.uniform(0.5, 1.5)
                    for method, shift in (("global_mean", 0.3), ("bias", 0.0), ("maml", -0.05)):
                        ae = base + shift + rng.normal(0, 0.02)
                        extra = {"auc": float(rng.uniform(0.4, 0.9))} if click else {}
                        rows.append(_row(fold, f"u{user}", method, ae, ndcg=float(rng.uniform()),
                                         scenario=scenario, support_size=support_size, **extra))
    return rows


def test_write_report_writes_markdown_json_and_plots(tmp_path) -> None:
    out_dir = tmp_path / "report"
    path = write_report(_report_rows(), out_dir, reference="bias", title="Cold start on ML-100K",
                        notes="Synthetic numbers.", extra_sections={"Training": "3 meta-epochs."})
    assert path == out_dir / "report.md"
    text = path.read_text(encoding="utf-8")

    assert text.startswith("# Cold start on ML-100K")
    assert "Synthetic numbers." in text and "## Training" in text
    assert "## Scenario: new_users" in text and "## Scenario: new_items" in text
    assert "| method | K=1 | K=5 | K=all |" in text  # K order, not input order
    assert "| 5 | 16 | 2 |" in text  # users and folds per support size
    assert "(reference)" in text and "**" in text and "†" in text
    # a cell: value (signed difference [low, high])
    assert re.search(r"\| global_mean \| \d\.\d{4} \(\+\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]\) †", text)
    # AUC only for the click scenario
    assert text.count("### AUC") == 1

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 6  # RMSE, MAE, nDCG@5 per scenario
    for link in links:
        png = out_dir / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["reference"] == "bias"
    assert len(summary["rows"]) == 2 * 3 * 3
    first = summary["rows"][0]
    assert (first["scenario"], first["support_size"], first["method"]) == ("new_users", "1", "global_mean")
    assert first["metrics"]["mae"]["resolved"] is True
    assert summary["rows"][1]["metrics"]["mae"]["diff"] is None  # the reference: NaN -> null
