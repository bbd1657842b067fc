"""What a method may learn from in one split, and the objective rating methods tune on.

Shared by the evaluation harness (which builds a FitContext per split) and the production
training path (which builds one for its validation users), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import numpy as np

from training.dataset import Dataset
from training.metrics import query_loss
from training.splits import Task

if TYPE_CHECKING:
    from training.splits import Split


class Predictor(Protocol):
    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]: ...


@dataclass
class FitContext:
    """What a method may learn from in one split."""

    dataset: Dataset  # the whole dataset: attribute tables, label spec
    train: Dataset  # only the interactions this split allows for training
    valid_tasks: list[Task]  # validation users' tasks (full support pools), for tuning
    support_sizes: tuple[int | None, ...]  # the sizes it will be evaluated at
    split: "Split | None"  # None outside the harness (the production job's validation users)
    seed: int = 0


def support_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def tasks_at(tasks: Iterable[Task], k: int | None) -> list[Task]:
    return [t.with_support_size(k) for t in tasks]


def validation_mse(
    method: Predictor, tasks: Sequence[Task], support_sizes: Sequence[int | None], low: float, high: float
) -> float:
    """Mean query MSE (clipped predictions) over tasks and support sizes: the tuning objective."""
    losses = [
        query_loss(np.clip(pred, low, high), task.query_labels, "rating")
        for k in support_sizes
        for task, pred in zip(tasks, method.predict(tasks_at(tasks, k)))
    ]
    return float(np.mean(losses)) if losses else 0.0
