"""What a saved ``torch.export`` program may hold before it is loaded: its entries, its payloads
and every string its loader parses or runs as code (shape expressions, guards, node targets)."""

from __future__ import annotations

import ast
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

from ._errors import ParetoslimError

# what a program saved by ``torch.export.save`` holds besides its payloads (paths below the
# archive's top folder); nothing else is accepted
_ARCHIVE_FILES = {"archive_format", "archive_version", "byteorder", ".data/version",
                  ".data/serialization_id"}
_PROGRAM = re.compile(r"models/[\w.-]+\.json")
_ARCHIVE_PATTERNS = (_PROGRAM, re.compile(r"data/sample_inputs/[\w.-]+\.pt"),
                     re.compile(r"data/weights/[\w.-]+_weights_config\.json"),
                     re.compile(r"data/constants/[\w.-]+_constants_config\.json"))
# payloads as tensors: raw bytes, or a torch.save archive read by the weights-only unpickler
_PAYLOAD_NAMES = {"weights": re.compile(r"weight_\d+"),
                  "constants": re.compile(r"tensor_\d+")}

# Shape expressions are handed to ``sympy.sympify`` (which evaluates Python), guards are
# compiled with ``exec`` and node targets are resolved by attribute lookups from ``torch``:
# each must fit a grammar with nothing in it that can name or call arbitrary code.
_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}")  # s0, u3, ps1: torch's shape symbols
_IDENTIFIER = re.compile(r"[A-Za-z_]\w{0,99}")
_SYMPY_FUNCTIONS = frozenset((
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "Piecewise", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity"))
_SYMPY_CONSTANTS = frozenset(("oo", "zoo", "nan", "true", "false", "int_oo"))
_GUARD_METHODS = frozenset(("size", "stride", "storage_offset"))
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd,
              ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed", "quantized", "paretoslim", "torchao")
_OP_TARGET = re.compile(rf"torch\.ops\.(?:{'|'.join(_OP_NAMESPACES)})\.[A-Za-z_]\w*\.[A-Za-z_]\w*")
# the symbolic-shape operators the loader accepts as plain callables (its _SYM_OPS)
_SYM_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("add", "and_", "eq", "floordiv", "ge", "getitem", "gt",
                                      "le", "lshift", "lt", "mod", "mul", "ne", "neg", "or_",
                                      "pos", "rshift", "sub", "truediv")]
    + ["math.trunc", "torch._sym_sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
       "torch.sym_max", "torch.sym_min", "torch.sym_not"])
_MAX_EXPRESSION = 4000  # characters
_MAX_INTEGER = 2 ** 63


