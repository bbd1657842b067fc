"""Aggregate per-user evaluation rows and render them as a Markdown report with plots.

`summarise` is pure computation: per (scenario, support size, method) it pools the
users of every fold, computes each metric, its 95 % interval, the per-fold values and
the paired difference against a reference method. `write_report` renders those summary
rows as report.md (tables + embedded PNGs) and summary.json.

Users of different folds are different test users (each fold is its own seeded user
split), so intervals pool the per-user values of all folds rather than averaging fold
means: more users, and no pretence that a handful of folds is a sample of anything.
Pairing is by (fold, user): the same user id in two folds is two observations.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
import matplotlib
from matplotlib.figure import Figure

from training.metrics import mean_ci, paired_difference_ci, rmse_ci, rmse_difference_ci

# One test user's result for one method. Further f"ndcg@{k}" keys (other cut-offs) are
# read as well; "auc" is present for click data only.
ResultRow = TypedDict(
    "ResultRow",
    {
        "scenario": str,
        "fold": int,
        "support_size": str,  # "1", "3", "5", "10", "20" or "all"
        "method": str,
        "user": str,
        "n": int,  # query size
        "ae": float,  # mean absolute error on the query (clipped predictions)
        "se": float,  # mean squared error on the query (clipped predictions)
        "ndcg@3": float,  # NaN when every query gain is 0
        "ndcg@5": float,
        "auc": NotRequired[float],  # NaN when the query has one class
    },
)


class MetricSummary(TypedDict):
    """One metric of one (scenario, support size, method), pooled over folds."""

    value: float  # MAE: mean ae; RMSE: sqrt(mean se); nDCG, AUC: mean over non-NaN users
    low: float  # 95 % interval of the value itself (plot bands)
    high: float
    n: int  # users with a non-NaN value
    per_fold: list[float]  # the value per fold, aligned with SummaryRow["folds"]
    diff: float  # value - reference value over paired users; NaN for the reference itself
    diff_low: float  # paired interval of diff, pooled over folds
    diff_high: float
    resolved: bool  # the diff interval excludes 0


class SummaryRow(TypedDict):
    scenario: str
    support_size: str
    method: str
    reference: str
    n_users: int  # (fold, user) pairs
    folds: list[int]
    metrics: dict[str, MetricSummary]  # "mae", "rmse", "ndcg@3", "ndcg@5", ["auc"]


CONFIDENCE = 0.95
_LOWER_IS_BETTER = {"mae": True, "rmse": True}  # nDCG, AUC, Recall: higher is better
_UNRANKED_PREFIXES = ("popularity@",)  # descriptive: neither direction is "best"
_PLOTTED = ("rmse", "mae", "ndcg@5", "recall@20", "ndcg@20")
_KEY_COLUMNS = ("scenario", "fold", "support_size", "method", "user")


def support_size_key(support_size: str) -> tuple[int, float, str]:
    """Sort key putting numeric support sizes in numeric order (0, 1, 3, 5, 10, 20), then "all"."""
    if support_size.isdigit():
        return 0, float(support_size), support_size
    return 1, 0.0, support_size


def metric_title(metric: str) -> str:
    """Display name: "rmse" -> "RMSE", "ndcg@5" -> "nDCG@5", "recall@20" -> "Recall@20"."""
    for prefix, title in (("ndcg@", "nDCG@"), ("recall@", "Recall@"), ("popularity@", "Popularity percentile@")):
        if metric.startswith(prefix):
            return title + metric.removeprefix(prefix)
    return metric.upper()


def _by_cutoff(keys: Iterable[str], prefix: str) -> list[str]:
    return sorted((key for key in keys if key.startswith(prefix)), key=lambda key: int(key.removeprefix(prefix)))


def _metric_names(rows: Sequence[ResultRow]) -> list[str]:
    """Metrics present in the rows. Rating rows: mae, rmse, every ndcg@k by k, then auc.
    Top-N rows (no "se"): every recall@k, every ndcg@k, then popularity@k."""
    keys = {key for row in rows for key in row}
    if "se" not in keys:
        return [*_by_cutoff(keys, "recall@"), *_by_cutoff(keys, "ndcg@"), *_by_cutoff(keys, "popularity@")]
    return ["mae", "rmse", *_by_cutoff(keys, "ndcg@"), *(["auc"] if "auc" in keys else [])]


def _source_key(metric: str) -> str:
    """The ResultRow key a summary metric is computed from."""
    return {"mae": "ae", "rmse": "se"}.get(metric, metric)


def _values(rows: Sequence[ResultRow], metric: str) -> np.ndarray:
    key = _source_key(metric)
    return np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)


def _point(values: np.ndarray, metric: str) -> float:
    """The reported value of a metric from per-user values."""
    if metric == "rmse":
        return math.sqrt(float(np.mean(values)))
    if metric == "mae":
        return float(np.mean(values))
    finite = values[~np.isnan(values)]  # nDCG/AUC are undefined for some users
    return float(np.mean(finite)) if finite.size else math.nan


def _index_by_user(rows: Iterable[ResultRow], what: str) -> dict[tuple[int, str], ResultRow]:
    indexed: dict[tuple[int, str], ResultRow] = {}
    for row in rows:
        key = (row["fold"], row["user"])
        if key in indexed:
            raise ValueError(f"{what} has two rows for fold={key[0]} user={key[1]!r}")
        indexed[key] = row
    return indexed


def _summarise_metric(
    metric: str,
    rows: Sequence[ResultRow],
    reference_rows: Sequence[ResultRow],
    folds: list[int],
    is_reference: bool,
    confidence: float,
) -> MetricSummary:
    values = _values(rows, metric)
    if metric == "rmse":
        _, low, high = rmse_ci(values, confidence)
    else:
        _, low, high = mean_ci(values, confidence)
    fold_of = np.array([row["fold"] for row in rows])
    per_fold = [_point(values[fold_of == fold], metric) for fold in folds]

    if is_reference:
        diff = diff_low = diff_high = math.nan
    else:
        reference_values = _values(reference_rows, metric)
        if metric == "rmse":
            diff, diff_low, diff_high = rmse_difference_ci(values, reference_values, confidence)
        else:
            diff, diff_low, diff_high = paired_difference_ci(values, reference_values, confidence)
    return MetricSummary(
        value=_point(values, metric),
        low=low,
        high=high,
        n=int(np.count_nonzero(~np.isnan(values))),
        per_fold=per_fold,
        diff=diff,
        diff_low=diff_low,
        diff_high=diff_high,
        resolved=bool(diff_low > 0.0 or diff_high < 0.0),  # False for NaN bounds
    )


def summarise(rows: Sequence[ResultRow], reference: str, confidence: float = CONFIDENCE) -> list[SummaryRow]:
    """Summary rows per (scenario, support size, method), pooled over folds.

    Every (fold, user) of a method must have a row of the reference method in the same
    scenario and support size (ValueError otherwise): the differences are paired.
    Scenarios and methods keep their order of first appearance; support sizes follow
    1, 3, 5, 10, 20, all.
    """
    if not rows:
        raise ValueError("no result rows to summarise")
    for row in rows:
        missing = [key for key in _KEY_COLUMNS if key not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}: {row}")
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["support_size"], row["method"]), []).append(row)
    scenarios = list(dict.fromkeys(row["scenario"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    support_sizes = sorted({row["support_size"] for row in rows}, key=support_size_key)

    summary: list[SummaryRow] = []
    for scenario in scenarios:
        # Per scenario, so a rating scenario gets no AUC column from a click one.
        metrics = _metric_names([row for row in rows if row["scenario"] == scenario])
        for support_size in support_sizes:
            present = [method for method in methods if (scenario, support_size, method) in groups]
            if not present:
                continue
            where = f"scenario={scenario!r} K={support_size}"
            reference_by_user = _index_by_user(
                groups.get((scenario, support_size, reference), []), f"reference {reference!r} in {where}"
            )
            for method in present:
                by_user = _index_by_user(groups[(scenario, support_size, method)], f"method {method!r} in {where}")
                missing = [key for key in by_user if key not in reference_by_user]
                if missing:
                    fold, user = missing[0]
                    raise ValueError(
                        f"reference method {reference!r} has no row for {where} fold={fold} user={user!r} "
                        f"(needed to pair method {method!r}; {len(missing)} such users)"
                    )
                keys = sorted(by_user)
                method_rows = [by_user[key] for key in keys]
                reference_rows = [reference_by_user[key] for key in keys]
                folds = sorted({fold for fold, _ in keys})
                summary.append(
                    SummaryRow(
                        scenario=scenario,
                        support_size=support_size,
                        method=method,
                        reference=reference,
                        n_users=len(keys),
                        folds=folds,
                        metrics={
                            metric: _summarise_metric(
                                metric, method_rows, reference_rows, folds, method == reference, confidence
                            )
                            for metric in metrics
                        },
                    )
                )
    return summary


# --- Rendering ----------------------------------------------------------------------


def _number(x: float, signed: bool = False) -> str:
    """4 decimals with a typographic minus; "—" for NaN."""
    if math.isnan(x):
        return "—"
    text = f"{x:+.4f}" if signed else f"{x:.4f}"
    return text.replace("-", "−")


def _cell(entry: MetricSummary, is_reference: bool, is_best: bool) -> str:
    value = _number(entry["value"])
    if is_best:
        value = f"**{value}**"
    if is_reference:
        return f"{value} (reference)"
    mark = " †" if entry["resolved"] else ""
    interval = f"[{_number(entry['diff_low'])}, {_number(entry['diff_high'])}]"
    return f"{value} ({_number(entry['diff'], signed=True)} {interval}){mark}"


def _best_values(rows: Sequence[SummaryRow], metric: str, support_sizes: Sequence[str]) -> dict[str, float]:
    best: dict[str, float] = {}
    if metric.startswith(_UNRANKED_PREFIXES):
        return best
    choose = min if _LOWER_IS_BETTER.get(metric, False) else max
    for support_size in support_sizes:
        values = [
            row["metrics"][metric]["value"]
            for row in rows
            if row["support_size"] == support_size and not math.isnan(row["metrics"][metric]["value"])
        ]
        if values:
            best[support_size] = choose(values)
    return best


def _metric_table(
    rows: Sequence[SummaryRow], metric: str, methods: Sequence[str], support_sizes: Sequence[str], reference: str
) -> str:
    best = _best_values(rows, metric, support_sizes)
    by_cell = {(row["method"], row["support_size"]): row for row in rows}
    lines = [
        "| method | " + " | ".join(f"K={k}" for k in support_sizes) + " |",
        "|---|" + "---|" * len(support_sizes),
    ]
    for method in methods:
        cells = []
        for support_size in support_sizes:
            row = by_cell.get((method, support_size))
            if row is None:
                cells.append("")
                continue
            entry = row["metrics"][metric]
            cells.append(_cell(entry, method == reference, entry["value"] == best.get(support_size)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _users_table(rows: Sequence[SummaryRow], reference: str, support_sizes: Sequence[str]) -> str:
    by_size = {row["support_size"]: row for row in rows if row["method"] == reference}
    lines = ["| K | users | folds |", "|---|---|---|"]
    for support_size in support_sizes:
        row = by_size[support_size]
        lines.append(f"| {support_size} | {row['n_users']} | {len(row['folds'])} |")
    return "\n".join(lines)


def _plot(
    rows: Sequence[SummaryRow],
    metric: str,
    methods: Sequence[str],
    support_sizes: Sequence[str],
    scenario: str,
    path: Path,
) -> None:
    """metric vs support size, one line per method with its interval as a band.

    Uses the Agg canvas directly (no pyplot), so it needs no display and leaves
    matplotlib's global backend alone.
    """
    by_cell = {(row["method"], row["support_size"]): row["metrics"][metric] for row in rows}
    x = np.arange(len(support_sizes))
    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # A distinct colour and marker per method: the default cycle repeats after ten lines.
    palette = matplotlib.colormaps["tab20"].colors
    markers = "osD^v<>pXh*P"
    for index, method in enumerate(methods):
        entries = [by_cell.get((method, k)) for k in support_sizes]
        value, low, high = (
            np.array([math.nan if entry is None else entry[field] for entry in entries])
            for field in ("value", "low", "high")
        )
        if np.isnan(value).all():
            continue
        color = palette[(2 * index) % len(palette)] if index < len(palette) // 2 else palette[(2 * index + 1) % len(palette)]
        axes.plot(x, value, marker=markers[index % len(markers)], color=color, label=method)
        # Bands only for the reference-scale picture: with many methods they would hide the lines.
        if len(methods) <= 4:
            axes.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
    axes.set_xticks(x, [str(k) for k in support_sizes])
    axes.set_xlabel("support size K")
    axes.set_ylabel(metric_title(metric))
    bands = f" ({CONFIDENCE:.0%} CI bands)" if len(methods) <= 4 else ""
    axes.set_title(f"{scenario}: {metric_title(metric)} vs support size{bands}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2 if len(methods) > 6 else 1)
    figure.savefig(path, dpi=110)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def _json_safe(value: object) -> object:
    """NaN -> null so summary.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


