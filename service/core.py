"""The data plane: validate and encode a request, adapt-and-score through the batcher, rank.

Works on domain objects only (service/domain.py). Every request is encoded against the
model that is current when it arrives and runs on that same model, so a version swap
never mixes one version's encoding with another's graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Callable, Sequence

import numpy as np

from service.batcher import DynamicBatcher
from service.domain import (
    AdaptationSummary,
    FieldDescription,
    ItemList,
    ItemRole,
    ModelDescription,
    OnboardQuery,
    OnboardResult,
    RecommendQuery,
    ScoredItems,
    ScoreQuery,
    UnknownItem,
    UserContext,
)
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotReady, echo
from service.metrics import Metrics
from service.padding import Ranking, UserInputs, UserOutputs
from service.repository import LoadedModel
from warmstart import onboarding

EXAMPLE_VALUES = 5  # vocabulary values GetModel shows per field


@dataclass(frozen=True)
class RequestLimits:
    max_interactions: int = 128
    max_candidates: int = 1024
    allow_unknown_values: bool = False  # unknown attribute values: OOV instead of INVALID_ARGUMENT
    max_batch_size: int = 32  # reported by GetModel

    def __post_init__(self) -> None:
        if self.max_interactions < 1 or self.max_candidates < 1:
            raise ValueError("max_interactions and max_candidates must be >= 1")


class RecommenderCore:
    """Recommend, Score, Onboard and GetModel on domain objects."""

    def __init__(
        self,
        current_model: Callable[[], LoadedModel | None],
        batcher: DynamicBatcher,
        limits: RequestLimits,
        metrics: Metrics,
    ) -> None:
        self._current_model = current_model
        self._batcher = batcher
        self._limits = limits
        self._metrics = metrics

    def _model(self) -> LoadedModel:
        model = self._current_model()
        if model is None:
            raise NotReady("no model is loaded yet")
        return model

    async def recommend(self, query: RecommendQuery) -> ScoredItems:
        """The candidates (or the whole catalog), best first, after exclusions, top_k of them."""
        model = self._model()
        violations: list[FieldViolation] = []
        if query.top_k < 0:
            violations.append(FieldViolation("top_k", f"must be >= 0 (0 = all), got {query.top_k}"))
        if query.rank_by == "engagement" and not model.has_engagement:
            violations.append(FieldViolation("rank_by", "this model has no engagement head; rank by predicted rating"))
        rank_catalog = not query.candidates
        if rank_catalog and model.artifact.catalog.size == 0:
            violations.append(FieldViolation("candidates", "empty, and the model has no catalog to rank"))
        inputs, unknown = self._encode(model, query.user, None if rank_catalog else query.candidates, violations)
        catalog = model.artifact.catalog
        ids: Sequence[str] = catalog.item_ids if rank_catalog else query.candidates.ids
        excluded = set(query.exclude_item_ids) if query.exclude_item_ids else set()
        if query.exclude_interacted:
            excluded.update(query.user.interactions.items.ids)
        if not excluded:
            positions = np.zeros(0, dtype=np.int64)
        elif rank_catalog:
            positions = np.array(sorted(catalog.row_of[i] for i in excluded if i in catalog.row_of), dtype=np.int64)
        else:
            positions = np.flatnonzero(np.fromiter((i in excluded for i in ids), dtype=bool, count=len(ids)))
        by_engagement = model.artifact.has_engagement and query.rank_by != "rating"
        ranking = Ranking(query.top_k, by_engagement, positions)
        inputs.ranking = ranking
        output = await self._adapt(model, query.user, inputs)
        return ScoredItems(
            request_id=query.user.request_id,
            model_name=model.name,
            model_version=model.version,
            item_ids=[ids[i] for i in output.order.tolist()],
            scores=output.query_scores,
            adaptation=self._summary(model, inputs, unknown, output),
            engagement=output.query_engagement,
        )

    async def score(self, query: ScoreQuery) -> ScoredItems:
        """One score per item, in request order."""
        model = self._model()
        violations = [] if query.items else [FieldViolation(query.items.field, "must not be empty")]
        inputs, unknown = self._encode(model, query.user, query.items, violations)
        output = await self._adapt(model, query.user, inputs)
        return ScoredItems(
            request_id=query.user.request_id,
            model_name=model.name,
            model_version=model.version,
            item_ids=query.items.ids,
            scores=output.query_scores,
            adaptation=self._summary(model, inputs, unknown, output),
            engagement=output.query_engagement,
        )

    async def onboard(self, query: OnboardQuery) -> OnboardResult:
        """The items to ask the user about next, best first (warmstart.onboarding.select)."""
        model = self._model()
        tables = model.onboarding
        if tables is None:
            raise FailedPrecondition(
                f"model version {model.version} cannot onboard: it was exported without the onboarding prior or "
                "the item table (re-export it with this release)"
            )
        catalog = model.artifact.catalog
        violations: list[FieldViolation] = []
        if not 1 <= query.count <= self._limits.max_candidates:
            violations.append(FieldViolation("count", f"must be in [1, {self._limits.max_candidates}], got {query.count}"))
        if query.strategy == "popular" and tables.popularity is None:
            violations.append(FieldViolation("strategy", "this model has no engagement head, so no learned popularity"))
        pool = query.candidates
        outside = [
            FieldViolation(pool.id_path(k), f"{echo(item_id)} is not in the catalog (onboarding asks about catalog items)")
            for k, item_id in enumerate(pool.ids[: self._limits.max_candidates + 1])
            if item_id not in catalog.row_of
        ]
        if outside:  # before encoding, which would ask for the attributes of an unknown item
            raise InvalidArgument(violations + outside + _duplicate_violations(pool))
        # The knowledge weights come from the user's engagement logits, adapted to the answers
        # so far: only the strategies that use them run the engine.
        needs_engine = query.strategy in ("dopt", "melu") and model.artifact.has_engagement
        inputs, _ = self._encode(model, query.user, pool if pool else None, violations)
        logits = None
        if needs_engine:
            output = await self._adapt(model, query.user, inputs)
            logits = output.query_engagement
        interactions = query.user.interactions
        answered, engaged = [], []
        click = model.artifact.label.kind == "click"
        for item_id, label in zip(interactions.items.ids, interactions.labels):
            row = catalog.row_of.get(item_id)
            if row is not None:  # an item sent with inline attributes has no table row: it adapts the user only
                answered.append(row)
                engaged.append(label > 0.5 if click else True)
        candidates = np.fromiter((catalog.row_of[i] for i in pool.ids), np.int64, len(pool)) if pool else None
        popularity = None
        if query.strategy == "popular":
            popularity = tables.popularity if candidates is None else tables.popularity[candidates]
        chosen = onboarding.select(
            query.strategy,
            tables.vectors,
            tables.prior,
            query.count,
            candidates=candidates,
            engagement_logits=logits,
            popularity=popularity,
            answered=np.array(answered, dtype=np.int64),
            answered_engaged=np.array(engaged, dtype=bool),
            excluded=np.fromiter((catalog.row_of[i] for i in query.exclude_item_ids if i in catalog.row_of), np.int64),
        )
        self._metrics.onboard(query.strategy, len(chosen.rows))
        return OnboardResult(
            request_id=query.user.request_id,
            model_name=model.name,
            model_version=model.version,
            item_ids=[catalog.item_ids[r] for r in chosen.rows.tolist()],
            reasons=chosen.reasons,
            strategy=query.strategy,
        )

    def describe(self) -> ModelDescription:
        model = self._model()
        artifact = model.artifact
        encoder = artifact.encoder

        def fields(codecs) -> tuple[FieldDescription, ...]:
            return tuple(
                FieldDescription(f.name, f.multi_valued, len(f.vocabulary), f.vocabulary[:EXAMPLE_VALUES])
                for f in codecs
                if f.name != encoder.item_id_field
            )

        return ModelDescription(
            model_name=model.name,
            model_version=model.version,
            created_at=artifact.manifest.created_at,
            label_kind=artifact.label.kind,
            label_min=artifact.label.min_value,
            label_max=artifact.label.max_value,
            user_fields=fields(encoder.user_fields),
            item_fields=fields(encoder.item_fields),
            catalog_size=artifact.catalog.size,
            inner_steps=artifact.inner_steps,
            model_kind=artifact.manifest.model.kind,
            learner=artifact.manifest.model.learner,
            engine=model.engine.description,
            max_interactions=self._limits.max_interactions,
            max_candidates=self._limits.max_candidates,
            max_batch_size=self._limits.max_batch_size,
            has_engagement=model.has_engagement,
        )

    # -- encoding -------------------------------------------------------------------

    def _encode(
        self,
        model: LoadedModel,
        user: UserContext,
        items: ItemList | None,
        violations: list[FieldViolation],
    ) -> tuple[UserInputs, tuple[UnknownItem, ...]]:
        """Validates and encodes one request into the engine's inputs for this user, with
        the items encoded from inline attributes; raises InvalidArgument naming every bad
        field (those found by the caller, passed in `violations`, included)."""
        limits = self._limits
        interactions = user.interactions
        oversized = []
        if len(interactions) > limits.max_interactions:
            oversized.append(
                FieldViolation("interactions", f"{len(interactions)} interactions; at most {limits.max_interactions} are accepted")
            )
        if items is not None and len(items) > limits.max_candidates:
            oversized.append(FieldViolation(items.field, f"{len(items)} items; at most {limits.max_candidates} are accepted"))
        if oversized:  # refuse oversized lists before spending time on them
            raise InvalidArgument(violations + oversized)

        encoder = model.artifact.encoder
        try:
            user_row = encoder.encode_user(user.user_attributes, "user_attributes", limits.allow_unknown_values)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            user_row = np.zeros(encoder.user_width, dtype=np.int64)

        timestamps = interactions.timestamps
        positions: Sequence[int]
        if len(interactions) and all(timestamps):
            positions = sorted(range(len(interactions)), key=timestamps.__getitem__)  # stable: ties keep request order
        else:
            positions = range(len(interactions))
        violations.extend(_label_violations(model, interactions.labels))
        unknown: list[UnknownItem] = []
        support_items = self._item_codes(model, interactions.items, positions, "interaction", unknown, violations)

        query_items, query_rows = None, None
        if items is None:
            if not model.scores_from_table:
                query_items = model.artifact.catalog.codes
        else:
            violations.extend(_duplicate_violations(items))
            rows = _catalog_rows(model, items.ids)
            if model.scores_from_table and (rows >= 0).all():
                query_rows = rows  # every candidate is in the catalog: scored from the item table
            else:
                query_items = self._item_codes(model, items, range(len(items)), "candidate", unknown, violations, rows)
        if violations:
            raise InvalidArgument(violations)
        labels = interactions.labels
        ordered_labels = labels if isinstance(positions, range) else [labels[k] for k in positions]
        support_labels = np.array(ordered_labels, dtype=np.float32)  # in range: checked
        return UserInputs(user_row, support_items, support_labels, query_items, query_rows), tuple(unknown)

    def _item_codes(
        self,
        model: LoadedModel,
        items: ItemList,
        positions: Sequence[int],
        role: ItemRole,
        unknown: list[UnknownItem],
        violations: list[FieldViolation],
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """(len(positions), item_width) codes of items[positions]: catalog rows, or the inline
        attributes of items the catalog does not know. rows: their catalog rows (-1 =
        unknown) when the caller already looked them up."""
        catalog = model.artifact.catalog
        encoder = model.artifact.encoder
        ids = items.ids
        if rows is None:
            rows = _catalog_rows(model, ids if isinstance(positions, range) else [ids[k] for k in positions])
        found = rows >= 0
        if found.all():  # the common case: every item is in the catalog
            return catalog.codes.take(rows, axis=0)
        codes = np.zeros((len(positions), encoder.item_width), dtype=np.int64)
        codes[found] = catalog.codes.take(rows[found], axis=0)
        for i in np.flatnonzero(~found).tolist():
            k = positions[i]
            item_id = ids[k]
            attributes = items.attributes(k)
            if not item_id:
                violations.append(FieldViolation(items.id_path(k), "must not be empty"))
            elif not attributes:
                violations.append(
                    FieldViolation(items.id_path(k), f"{echo(item_id)} is not in the catalog; send it with its item_attributes")
                )
            else:
                row, problems = encoder.encode_item(item_id, attributes, items.attributes_path(k), self._limits.allow_unknown_values)
                if row is None:
                    violations.extend(problems)
                else:
                    codes[i] = row
                    unknown.append(UnknownItem(item_id, role))
        return codes

    # -- running and summarising ----------------------------------------------------

    async def _adapt(self, model: LoadedModel, user: UserContext, inputs: UserInputs) -> UserOutputs:
        # The batch records the support losses (on its engine thread) and says whether all
        # of its scores are finite: a per-user check only when some are not.
        output = await self._batcher.submit(model, inputs, user.deadline_s)
        scores = output.query_scores
        if not output.finite and not np.isfinite(scores).all():
            # A graph's clamp passes NaN through: never answer one. The label floor ranks
            # such items last; the counter makes the fault visible.
            bad = ~np.isfinite(scores)
            self._metrics.nonfinite_scores(int(bad.sum()))
            floor = np.float32(model.artifact.label.min_value)
            output = replace(output, query_scores=np.where(bad, floor, scores).astype(np.float32))
        return output

    @staticmethod
    def _summary(model: LoadedModel, inputs: UserInputs, unknown: tuple[UnknownItem, ...], output: UserOutputs) -> AdaptationSummary:
        n = inputs.support_size
        inner_steps = model.inner_steps
        adapted = n > 0 and inner_steps > 0
        return AdaptationSummary(
            support_size=n,
            adapted=adapted,
            inner_steps=inner_steps if adapted else 0,
            support_loss_before=output.support_loss_before if n else 0.0,
            support_loss_after=output.support_loss_after if n else 0.0,
            unknown_items=unknown,
        )


def _label_violations(model: LoadedModel, labels: Sequence[float]) -> list[FieldViolation]:
    label = model.artifact.label
    low, high = label.min_value, label.max_value
    # A request's few labels: plain comparisons beat building arrays (NaN fails them all).
    if label.kind == "click":
        if all((v == 0.0 or v == 1.0) and low <= v <= high for v in labels):
            return []
    elif all(low <= v <= high for v in labels):
        return []
    values = np.asarray(labels, dtype=np.float64)
    valid = np.isfinite(values) & (values >= label.min_value) & (values <= label.max_value)
    if label.kind == "click":
        valid &= (values == 0.0) | (values == 1.0)
    if valid.all():
        return []
    violations = []
    for k, value in enumerate(labels):
        where = f"interactions[{k}].label"
        if not math.isfinite(value):
            violations.append(FieldViolation(where, f"must be a finite number, got {value}"))
        elif label.kind == "click" and value not in (0.0, 1.0):
            violations.append(FieldViolation(where, f"a click label is 0 or 1, got {value}"))
        elif not label.min_value <= value <= label.max_value:
            violations.append(FieldViolation(where, f"must be in [{label.min_value:g}, {label.max_value:g}], got {value}"))
    return violations


def _duplicate_violations(items: ItemList) -> list[FieldViolation]:
    if len(set(items.ids)) == len(items.ids):
        return []
    first: dict[str, int] = {}
    violations = []
    for k, item_id in enumerate(items.ids):
        if item_id in first:
            violations.append(FieldViolation(items.id_path(k), f"duplicate of {items.id_path(first[item_id])} ({echo(item_id)})"))
        else:
            first[item_id] = k
    return violations


def _catalog_rows(model: LoadedModel, ids: Sequence[str]) -> np.ndarray:
    """Catalog rows of item ids, -1 for items the catalog does not know."""
    row_of = model.artifact.catalog.row_of
    return np.fromiter(map(row_of.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
