"""Vetting a ``torch.export`` archive (``.pt2``) as data, before torch reads it.

Given a crafted file, ``torch.export.load`` (read in torch 2.14) would run code from it: it
unpickles tensor subclasses and constants with ``torch.load(weights_only=False)`` or
``pickle.loads``, retries example inputs that ``weights_only`` refuses with ``weights_only=False``,
loads AOTInductor shared libraries, and ``sympify`` (an ``eval``) symbolic shape strings; and
``ExportedProgram.module()`` ``exec``s guard code read from the file (dfkd asks for no guards) and
generates Python source from names read from the file. So this module reads the archive as a zip
of JSON and raw tensor bytes and refuses all of that: after it, torch only sees tensors stored as
bytes, one program made of built-in (ATen) operators, identifiers for names, and shape expressions
of a fixed grammar. It also reads what the teacher needs from the JSON: the input's sizes and
dynamic ranges, and how many BatchNorm operators run in eval mode.

Example:
    >>> facts = vet_program(Path("net.pt2").read_bytes(), Path("net.pt2"))
    >>> facts.batch_norms, [dim.size for dim in facts.dims]
    (2, [2, 3, 32, 32])
"""

from __future__ import annotations

import functools
import io
import json
import keyword
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfkd_cli.errors import DfkdError

# How to write a program dfkd reads: eval mode, a dynamic batch (dim 0 of the one input).
EXPORT_CALL = ('torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: '
               'torch.export.Dim("batch")},)), "net.pt2")')
EXPORT_HINT = f"export it with {EXPORT_CALL}"
MODEL = "model"  # the program torch.export.load returns
# Archive entries torch.export.load reads that hold nothing executable (AOTInductor libraries and
# the pickled layouts of older torch versions are left out on purpose).
_FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", f"models/{MODEL}.json",
                  f"data/sample_inputs/{MODEL}.pt", f"data/weights/{MODEL}_weights_config.json",
                  f"data/constants/{MODEL}_constants_config.json"}
_ENTRY_PREFIXES = ("data/weights/weight_", "data/constants/tensor_", ".data/", "extra/")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ATEN_OP = re.compile(r"torch\.ops\.(aten|prims)\.\w+\.\w+")
_CUSTOM_OP = re.compile(r"torch\.ops\.(\w+)\.(\w+)(\.\w+)?")
_PYTHON_OPS = {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                                 "pos", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
_PYTHON_OPS |= {f"math.{name}" for name in ("ceil", "floor", "sqrt", "trunc")}
_PYTHON_OPS |= {f"torch.{name}" for name in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite",
                                               "sym_sum", "_sym_sqrt")}
# The sympy names torch writes in a shape expression (srepr), e.g. Mul(Integer(2), Symbol('s0', positive=True)).
_EXPR_NAMES = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Mod", "Abs", "FloorDiv",
               "CeilDiv", "CleanDiv", "ModularIndexing", "PythonMod", "IntTrueDiv", "FloatTrueDiv", "ToFloat",
               "TruncToInt", "TruncToFloat", "RoundToInt", "CeilToInt", "FloorToInt", "Eq", "Ne", "Lt", "Le", "Gt",
               "Ge", "And", "Or", "Not", "true", "false", "True", "False", "oo", "positive", "negative", "integer",
               "nonnegative", "nonpositive", "real", "finite", "zero", "nonzero", "even", "odd"}
_EXPR_TOKEN = re.compile(r"\s+|'[A-Za-z_]\w*'|[A-Za-z_]\w*|\d{1,18}(\.\d{1,18})?|[-+*/(),=]")
_MAX_EXPR = 2000
FLOAT32 = 7  # torch._export.serde.schema.ScalarType.FLOAT
# BatchNorm operators by ATen name: the argument that says whether it normalises with batch
# statistics (True: always; False: never, i.e. eval mode with running statistics).
BATCH_NORM_OPS: dict[str, str | bool] = {
    "batch_norm.default": "training", "native_batch_norm.default": "training",
    "_native_batch_norm_legit_no_training.default": False, "_batch_norm_no_update.default": False,
    "_native_batch_norm_legit.default": "training", "_native_batch_norm_legit.no_stats": True,
    "_native_batch_norm_legit_functional.default": "training", "_batch_norm_with_update.default": True,
    "cudnn_batch_norm.default": "training", "miopen_batch_norm.default": "training",
}
BN_RANKS = (2, 3, 4)  # inputs of BatchNorm1d (N, C[, L]) and BatchNorm2d (N, C, H, W)


