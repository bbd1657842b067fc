"""User-preference models as pure functions over a dict of parameters.

Two structures share one interface (`item_repr`, `user_repr`, `initial_user_params`,
`predict`), so the inner loop in training.inner_loop is written once for both:

- ``bias_factor`` (the default): score = mu + b_item + theta_b + q_item . theta_f.
  b_item = base item bias (shrunk item mean from the training data, fixed) + a regularised
  id correction + pooled attribute biases; q_item = regularised id factors + pooled
  attribute factors. The inner loop adapts the user part theta = (theta_b, theta_f) from a
  meta-learned prior theta_0 (optionally shifted by the user's attributes). With item
  factors near zero and one inner step of the right size it is exactly the support-fitted
  bias baseline, which is where meta-training starts.
- ``mlp`` (MeLU-like): pooled attribute embeddings of user and item, concatenated, through
  decision layers; the inner loop adapts the decision layers.

Shapes: B users, S support items, Q query items, W slots of an encoded item row,
d factors, E embedding size, H hidden units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from training.features import ITEM_ID_FIELD, PAD, FeatureSchema, Field

Params = dict[str, Tensor]

BIAS_FACTOR_ADAPTED = ("user.bias", "user.factors")


@dataclass(frozen=True)
class ModelConfig:
    """The model structure. Every field has a comment on what its default means."""

    kind: Literal["bias_factor", "mlp"] = "bias_factor"
    factors: int = 16  # bias_factor: dimension of user and item factors
    factor_init: Literal["als", "random"] = "als"  # bias_factor: item-id factors start at an ALS fit (ratings)
    als_l2: float = 10.0  # ridge weight of that ALS fit
    fold_in_l2: float = 10.0  # initial pull of the user factors toward theta_0 (ridge fold-in)
    # bias_factor: items shrink toward what their attributes predict ("on", ridge weight
    # attribute_prior_l2), toward the mean ("off"), or whichever the validation users
    # prefer ("tune"). On by default: it helped new users on MovieLens-100K (5 dev folds).
    # It hurt new items there (older films of a release-year bucket rate lower than the
    # new releases in it): "off" suits catalogs whose new items differ from the old.
    attribute_prior: Literal["tune", "on", "off"] = "on"
    attribute_prior_l2: float = 1.0
    prior: Literal["global", "user_attributes"] = "global"  # bias_factor: theta_0 from user attributes too
    embedding_dim: int = 16  # mlp: per-field embedding size
    hidden: tuple[int, ...] = (64, 64)  # mlp: decision layer widths
    adapted: tuple[str, ...] = ()  # parameters the inner loop adapts; () = the kind's default
    id_l2: float = 10.0  # L2 weight on item-id corrections and factors (per training interaction)
    attribute_l2: float = 1.0  # L2 weight on attribute biases and factors
    init_scale: float = 0.01  # std of the random initial factors / embeddings
    use_item_id: bool = True  # item-id embedding (with an out-of-vocabulary row for new items)
    # Name prefixes of parameters the outer loop leaves at their start. The item side starts
    # at a ridge/ALS fit of the training data; learning it by meta-gradient as well overfit
    # the few hundred training users of MovieLens-100K in our measurements.
    frozen: tuple[str, ...] = ("item.",)
    # With a frozen item side, score each half of the training users' episodes with an item
    # side fitted on the other half (a user's query never shaped the items it is scored on).
    # Off by default: on MovieLens-100K (5 dev folds) it learned a more timid adaptation
    # that transferred worse to the full item side used at serving time.
    cross_fit: bool = False
    # bias_factor: the engagement head ("will this user interact with the item"), what
    # Recommend ranks the catalog by. 0 = none (a rating-only model). Its item side
    # (a popularity bias and factors per item id and attribute value) is meta-trained with
    # a listwise loss over the catalog; the inner loop adapts the user's engagement factors.
    engagement_factors: int = 0
    engagement_l2: float = 1.0  # L2 weight on the engagement item tables (per training interaction)
    # Share of the ranked catalog whose item id is hidden (read as out-of-vocabulary) in each
    # engagement meta-step, so that the attribute tables learn to rank an item without its
    # id, as they must for a new item. 0 = off (the served model).
    engagement_id_dropout: float = 0.0
    # bias_factor, ratings: where the item biases start. "shrunk_mean": each item's mean
    # shrunk toward the global mean; "als": item and user biases fitted jointly by
    # regularised ALS (the standard BaselineOnly, reg_i / reg_u below), so an item's bias is
    # not confounded with the biases of the users who happened to rate it.
    item_biases: Literal["shrunk_mean", "als"] = "shrunk_mean"
    bias_reg_item: float = 10.0
    bias_reg_user: float = 15.0
    # bias_factor: the memory learner (training.memory): memory_slots slots, read by softmax
    # attention from the user's attributes and pooled support items, personalise theta_0,
    # the inner step sizes and the engagement head's phi_0. 0 = no memory (the served model).
    memory_slots: int = 0
    memory_key_dim: int = 16  # size of the memory's keys (the attention's query space)

    def __post_init__(self) -> None:
        if self.kind not in ("bias_factor", "mlp"):
            raise ValueError(f"model kind must be 'bias_factor' or 'mlp', got {self.kind!r}")
        if self.factor_init not in ("als", "random"):
            raise ValueError(f"factor_init must be 'als' or 'random', got {self.factor_init!r}")
        if self.als_l2 <= 0 or self.fold_in_l2 <= 0 or self.attribute_prior_l2 <= 0:
            raise ValueError("als_l2, fold_in_l2 and attribute_prior_l2 must be positive")
        if self.attribute_prior not in ("tune", "on", "off"):
            raise ValueError(f"attribute_prior must be 'tune', 'on' or 'off', got {self.attribute_prior!r}")
        if self.prior not in ("global", "user_attributes"):
            raise ValueError(f"prior must be 'global' or 'user_attributes', got {self.prior!r}")
        if self.factors < 1 or self.embedding_dim < 1 or any(h < 1 for h in self.hidden) or not self.hidden:
            raise ValueError("factors, embedding_dim and hidden widths must be positive (hidden non-empty)")
        if self.id_l2 < 0 or self.attribute_l2 < 0 or self.init_scale < 0 or self.engagement_l2 < 0:
            raise ValueError("id_l2, attribute_l2, engagement_l2 and init_scale must be >= 0")
        if self.item_biases not in ("shrunk_mean", "als"):
            raise ValueError(f"item_biases must be 'shrunk_mean' or 'als', got {self.item_biases!r}")
        if self.bias_reg_item <= 0 or self.bias_reg_user <= 0:
            raise ValueError("bias_reg_item and bias_reg_user must be positive")
        if self.engagement_factors < 0:
            raise ValueError(f"engagement_factors must be >= 0, got {self.engagement_factors}")
        if self.engagement_factors and self.kind != "bias_factor":
            raise ValueError("the engagement head needs the bias_factor model")
        if not 0.0 <= self.engagement_id_dropout < 1.0:
            raise ValueError(f"engagement_id_dropout must be in [0, 1), got {self.engagement_id_dropout}")
        if self.memory_slots < 0 or self.memory_key_dim < 1:
            raise ValueError(f"memory_slots must be >= 0 and memory_key_dim >= 1, got {self.memory_slots}, {self.memory_key_dim}")
        if self.memory_slots and self.kind != "bias_factor":
            raise ValueError("the memory learner needs the bias_factor model")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "adapted", tuple(self.adapted))
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if self.adapted:
            allowed = set(self._default_adapted())
            unknown = [n for n in self.adapted if n not in allowed]
            if unknown:
                raise ValueError(f"cannot adapt {unknown} in a {self.kind} model; choose from {sorted(allowed)}")

    def _default_adapted(self) -> tuple[str, ...]:
        if self.kind == "bias_factor":
            return BIAS_FACTOR_ADAPTED
        return tuple(name for i in range(len(self.hidden) + 1) for name in (f"mlp.{i}.weight", f"mlp.{i}.bias"))

    def adapted_names(self) -> tuple[str, ...]:
        """Names of the per-user parameters the inner loop adapts."""
        return self.adapted or self._default_adapted()

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "ModelConfig":
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", (64, 64)))
        d["adapted"] = tuple(d.get("adapted", ()))
        d["frozen"] = tuple(d.get("frozen", ("item.",)))
        return ModelConfig(**d)


def served_config(**overrides) -> ModelConfig:
    """The model `train` exports by default (and the harness's `warmstart` method): joint ALS
    biases + factors for ratings, and the engagement head Recommend ranks by.

    The attribute prior is off: on MovieLens-100K new items, letting the validation users
    choose its weight ("tune") picked it in 4 of 5 folds and ended +0.025 RMSE worse than
    BaselineOnly, while "off" was within +0.006 (the validation share of new-item users is
    too small to choose on); for new users the two were level."""
    return ModelConfig(**{"attribute_prior": "off", "engagement_factors": 32, "item_biases": "als", **overrides})


@dataclass
class DataStats:
    """What initialisation takes from the training data (nothing else does)."""

    mean: float  # global mean label (a logit for clicks)
    item_base_bias: Tensor  # (id codes,) shrunk item deviations from the mean; 0 for pad / OOV
    interactions: int  # number of training interactions: scales the L2 terms
    item_factors: Tensor | None = None  # (id codes, factors) starting item-id factors, e.g. from ALS
    attribute_tables: dict[str, Tensor] = field(default_factory=dict)  # starting attribute biases / factors
    engagement_start: Tensor | None = None  # (id codes, 1 + engagement factors): [log-popularity | factors]


def _fields(schema: FeatureSchema, side: str, config: ModelConfig) -> list[Field]:
    fields = schema.user_fields if side == "user" else schema.item_fields
    return [f for f in fields if config.use_item_id or f.name != ITEM_ID_FIELD]


def _attribute_fields(schema: FeatureSchema) -> list[Field]:
    return [f for f in schema.item_fields if f.name != ITEM_ID_FIELD]


def init_params(config: ModelConfig, schema: FeatureSchema, stats: DataStats, seed: int = 0) -> Params:
    """Initial parameters (the inner-loop parameters are added by training.inner_loop)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) * config.init_scale

    params: Params = {"mu": torch.tensor(float(stats.mean))}
    if config.kind == "bias_factor":
        d = config.factors
        id_field = schema.item_id_field
        if config.use_item_id and id_field is not None:
            if stats.item_base_bias.shape != (id_field.num_codes,):
                raise ValueError("item_base_bias must have one entry per item-id code")
            params["item.base_bias"] = stats.item_base_bias.float().clone()
            params["item.id_bias"] = torch.zeros(id_field.num_codes)
            params["item.id_factors"] = randn(id_field.num_codes, d)
            if stats.item_factors is not None:
                if stats.item_factors.shape != (id_field.num_codes, d):
                    raise ValueError(f"item_factors must be ({id_field.num_codes}, {d})")
                params["item.id_factors"] = stats.item_factors.float().clone()
        for f in _attribute_fields(schema):
            params[f"item.attr_bias.{f.name}"] = torch.zeros(f.num_codes)
            params[f"item.attr_factors.{f.name}"] = randn(f.num_codes, d)
        for name, table in stats.attribute_tables.items():
            if name not in params or params[name].shape != table.shape:
                raise ValueError(f"attribute table {name} does not fit the model")
            params[name] = table.float().clone()
        params["user.bias0"] = torch.zeros(())
        params["user.factors0"] = torch.zeros(d)
        if config.engagement_factors:
            params.update(init_engagement_params(config, schema, stats))
        if config.prior == "user_attributes":
            for f in schema.user_fields:
                params[f"user.attr_bias.{f.name}"] = torch.zeros(f.num_codes)
                params[f"user.attr_factors.{f.name}"] = torch.zeros(f.num_codes, d)
        return params
    e = config.embedding_dim
    for side in ("user", "item"):
        for f in _fields(schema, side, config):
            # Embeddings feed a ReLU network: a larger scale than the factors keeps it off zero.
            params[f"emb.{side}.{f.name}"] = torch.randn(f.num_codes, e, generator=gen) * 0.1
    width = e * (len(_fields(schema, "user", config)) + len(_fields(schema, "item", config)))
    for i, h in enumerate((*config.hidden, 1)):
        bound = 1.0 / math.sqrt(width)
        params[f"mlp.{i}.weight"] = (torch.rand(h, width, generator=gen) * 2 - 1) * bound
        params[f"mlp.{i}.bias"] = (torch.rand(h, generator=gen) * 2 - 1) * bound
        width = h
    return params


