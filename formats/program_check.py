"""Strict allowlist check of the JSON inside a program archive, walked along torch's own export
schema: a value passes only if no path through torch's loader can import, unpickle, eval or exec
anything with it."""

from __future__ import annotations

import dataclasses
import enum
import json
import keyword
import math
import re
import types
import typing

import torch
from torch._export.serde import schema

from .errors import DczError

MAX_ITEMS = 1 << 20  # entries of one JSON array or object
MAX_TEXT = 1 << 16  # characters of one string
MAX_EXPR = 4096  # characters of one symbolic expression
MAX_DEPTH = 32  # nesting of expressions and tree specs

_HINTS = {cls: typing.get_type_hints(cls, globalns=vars(schema)) for cls in vars(schema).values()
          if isinstance(cls, type) and dataclasses.is_dataclass(cls)}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"(?!__)[A-Za-z0-9_]+(?:\.(?!__)[A-Za-z0-9_]+)*")  # "0.weight" in Sequential
_SYMBOL = re.compile(r"[a-z]{1,3}[0-9]{1,9}")
_OP = re.compile(r"torch\.ops\.(aten|prims)\.(_?[a-z][a-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)")
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|'([^']*)'|-?[0-9]{1,18}|([(),=]))")
# sympy.srepr() names torch writes for integer shape arithmetic; no Pow/shift: they blow up
_EXPR_NAMES = frozenset(
    "Symbol Integer Add Mul Max Min Mod FloorDiv CleanDiv CeilDiv PythonMod ModularIndexing "
    "Identity Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan And Or "
    "Not true false True False positive negative nonnegative nonpositive integer real finite"
    .split())
_SYM_OPS = frozenset(
    [f"_operator.{n}" for n in "getitem add sub mul floordiv truediv mod neg pos eq ne lt le gt "
     "ge and_ or_".split()]
    + [f"torch.sym_{n}" for n in "max min not float int ite".split()] + ["math.trunc"])
# dispatcher ops that touch files or skip bounds checks
_DENIED_OPS = frozenset({"from_file", "_unsafe_index", "_unsafe_index_put", "_unsafe_masked_index",
                         "_unsafe_masked_index_put_accumulate"})
_MEMBERS = frozenset(  # union members admitted: no graphs, operators, custom objects, tokens
    "as_none as_tensor as_tensors as_int as_ints as_float as_floats as_string as_strings "
    "as_sym_int as_sym_ints as_scalar_type as_memory_format as_layout as_device as_bool as_bools "
    "as_sym_bool as_sym_bools as_optional_tensors as_optional_tensor as_complex as_int_lists "
    "as_float_lists as_expr as_name user_input parameter buffer tensor_constant constant_input "
    "user_output buffer_mutation user_input_mutation".split())
_EMPTY = frozenset({"GraphModule.metadata", "GraphModule.treespec_namedtuple_fields",
                    "Graph.custom_obj_values", "ExportedProgram.guards_code"})
NODE_METADATA = frozenset({"nn_module_stack", "torch_fn"})  # what pack() keeps
# what a reader admits (and then drops): files written before pack() cut stack traces hold them
_READ_METADATA = NODE_METADATA | {"stack_trace"}
_SPEC_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict",
                         "collections.OrderedDict"})


def _value_name(s: str) -> bool:
    return bool(_IDENT.fullmatch(s)) and not keyword.iskeyword(s) and not s.startswith("__")


def _text(s: str) -> bool:
    return s.isprintable()


def _op(target: str) -> bool:
    if target in _SYM_OPS:
        return True
    m = _OP.fullmatch(target)
    if not m or m[2] in _DENIED_OPS:
        return False
    try:
        op = getattr(getattr(getattr(torch.ops, m[1]), m[2]), m[3])
        return (isinstance(op, torch._ops.OpOverload) and torch._C._dispatch_has_kernel(op.name())
                and not any("Storage" in str(a.type) for a in op._schema.arguments))
    except Exception:  # unknown op names raise AttributeError or RuntimeError
        return False


def _expr(s: str) -> bool:
    """Only what sympy.srepr writes for integer shape arithmetic, so sympify evals nothing else."""
    pos, depth = 0, 0
    while pos < len(s) <= MAX_EXPR:
        m = _EXPR_TOKEN.match(s, pos)
        if not m or (m[1] and m[1] not in _EXPR_NAMES) or (m[2] is not None
                                                          and not _SYMBOL.fullmatch(m[2])):
            return False
        depth += {"(": 1, ")": -1}.get(m[3], 0)
        if not 0 <= depth <= MAX_DEPTH:
            return False
        pos = m.end()
    return 0 < len(s) <= MAX_EXPR and depth == 0 and s.strip() == s


def _spec_node(node: object, depth: int) -> bool:
    if (not isinstance(node, dict) or node.keys() != {"type", "context", "children_spec"}
            or not isinstance(kids := node["children_spec"], list) or depth > MAX_DEPTH):
        return False
    if node["type"] is None:
        return node["context"] is None and not kids
    if node["type"] not in _SPEC_TYPES or not isinstance(node["context"], str):
        return False
    context = loads(node["context"].encode())  # no JSON object: torch would resolve "__enum__"
    keys_ok = context is None or (isinstance(context, list) and all(
        type(k) in (str, int) for k in context))
    return keys_ok and all(_spec_node(k, depth + 1) for k in kids)


def _treespec(s: str) -> bool:
    spec = loads(s.encode())
    return isinstance(spec, list) and len(spec) == 2 and spec[0] == 1 and _spec_node(spec[1], 0)