_RATING_EXPLANATION = (
    "Each cell: value (difference vs `{reference}` [paired {confidence:.0%} CI]). "
    "Metrics are computed per user and averaged over users; RMSE is sqrt(mean per-user MSE). "
    "Differences are paired by (fold, user) and pooled over folds (Student-t interval). "
    "The RMSE difference interval is the MSE-difference interval divided by "
    "(RMSE_method + RMSE_reference), so it excludes 0 exactly when the MSE one does. "
    "† = the interval excludes 0 (resolved). **Bold** = best value in the column "
    "(lowest MAE/RMSE, highest nDCG/AUC). nDCG is tie-aware; users whose query has no "
    "positive gain are left out of nDCG. Plot bands are each method's own interval "
    "(unpaired): overlapping bands do not make a difference unresolved, the paired "
    "intervals in the tables decide."
)


_TOPN_EXPLANATION = (
    "Each cell: value (difference vs `{reference}` [paired {confidence:.0%} CI]). "
    "Metrics are computed per user over the candidates (the whole catalog; the withheld new items in "
    "new-item scenarios; the support masked out) and averaged over "
    "users: Recall@N = hits / min(N, relevant items), nDCG@N with binary gains and the ideal of "
    "min(N, relevant) hits at the top, popularity percentile@20 = the mean training-popularity "
    "percentile of the user's top 20 (100 = the most interacted item). Users with no relevant item at a "
    "K are left out at that K for every method. Ties in scores are broken by training popularity, "
    "then catalog order. Differences are paired by (fold, user) and pooled over folds (Student-t "
    "interval). † = the interval excludes 0 (resolved). **Bold** = best value in the column (none for "
    "popularity). Plot bands are each method's own interval (unpaired); the paired intervals in the "
    "tables decide."
)


