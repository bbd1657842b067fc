"""The named meta-learners: how the inner loop is configured and meta-trained.

- ``maml``: one fixed step size on the mean support loss, true second-order meta-gradient.
- ``fomaml``: the same with the first-order approximation.
- ``metasgd``: a learned step size per adapted coordinate (Meta-SGD), second order.
- ``warmstart``: the served learner: Meta-SGD step sizes normalised by support size
  (lr / (n + c), c learned) plus a learned pull toward the initialisation, second order.
  On the bias_factor model it starts exactly at the tuned bias baseline.
- ``memory``: the served learner plus a learned memory of earlier users that personalises
  each user's initialisation, step sizes and engagement start (training.memory), meta-trained
  on top of the served model; the memory lives in the model (ModelConfig.memory_slots).
- ``none``: no inner loop at training (plain supervised training of the same network),
  used for the "without adaptation" and "fine-tuned" baselines.
"""

from __future__ import annotations

import math

from training.inner_loop import InnerLoopConfig

LEARNERS = ("maml", "fomaml", "metasgd", "warmstart", "memory", "none")
MEMORY_SLOTS = 8  # the memory learner's default number of slots


def learner_config(learner: str, steps: int = 5, learning_rate: float | None = None) -> InnerLoopConfig:
    """The inner-loop configuration of a named learner."""
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; choose from {LEARNERS}")
    if learner in ("warmstart", "memory"):  # the memory changes the model, not the inner loop
        return InnerLoopConfig(steps=steps, learning_rate=learning_rate or 0.5)
    if learner == "none":
        return InnerLoopConfig(
            steps=0,
            learning_rate=learning_rate or 0.1,
            learning_rate_kind="scalar",
            learn_learning_rate=False,
            normalise_by_support_size=False,
            prior_pull=False,
            max_step_norm=0.0,
        )
    return InnerLoopConfig(
        steps=steps,
        learning_rate=learning_rate or 0.1,
        learning_rate_kind="per_parameter" if learner == "metasgd" else "scalar",
        learn_learning_rate=learner == "metasgd",
        normalise_by_support_size=False,
        prior_pull=False,
        max_step_norm=2.0,
        first_order=learner == "fomaml",
    )


def logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))