def frozen_names(config: ModelConfig, params: Params) -> tuple[str, ...]:
    """Parameters the outer loop never trains: data-derived bases and configured prefixes."""
    fixed = {"item.base_bias", ENGAGEMENT_GRAM} if config.kind == "bias_factor" else set()
    return tuple(n for n in params if n in fixed or (config.frozen and n.startswith(config.frozen)))


def _without_padding_row(table: Tensor) -> Tensor:
    """The table with the padding row (code PAD = 0) zeroed: a slot holding padding then
    adds nothing to a pooled sum, so the gathered rows need no mask. Built from the table
    itself (a new zeros tensor would bake a device into the exported graph); in the
    exported graph it depends on parameters only, and onnxruntime folds it at load."""
    return torch.cat([table[:1] * 0, table[1:]])


def _pool(table: Tensor, codes: Tensor) -> Tensor:
    """Mean of the embedding rows of the non-padding codes; (..., width) -> (..., dim).

    Works for 1-D tables (biases) too: (..., width) -> (...). Gathers with `embedding`
    (one Gather in ONNX; advanced indexing exports as the slower GatherND) from the table
    with its padding row zeroed, slot by slot (the width is small and static) so that
    every op works on contiguous (..., dim) tensors: a reduction over the slot axis of a
    (..., width, dim) tensor is several times slower in onnxruntime than these adds.
    """
    width = codes.shape[-1]
    rows_table = _without_padding_row(table if table.dim() == 2 else table.unsqueeze(-1))  # (codes, dim)
    slots = codes.unbind(-1)  # one Split in ONNX, not one strided Gather per slot
    total = torch.nn.functional.embedding(slots[0], rows_table)
    for slot_codes in slots[1:]:
        total = total + torch.nn.functional.embedding(slot_codes, rows_table)
    if width > 1:
        count = (codes != PAD).to(table.dtype).sum(-1, keepdim=True).clamp(min=1.0)  # (..., 1)
        total = total / count
    return total if table.dim() == 2 else total.squeeze(-1)


