"""The torch engine's program file: a torch.export program stored without pickle.

`torch.export.save` writes a zip in which sample inputs (and any tensor it cannot store
raw) are pickles, and torch's loader unpickles them (falling back to an unrestricted
unpickler when the restricted one refuses): anyone who can write the model repository
could make a server run code. An artifact is data, never code, so the program is stored as one
safetensors file instead:

- the tensors: the program's state dict (`state_dict/<fqn>`) and tensor constants
  (`constants/<fqn>`), raw little-endian data that safetensors reads without executing
  anything;
- the header metadata: `format` (FORMAT) and `program`, the graph in torch's own JSON
  schema (torch._export.serde), written with no node metadata and no guard code.

JSON is not automatically safe either: torch's deserializer evaluates symbolic-shape
expressions with sympy (which calls eval), resolves node targets as attributes of
torch, and compiles guard code and FX code from names. `load_program` therefore checks
the whole document against a strict allowlist first (aten operators only, shape
expressions of integers and size symbols only, identifiers only, no guard code, no
custom objects or subgraphs) and only then hands it to torch.

torch is imported inside the functions: this module sits in the shared `warmstart`
package, which an onnxruntime-only service imports without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

FORMAT = "warmstart.torch_program.v1"
STATE_PREFIX = "state_dict/"
CONSTANT_PREFIX = "constants/"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.[a-z0-9_]+\.[A-Za-z0-9_]+$")
_OPERATOR_TARGETS = frozenset(
    f"_operator.{name}"
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")
)
_DENIED_ATEN = frozenset({"from_file"})  # reads a file named by the graph
# Argument kinds a plain tensor program uses; subgraphs, custom objects and operator
# references are refused.
_ARGUMENT_KINDS = frozenset(
    {
        "as_none", "as_tensor", "as_tensors", "as_optional_tensor", "as_optional_tensors",
        "as_int", "as_ints", "as_float", "as_floats", "as_bool", "as_bools", "as_string", "as_strings",
        "as_sym_int", "as_sym_ints", "as_sym_bool", "as_sym_bools", "as_sym_float", "as_sym_floats",
        "as_scalar_type", "as_memory_format", "as_layout", "as_device",
    }
)
# sympy's srepr of shape expressions: Symbol('s12', positive=True, integer=True), Integer(3), Mul(...).
_SYMBOL_LITERAL = re.compile(r"'[a-z][0-9]+'")
_EXPRESSION_CHARS = re.compile(r"^[A-Za-z0-9_=(), \-]*$")
_EXPRESSION_WORDS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Max", "Min", "FloorDiv", "Mod", "PythonMod",
        "CleanDiv", "CeilToInt", "FloorToInt", "positive", "integer", "nonnegative", "True", "False",
    }
)
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
_MAX_EXPRESSION = 512


class ProgramFormatError(ValueError):
    """The file is not a program this module wrote, or holds something it refuses to run."""


def save_program(program: Any, path: Path) -> None:
    """Writes a torch.export ExportedProgram to `path` (safetensors; no pickle anywhere)."""
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    serialized = serialize(program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    document = json.loads(serialized.exported_program)
    for node in document["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}  # stack traces and module paths: not needed to run, and not to be trusted
    document["guards_code"] = []  # Python source torch would exec; the input shapes are checked by the engine
    tensors = {}
    for prefix, values in ((STATE_PREFIX, program.state_dict), (CONSTANT_PREFIX, program.constants)):
        for name, value in values.items():
            if not hasattr(value, "detach"):
                raise ProgramFormatError(f"constant {name!r} is a {type(value).__name__}, not a tensor")
            tensors[prefix + name] = value.detach().contiguous().clone()
    save_file(tensors, str(path), metadata={"format": FORMAT, "program": json.dumps(document, sort_keys=True)})


def load_program(path: Path) -> Any:
    """Reads a program written by save_program; raises ProgramFormatError on anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ProgramFormatError(f"not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ProgramFormatError(f"format {str(metadata.get('format'))[:80]!r}, expected {FORMAT!r}")
    try:
        document = json.loads(metadata["program"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ProgramFormatError(f"no readable program in the header: {exc}") from exc
    check_document(document)
    state_dict = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    constants = {k[len(CONSTANT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CONSTANT_PREFIX)}
    if len(state_dict) + len(constants) != len(tensors):
        raise ProgramFormatError("tensors outside state_dict/ and constants/")
    return _deserialize(document, state_dict, constants)


def _deserialize(document: dict, state_dict: dict, constants: dict) -> Any:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        # Dicts, not bytes: torch's deserializer takes them as they are (bytes would be unpickled).
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except ProgramFormatError:
        raise
    except Exception as exc:  # torch raises assorted types for documents it cannot rebuild
        raise ProgramFormatError(f"torch could not rebuild the program: {type(exc).__name__}: {exc}") from exc


def check_document(document: Any) -> None:
    """Raises ProgramFormatError unless the JSON program holds nothing but a plain aten graph."""
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise ProgramFormatError("the program is not a JSON object with a graph_module")
    if document.get("guards_code"):
        raise ProgramFormatError("guards_code is not accepted (torch would execute it)")
    module = document["graph_module"]
    graph = module.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ProgramFormatError("graph_module.graph.nodes is missing")
    if graph.get("custom_obj_values"):
        raise ProgramFormatError("custom objects are not accepted")
    for node in graph["nodes"]:
        _check_node(node)
    for spec in module.get("module_call_graph") or []:
        if not isinstance(spec, dict) or not _FQN.match(spec.get("fqn") or "_"):
            raise ProgramFormatError("a module_call_graph entry has a malformed fqn")
        signature = spec.get("signature") or {}
        for key in ("in_spec", "out_spec"):
            if key in signature:
                _check_treespec(signature[key])
    _walk(document)


def _check_node(node: Any) -> None:
    if not isinstance(node, dict):
        raise ProgramFormatError("a graph node is not an object")
    target = node.get("target")
    if not isinstance(target, str):
        raise ProgramFormatError("a graph node has no target")
    if _ATEN_TARGET.match(target):
        if target.split(".")[3] in _DENIED_ATEN:
            raise ProgramFormatError(f"operator {target!r} is not accepted")
    elif target not in _OPERATOR_TARGETS:
        raise ProgramFormatError(f"operator {target[:120]!r} is not an aten operator")
    if node.get("metadata"):
        raise ProgramFormatError("node metadata is not accepted")
    for argument in node.get("inputs") or []:
        if not isinstance(argument, dict) or not isinstance(argument.get("arg"), dict):
            raise ProgramFormatError(f"node {str(node.get('name'))[:80]!r} has a malformed input")
        kinds = set(argument["arg"])
        if not kinds <= _ARGUMENT_KINDS:
            raise ProgramFormatError(f"argument kind(s) {sorted(kinds - _ARGUMENT_KINDS)} are not accepted")


def _check_treespec(text: Any) -> None:
    try:
        spec = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ProgramFormatError(f"malformed treespec: {exc}") from exc

    def visit(entry: Any) -> None:
        if isinstance(entry, dict):
            if entry.get("type") not in _TREESPEC_TYPES:
                raise ProgramFormatError(f"treespec type {str(entry.get('type'))[:80]!r} is not accepted")
            for child in entry.get("children_spec") or []:
                visit(child)
        elif isinstance(entry, list):
            for child in entry:
                visit(child)

    visit(spec)


def _walk(value: Any) -> None:
    """Every name is an identifier (FX generates Python source from them) and every shape
    expression is a plain arithmetic of integers and size symbols (sympy evaluates it)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "name" and isinstance(item, str) and not _IDENTIFIER.match(item):
                raise ProgramFormatError(f"name {item[:80]!r} is not an identifier")
            if key in ("buffer_name", "parameter_name", "tensor_constant_name") and isinstance(item, str) and not _FQN.match(item):
                raise ProgramFormatError(f"{key} {item[:80]!r} is malformed")
            if key == "expr_str":
                _check_expression(item)
            _walk(item)
    elif isinstance(value, list):
        for item in value:
            _walk(item)


def _check_expression(text: Any) -> None:
    if not isinstance(text, str) or len(text) > _MAX_EXPRESSION:
        raise ProgramFormatError("a shape expression is not a short string")
    bare = _SYMBOL_LITERAL.sub("", text)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare))
    if not _EXPRESSION_CHARS.match(bare) or not words <= _EXPRESSION_WORDS:
        raise ProgramFormatError(f"shape expression {text[:80]!r} is not accepted")
