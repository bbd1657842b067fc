"""The memory learner: a learned memory of earlier users that personalises where a new
user's adaptation starts and how fast it moves.

The third family of meta-learning, after learning the initialisation (MAML) and learning
how to adapt (Meta-SGD): memory-assisted learning, as in MAMO (Dong et al., KDD 2020),
whose feature-specific memory turns a user's profile into a personalised bias on the
global initialisation. Here the memory has M slots, each with a key (k,) and three values:

    V_start (1 + d)  an offset for the rating head's theta_0 = (b_u, f_u)
    V_steps (1 + d)  an offset for the log inner step sizes of b_u and f_u
    V_eng   (e)      an offset for the engagement head's phi_0 (models with that head)

A user's query is built from what is known before the inner loop runs: the user's
attributes and the pooled representation of their support items,

    s_u = [mean_j q_j, mean_j r_j q_j, mean_j r_j, log(1 + n)]     r_j = y_j - mu - b_j
    z_u = sum_f pool(A_f, codes_uf) + s_u W                         (k,)
    a_u = softmax(K z_u / sqrt(k))                                  (M,), sums to one
    theta_0u = theta_0 + a_u V_start
    lr_u     = lr * exp(a_u V_steps)          (per coordinate, every step)
    phi_0u   = phi_0 + a_u V_eng

(j = the user's support items, n their number, q_j / b_j their rating factors / biases,
A_f a table per user attribute field, K (M, k) the keys). Gathers, matmuls and a softmax
over the whole batch, outside the per-user loop: the memory exports like the rest of the
adapt-then-score graph. The inner loop's pull toward theta_0 pulls toward theta_0u.

The values start at zero, so the read is exactly zero and the model is exactly the served
one; `train --learner memory` meta-trains the served model first and then the memory
alone on top of it (training.initialisation), so early stopping keeps the served model
whenever the memory does not help the validation users.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from training import model as M
from training.features import FeatureSchema

MEMORY_PREFIX = "memory."  # the memory's rating-side parameters (trained with the rating objective)
KEYS = "memory.keys"  # (M, k)
SUPPORT_PROJECTION = "memory.support_projection"  # (2 d + 2, k)
START_VALUES = "memory.start_values"  # (M, 1 + d)
STEP_VALUES = "memory.step_values"  # (M, 1 + d)
ENGAGEMENT_VALUES = "eng.memory.values"  # (M, e): an engagement parameter, trained with the engagement objective
ENGAGEMENT_PREFIX = "eng.memory."


def attribute_table(field_name: str) -> str:
    """Name of the memory's (codes, k) table of a user attribute field."""
    return f"memory.user_attr.{field_name}"


def support_width(config: M.ModelConfig) -> int:
    """Width of the pooled support representation s_u."""
    return 2 * config.factors + 2


class MemoryRead(NamedTuple):
    attention: Tensor  # (B, M) rows sum to one
    start: Tensor  # (B, 1 + d) offset of [user.bias | user.factors]
    steps: Tensor  # (B, 1 + d) offset of their log step sizes
    engagement: Tensor | None  # (B, e) offset of phi_0, or None without the engagement head


def init_memory_params(config: M.ModelConfig, schema: FeatureSchema, seed: int = 0) -> M.Params:
    """The memory's parameters, with every value at zero (the read is exactly zero).

    Keys, attribute tables and the support projection start random, scaled so that the
    attention logits have about unit spread across users: with attention equal for every
    user, all slots' values would get the same gradient and never part.
    """
    if not config.memory_slots:
        raise ValueError("the model has no memory (memory_slots = 0)")
    g = torch.Generator().manual_seed(10_000 + seed)
    m, k, d = config.memory_slots, config.memory_key_dim, config.factors
    scale = 1.0 / math.sqrt(len(schema.user_fields) + 1)  # the attribute terms and the support term share unit variance
    params: M.Params = {}
    for f in schema.user_fields:
        params[attribute_table(f.name)] = torch.randn(f.num_codes, k, generator=g) * scale
    width = support_width(config)
    params[SUPPORT_PROJECTION] = torch.randn(width, k, generator=g) * (scale / math.sqrt(width))
    params[KEYS] = torch.randn(m, k, generator=g)
    params[START_VALUES] = torch.zeros(m, 1 + d)
    params[STEP_VALUES] = torch.zeros(m, 1 + d)
    if config.engagement_factors:
        params[ENGAGEMENT_VALUES] = torch.zeros(m, config.engagement_factors)
    return params


