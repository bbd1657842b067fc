"""Export a trained model as a self-contained, verified, immutable artifact.

The artifact is the directory `<repository>/<model_name>/<version>/`:

    manifest.json          the ArtifactManifest (protos/warmstart/v1/manifest.proto)
    manifest.sha256        the manifest's own sha256 (sha256sum format)
    init.safetensors       the meta-learned initialisation and learned inner-loop parameters
    model.onnx             the fused adapt-then-score graph (inner loop unrolled inside)
    torch_program.safetensors  the same graph as a torch.export program (the torch engine),
                           stored without pickle (warmstart.torch_program)
    adapt.onnx             the adapt step alone (support in, adapted user parameters out)
    adapt_program.safetensors  the same as a torch.export program
    item_table.safetensors every catalog item's scoring vectors (warmstart.contract.ItemTable)
    catalog.safetensors    "item_features": int64 [items, item_width], known items encoded
    catalog_items.txt      their ids, one per line, in row order
    vocab/<field>.txt      vocabularies too large to sit in the manifest
    onboarding_prior.safetensors  bias_factor models: the user's prior precision per head,
                           for the Onboard RPC's selection (warmstart.onboarding), which
                           takes the item vectors from the item table

(adapt graph and item table for bias_factor models: an mlp model's scores are no product
of an item vector with a user vector, and it is served by the fused graph alone). File
names, tensor names, the manifest's JSON form and digests, line files and the field codec
are warmstart.contract's, which the service reads through.

How the inner loop gets into a graph: the loop is written with torch.func (grad inside
vmap). Exporting torch.func.grad directly fails, so the fused function is first traced
with make_fx (symbolic shapes, parameters as explicit inputs), which turns the
per-user gradients into plain aten ops; the traced module, with the parameters turned
into buffers, is then exported by torch.export and by torch.onnx (dynamo).

Before anything is written the three implementations — training's own inner loop,
onnxruntime on the ONNX graph, and the torch.export program — must agree to 1e-4 on
random batches of several shapes (the adapt graph's too), and the item table's scores,
for users adapted by the adapt ONNX graph, must equal the fused ONNX graph's to 1e-5. The directory is assembled under a temporary name and
renamed into place, so an interrupted export leaves no version a server could load.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch.fx.experimental.proxy_tensor import make_fx

from training import model as M
from training.batching import EncodedCatalog
from training.dataset import LabelSpec
from training.features import FeatureSchema, Field
from training.inner_loop import Batch, InnerLoopConfig, adapt_users
from training.onboarding import onboarding_prior
from training.trainer import AdaptedModel, loss_kind_of
from warmstart import contract as C, onboarding
from warmstart.torch_program import load_program, save_program
from warmstart.v1 import manifest_pb2 as pb

log = logging.getLogger(__name__)

INPUT_NAMES = C.INPUT_NAMES
OUTPUT_NAMES = C.REQUIRED_OUTPUTS
ENGAGEMENT_OUTPUT = C.ENGAGEMENT_OUTPUT  # a fourth output, for models with the engagement head
TORCH_PROGRAM_FILE = C.TORCH_PROGRAM_FILE


def output_names(adapted: AdaptedModel) -> tuple[str, ...]:
    """The fused graph's outputs for this model, in order."""
    return C.fused_output_names(bool(adapted.model_config.engagement_factors))


def adapt_output_names(adapted: AdaptedModel) -> tuple[str, ...]:
    """The adapt graph's outputs for this model, in order."""
    return C.adapt_output_names(bool(adapted.model_config.engagement_factors))


TOLERANCE = 1e-4
INLINE_VOCABULARY_MAX = 1000  # larger vocabularies go to vocab/<field>.txt
ONNX_OPSET = 18
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ExportError(RuntimeError):
    """The export was refused; nothing was written."""


@dataclass(frozen=True)
class CheckShape:
    batch: int
    support: int
    query: int
    ragged: bool  # random masks (some users with fewer support items, one with none)

    def describe(self) -> str:
        return f"batch={self.batch} support={self.support} query={self.query}" + (" ragged" if self.ragged else "")


CHECK_SHAPES = (
    CheckShape(1, 1, 7, ragged=False),
    CheckShape(1, 12, 1, ragged=False),
    CheckShape(5, 9, 23, ragged=True),
    CheckShape(16, 30, 100, ragged=True),
)


