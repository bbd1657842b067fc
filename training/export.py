"""Export a trained model as a self-contained, verified, immutable artifact.

The artifact is the directory `<repository>/<model_name>/<version>/`:

    manifest.json          the ArtifactManifest (protos/warmstart/v1/manifest.proto)
    manifest.sha256        the manifest's own sha256 (sha256sum format)
    init.safetensors       the meta-learned initialisation and learned inner-loop parameters
    model.onnx             the fused adapt-then-score graph (inner loop unrolled inside)
    torch_program.safetensors  the same graph as a torch.export program (the torch engine),
                           stored without pickle (warmstart.torch_program)
    catalog.safetensors    "item_features": int64 [items, item_width], known items encoded
    catalog_items.txt      their ids, one per line, in row order
    vocab/<field>.txt      vocabularies too large to sit in the manifest
    onboarding_prior.safetensors  bias_factor models: the user's prior precision per head,
                           for the Onboard RPC's selection (warmstart.onboarding)
    onboarding_items.safetensors  ... and each catalog item's vectors as the inner loop sees
                           them (q_i; p_i and c_i with the engagement head)

How the inner loop gets into a graph: the loop is written with torch.func (grad inside
vmap). Exporting torch.func.grad directly fails, so the fused function is first traced
with make_fx (symbolic shapes, parameters as explicit inputs), which turns the
per-user gradients into plain aten ops; the traced module, with the parameters turned
into buffers, is then exported by torch.export and by torch.onnx (dynamo).

Before anything is written the three implementations — training's own inner loop,
onnxruntime on the ONNX graph, and the torch.export program — must agree to 1e-4 on
random batches of several shapes. The directory is assembled under a temporary name and
renamed into place, so an interrupted export leaves no version a server could load.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import hashlib
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
from google.protobuf import json_format
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch.fx.experimental.proxy_tensor import make_fx

from training import model as M
from training.batching import EncodedCatalog
from training.dataset import LabelSpec
from training.features import FeatureSchema, Field
from training.inner_loop import Batch, InnerLoopConfig
from training.onboarding import item_tensors as onboarding_item_tensors, onboarding_prior
from training.trainer import AdaptedModel
from warmstart import onboarding
from warmstart.torch_program import load_program, save_program
from warmstart.v1 import manifest_pb2 as pb

log = logging.getLogger(__name__)

INPUT_NAMES = ("user_features", "support_items", "support_labels", "support_mask", "query_items")
OUTPUT_NAMES = ("query_scores", "support_loss_before", "support_loss_after")
ENGAGEMENT_OUTPUT = "query_engagement"  # a fourth output, for models with the engagement head


def output_names(adapted: AdaptedModel) -> tuple[str, ...]:
    """The graph's outputs for this model, in order."""
    return (*OUTPUT_NAMES, ENGAGEMENT_OUTPUT) if adapted.model_config.engagement_factors else OUTPUT_NAMES
TOLERANCE = 1e-4
INLINE_VOCABULARY_MAX = 1000  # larger vocabularies go to vocab/<field>.txt
ONNX_OPSET = 18
TORCH_PROGRAM_FILE = "torch_program.safetensors"
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

    def codes(fields: Sequence[Field], lead: tuple[int, ...]) -> torch.Tensor:
        width = sum(f.width for f in fields)
        out = np.zeros((*lead, width), dtype=np.int64)
        for f in fields:
            out[..., f.offset : f.offset + f.width] = rng.integers(0, f.num_codes, size=(*lead, f.width))
        return torch.from_numpy(out)

    b, s, q = shape.batch, shape.support, shape.query
    if label.kind == "click":
        labels = rng.integers(0, 2, size=(b, s)).astype(np.float32)
    else:
        labels = rng.uniform(label.min_value, label.max_value, size=(b, s)).astype(np.float32)
    mask = np.ones((b, s), dtype=np.float32)
    if shape.ragged:
        lengths = rng.integers(0, s + 1, size=b)
        lengths[0] = 0  # one user with no interactions at all
        mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.float32)
    return Batch(
        user_features=codes(schema.user_fields, (b,)),
        support_items=codes(schema.item_fields, (b, s)),
        support_labels=torch.from_numpy(labels),
        support_mask=torch.from_numpy(mask),
        query_items=codes(schema.item_fields, (b, q)),
    )


def trace(adapted: AdaptedModel) -> _Fused:
    """make_fx over the fused function with symbolic shapes; parameters become buffers."""
    names = list(adapted.params)

    def flat(*args: torch.Tensor):
        params = dict(zip(names, args[: len(names)]))
        batch = Batch(*args[len(names) :])
        model = AdaptedModel(adapted.model_config, adapted.inner_config, adapted.schema, adapted.label, params)
        return model.forward(batch)

    example = random_batch(adapted.schema, CheckShape(3, 4, 5, ragged=False), np.random.default_rng(0), adapted.label)
    traced = make_fx(flat, tracing_mode="symbolic")(*[adapted.params[n] for n in names], *example)
    return _Fused(traced, adapted.params)


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