def pooled_support(
    config: M.ModelConfig,
    schema: FeatureSchema,
    params: M.Params,
    support_items: Tensor,
    support_labels: Tensor,
    support_mask: Tensor,
    loss_kind: str = "squared",
) -> Tensor:
    """s_u (B, 2 d + 2): the support items' mean rating factors, their mean weighted by the
    label's residual against the item baseline, the mean residual and log(1 + n)."""
    b, q = M.item_repr(config, schema, params, support_items)  # (B, S), (B, S, d)
    baseline = params["mu"] + b
    if loss_kind == "logistic":
        baseline = torch.sigmoid(baseline)  # clicks: the residual in probability units
    residual = (support_labels - baseline) * support_mask  # (B, S), 0 on padding
    n = support_mask.sum(-1, keepdim=True)  # (B, 1)
    denominator = n.clamp(min=1.0)
    mean_q = (support_mask.unsqueeze(1) @ q).squeeze(1) / denominator  # (B, d)
    mean_rq = (residual.unsqueeze(1) @ q).squeeze(1) / denominator  # (B, d)
    mean_r = residual.sum(-1, keepdim=True) / denominator  # (B, 1)
    return torch.cat([mean_q, mean_rq, mean_r, torch.log1p(n)], dim=-1)


def attention(
    config: M.ModelConfig,
    schema: FeatureSchema,
    params: M.Params,
    user_features: Tensor,
    support_items: Tensor,
    support_labels: Tensor,
    support_mask: Tensor,
    loss_kind: str = "squared",
) -> Tensor:
    """a_u (B, M): each user's softmax attention over the memory's slots."""
    query = pooled_support(config, schema, params, support_items, support_labels, support_mask, loss_kind) @ params[SUPPORT_PROJECTION]
    for f in schema.user_fields:
        query = query + M._pool(params[attribute_table(f.name)], M._slots(user_features, f))
    logits = query @ params[KEYS].transpose(0, 1) / math.sqrt(config.memory_key_dim)  # (B, M)
    return torch.softmax(logits, dim=-1)


def read(config: M.ModelConfig, schema: FeatureSchema, params: M.Params, batch, loss_kind: str = "squared") -> MemoryRead:
    """What the memory returns for each user of a Batch (training.inner_loop.Batch)."""
    weights = attention(config, schema, params, batch.user_features, batch.support_items, batch.support_labels, batch.support_mask, loss_kind)
    engagement = weights @ params[ENGAGEMENT_VALUES] if config.engagement_factors and ENGAGEMENT_VALUES in params else None
    return MemoryRead(weights, weights @ params[START_VALUES], weights @ params[STEP_VALUES], engagement)


def personalise(
    start: M.Params, learning_rates: dict[str, list[Tensor]], memory: MemoryRead
) -> tuple[M.Params, dict[str, list[Tensor]]]:
    """Each user's theta_0 and step sizes from the shared ones and the memory's read:
    (start with (B, ...) tensors, {adapted name: [per-user rates (B, ...) per step]})."""
    split = {"user.bias": (memory.start[:, 0], memory.steps[:, 0]), "user.factors": (memory.start[:, 1:], memory.steps[:, 1:])}
    personal = {name: value + split[name][0] if name in split else value for name, value in start.items()}
    rates = {}
    for name, per_step in learning_rates.items():
        scale = torch.exp(split[name][1])  # (B,) or (B, d)
        rates[name] = [rate * scale for rate in per_step]
    return personal, rates