class _Fused(torch.nn.Module):
    """The traced adapt-then-score function with the parameters held as buffers."""

    def __init__(self, traced: torch.nn.Module, params: M.Params) -> None:
        super().__init__()
        self.traced = traced
        self.names = list(params)
        for i, name in enumerate(self.names):
            self.register_buffer(f"p{i}", params[name].detach().clone())

    def forward(self, user_features, support_items, support_labels, support_mask, query_items):
        buffers = [getattr(self, f"p{i}") for i in range(len(self.names))]
        return self.traced(*buffers, user_features, support_items, support_labels, support_mask, query_items)


def random_batch(schema: FeatureSchema, shape: CheckShape, rng: np.random.Generator, label: LabelSpec) -> Batch:
    """Random codes within each field's range (padding and out-of-vocabulary included)."""
    b, s, q = shape.batch, shape.support, shape.query
    user_features = C.random_codes(schema.user_fields, schema.user_width, (b,), rng)
    support_items = C.random_codes(schema.item_fields, schema.item_width, (b, s), rng)
    labels, mask = C.random_support(b, s, "click" if label.kind == "click" else "rating", label.min_value, label.max_value, rng, shape.ragged)
    query_items = C.random_codes(schema.item_fields, schema.item_width, (b, q), rng)
    return Batch(*(torch.from_numpy(a) for a in (user_features, support_items, labels, mask, query_items)))


def trace_shape(adapted: AdaptedModel, wanted: tuple[int, int, int] = (3, 4, 5)) -> CheckShape:
    """The example batch make_fx traces with: sizes no parameter or feature row has.

    The symbolic trace takes the parameters as inputs too and gives equal sizes one symbol,
    so a support size equal to, say, the factor count would tie the two in the graph (and
    the export's checks at other support sizes would fail). Each size is the wanted one or
    the next free integer."""
    taken = {int(d) for p in adapted.params.values() for d in p.shape}
    taken |= {adapted.schema.user_width, adapted.schema.item_width, 0, 1}
    sizes: list[int] = []
    for size in wanted:
        while size in taken or size in sizes:
            size += 1
        sizes.append(size)
    return CheckShape(*sizes, ragged=False)


def trace(adapted: AdaptedModel) -> _Fused:
    """make_fx over the fused function with symbolic shapes; parameters become buffers."""
    names = list(adapted.params)

    def flat(*args: torch.Tensor):
        params = dict(zip(names, args[: len(names)]))
        batch = Batch(*args[len(names) :])
        model = AdaptedModel(adapted.model_config, adapted.inner_config, adapted.schema, adapted.label, params)
        return model.forward(batch)

    example = random_batch(adapted.schema, trace_shape(adapted), np.random.default_rng(0), adapted.label)
    traced = make_fx(flat, tracing_mode="symbolic")(*[adapted.params[n] for n in names], *example)
    return _Fused(traced, adapted.params)


class _Adapt(torch.nn.Module):
    """The traced adapt step (support only) with the parameters held as buffers."""

    def __init__(self, traced: torch.nn.Module, params: M.Params) -> None:
        super().__init__()
        self.traced = traced
        self.names = list(params)
        for i, name in enumerate(self.names):
            self.register_buffer(f"p{i}", params[name].detach().clone())

    def forward(self, user_features, support_items, support_labels, support_mask):
        buffers = [getattr(self, f"p{i}") for i in range(len(self.names))]
        return self.traced(*buffers, user_features, support_items, support_labels, support_mask)


def adapt_outputs(adapted: AdaptedModel, batch: Batch) -> tuple[torch.Tensor, ...]:
    """The adapt graph's outputs computed by training's adapt step: user bias (B,), user
    factors (B, d), [user engagement factors (B, e)], support loss before and after (B,)."""
    users = adapt_users(adapted.model_config, adapted.inner_config, adapted.schema, adapted.params, batch, loss_kind_of(adapted.label))
    head = (users.engagement_user,) if users.engagement_user is not None else ()
    return (users.user_params["user.bias"], users.user_params["user.factors"], *head, users.support_loss_before, users.support_loss_after)