@dataclass(frozen=True)
class InputDim:
    """One dimension of the program's input: the example input's size, and the sizes it accepts."""

    size: int
    dynamic: bool
    low: int | None = None  # a dynamic size's range; None where the program states none (a derived size)
    high: int | None = None  # None: unbounded (or unknown)


@dataclass(frozen=True)
class ProgramFacts:
    """What the archive's JSON says about the program, read without running anything."""

    dims: tuple[InputDim, ...]
    input_dtype: int
    batch_norms: int  # eval-mode BatchNorm operators on 2-4-d inputs
    training_batch_norms: int  # BatchNorm operators that normalise with the batch's own statistics


def bad_program(path: Path, reason: str) -> DfkdError:
    """The one-line error for a file that is not a usable program."""
    return DfkdError(f"'{path}' is not a torch.export program dfkd can read: {reason}; {EXPORT_HINT}")


def vet_archive(path: Path) -> ProgramFacts:
    """:func:`vet_program` of the file at ``path``, cached by path, size and modification time (the
    race asks before the teacher is loaded; loading vets the bytes it loads again)."""
    stat = Path(path).stat()
    return _vet_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, Path(path))


@functools.lru_cache(maxsize=8)
def _vet_cached(resolved: str, size: int, mtime_ns: int, path: Path) -> ProgramFacts:
    return vet_program(Path(path).read_bytes(), path)


def vet_program(data: bytes, path: Path) -> ProgramFacts:
    """Check the archive ``data`` (read from ``path``) as the module docstring says; its facts."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            root = _check_entries(archive, path)
            _check_payloads(archive, root, path)
            _check_example_inputs(archive.read(f"{root}data/sample_inputs/{MODEL}.pt"), path)
            program = json.loads(archive.read(f"{root}models/{MODEL}.json"))
            if not isinstance(program, dict):
                raise bad_program(path, "its program JSON is not an object")
            return _check_program(program, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise bad_program(path, f"not a readable zip archive ({exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_program(path, f"its JSON is damaged ({exc.__class__.__name__})") from None
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise bad_program(path, f"its JSON lacks an expected field ({exc.__class__.__name__}: {exc})") from None


def _check_entries(archive: zipfile.ZipFile, path: Path) -> str:
    """The archive's root folder ("net/"), after checking every entry is one torch reads as data."""
    names = archive.namelist()
    if not names or "/" not in names[0]:
        raise bad_program(path, "the zip holds no archive folder")
    root = names[0].split("/", 1)[0] + "/"
    inner = [name.removeprefix(root) for name in names if name.startswith(root)]
    if len(inner) != len(names):
        raise bad_program(path, "its entries are not all in one archive folder")
    if "serialized_exported_program.json" in inner:
        raise bad_program(path, "it is in the pickle-based layout of torch 2.6 and older; re-save it with this torch")
    if any(name.startswith("data/aotinductor/") for name in inner):
        raise bad_program(path, "it holds AOTInductor compiled code (a shared library), which dfkd does not run")
    unknown = [name for name in inner if name not in _FIXED_ENTRIES and not name.startswith(_ENTRY_PREFIXES)]
    if unknown:
        raise bad_program(path, f"it holds entries dfkd does not read as plain data, e.g. '{unknown[0]}' "
                                "(several programs, pickled or compiled parts)")
    missing = sorted(_FIXED_ENTRIES - {"byteorder"} - set(inner))
    if missing:
        raise bad_program(path, f"it lacks '{missing[0]}'")
    if archive.read(f"{root}archive_format").strip() != b"pt2":
        raise bad_program(path, "its archive_format is not pt2")
    return root