def _total(terms: list[Tensor]) -> Tensor:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _slots(codes: Tensor, f: Field) -> Tensor:
    return codes[..., f.offset : f.offset + f.width]


def item_repr(config: ModelConfig, schema: FeatureSchema, params: Params, items: Tensor) -> tuple[Tensor, ...]:
    """What the model needs of each item, computed once outside the per-user loop.

    bias_factor: (b, q) with b (..., ) and q (..., d); mlp: (x,) with x (..., E * fields).
    """
    if config.kind == "bias_factor":
        # One table per field holding [bias | factors] in each row: one gather per slot
        # instead of two (gathering a row costs about as much as gathering a scalar). The
        # tables depend on parameters only: onnxruntime folds them into constants at load;
        # model.pt2 rebuilds them per call, O(codes x d). Sums of gathered rows only:
        # creating tensors here (torch.zeros) would bake a device into the exported graph.
        terms: list[Tensor] = []
        for f in schema.item_fields:
            codes = _slots(items, f)
            if f.name == ITEM_ID_FIELD:
                if not config.use_item_id:
                    continue
                bias = params["item.base_bias"] + params["item.id_bias"]
                table = torch.cat([bias.unsqueeze(-1), params["item.id_factors"]], dim=-1)  # (codes, 1 + d)
                terms.append(torch.nn.functional.embedding(codes.squeeze(-1), table))  # one Gather
            else:
                bias = params[f"item.attr_bias.{f.name}"]
                table = torch.cat([bias.unsqueeze(-1), params[f"item.attr_factors.{f.name}"]], dim=-1)
                terms.append(_pool(table, codes))
        if not terms:
            raise ValueError("the model has no item features: enable the item id or give item attributes")
        total = _total(terms)  # (..., 1 + d)
        return total[..., 0], total[..., 1:]
    parts = [_pool(params[f"emb.item.{f.name}"], _slots(items, f)) for f in _fields(schema, "item", config)]
    return (torch.cat(parts, dim=-1),)