def trace_adapt(adapted: AdaptedModel) -> _Adapt:
    """make_fx over the adapt step alone (the query items are never read)."""
    names = list(adapted.params)

    def flat(*args: torch.Tensor):
        params = dict(zip(names, args[: len(names)]))
        model = AdaptedModel(adapted.model_config, adapted.inner_config, adapted.schema, adapted.label, params)
        return adapt_outputs(model, Batch(*args[len(names) :], None))

    example = random_batch(adapted.schema, trace_shape(adapted), np.random.default_rng(0), adapted.label)
    traced = make_fx(flat, tracing_mode="symbolic")(*[adapted.params[n] for n in names], *example[:4])
    return _Adapt(traced, adapted.params)


def _adapt_dynamic_shapes() -> dict:
    shapes = _dynamic_shapes()
    del shapes["query_items"]
    return shapes


def _dynamic_shapes() -> dict:
    batch, support, query = torch.export.Dim("batch"), torch.export.Dim("support"), torch.export.Dim("query")
    return {
        "user_features": {0: batch},
        "support_items": {0: batch, 1: support},
        "support_labels": {0: batch, 1: support},
        "support_mask": {0: batch, 1: support},
        "query_items": {0: batch, 1: query},
    }


def device_pinned_nodes(program: torch.export.ExportedProgram) -> list[str]:
    """Graph nodes that create tensors on a fixed device (they would break a CUDA run)."""
    pinned = []
    for node in program.graph.nodes:
        device = node.kwargs.get("device") if node.op == "call_function" else None
        if device is not None:
            pinned.append(f"{node.name}: {node.target} on {device}")
    return pinned