def _check_payloads(archive: zipfile.ZipFile, root: str, path: Path) -> None:
    """Weights and constants: every one raw tensor bytes on the CPU (no pickle, no custom objects)."""
    for kind in ("weights", "constants"):
        config = json.loads(archive.read(f"{root}data/{kind}/{MODEL}_{kind}_config.json"))["config"]
        for fqn, payload in config.items():
            _check_fqn(fqn, path)
            file_name = str(payload["path_name"])
            if payload.get("use_pickle") or not file_name.startswith("weight_" if kind == "weights" else "tensor_"):
                raise bad_program(path, f"its {kind} entry '{fqn}' is pickled (a tensor subclass or a custom "
                                        "object), which dfkd does not unpickle")
            device = payload["tensor_meta"]["device"]["type"]
            if device != "cpu":
                raise bad_program(path, f"its tensor '{fqn}' was saved on {device}; move the model to the CPU "
                                        "(model.cpu()) before exporting")


def _check_example_inputs(data: bytes, path: Path) -> None:
    """torch.export.load retries example inputs that ``weights_only`` refuses without it: make sure
    that retry never happens (``weights_only`` loading runs no pickled code)."""
    import pickle

    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise bad_program(path, f"its example inputs hold objects that are not plain tensors "
                                f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None


def _check_program(program: dict[str, Any], path: Path) -> ProgramFacts:
    """Walk the program JSON, check every operator, name and expression, and read the facts."""
    module = program["graph_module"]
    graph = module["graph"]
    if graph.get("custom_obj_values"):
        raise bad_program(path, "it holds custom class objects, which need the code that defines them")
    _walk(program, path)
    for entry in module["module_call_graph"]:
        signature = entry.get("signature") or {}
        for name in signature.get("forward_arg_names") or []:
            _check_identifier(name, path)
    ranges = program.get("range_constraints") or {}
    for bounds in ranges.values():
        if not all(value is None or type(value) is int for value in (bounds.get("min_val"), bounds.get("max_val"))):
            raise bad_program(path, "a dynamic size has a range that is not whole numbers")
    tensor_name = _user_input(module["signature"], path)
    _user_output(module["signature"], path)
    meta = graph["tensor_values"][tensor_name]
    dims = tuple(_input_dim(size, ranges) for size in meta["sizes"])
    eval_bn, train_bn = _count_batch_norms(graph)
    return ProgramFacts(dims, int(meta["dtype"]), eval_bn, train_bn)


def _walk(node: Any, path: Path) -> None:
    """Check, anywhere in the JSON, operator targets, names used in generated code, attribute paths
    and shape expressions."""
    if isinstance(node, list):
        for item in node:
            _walk(item, path)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("target", "as_operator") and isinstance(value, str):
            _check_operator(value, path)
        elif key in ("name", "as_name") and isinstance(value, str):
            _check_identifier(value, path)
        elif key in ("parameter_name", "buffer_name", "tensor_constant_name") and isinstance(value, str):
            _check_fqn(value, path)
        elif key in ("custom_obj", "class_fqn", "as_custom_obj"):
            raise bad_program(path, "it uses custom class objects, which need the code that defines them")
        elif key == "expr_str":
            _check_expression(value, path)
        elif key == "fqn" and value != "":
            _check_fqn(value, path)
        elif key != "metadata":  # metadata: stack traces and module paths, kept as text by torch
            _walk(value, path)


def _check_operator(target: str, path: Path) -> None:
    if _ATEN_OP.fullmatch(target) or target in _PYTHON_OPS:
        return
    custom = _CUSTOM_OP.fullmatch(target)
    if custom and custom.group(1) == "higher_order":
        raise bad_program(path, f"it uses the higher-order operator {custom.group(2)} (control flow, or a no_grad "
                                "or autocast region inside forward), which dfkd does not run; export a model without it")
    if custom:
        raise bad_program(path, f"it calls the custom operator {custom.group(1)}::{custom.group(2)}, which needs the "
                                "code that defines it (dfkd runs no code from a teacher file); export a model made "
                                "of built-in PyTorch operators")
    raise bad_program(path, f"it calls '{target[:80]}', which is not a built-in ATen operator")


def _check_identifier(name: str, path: Path) -> None:
    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise bad_program(path, f"it names a value {name[:60]!r}, which is not a Python identifier")


def _check_fqn(fqn: str, path: Path) -> None:
    if not _FQN.fullmatch(fqn):
        raise bad_program(path, f"it names a weight or module {fqn[:60]!r}, which is not a dotted name")


def _check_expression(text: Any, path: Path) -> None:
    """A shape expression as torch writes it (sympy's srepr): torch ``sympify``s it, so only a fixed
    set of sympy names, symbol names quoted right after ``Symbol(``, small numbers and arithmetic."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR:
        raise bad_program(path, "a shape expression is not text of a sensible length")
    tokens: list[str] = []
    position = 0
    for match in _EXPR_TOKEN.finditer(text):
        if match.start() != position:
            break
        position = match.end()
        if not match.group().isspace():
            tokens.append(match.group())
    problem = position != len(text) or "**" in text
    for index, token in enumerate(tokens):
        if token.startswith("'"):
            problem |= tokens[max(0, index - 2):index] != ["Symbol", "("]
        elif token[0].isalpha() or token[0] == "_":
            problem |= token not in _EXPR_NAMES
    if problem:
        raise bad_program(path, f"a shape expression {text[:60]!r} is outside the grammar dfkd reads")


def _only_key(spec: dict[str, Any]) -> str:
    """The kind of a one-key union, e.g. {"user_input": {...}} -> "user_input"."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError("an input or output spec is not a one-key object")
    return next(iter(spec))


def _user_input(signature: dict[str, Any], path: Path) -> str:
    """The name of the one user input, a tensor (parameters, buffers and tensor constants aside)."""
    user = []
    for spec in signature["input_specs"]:
        kind = _only_key(spec)
        body = spec[kind]
        if kind == "user_input":
            user.append(body["arg"])
        elif kind not in ("parameter", "buffer", "tensor_constant"):
            raise bad_program(path, f"it takes a {kind.replace('_', ' ')} input; dfkd feeds a program one image tensor")
    if len(user) != 1 or "as_tensor" not in user[0]:
        raise bad_program(path, f"it takes {len(user)} user inputs; dfkd feeds a program exactly one image tensor, "
                                "(x,)")
    return str(user[0]["as_tensor"]["name"])


def _user_output(signature: dict[str, Any], path: Path) -> None:
    """One output, a tensor (the logits); a program that updates buffers ran in training mode."""
    kinds = [_only_key(spec) for spec in signature["output_specs"]]
    if any(kind != "user_output" for kind in kinds):
        raise bad_program(path, "it updates its own buffers or parameters when run (exported in training mode?); "
                                "call model.eval() before exporting")
    if len(kinds) != 1 or "as_tensor" not in signature["output_specs"][0]["user_output"]["arg"]:
        raise bad_program(path, f"it returns {len(kinds)} values; dfkd needs a program that returns one logits tensor")


_SYMBOL = re.compile(r"Symbol\('(\w+)'[^()]*\)")


def _input_dim(size: dict[str, Any], ranges: dict[str, Any]) -> InputDim:
    if "as_int" in size:
        return InputDim(int(size["as_int"]), dynamic=False)
    expression = size["as_expr"]
    hint = (expression.get("hint") or {}).get("as_int")
    symbol = _SYMBOL.fullmatch(expression["expr_str"])
    bounds = ranges.get(symbol.group(1)) if symbol else None
    if hint is None:
        raise ValueError("a dynamic input size has no example value")
    if bounds is None:
        return InputDim(int(hint), dynamic=True)
    return InputDim(int(hint), dynamic=True, low=bounds.get("min_val"), high=bounds.get("max_val"))


def _count_batch_norms(graph: dict[str, Any]) -> tuple[int, int]:
    """(eval-mode BatchNorm operators on 2-4-d inputs, BatchNorm operators using batch statistics)."""
    eval_count = train_count = 0
    for node in graph["nodes"]:
        name = node["target"].removeprefix("torch.ops.aten.")
        if name not in BATCH_NORM_OPS:
            continue
        arguments = {item["name"]: item["arg"] for item in node["inputs"]}
        if batch_statistics(name, {key: value.get("as_bool") for key, value in arguments.items()}):
            train_count += 1
            continue
        source = arguments["input"]["as_tensor"]["name"]
        eval_count += len(graph["tensor_values"][source]["sizes"]) in BN_RANKS
    return eval_count, train_count


def batch_statistics(op_name: str, arguments: dict[str, Any]) -> bool:
    """Whether the BatchNorm operator ``op_name`` ("batch_norm.default") normalises with the batch's
    own statistics, given its arguments by name."""
    rule = BATCH_NORM_OPS[op_name]
    return rule if isinstance(rule, bool) else bool(arguments.get(rule))