def check_program_archive(path: str | Path) -> None:
    """Raise ParetoslimError unless ``path`` is a ``torch.export`` archive holding only what
    loads without running code: the program's JSON, raw tensor payloads, and tensors saved
    by ``torch.save`` (read weights-only). Refused: pickled Python objects (``opaque_obj_``,
    ``custom_obj_`` constants), compiled AOTInductor code, pickles (``*.pkl``, or bytes
    starting with the pickle protocol marker ``\\x80``), any entry ``torch.export.save``
    does not write for an exported program, and a program whose shape expressions, guards
    or node targets leave the grammar above (integers, shape symbols, arithmetic and
    comparisons, sympy's shape functions; operators of the tensor namespaces)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(archive)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, AttributeError,
            RecursionError) as exc:
        raise ParetoslimError(f"{path}: refused before loading: "
                              f"{' '.join(str(exc).split())[:300]}") from None


def _check_entries(archive: zipfile.ZipFile) -> None:
    names = archive.namelist()
    top = names[0].split("/", 1)[0] + "/" if names else ""
    if not top or f"{top}archive_format" not in names:
        raise ValueError("not a torch.export archive (no archive_format)")
    payloads = _payloads(archive, top)
    for name in names:
        relative = name[len(top):] if name.startswith(top) else ""
        if relative in payloads:
            if payloads[relative] and archive.read(name)[:2] != b"PK":
                raise ValueError(f"{name} should be a torch.save archive of a tensor")
            continue  # raw bytes are read as a tensor, never unpickled
        known = relative in _ARCHIVE_FILES or any(p.fullmatch(relative)
                                                  for p in _ARCHIVE_PATTERNS)
        if not known:
            raise ValueError(f"it holds {name}, which is not part of an exported program "
                             "(pickled objects, compiled code and other files are refused)")
        data = archive.read(name)
        if data[:1] == b"\x80":
            raise ValueError(f"{name} is a pickle")
        if _PROGRAM.fullmatch(relative):
            check_program(json.loads(data), name)


def _payloads(archive: zipfile.ZipFile, top: str) -> dict[str, bool]:
    """The payload entries the archive's configs name, each with whether it is saved by
    ``torch.save`` (else raw bytes). Raises ValueError for a payload that is not a tensor."""
    found: dict[str, bool] = {}
    for kind, allowed in _PAYLOAD_NAMES.items():
        prefix = f"{top}data/{kind}/"
        for name in archive.namelist():
            if not (name.startswith(prefix) and name.endswith(f"_{kind}_config.json")):
                continue
            config = json.loads(archive.read(name)).get("config", {})
            for fqn, payload in config.items():
                file = payload.get("path_name", "")
                if not isinstance(file, str) or not allowed.fullmatch(file):
                    raise ValueError(f"{kind[:-1]} {fqn!r} is stored as {file!r}, a pickled "
                                     "Python object loading would unpickle")
                found[f"data/{kind}/{file}"] = bool(payload.get("use_pickle"))
    return found


def check_program(program: Any, where: str) -> None:
    """Raise ValueError naming ``where`` for a serialized program (``models/*.json``) holding a
    shape expression, a guard or a node target outside the grammar."""
    if not isinstance(program, dict):
        raise ValueError(f"{where} is not a serialized program")
    guards = program.get("guards_code", [])
    if not isinstance(guards, list):
        raise ValueError(f"{where}: guards_code is not a list")
    for guard in guards:
        _check_code(guard, _guard_node, where, "guard")
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "expr_str" in item:
                _check_code(item["expr_str"], _expression_node, where, "shape expression")
            if {"target", "inputs", "outputs"} <= item.keys():
                _check_target(item["target"], where)
            stack.extend(item.values())


def _check_target(target: Any, where: str) -> None:
    if not (isinstance(target, str) and (_OP_TARGET.fullmatch(target)
                                         or target in _SYM_TARGETS)):
        raise ValueError(f"{where}: the node target {str(target)[:80]!r} is not an operator "
                         f"of the {', '.join(_OP_NAMESPACES)} namespaces")


def _check_code(text: Any, allowed: Any, where: str, kind: str) -> None:
    """Raise ValueError unless ``text`` parses as a Python expression every node of which
    ``allowed(node)`` accepts."""
    shown = str(text)[:80]
    if not isinstance(text, str) or len(text) > _MAX_EXPRESSION:
        raise ValueError(f"{where}: a {kind} that is not a short string ({shown!r})")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"{where}: the {kind} {shown!r} is not an expression") from None
    for node in ast.walk(tree.body):
        if not allowed(node):
            raise ValueError(f"{where}: the {kind} {shown!r} holds "
                             f"{ast.unparse(node)[:60]!r}, which is not part of one")


def _common_node(node: ast.AST) -> bool:
    """Arithmetic, comparisons and bounded numbers: the part shared by both grammars."""
    if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, ast.Tuple,
                         *_OPERATORS)):
        return True
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or value is None:
            return True
        if isinstance(value, int):
            return abs(value) < _MAX_INTEGER
        return isinstance(value, float) and math.isfinite(value)
    return False


def _expression_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return (node.id in _SYMPY_FUNCTIONS or node.id in _SYMPY_CONSTANTS
                or bool(_SYMBOL.fullmatch(node.id)))
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY_FUNCTIONS
    if isinstance(node, ast.keyword):  # Symbol('s0', positive=True, integer=True)
        return (node.arg is not None and _IDENTIFIER.fullmatch(node.arg) is not None
                and not node.arg.startswith("_") and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, bool))
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(_SYMBOL.fullmatch(node.value))
    return _common_node(node)


def _guard_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):  # L is the guarded inputs; sympy's shape functions
        return node.id == "L" or node.id in _SYMPY_FUNCTIONS
    if isinstance(node, ast.Subscript):  # L['x'], .size()[0]
        return isinstance(node.slice, ast.Constant)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(_IDENTIFIER.fullmatch(node.value))
    if isinstance(node, ast.Attribute):
        return node.attr in _GUARD_METHODS
    if isinstance(node, ast.Call):
        func = node.func
        return ((isinstance(func, ast.Attribute) and func.attr in _GUARD_METHODS)
                or (isinstance(func, ast.Name) and func.id in _SYMPY_FUNCTIONS))
    return _common_node(node)