def _worst_difference(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Largest absolute difference between paired outputs (0 for empty ones)."""
    return max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(reference, candidate))


def _engine_checks(
    adapted: AdaptedModel,
    onnx_path: Path,
    program: torch.export.ExportedProgram,
    shapes: Sequence[CheckShape],
    seed: int,
    graph: str,
    input_names: Sequence[str],
    outputs: Sequence[str],
    reference: Callable[[Batch], Sequence[torch.Tensor]],
) -> list[pb.ExportCheck]:
    """Max abs differences of onnxruntime and the torch.export program against training's
    `reference` on random batches of `shapes` (the graph's inputs: the first len(input_names))."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_inputs = {i.name for i in session.get_inputs()}
    module = program.module()
    rng = np.random.default_rng(seed)
    prefix = f"{graph} " if graph else ""
    checks = []
    for shape in shapes:
        batch = random_batch(adapted.schema, shape, rng, adapted.label)
        inputs = tuple(batch[: len(input_names)])
        with torch.no_grad():
            expected = [t.numpy() for t in reference(batch)]
            exported = [t.detach().numpy() for t in module(*inputs)]
        feeds = {name: t.numpy() for name, t in zip(input_names, inputs) if name in onnx_inputs}
        from_onnx = session.run(list(outputs), feeds)
        if not all(np.all(np.isfinite(x)) for x in (*expected, *from_onnx, *exported)):
            raise ExportError(f"non-finite {prefix}outputs at {shape.describe()}")
        checks.append(
            pb.ExportCheck(
                shape=prefix + shape.describe(),
                max_abs_diff_onnx=_worst_difference(expected, from_onnx),
                max_abs_diff_torch_export=_worst_difference(expected, exported),
            )
        )
    return checks


def verify(
    adapted: AdaptedModel,
    onnx_path: Path,
    program: torch.export.ExportedProgram,
    shapes: Sequence[CheckShape] = CHECK_SHAPES,
    seed: int = 0,
) -> list[pb.ExportCheck]:
    """Max abs differences of onnxruntime and torch.export against training's inner loop."""
    return _engine_checks(adapted, onnx_path, program, shapes, seed, "", INPUT_NAMES, output_names(adapted), adapted.forward)


def verify_adapt(
    adapted: AdaptedModel,
    onnx_path: Path,
    program: torch.export.ExportedProgram,
    shapes: Sequence[CheckShape] = CHECK_SHAPES,
    seed: int = 3,
) -> list[pb.ExportCheck]:
    """verify() for the adapt graph: onnxruntime and torch.export against training's adapt step."""
    outputs = adapt_output_names(adapted)
    return _engine_checks(adapted, onnx_path, program, shapes, seed, "adapt", C.ADAPT_INPUT_NAMES, outputs, lambda b: adapt_outputs(adapted, b))


def _onnx_export(program: torch.export.ExportedProgram, outputs: Sequence[str], inputs: Sequence[str] = INPUT_NAMES):
    """ONNX from the already exported program (one torch.export, not two).

    The nodes' provenance records ("from_node") are dropped first: the ONNX exporter's
    decomposition deep-copies them, and after a training run in the same process that
    copy failed inside torch (AttributeError on NodeSource); nothing reads them."""
    for node in program.graph.nodes:
        node.meta.pop("from_node", None)
    return torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(inputs),
        output_names=list(outputs),
        opset_version=ONNX_OPSET,
        verbose=False,
    )


@contextlib.contextmanager
def _quiet_exporters():
    """The ONNX exporter narrates every optimisation pass on stdout and in logs; keep the
    job's output readable (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


sha256_file = C.sha256_file


def next_version(model_dir: Path) -> str:
    """One more than the highest integer version present (1 for a new model)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.exists() else []
    return str(max(versions, default=0) + 1)


def _tensor_spec(name: str, dtype: int, dims: Sequence[int | str], description: str) -> pb.TensorSpec:
    shape = [pb.Dim(size=d) if isinstance(d, int) else pb.Dim(name=d) for d in dims]
    return pb.TensorSpec(name=name, dtype=dtype, shape=shape, description=description)


def graph_spec(schema: FeatureSchema, onnx_inputs: Sequence[str], engagement: bool = False) -> pb.GraphSpec:
    inputs = {
        "user_features": _tensor_spec("user_features", pb.INT64, ["batch", schema.user_width], "encoded user attributes"),
        "support_items": _tensor_spec(
            "support_items", pb.INT64, ["batch", "support", schema.item_width], "encoded items the user interacted with"
        ),
        "support_labels": _tensor_spec("support_labels", pb.FLOAT32, ["batch", "support"], "their labels"),
        "support_mask": _tensor_spec("support_mask", pb.FLOAT32, ["batch", "support"], "1 for real entries, 0 for padding"),
        "query_items": _tensor_spec("query_items", pb.INT64, ["batch", "query", schema.item_width], "encoded items to score"),
    }
    outputs = [
        _tensor_spec("query_scores", pb.FLOAT32, ["batch", "query"], "scores in label units"),
        _tensor_spec("support_loss_before", pb.FLOAT32, ["batch"], "mean support loss at the initialisation"),
        _tensor_spec("support_loss_after", pb.FLOAT32, ["batch"], "mean support loss after the inner steps"),
    ]
    if engagement:
        outputs.append(_tensor_spec(ENGAGEMENT_OUTPUT, pb.FLOAT32, ["batch", "query"], "engagement logits (what Recommend ranks by)"))
    return pb.GraphSpec(
        onnx_file="model.onnx",
        torch_export_file=TORCH_PROGRAM_FILE,
        onnx_opset=ONNX_OPSET,
        inputs=[inputs[n] for n in INPUT_NAMES if n in onnx_inputs],
        outputs=outputs,
    )


def adapt_graph_spec(schema: FeatureSchema, onnx_inputs: Sequence[str], factors: int, engagement_factors: int) -> pb.GraphSpec:
    """The adapt graph's GraphSpec: the fused graph's support inputs, the adapted user parameters out."""
    fused = graph_spec(schema, list(C.ADAPT_INPUT_NAMES))
    outputs = [
        _tensor_spec("user_bias", pb.FLOAT32, ["batch"], "adapted user bias"),
        _tensor_spec("user_factors", pb.FLOAT32, ["batch", factors], "adapted user factors (dot rating_factors)"),
    ]
    if engagement_factors:
        outputs.append(
            _tensor_spec(C.ADAPT_ENGAGEMENT_OUTPUT, pb.FLOAT32, ["batch", engagement_factors], "adapted engagement factors phi")
        )
    outputs.extend(fused.outputs[1:3])  # the support losses
    return pb.GraphSpec(
        onnx_file=C.ADAPT_ONNX_FILE,
        torch_export_file=C.ADAPT_TORCH_PROGRAM_FILE,
        onnx_opset=ONNX_OPSET,
        inputs=[i for i in fused.inputs if i.name in onnx_inputs],
        outputs=outputs,
    )


def _feature_schema(schema: FeatureSchema, out_dir: Path) -> pb.FeatureSchema:
    fields = []
    for f in (*schema.user_fields, *schema.item_fields):
        field = pb.FeatureField(
            name=f.name,
            side=pb.USER if f.side == "user" else pb.ITEM,
            multi_valued=f.multi_valued,
            width=f.width,
            offset=f.offset,
            vocabulary_size=len(f.vocabulary),
        )
        if len(f.vocabulary) <= INLINE_VOCABULARY_MAX:
            field.vocabulary.extend(f.vocabulary)
        else:
            relative = f"vocab/{f.side}.{f.name}.txt"
            (out_dir / "vocab").mkdir(exist_ok=True)
            C.write_lines(out_dir / relative, f.vocabulary)
            field.vocabulary_file = relative
        fields.append(field)
    id_field = schema.item_id_field
    return pb.FeatureSchema(
        fields=fields,
        user_width=schema.user_width,
        item_width=schema.item_width,
        item_id_field=id_field.name if id_field is not None else "",
        multi_value_separator=schema.separator,
    )


TABLE_TOLERANCE = 1e-5  # item-table scores against the fused graph's (label units and engagement logits)
TABLE_CHECK_SHAPES = (CheckShape(1, 1, 7, ragged=False), CheckShape(5, 9, 23, ragged=True), CheckShape(16, 30, 100, ragged=True))


def has_item_table(adapted: AdaptedModel) -> bool:
    """Whether the model's scores are a product of an item vector with a user vector (the
    bias_factor model); an mlp model is served by its fused graph only."""
    return adapted.model_config.kind == "bias_factor"


@torch.no_grad()
def compute_item_table(adapted: AdaptedModel, item_codes: torch.Tensor) -> C.ItemTable:
    """Every item's scoring vectors from its encoded row (N, item_width), by the trained
    item side: the same item_repr / item_engagement the graphs compute per call."""
    if not has_item_table(adapted):
        raise ExportError(f"a {adapted.model_config.kind} model has no item table")
    params, config, schema = adapted.params, adapted.model_config, adapted.schema
    bias, factors = M.item_repr(config, schema, params, item_codes)  # (N,), (N, d)
    table = dict(
        rating_offset=float(params["mu"]),
        rating_bias=bias.float().numpy(),
        rating_factors=factors.float().numpy(),
    )
    if config.engagement_factors:
        c, p = M.item_engagement(config, schema, params, item_codes)  # (N,), (N, e)
        table.update(
            engagement_bias=c.float().numpy(),
            engagement_factors=p.float().numpy(),
            engagement_scale=float(torch.exp(params["eng.log_scale"])),
        )
    return C.ItemTable(**table)


def _table_batch(
    schema: FeatureSchema,
    shape: CheckShape,
    rng: np.random.Generator,
    label: LabelSpec,
    catalog_rows: torch.Tensor,
    pool: np.ndarray | None = None,
):
    """A random batch whose query items are catalog rows (their indices too), drawn from
    `pool` (default: every row)."""
    batch = random_batch(schema, shape, rng, label)
    pool = np.arange(len(catalog_rows)) if pool is None else np.asarray(pool, dtype=np.int64)
    rows = torch.from_numpy(pool[rng.integers(0, len(pool), size=(shape.batch, shape.query))])
    return batch._replace(query_items=catalog_rows[rows]), rows.numpy()


def check_item_table(
    adapted: AdaptedModel,
    directory: Path,
    table: C.ItemTable,
    catalog_rows: torch.Tensor,
    seed: int = 2,
    pool: np.ndarray | None = None,
) -> float:
    """Largest difference between the fused ONNX graph's query outputs (label units, and
    engagement logits) and what serving computes instead: the adapt ONNX graph's users
    scored against the table, on the same catalog rows (drawn from `pool`, default all);
    raises ExportError above TABLE_TOLERANCE."""
    import onnxruntime as ort

    if len(catalog_rows) == 0:
        return 0.0
    fused_session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    adapt_session = ort.InferenceSession(str(directory / C.ADAPT_ONNX_FILE), providers=["CPUExecutionProvider"])
    fused_inputs = {i.name for i in fused_session.get_inputs()}
    adapt_inputs = {i.name for i in adapt_session.get_inputs()}
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in TABLE_CHECK_SHAPES:
        batch, rows = _table_batch(adapted.schema, shape, rng, adapted.label, catalog_rows, pool)
        fused = fused_session.run(list(output_names(adapted)), {n: t.numpy() for n, t in zip(INPUT_NAMES, batch) if n in fused_inputs})
        users = adapt_session.run(
            list(adapt_output_names(adapted)), {n: t.numpy() for n, t in zip(C.ADAPT_INPUT_NAMES, batch) if n in adapt_inputs}
        )
        worst = max(worst, _table_difference(adapted, table, users, rows, fused))
    if worst > TABLE_TOLERANCE:
        raise ExportError(f"the item table's scores differ from the fused graph's by up to {worst:.2e} (tolerance {TABLE_TOLERANCE:.0e})")
    return worst


def _table_difference(
    adapted: AdaptedModel, table: C.ItemTable, users: Sequence[np.ndarray], rows: np.ndarray, fused: Sequence[np.ndarray]
) -> float:
    """users: the adapt graph's outputs (user bias, user factors, [user engagement], losses)."""
    label = adapted.label
    worst = 0.0
    for u in range(rows.shape[0]):
        raw = C.rating_scores(table, float(users[0][u]), users[1][u], rows[u])
        scores = C.to_label_units(raw, label.kind, label.min_value, label.max_value)
        worst = max(worst, float(np.max(np.abs(scores - fused[0][u]))))
        if table.has_engagement:
            engagement = C.engagement_scores(table, users[2][u], rows[u])
            worst = max(worst, float(np.max(np.abs(engagement - fused[3][u]))))
    return worst


def _onnx_input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _export_adapt_graph(adapted: AdaptedModel, directory: Path) -> list[pb.ExportCheck]:
    """Writes the adapt graph (ONNX and torch program) into `directory` and returns its
    agreement checks; refuses like the fused graph does."""
    module = trace_adapt(adapted)
    example = random_batch(adapted.schema, CheckShape(2, 3, 4, ragged=True), np.random.default_rng(1), adapted.label)
    program = torch.export.export(module, tuple(example[:4]), dynamic_shapes=_adapt_dynamic_shapes())
    pinned = device_pinned_nodes(program)
    if pinned:
        raise ExportError("the exported adapt program pins tensors to a device: " + "; ".join(pinned[:5]))
    save_program(program, directory / C.ADAPT_TORCH_PROGRAM_FILE)
    with _quiet_exporters():
        onnx_program = _onnx_export(program, adapt_output_names(adapted), C.ADAPT_INPUT_NAMES)
    onnx_program.save(str(directory / C.ADAPT_ONNX_FILE))
    return verify_adapt(adapted, directory / C.ADAPT_ONNX_FILE, load_program(directory / C.ADAPT_TORCH_PROGRAM_FILE))


def _refuse_disagreement(checks: Sequence[pb.ExportCheck], tolerance: float) -> float:
    """The largest difference of the checks; ExportError listing every check if it exceeds the tolerance."""
    worst = max(max(c.max_abs_diff_onnx, c.max_abs_diff_torch_export) for c in checks)
    if worst > tolerance:
        detail = ", ".join(f"{c.shape}: onnx {c.max_abs_diff_onnx:.2e}, torch.export {c.max_abs_diff_torch_export:.2e}" for c in checks)
        raise ExportError(f"engines disagree by up to {worst:.2e} (tolerance {tolerance:.0e}): {detail}")
    return worst


@dataclass
class ExportResult:
    path: Path
    manifest: pb.ArtifactManifest
    wall_time_s: float


def export_artifact(
    adapted: AdaptedModel,
    catalog: EncodedCatalog,
    repository: Path,
    model_name: str,
    version: str | None = None,
    learner: str = "",
    evaluation: pb.EvaluationSummary | None = None,
    training: pb.TrainingInfo | None = None,
    extra_files: dict[str, bytes] | None = None,
    tolerance: float = TOLERANCE,
    max_support_trained: int = 0,
    before_rename: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Traces, exports, verifies and writes one artifact version; refuses on any disagreement."""
    started = time.perf_counter()
    if not _NAME.match(model_name):
        raise ExportError(f"model name {model_name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    model_dir = repository / model_name
    version = version or next_version(model_dir)
    if not _NAME.match(version):
        raise ExportError(f"version {version!r}: use letters, digits, '.', '_' or '-'")
    final = model_dir / version
    if final.exists():
        raise ExportError(f"{final} already exists: artifact versions are immutable")
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-{owner_tag()}-", dir=model_dir))
    try:
        fused = trace(adapted)
        example = random_batch(adapted.schema, CheckShape(2, 3, 4, ragged=True), np.random.default_rng(1), adapted.label)
        program = torch.export.export(fused, tuple(example), dynamic_shapes=_dynamic_shapes())
        pinned = device_pinned_nodes(program)
        if pinned:
            raise ExportError("the exported program pins tensors to a device: " + "; ".join(pinned[:5]))
        save_program(program, tmp / TORCH_PROGRAM_FILE)
        with _quiet_exporters():
            onnx_program = _onnx_export(program, output_names(adapted))
        onnx_program.save(str(tmp / "model.onnx"))
        # The program as the torch engine will read it back, not the one in memory.
        checks = verify(adapted, tmp / "model.onnx", load_program(tmp / TORCH_PROGRAM_FILE))
        worst = _refuse_disagreement(checks, tolerance)  # before the adapt graph: a refusal comes early
        if has_item_table(adapted):
            checks += _export_adapt_graph(adapted, tmp)
            worst = _refuse_disagreement(checks, tolerance)

        save_file({k: v.detach().contiguous().float() for k, v in adapted.params.items()}, str(tmp / "init.safetensors"))
        catalog_rows = catalog.codes[: len(catalog.item_ids)].contiguous()
        save_file({C.CATALOG_TENSOR: catalog_rows}, str(tmp / C.CATALOG_FEATURES_FILE))
        C.write_lines(tmp / C.CATALOG_IDS_FILE, catalog.item_ids)
        item_table, adapt_graph = None, None
        if has_item_table(adapted):
            table = compute_item_table(adapted, catalog_rows)
            table_diff = check_item_table(adapted, tmp, table, catalog_rows)
            (tmp / C.ITEM_TABLE_FILE).write_bytes(C.item_table_bytes(table))
            item_table = pb.ItemTable(
                file=C.ITEM_TABLE_FILE,
                size=table.size,
                rating_factors=table.factors,
                engagement_factors=table.engagement_width,
                max_abs_diff=table_diff,
            )
            adapt_graph = adapt_graph_spec(adapted.schema, _onnx_input_names(tmp / C.ADAPT_ONNX_FILE), table.factors, table.engagement_width)
            # What the Onboard RPC's D-optimal selection needs beside the table's item vectors.
            save_numpy(onboarding.prior_tensors(onboarding_prior(adapted)), str(tmp / onboarding.PRIOR_FILE))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)

        onnx_inputs = _onnx_input_names(tmp / "model.onnx")
        manifest = pb.ArtifactManifest(
            schema_version=pb.MANIFEST_SCHEMA_V1,
            model_name=model_name,
            model_version=version,
            created_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            feature_schema=_feature_schema(adapted.schema, tmp),
            label=pb.LabelSpec(
                kind=pb.CLICK if adapted.label.kind == "click" else pb.RATING,
                min_value=adapted.label.min_value,
                max_value=adapted.label.max_value,
            ),
            model=_model_spec(adapted, learner),
            inner_loop=_inner_spec(adapted.inner_config, adapted.params, max_support_trained),
            graph=graph_spec(adapted.schema, onnx_inputs, engagement=bool(adapted.model_config.engagement_factors)),
            catalog=pb.Catalog(ids_file="catalog_items.txt", features_file="catalog.safetensors", size=len(catalog.item_ids)),
            evaluation=evaluation or pb.EvaluationSummary(),
            training=training or pb.TrainingInfo(),
            export_checks=checks,
            item_table=item_table,
            adapt_graph=adapt_graph,
        )
        C.write_manifest(tmp, manifest)
        fsync_tree(tmp)
        make_read_only(tmp)
        if before_rename is not None:
            before_rename(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    log.info("exported %s in %.1f s (worst engine difference %.2e)", final, elapsed, worst)
    return ExportResult(final, manifest, elapsed)


PARTIAL_MAX_AGE_S = 24 * 3600  # a partial directory of another machine older than this is abandoned
_PARTIAL = re.compile(r"^\.[^.]+\.partial-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-")


def owner_tag() -> str:
    """host-pid of this export, in the partial directory's name, so that a later export can
    tell an abandoned directory (its process is gone) from one still being written."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def remove_abandoned_partials(model_dir: Path) -> list[Path]:
    """Deletes the `.<version>.partial-*` directories of exports that were killed: on this
    machine, those whose process no longer runs; from elsewhere (or unnamed), those older
    than PARTIAL_MAX_AGE_S. Returns what it removed."""
    host = owner_tag().rsplit("-", 1)[0]
    removed = []
    for path in model_dir.glob(".*.partial-*"):
        if not path.is_dir() or path.is_symlink():
            continue
        match = _PARTIAL.match(path.name)
        if match and match["host"] == host:
            abandoned = not _process_alive(int(match["pid"]))
        else:
            abandoned = time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE_S
        if abandoned:
            for sub in [path, *path.rglob("*")]:  # make_read_only may have run before the kill
                if sub.is_dir() and not sub.is_symlink():
                    sub.chmod(0o755)
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted export", path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def read_manifest(artifact: Path) -> pb.ArtifactManifest:
    """An artifact's manifest.json, parsed (no checksum verification: see verify_artifact)."""
    return C.parse_manifest((Path(artifact) / C.MANIFEST_FILE).read_bytes())


def verify_artifact(artifact: Path) -> pb.ArtifactManifest:
    """An artifact's manifest after its digest and every listed file are checked (and no
    other file is there), as the service checks them."""
    artifact = Path(artifact)
    data = (artifact / C.MANIFEST_FILE).read_bytes()
    C.check_manifest_digest(artifact, data)
    manifest = C.parse_manifest(data)
    C.verify_files(artifact, manifest)
    return manifest


def load_exported_model(artifact: Path) -> AdaptedModel:
    """Training's model and inner loop rebuilt from nothing but an artifact's files: the
    inverse of export_artifact (the reference the exported graphs are compared with)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    fields = []
    for f in manifest.feature_schema.fields:
        vocabulary = tuple(f.vocabulary) or tuple(C.read_lines(artifact / f.vocabulary_file, f.vocabulary_file))
        fields.append(Field(f.name, "user" if f.side == pb.USER else "item", f.multi_valued, f.width, f.offset, vocabulary))
    schema = FeatureSchema(tuple(f for f in fields if f.side == "user"), tuple(f for f in fields if f.side == "item"))
    hyper = {k: json.loads(v) for k, v in manifest.model.hyperparameters.items()}
    loop = manifest.inner_loop
    inner = InnerLoopConfig(
        steps=loop.steps,
        learning_rate_kind=loop.learning_rate_kind,  # type: ignore[arg-type]
        normalise_by_support_size=loop.normalise_by_support_size,
        prior_pull=loop.prior_pull,
        max_step_norm=loop.max_step_norm,
        keep_best=loop.keep_best,
    )
    kind = "click" if manifest.label.kind == pb.CLICK else "rating"
    label = LabelSpec(kind, manifest.label.min_value, manifest.label.max_value)
    params = load_file(str(artifact / "init.safetensors"))
    return AdaptedModel(M.ModelConfig.from_dict(hyper), inner, schema, label, params)


def make_read_only(directory: Path) -> None:
    """Versions are immutable: files read-only for everyone, directories readable (a
    service running as another user must be able to load them)."""
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
    directory.chmod(0o755)


def fsync_tree(directory: Path) -> None:
    """Flush every file so that the rename publishes complete contents."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def _model_spec(adapted: AdaptedModel, learner: str) -> pb.ModelSpec:
    config = adapted.model_config.to_dict()
    return pb.ModelSpec(
        kind=adapted.model_config.kind,
        learner=learner,
        hyperparameters={k: json.dumps(v) for k, v in config.items()},
        adapted_parameters=list(adapted.model_config.adapted_names()),
        parameter_count=M.parameter_count(adapted.params),
    )


def _inner_spec(config: InnerLoopConfig, params: M.Params, max_support_trained: int) -> pb.InnerLoopSpec:
    return pb.InnerLoopSpec(
        steps=config.steps,
        learning_rate_kind=config.learning_rate_kind,
        learning_rate_tensors=sorted(n for n in params if n.startswith("inner.log_lr.")),
        normalise_by_support_size=config.normalise_by_support_size,
        prior_pull=config.prior_pull,
        max_step_norm=config.max_step_norm,
        max_support_trained=max_support_trained,
        keep_best=config.keep_best,
    )