_VALUE_NAMES = ("TensorArgument.name SymIntArgument.as_name SymBoolArgument.as_name Node.name "
                "InputToConstantInputSpec.name Graph.tensor_values.key Graph.sym_int_values.key "
                "Graph.sym_bool_values.key Graph.sym_float_values.key").split()
_FQNS = ("InputToParameterSpec.parameter_name InputToBufferSpec.buffer_name "
         "InputToTensorConstantSpec.tensor_constant_name BufferMutationSpec.buffer_name "
         "UserInputMutationSpec.user_input_name PayloadConfig.config.key").split()
_RULES: dict[str, typing.Callable[[str], bool]] = {
    **dict.fromkeys(_VALUE_NAMES, _value_name), **dict.fromkeys(_FQNS, _FQN.fullmatch),
    **dict.fromkeys(("Argument.as_string", "Argument.as_strings", "ConstantValue.as_string"),
                    _text),
    "Node.metadata": lambda s: all(map(_text, s.split("\n"))),
    "NamedArgument.name": _IDENT.fullmatch, "ModuleCallSignature.forward_arg_names": _value_name,
    "ModuleCallEntry.fqn": lambda s: s == "" or bool(_FQN.fullmatch(s)),
    "Node.target": _op, "SymExpr.expr_str": _expr, "Node.metadata.key": _READ_METADATA.__contains__,
    "ModuleCallSignature.in_spec": _treespec, "ModuleCallSignature.out_spec": _treespec,
    "ExportedProgram.opset_version.key": _IDENT.fullmatch,
    "ExportedProgram.range_constraints.key": _SYMBOL.fullmatch,
    "ExportedProgram.verifiers": {"ATEN", "TRAINING"}.__contains__,
    "ExportedProgram.torch_version": re.compile(r"[0-9A-Za-z.+_<=-]{1,64}").fullmatch,
    "Device.type": "cpu".__eq__,
    "PayloadMeta.path_name": re.compile(r"(weight|tensor)_[0-9]{1,9}").fullmatch,
}


def _walk(tp: object, value: object, where: str, depth: int = 0) -> None:
    """Check `value` (parsed JSON) against the schema type `tp`, strictly and recursively."""
    def need(ok: object, what: str = "malformed") -> None:
        if not ok:
            raise DczError(f"program: {where}: {what}")

    need(depth <= 3 * MAX_DEPTH, "nested too deep")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` occurs in the schema
        if value is not None:
            _walk(next(a for a in args if a is not type(None)), value, where, depth)
    elif isinstance(tp, type) and issubclass(tp, schema._Union):
        need(isinstance(value, dict) and len(value) == 1)
        (member, inner), = value.items()
        need(member in _HINTS[tp] and member in _MEMBERS, f"{member!r} is not allowed")
        _walk(_HINTS[tp][member], inner, f"{tp.__name__}.{member}", depth + 1)
    elif tp in _HINTS:
        hints = _HINTS[tp]
        need(isinstance(value, dict) and value.keys() <= hints.keys()
             and all(f.name in value for f in dataclasses.fields(tp)
                     if f.default is f.default_factory is dataclasses.MISSING))
        for key, inner in value.items():
            need(f"{tp.__name__}.{key}" not in _EMPTY or not inner, f"{key} must be empty")
            _walk(hints[key], inner, f"{tp.__name__}.{key}", depth + 1)
    elif origin is list:
        need(isinstance(value, list) and len(value) <= MAX_ITEMS)
        for item in value:
            _walk(args[0], item, where, depth + 1)
    elif origin is dict:
        need(isinstance(value, dict) and len(value) <= MAX_ITEMS)
        for key, inner in value.items():
            _walk(str, key, f"{where}.key", depth + 1)
            _walk(args[1], inner, where, depth + 1)
    elif tp is str:
        rule = _RULES.get(where)
        need(isinstance(value, str) and len(value) <= MAX_TEXT and rule and rule(value),
             f"{str(value)[:60]!r} is not allowed")
    elif isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        need(type(value) is int and value in tp._value2member_map_)
    elif tp is int:
        need(type(value) is int and -(1 << 63) <= value < (1 << 63))
    elif tp is float:
        need(type(value) in (int, float) and not math.isnan(value))
    else:
        need(tp is bool and type(value) is bool)


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DczError("program: JSON object repeats a key")
    return out


def _no_nan(name: str) -> float:
    if name == "NaN":
        raise DczError("program: JSON holds NaN")
    return float(name)


def loads(data: bytes) -> object:
    """Strict JSON: UTF-8, no repeated keys, no NaN."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_nan)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, DczError):
            raise
        raise DczError(f"program: invalid JSON ({type(exc).__name__})") from None


def check_program(doc: object) -> None:
    """Raise DczError unless `doc` (parsed models/model.json) passes the allowlist."""
    _walk(schema.ExportedProgram, doc, "model.json")


def check_config(doc: object, prefix: str) -> None:
    """Raise DczError unless `doc` is a payload config of raw `prefix`_N tensor records."""
    _walk(schema.PayloadConfig, doc, "config")
    for fqn, meta in doc["config"].items():
        tm = meta["tensor_meta"]
        if (meta["use_pickle"] or not meta["path_name"].startswith(prefix) or tm is None
                or tm["layout"] != schema.Layout.Strided
                or any("as_int" not in d for d in (*tm["sizes"], *tm["strides"],
                                                   tm["storage_offset"]))):
            raise DczError(f"program: {fqn}: not a raw strided tensor record "
                           "(pickled, symbolic or wrong path)")