def verify(
    adapted: AdaptedModel,
    onnx_path: Path,
    program: torch.export.ExportedProgram,
    shapes: Sequence[CheckShape] = CHECK_SHAPES,
    seed: int = 0,
) -> list[pb.ExportCheck]:
    """Max abs differences of onnxruntime and torch.export against training's inner loop."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    module = program.module()
    rng = np.random.default_rng(seed)
    checks = []
    for shape in shapes:
        batch = random_batch(adapted.schema, shape, rng, adapted.label)
        with torch.no_grad():
            reference = [t.numpy() for t in adapted.forward(batch)]
            exported = [t.detach().numpy() for t in module(*batch)]
        feeds = {name: t.numpy() for name, t in zip(INPUT_NAMES, batch) if name in onnx_inputs}
        from_onnx = session.run(list(output_names(adapted)), feeds)
        diff_onnx = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(reference, from_onnx))
        diff_export = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(reference, exported))
        finite = all(np.all(np.isfinite(x)) for x in (*reference, *from_onnx, *exported))
        if not finite:
            raise ExportError(f"non-finite outputs at {shape.describe()}")
        checks.append(pb.ExportCheck(shape=shape.describe(), max_abs_diff_onnx=diff_onnx, max_abs_diff_torch_export=diff_export))
    return checks


def _onnx_export(program: torch.export.ExportedProgram, outputs: Sequence[str]):
    """ONNX from the already exported program (one torch.export, not two)."""
    return torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(INPUT_NAMES),
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
            _write_lines(out_dir / relative, f.vocabulary)
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


def _write_lines(path: Path, values: Sequence[str]) -> None:
    for value in values:
        if "\n" in value or "\r" in value:
            raise ExportError(f"value {value!r} contains a line break and cannot be written to {path.name}")
    path.write_text("".join(f"{v}\n" for v in values), encoding="utf-8")


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-{_owner_tag()}-", dir=model_dir))
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
        worst = max(max(c.max_abs_diff_onnx, c.max_abs_diff_torch_export) for c in checks)
        if worst > tolerance:
            detail = ", ".join(
                f"{c.shape}: onnx {c.max_abs_diff_onnx:.2e}, torch.export {c.max_abs_diff_torch_export:.2e}" for c in checks
            )
            raise ExportError(f"engines disagree by up to {worst:.2e} (tolerance {tolerance:.0e}): {detail}")

        save_file({k: v.detach().contiguous().float() for k, v in adapted.params.items()}, str(tmp / "init.safetensors"))
        catalog_rows = catalog.codes[: len(catalog.item_ids)].contiguous()
        save_file({"item_features": catalog_rows}, str(tmp / "catalog.safetensors"))
        _write_lines(tmp / "catalog_items.txt", catalog.item_ids)
        if adapted.model_config.kind == "bias_factor":
            # What the Onboard RPC's D-optimal selection needs beside the item vectors.
            save_numpy(onboarding.prior_tensors(onboarding_prior(adapted)), str(tmp / onboarding.PRIOR_FILE))
            save_numpy(onboarding_item_tensors(adapted, catalog), str(tmp / onboarding.ITEMS_FILE))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)

        import onnx

        onnx_inputs = [i.name for i in onnx.load(str(tmp / "model.onnx"), load_external_data=False).graph.input]
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
        )
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            manifest.files.append(
                pb.FileDigest(path=path.relative_to(tmp).as_posix(), sha256=sha256_file(path), size_bytes=path.stat().st_size)
            )
        (tmp / "manifest.json").write_text(
            json_format.MessageToJson(
                manifest, indent=1, sort_keys=True, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            + "\n"
        )
        # The manifest cannot list its own digest: a sha256sum-format sidecar carries it
        # (`sha256sum -c manifest.sha256` checks it by hand), so no byte of the artifact
        # goes unchecked.
        (tmp / "manifest.sha256").write_text(f"{sha256_file(tmp / 'manifest.json')}  manifest.json\n")
        _fsync_tree(tmp)
        _make_read_only(tmp)
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


def _owner_tag() -> str:
    """host-pid of this export, in the partial directory's name, so that a later export can
    tell an abandoned directory (its process is gone) from one still being written."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def remove_abandoned_partials(model_dir: Path) -> list[Path]:
    """Deletes the `.<version>.partial-*` directories of exports that were killed: on this
    machine, those whose process no longer runs; from elsewhere (or unnamed), those older
    than PARTIAL_MAX_AGE_S. Returns what it removed."""
    host = _owner_tag().rsplit("-", 1)[0]
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
            for sub in [path, *path.rglob("*")]:  # _make_read_only may have run before the kill
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
    """An artifact's manifest.json, parsed (no checksum verification: see service.artifact)."""
    return json_format.Parse((Path(artifact) / "manifest.json").read_text(encoding="utf-8"), pb.ArtifactManifest())


def load_exported_model(artifact: Path) -> AdaptedModel:
    """Training's model and inner loop rebuilt from nothing but an artifact's files: the
    inverse of export_artifact (the reference the exported graphs are compared with)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    fields = []
    for f in manifest.feature_schema.fields:
        vocabulary = tuple(f.vocabulary) or tuple((artifact / f.vocabulary_file).read_text(encoding="utf-8").splitlines())
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


def _make_read_only(directory: Path) -> None:
    """Versions are immutable: files read-only for everyone, directories readable (a
    service running as another user must be able to load them)."""
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
    directory.chmod(0o755)


def _fsync_tree(directory: Path) -> None:
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