def engagement_start(config: M.ModelConfig, schema: FeatureSchema, params: M.Params, batch, loss_kind: str = "squared") -> Tensor | None:
    """Each user's phi_0 (B, e) with the memory's offset; None for a model without memory
    or engagement head (the inner loop then starts every user at the shared phi_0)."""
    if not (config.memory_slots and config.engagement_factors and ENGAGEMENT_VALUES in params):
        return None
    return params["eng.user0"] + read(config, schema, params, batch, loss_kind).engagement


def is_memory_parameter(name: str) -> bool:
    return name.startswith((MEMORY_PREFIX, ENGAGEMENT_PREFIX))


# -- what the memory learned ---------------------------------------------------------------------
def inspect(
    config: M.ModelConfig, schema: FeatureSchema, params: M.Params, batches: Sequence, loss_kind: str = "squared", top: int = 3
) -> str:
    """A Markdown report of what the memory learned: the slots by attention mass (with
    what each one adds to theta_0, the step sizes and phi_0), and for every value of every
    user attribute the slots its users attend to most.

    `batches` are (Batch, user codes (B, Wu)) pairs of the users to read the memory for
    (e.g. every user with their first K interactions)."""
    weights, codes = [], []
    with torch.no_grad():
        for batch in batches:
            weights.append(read(config, schema, params, batch, loss_kind).attention.numpy())
            codes.append(batch.user_features.numpy())
    if not weights:
        raise ValueError("no users to read the memory for")
    attention_matrix = np.concatenate(weights)  # (users, M)
    user_codes = np.concatenate(codes)
    mass = attention_matrix.mean(0)
    order = np.argsort(-mass, kind="stable")
    start = params[START_VALUES].detach().numpy()
    steps = params[STEP_VALUES].detach().numpy()
    eng = params[ENGAGEMENT_VALUES].detach().numpy() if ENGAGEMENT_VALUES in params else None
    entropy = float(-(attention_matrix * np.log(np.clip(attention_matrix, 1e-12, None))).sum(1).mean())
    lines = [
        f"{len(attention_matrix)} users, {config.memory_slots} slots; mean attention entropy {entropy:.3f} nats "
        f"(uniform: {math.log(config.memory_slots):.3f}); the share of users whose largest weight is each slot in brackets.",
        "",
        "| slot | attention mass | top slot of | bias offset | factor offset norm | mean step-size factor |"
        + (" phi_0 offset norm |" if eng is not None else ""),
        "|---|---|---|---|---|---|" + ("---|" if eng is not None else ""),
    ]
    argmax = attention_matrix.argmax(1)
    for slot in order:
        row = (
            f"| {slot} | {mass[slot]:.3f} | {np.mean(argmax == slot):.3f} | {start[slot, 0]:+.4f} | {np.linalg.norm(start[slot, 1:]):.4f} "
            f"| {np.exp(steps[slot]).mean():.3f} |"
        )
        if eng is not None:
            row += f" {np.linalg.norm(eng[slot]):.4f} |"
        lines.append(row)
    lines += ["", f"Which user attributes map to which slots (mean attention of the users with each value; the {top} largest):", ""]
    lines += ["| attribute | value | users | slots (weight) |", "|---|---|---|---|"]
    for f in schema.user_fields:
        values = user_codes[:, f.offset : f.offset + f.width]
        for code in range(1, f.num_codes):
            holders = (values == code).any(1)
            if not holders.any():
                continue
            mean = attention_matrix[holders].mean(0)
            best = np.argsort(-mean, kind="stable")[:top]
            label = "(unknown)" if code == 1 else f.vocabulary[code - 2]
            lines.append(f"| {f.name} | {label} | {int(holders.sum())} | " + ", ".join(f"{s} ({mean[s]:.2f})" for s in best) + " |")
    return "\n".join(lines)
