"""The evaluation harness: every method, every split, every support size, the same way.

A method is anything with a name, `fit(context)` and `predict(tasks)`. `fit` sees only
training interactions and validation tasks (for tuning); `predict` gets test tasks whose
support has been cut to the earliest K interactions and returns one prediction per query
item. The harness turns those into per-user result rows (see training.report).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol as TypingProtocol, Sequence

import numpy as np

from training.dataset import Dataset
from training.fitting import FitContext, support_label, tasks_at
from training.metrics import user_metrics
from training.splits import Split, Task, build_tasks, training_rows

log = logging.getLogger(__name__)

SUPPORT_SIZES: tuple[int | None, ...] = (1, 3, 5, 10, 20, None)  # None = all


def parse_support_sizes(text: str) -> tuple[int | None, ...]:
    """'5,10,20,all' -> (5, 10, 20, None)."""
    sizes: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            sizes.append(None)
        elif part.isascii() and part.isdigit() and int(part) > 0:
            sizes.append(int(part))
        else:
            raise ValueError(f"support size must be a positive integer or 'all', got {part!r}")
    return tuple(sizes)


class Method(TypingProtocol):
    name: str

    def fit(self, context: FitContext) -> None: ...

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]: ...


def fit_context(dataset: Dataset, split: Split, support_sizes: tuple[int | None, ...], seed: int = 0) -> FitContext:
    train = dataset.subset(training_rows(dataset, split))
    return FitContext(
        dataset=dataset,
        train=train,
        valid_tasks=build_tasks(dataset, split, split.valid_users),
        support_sizes=support_sizes,
        split=split,
        seed=seed,
    )


def evaluate(
    dataset: Dataset,
    splits: Sequence[Split],
    make_methods: Callable[[], Sequence[Method]],
    support_sizes: tuple[int | None, ...] = SUPPORT_SIZES,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Fits fresh methods on each split and scores every test user at every support size."""
    rows: list[dict] = []
    label = dataset.label
    for split in splits:
        context = fit_context(dataset, split, support_sizes, seed=split.protocol.seed + split.fold)
        test_tasks = build_tasks(dataset, split, split.test_users)
        for method in make_methods():
            if progress:
                progress(f"fold {split.fold}: {method.name}")
            method.fit(context)
            for k in support_sizes:
                tasks = tasks_at(test_tasks, k)
                predictions = method.predict(tasks)
                if len(predictions) != len(tasks):
                    raise RuntimeError(f"{method.name} returned {len(predictions)} predictions for {len(tasks)} tasks")
                for task, pred in zip(tasks, predictions):
                    pred = np.asarray(pred, dtype=np.float64)
                    if pred.shape != task.query_labels.shape or not np.all(np.isfinite(pred)):
                        raise RuntimeError(f"{method.name}: bad predictions for user {task.user}: {pred!r}")
                    metrics = user_metrics(pred, task.query_labels, label.kind, (label.min_value, label.max_value))
                    rows.append(
                        {
                            "scenario": split.protocol.scenario,
                            "fold": split.fold,
                            "support_size": support_label(k),
                            "method": method.name,
                            "user": task.user,
                            **metrics,
                        }
                    )
    return rows
