"""The two baselines of the engine benchmark, on an artifact's own weights.

- `load_reference`: training's inner loop (torch.func: grad inside vmap, run eagerly),
  rebuilt from nothing but the artifact's files (manifest + init.safetensors).
- `NaiveLoop`: what a user would write without the artifact: for each user, deep-copy an
  nn.Module holding the model, take the inner steps with torch.optim.SGD, then predict.
  The gradients are scaled per coordinate so that SGD(lr=1) takes the artifact's step:
  the learned, support-size-normalised step sizes, the pull toward the prior and the
  update-norm clip (training.inner_loop.inner_steps). Its scores equal the engines' to
  float32 rounding, so that the benchmark compares the same computation.

Inputs are the engines' padded numpy batches (service.padding.EngineInputs) with
prefix masks: a user's real support entries come first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from service.padding import EngineInputs, EngineOutputs
from training import model as M
from training.export import load_exported_model
from training.inner_loop import INNER_PREFIX, Batch, support_loss_terms, to_label_units
from training.trainer import AdaptedModel, loss_kind_of


def load_reference(artifact: Path) -> AdaptedModel:
    """Training's model and inner loop with the artifact's configuration and weights."""
    return load_exported_model(artifact)


def to_batch(inputs: EngineInputs, device: torch.device | str = "cpu") -> Batch:
    return Batch(*(torch.from_numpy(a).to(device) for a in inputs))


def func_eager(reference: AdaptedModel, inputs: EngineInputs, device: torch.device | str = "cpu") -> EngineOutputs:
    """Baseline (b): training.inner_loop.adapt_and_score (torch.func vmap), eager."""
    with torch.no_grad():
        outputs = reference.forward(to_batch(inputs, device))
    return EngineOutputs(*(o.cpu().numpy() for o in outputs))


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots


class PreferenceModel(torch.nn.Module):
    """The artifact's model as an ordinary nn.Module: shared weights plus one user's
    adapted parameters (`user`), which the naive loop fills and trains per user."""

    def __init__(self, reference: AdaptedModel) -> None:
        super().__init__()
        self.config = reference.model_config
        self.schema = reference.schema
        self.weights = torch.nn.ParameterDict(
            {_key(n): torch.nn.Parameter(v.detach().clone(), requires_grad=False) for n, v in reference.params.items()}
        )
        self.user = torch.nn.ParameterDict()
        self.names = list(reference.params)

    def params(self) -> M.Params:
        return {n: self.weights[_key(n)] for n in self.names}

    def forward(self, user_features: torch.Tensor, fixed: M.Params, items: torch.Tensor) -> torch.Tensor:
        """Scores of one user's items (n, item_width) -> (n,) with its current parameters."""
        params = self.params()
        user = M.user_repr(self.config, self.schema, params, user_features[None])
        items_repr = M.pair_repr(self.config, user, M.item_repr(self.config, self.schema, params, items[None]))
        user_params = {**fixed, **{k.replace("__", "."): p for k, p in self.user.items()}}
        return M.predict(self.config, params, user_params, user[0], tuple(x[0] for x in items_repr))