def _render_markdown(
    summary: Sequence[SummaryRow],
    out_dir: Path,
    reference: str,
    title: str,
    notes: str,
    extra_sections: dict[str, str],
) -> str:
    scenarios = list(dict.fromkeys(row["scenario"] for row in summary))
    methods = list(dict.fromkeys(row["method"] for row in summary))
    parts = [f"# {title}"]
    if notes:
        parts.append(notes.strip())
    topn = bool(summary) and "rmse" not in summary[0]["metrics"]
    explanation = _TOPN_EXPLANATION if topn else _RATING_EXPLANATION
    parts.append(explanation.format(reference=reference, confidence=CONFIDENCE))
    used_names: set[str] = set()
    for scenario in scenarios:
        rows = [row for row in summary if row["scenario"] == scenario]
        support_sizes = sorted({row["support_size"] for row in rows}, key=support_size_key)
        scenario_methods = [method for method in methods if any(row["method"] == method for row in rows)]
        parts.append(f"## Scenario: {scenario}")
        parts.append(_users_table(rows, reference, support_sizes))
        for metric in rows[0]["metrics"]:
            parts.append(f"### {metric_title(metric)}")
            parts.append(_metric_table(rows, metric, scenario_methods, support_sizes, reference))
            if metric in _PLOTTED:
                name = f"{_slug(scenario)}_{_slug(metric)}.png"
                while name in used_names:  # two scenario names with the same slug
                    name = "_" + name
                used_names.add(name)
                _plot(rows, metric, scenario_methods, support_sizes, scenario, out_dir / name)
                parts.append(f"![{scenario}: {metric_title(metric)} vs support size]({name})")
    for heading, body in extra_sections.items():
        parts.append(f"## {heading}")
        parts.append(body.strip())
    return "\n\n".join(parts) + "\n"


def write_report(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    reference: str,
    title: str,
    notes: str = "",
    extra_sections: dict[str, str] | None = None,
    extra_summary: dict | None = None,
) -> Path:
    """Write out_dir/report.md (tables, embedded PNG plots) and out_dir/summary.json.

    Returns the path of report.md. `notes` goes under the title; `extra_sections` maps
    a heading to Markdown appended at the end; `extra_summary` adds top-level keys to
    summary.json (e.g. the top-N protocol's coverage).
    """
    summary = summarise(rows, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _render_markdown(summary, out, reference, title, notes, extra_sections or {})
    report_path = out / "report.md"
    report_path.write_text(markdown, encoding="utf-8")
    document = {"title": title, "reference": reference, "confidence": CONFIDENCE, "rows": summary, **(extra_summary or {})}
    (out / "summary.json").write_text(
        json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    return report_path