def pair_repr(config: ModelConfig, user: Tensor, items: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Joins each user's representation to its items' (mlp): (B, n, Du + Di).

    Done for the whole batch before the per-user loop: expanding inside vmap pins the
    batch and item counts when the loop is traced for export.
    """
    if config.kind != "mlp":
        return items
    (x,) = items  # (B, n, Di)
    return (torch.cat([user.unsqueeze(1).expand(x.shape[0], x.shape[1], user.shape[-1]), x], dim=-1),)


def user_repr(config: ModelConfig, schema: FeatureSchema, params: Params, users: Tensor) -> Tensor:
    """(B, Wu) codes -> (B, E * user fields) for mlp; bias_factor reads no user representation
    (its prior uses the codes directly), so it gets the codes back unchanged."""
    if config.kind == "mlp":
        parts = [_pool(params[f"emb.user.{f.name}"], _slots(users, f)) for f in schema.user_fields]
        return torch.cat(parts, -1) if parts else users.to(params["mu"].dtype)
    return users


def initial_user_params(config: ModelConfig, schema: FeatureSchema, params: Params, users: Tensor) -> Params:
    """Each user's parameters before adaptation: (B, ...) per tensor.

    The inner loop adapts the subset named by config.adapted_names(); the rest stay at
    these values (for bias_factor they still carry the user-attribute prior).
    """
    batch = users.shape[0]
    if config.kind == "bias_factor":
        bias = params["user.bias0"].expand(batch)
        factors = params["user.factors0"].expand(batch, config.factors)
        if config.prior == "user_attributes":
            for f in schema.user_fields:
                codes = _slots(users, f)
                bias = bias + _pool(params[f"user.attr_bias.{f.name}"], codes)
                factors = factors + _pool(params[f"user.attr_factors.{f.name}"], codes)
        return {"user.bias": bias, "user.factors": factors}
    return {name: params[name].expand(batch, *params[name].shape) for name in config.adapted_names()}


def predict(
    config: ModelConfig,
    params: Params,
    user_params: Params,
    user: Tensor,
    items: tuple[Tensor, ...],
) -> Tensor:
    """Raw scores of one user's items (a rating, or a logit for clicks): (n,).

    Called per user inside vmap: `user_params` holds that user's parameters (no batch axis),
    `user` its representation, `items` its item representations from pair_repr.
    Adapted parameters are separate tensors and are never indexed or sliced: indexing a
    per-user tensor inside vmap pins the batch size when the loop is traced for export.
    """
    if config.kind == "bias_factor":
        b, q = items  # (n,), (n, d)
        return params["mu"] + b + user_params["user.bias"] + q @ user_params["user.factors"]
    (h,) = items  # (n, Du + Di): user and item representations joined by pair_repr
    layers = len(config.hidden) + 1
    for i in range(layers):
        weight = user_params.get(f"mlp.{i}.weight", params[f"mlp.{i}.weight"])
        bias = user_params.get(f"mlp.{i}.bias", params[f"mlp.{i}.bias"])
        h = h @ weight.transpose(0, 1) + bias
        if i < layers - 1:
            h = torch.relu(h)
    return params["mu"] + h.squeeze(-1)


ENGAGEMENT_USER = "eng.user"  # the per-user engagement factors the inner loop adapts
ENGAGEMENT_GRAM = "eng.gram"  # (e, e) mean outer product of the catalog's engagement factors


def init_engagement_params(config: ModelConfig, schema: FeatureSchema, stats: DataStats) -> Params:
    """The engagement head's parameters: one [bias | factors] table per item field.

    The id table starts at stats.engagement_start (log-popularity and a truncated SVD of
    the training interactions) when given; attribute tables start at zero.
    """
    e = config.engagement_factors
    params: Params = {}
    id_field = schema.item_id_field
    if config.use_item_id and id_field is not None:
        table = torch.zeros(id_field.num_codes, 1 + e)
        if stats.engagement_start is not None:
            if stats.engagement_start.shape != table.shape:
                raise ValueError(f"engagement_start must be {tuple(table.shape)}, got {tuple(stats.engagement_start.shape)}")
            table = stats.engagement_start.float().clone()
        params["eng.item.id"] = table
    for f in _attribute_fields(schema):
        params[f"eng.item.attr.{f.name}"] = torch.zeros(f.num_codes, 1 + e)
    params["eng.log_scale"] = torch.zeros(())  # weight of the personal part against popularity
    params["eng.user0"] = torch.zeros(e)
    return params


def item_engagement(config: ModelConfig, schema: FeatureSchema, params: Params, items: Tensor) -> tuple[Tensor, Tensor]:
    """(c, p): each item's engagement bias (...,) and factors (..., e), from its codes."""
    terms: list[Tensor] = []
    for f in schema.item_fields:
        codes = _slots(items, f)
        if f.name == ITEM_ID_FIELD:
            if config.use_item_id:
                terms.append(torch.nn.functional.embedding(codes.squeeze(-1), _without_padding_row(params["eng.item.id"])))
        else:
            terms.append(_pool(params[f"eng.item.attr.{f.name}"], codes))
    total = _total(terms)  # (..., 1 + e)
    return total[..., 0], total[..., 1:]


def engagement_gram(factors: Tensor) -> Tensor:
    """(n, e) catalog engagement factors -> (e, e) mean outer product: the part of the
    inner loop's implicit loss that covers every catalog item, precomputed once."""
    return factors.transpose(0, 1) @ factors / max(factors.shape[0], 1)


def with_engagement_gram(config: ModelConfig, schema: FeatureSchema, params: Params, catalog_items: Tensor) -> Params:
    """params plus ENGAGEMENT_GRAM over the ranked catalog (encoded rows (n, W)); a no-op
    for a model without the engagement head. Differentiable: training recomputes it per step."""
    if not config.engagement_factors:
        return params
    _, p = item_engagement(config, schema, params, catalog_items)
    return {**params, ENGAGEMENT_GRAM: engagement_gram(p)}


def engagement_scores(params: Params, c: Tensor, p: Tensor, phi: Tensor) -> Tensor:
    """Engagement logits c + exp(log_scale) * p . phi.

    One user: (n,), (n, e), phi (e,) -> (n,). A batch against shared items (the catalog):
    (n,), (n, e), phi (B, e) -> (B, n).
    """
    personal = p @ phi if phi.dim() == 1 else phi @ p.transpose(0, 1)
    return c + torch.exp(params["eng.log_scale"]) * personal


def regulariser(config: ModelConfig, params: Params, interactions: int) -> Tensor:
    """L2 on the item side, scaled per training interaction (a MAP prior on the full data)."""
    scale = 1.0 / max(interactions, 1)
    total = params["mu"].new_zeros(())
    for name, value in params.items():
        if name.startswith(("item.id_bias", "item.id_factors")):
            total = total + config.id_l2 * scale * (value * value).sum()
        elif name.startswith(("item.attr_", "emb.", "user.attr_")):
            total = total + config.attribute_l2 * scale * (value * value).sum()
        elif name.startswith("eng.item."):
            total = total + config.engagement_l2 * scale * (value * value).sum()
    return total


def parameter_count(params: Params) -> int:
    return sum(int(v.numel()) for v in params.values())


def names_with_prefix(params: Params, prefixes: Sequence[str]) -> list[str]:
    return [n for n in params if n.startswith(tuple(prefixes))]