class NaiveLoop:
    """Baseline (a): a model copy and an SGD optimizer per user, one user at a time (the
    rating head only: its scores and support losses are what it is compared on)."""

    def __init__(self, reference: AdaptedModel, device: torch.device | str = "cpu") -> None:
        self.reference = reference
        self.device = torch.device(device)
        self.model = PreferenceModel(reference).to(self.device)
        self.inner = reference.inner_config
        self.loss_kind = loss_kind_of(reference.label)
        params = {n: v.to(self.device) for n, v in reference.params.items()}
        adapted = reference.model_config.adapted_names()
        self.adapted = adapted
        lr_names = {
            n: [f"{INNER_PREFIX}log_lr.{n}.step{t}" for t in range(self.inner.steps)]
            if self.inner.learning_rate_kind == "per_step"
            else [f"{INNER_PREFIX}log_lr.{n}"]
            for n in adapted
        }
        self.learning_rates = {n: [torch.exp(params[k]) for k in names] for n, names in lr_names.items()}
        self.pulls = {n: torch.exp(params[f"{INNER_PREFIX}log_pull.{n}"]) for n in adapted} if self.inner.prior_pull else {}
        self.offsets = (
            {n: torch.exp(params[f"{INNER_PREFIX}log_offset.{n}"]) for n in adapted} if self.inner.normalise_by_support_size else {}
        )

    def run(self, inputs: EngineInputs, users: int | None = None) -> EngineOutputs:
        """Adapts and scores the first `users` users of the batch (all by default)."""
        count = len(inputs.user_features) if users is None else users
        scores, before, after = [], [], []
        for i in range(count):
            s, b, a = self.adapt_one(inputs, i)
            scores.append(s)
            before.append(b)
            after.append(a)
        return EngineOutputs(np.stack(scores), np.asarray(before, np.float32), np.asarray(after, np.float32))

    def adapt_one(self, inputs: EngineInputs, i: int) -> tuple[np.ndarray, float, float]:
        device = self.device
        n = int(inputs.support_mask[i].sum())
        user_features = torch.from_numpy(inputs.user_features[i]).to(device)
        support = torch.from_numpy(inputs.support_items[i, :n]).to(device)
        labels = torch.from_numpy(inputs.support_labels[i, :n]).to(device)
        query = torch.from_numpy(inputs.query_items[i]).to(device)

        model = copy.deepcopy(self.model)  # the per-user copy a user would make
        config, schema = self.reference.model_config, self.reference.schema
        start = M.initial_user_params(config, schema, model.params(), user_features[None])
        fixed = {k: v[0].detach() for k, v in start.items() if k not in self.adapted}
        theta0 = {k: start[k][0].detach().clone() for k in self.adapted}
        for k in self.adapted:
            model.user[_key(k)] = torch.nn.Parameter(theta0[k].clone())
        optimizer = torch.optim.SGD(model.user.parameters(), lr=1.0)
        denominators = {
            k: torch.clamp(n + self.offsets[k], min=1.0) if self.offsets else torch.tensor(float(max(n, 1)), device=device)
            for k in self.adapted
        }

        def data_loss() -> torch.Tensor:
            return support_loss_terms(self.loss_kind, model(user_features, fixed, support), labels).sum()  # type: ignore[arg-type]

        before = None
        best_loss, best = float(data_loss().detach()), {k: theta0[k].clone() for k in self.adapted}
        for step in range(self.inner.steps):
            optimizer.zero_grad()
            loss = data_loss()
            if before is None:
                before = float(loss.detach()) / max(n, 1)
            for k, pull in self.pulls.items():
                diff = model.user[_key(k)] - theta0[k]
                loss = loss + (pull * diff * diff).sum()
            loss.backward()
            grads = []
            for k in self.adapted:
                p = model.user[_key(k)]
                rates = self.learning_rates[k]
                p.grad.mul_(rates[step if len(rates) > 1 else 0] / denominators[k])
                grads.append(p.grad)
            if self.inner.max_step_norm > 0:
                norm = torch.sqrt(sum((g * g).sum() for g in grads) + 1e-12)
                scale = torch.clamp(self.inner.max_step_norm / norm, max=1.0)
                for g in grads:
                    g.mul_(scale)
            optimizer.step()
            if self.inner.keep_best:  # the graph returns the iterate with the lowest support loss
                with torch.no_grad():
                    loss_now = float(data_loss())
                if loss_now < best_loss:
                    best_loss, best = loss_now, {k: model.user[_key(k)].detach().clone() for k in self.adapted}
        with torch.no_grad():
            if self.inner.keep_best:
                for k in self.adapted:
                    model.user[_key(k)].copy_(best[k])
            after = float(data_loss()) / max(n, 1)
            if before is None:
                before = after
            scores = model(user_features, fixed, query)
            label = self.reference.label
            scores = to_label_units(scores, self.loss_kind, label.min_value, label.max_value)  # type: ignore[arg-type]
        return scores.cpu().numpy(), before, after


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray], users: int | None = None) -> float:
    """Largest difference over all outputs (of the first `users` users)."""
    rows = slice(None) if users is None else slice(0, users)
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]  # the naive loop has no engagement head
    return max(float(np.max(np.abs(np.asarray(x)[rows] - np.asarray(y)[rows]), initial=0.0)) for x, y in pairs)
