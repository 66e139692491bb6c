"""A ``torch.export`` program (``.pt2``, written by ``torch.export.save``) as the teacher.

The program carries its own architecture and weights, so any model that exports works, and
loading it runs no code from the file (see :mod:`dfkd_cli.program_archive`, which vets the
archive before torch reads it). The input shape comes from the program's example input (the batch
dimension must be dynamic); the normalisation is not recorded in a program, so ImageNet's is
assumed and the plan says so. A program is a flat graph of operators, so two of them become real
modules again: each eval-mode BatchNorm operator becomes an ``nn.BatchNorm1d/2d`` holding the same
weights and running statistics (the BatchNorm recipes hook those), and a final linear layer becomes
an ``nn.Linear`` (recipes that read the penultimate features hook its input).

Example:
    >>> teacher = load_program_teacher(Path("net.pt2"), None, None, None, None, None)
    >>> teacher.arch, teacher.input_shape, teacher.bn_layers
    ('program:net', (3, 32, 32), ['bn1', 'layer1.0.bn1', ...])
"""

from __future__ import annotations

import hashlib
import io
import logging
import operator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from dfkd_cli import validate
from dfkd_cli.archs import NORMALIZE_PRESETS, format_shape
from dfkd_cli.errors import DfkdError
from dfkd_cli.program_archive import (
    EXPORT_CALL,
    BATCH_NORM_OPS,
    BN_RANKS,
    FLOAT32,
    ProgramFacts,
    bad_program,
    batch_statistics,
    vet_archive,
    vet_program,
)
from dfkd_cli.teacher import PROBE_INPUTS, Teacher, read_labels, resolve_normalization

DEFAULT_NORMALIZE = "imagenet"  # a program records no normalisation (see load_program_teacher)
_BN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ProgramBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm operator of a program as a module; always in eval mode, as the program is."""

    def train(self, mode: bool = True) -> ProgramBatchNorm1d:
        return super().train(False)


class ProgramBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm operator of a program as a module; always in eval mode, as the program is."""

    def train(self, mode: bool = True) -> ProgramBatchNorm2d:
        return super().train(False)


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise DfkdError(f"teacher program '{path}' {what}; pass a .pt2 file written by torch.export.save")
    return path


def program_has_bn(path: Path) -> bool:
    """Whether the program has eval-mode BatchNorm operators the teacher will hook (read from the
    archive's JSON, cached: the race asks before the teacher is loaded)."""
    return vet_archive(_existing(path)).batch_norms > 0


def load_program_teacher(path: Path, input_shape: tuple[int, int, int] | None, normalize: str | None,
                         mean: list[float] | None, std: list[float] | None, labels: Path | None) -> Teacher:
    """The program at ``path`` as a frozen, eval-mode teacher.

    The normalisation defaults to ImageNet's: a program does not record it, ImageNet statistics are
    what exported image classifiers (torchvision, timm) mostly expect, and refusing to start without
    flags would make every program need them even to be inspected. ``stats_note`` says it was assumed
    and how to set the right one (``--mean 0 --std 1`` for a program that normalises its own input).
    """
    path = _existing(path)
    data = path.read_bytes()  # vetted and loaded from the same bytes, whatever happens to the file meanwhile
    facts = vet_program(data, path)
    _check_signature(facts, path)
    shape = _input_shape(facts, input_shape, path)
    mean_t, std_t = resolve_normalization(normalize, mean, std, shape[0], DEFAULT_NORMALIZE)
    model = load_program_module(data, path)
    contiguous_input(model)
    follow_input_device(model)
    install_batch_norm_modules(model)
    classifier = install_classifier(model)
    model.eval().requires_grad_(False)
    num_classes = _probe(model, shape, mean_t, std_t, path)
    class_names = read_labels(labels, num_classes) if labels is not None else [str(i) for i in range(num_classes)]
    sha = hashlib.sha256(data).hexdigest()
    return Teacher(
        model=model, arch=f"program:{path.stem}", num_classes=num_classes, input_shape=shape, mean=mean_t, std=std_t,
        class_names=class_names, sha256=sha, path=str(path), source={"kind": "program", "sha256": sha},
        default_student=program_student(shape), shape_note=_shape_note(facts, shape), stats_note=_stats_note(shape),
        classifier=classifier,
    )


def program_student(shape: tuple[int, int, int]) -> str:
    """A registered student by input size: LeNet-5-half for 1x32x32 (the MNIST setting of the
    literature), the CIFAR ResNet-8 up to 64 px, MobileNetV3-small above."""
    if shape == (1, 32, 32):
        return "lenet5_half"
    return "resnet8" if max(shape[1:]) <= 64 else "mobilenet_v3_small"


def _check_signature(facts: ProgramFacts, path: Path) -> None:
    """One float32 (batch, channels, height, width) input with a dynamic batch; no batch statistics."""
    if len(facts.dims) != 4:
        raise bad_program(path, f"it takes a {len(facts.dims)}-d input; dfkd feeds images as (batch, channels, "
                                "height, width)")
    if facts.input_dtype != FLOAT32:
        raise bad_program(path, "its input is not float32; export it with a float32 example input")
    batch = facts.dims[0]
    if not batch.dynamic:
        raise DfkdError(f"program '{path}' was exported with a fixed batch size of {batch.size}, and dfkd runs the "
                        f"teacher on batches of other sizes; export it with a dynamic batch: {EXPORT_CALL}")
    if (batch.low or 0) > 2 or batch.high is not None:
        span = f"{batch.low} to {batch.high if batch.high is not None else 'any'}"
        raise DfkdError(f"program '{path}' accepts batches of {span} samples only, and dfkd runs the teacher on "
                        f"batches of any size; export it with an unbounded batch: {EXPORT_CALL}")
    if facts.training_batch_norms:
        raise DfkdError(f"program '{path}' normalises with the statistics of each batch ({facts.training_batch_norms} "
                        "BatchNorm operator(s) in training mode), so its outputs depend on the rest of the batch; "
                        "call model.eval() before torch.export.export and save it again")


def _input_shape(facts: ProgramFacts, given: tuple[int, int, int] | None, path: Path) -> tuple[int, int, int]:
    """The example input's (C, H, W), or ``given`` when the program accepts it."""
    example = (facts.dims[1].size, facts.dims[2].size, facts.dims[3].size)
    if given is None:
        return example
    for label, size, dim in zip(("channels", "height", "width"), given, facts.dims[1:], strict=True):
        fits = (size == dim.size if not dim.dynamic
                else (dim.low is None or size >= dim.low) and (dim.high is None or size <= dim.high))
        if not fits:
            accepted = str(dim.size) if not dim.dynamic else f"{dim.low} to {dim.high or 'any'}"
            raise DfkdError(f"--input-shape {format_shape(given)} has {size} {label} but program '{path}' takes "
                            f"{accepted}; pass --input-shape {format_shape(example)} (its example input) or leave it out")
    return given


def _shape_note(facts: ProgramFacts, shape: tuple[int, int, int]) -> str:
    if any(dim.dynamic for dim in facts.dims[1:]):
        return (f"the program's example input, {format_shape(shape)}; it accepts other sizes: set --input-shape CxHxW "
                "to the size the teacher was trained on")
    return f"fixed by the program: {format_shape(shape)}"


def _stats_note(shape: tuple[int, int, int]) -> str:
    averaged = " averaged over its 3 channels" if shape[0] == 1 else ""
    presets = ", ".join(NORMALIZE_PRESETS)
    return (f"ASSUMED: a .pt2 program records no normalisation, so ImageNet mean/std{averaged}; set --normalize "
            f"({presets}) or --mean/--std to the teacher's training normalisation (--mean 0 --std 1 if the program "
            "normalises its own input)")


def load_program_module(data: bytes, path: Path) -> fx.GraphModule:
    """The program as a plain ``fx.GraphModule`` (which, unlike ``ExportedProgram.module()``, allows
    ``.eval()``), without guard code (``check_guards=False``: torch would ``exec`` guards read from
    the file; dfkd checks the input shape itself). Call only on ``data`` that passed :func:`vet_program`."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch logs a traceback for a damaged archive before raising
    try:
        program = torch.export.load(io.BytesIO(data))
        unlifted = program.module(check_guards=False)
    except Exception as exc:  # noqa: BLE001 - torch's deserializer raises many types for a damaged archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise bad_program(path, f"torch cannot read it ({type(exc).__name__}: {first})") from None
    finally:
        logging.disable(previous)
    return fx.GraphModule(unlifted, unlifted.graph)


@torch.no_grad()
def _probe(model: nn.Module, shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
           path: Path) -> int:
    """The number of classes, from the program's output on a few random normalised inputs (which
    must be one finite (batch, classes) tensor that differs between inputs)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(PROBE_INPUTS, *shape, generator=generator)
    x = (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    try:
        outputs = model(x)
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DfkdError(f"program '{path}' fails on a {format_shape((PROBE_INPUTS, *shape))} input: {first}; check "
                        "--input-shape (or leave it out to use the program's example input)") from None
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[0] != PROBE_INPUTS:
        got = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise DfkdError(f"program '{path}' returns {got} for a batch of {PROBE_INPUTS}; dfkd needs a program that "
                        "returns one (batch, classes) logits tensor")
    validate.num_classes(outputs.shape[1], f"program '{path}' output width",
                         "dfkd distils classifiers with at least 2 classes")
    validate.distinct_finite_outputs(outputs.float(), f"program '{path}'",
                                     "check that the program was exported from the trained model (and its --mean/--std)")
    return int(outputs.shape[1])


def contiguous_input(model: fx.GraphModule) -> None:
    """Make the program read its input in the standard (NCHW) layout: its ``view`` operators were
    traced on contiguous tensors and fail on the activations of the channels_last images dfkd's
    trainer and generators feed. (``channels_last(model)`` leaves a program's weights as they are:
    it has no ``nn.Conv2d`` module.)"""
    graph = model.graph
    placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(placeholder):
        contiguous = graph.call_method("contiguous", (placeholder,))
    placeholder.replace_all_uses_with(contiguous, delete_user_cb=lambda user: user is not contiguous)
    model.recompile()


def follow_input_device(model: fx.GraphModule) -> int:
    """Make tensors the program creates (``torch.zeros(..., device=x.device)`` was recorded as the
    export's device, the CPU) follow the input's device, so the teacher runs wherever it is moved;
    return how many operators were changed."""
    graph = model.graph
    placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    creators = [node for node in graph.nodes
                if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device)]
    if creators:
        with graph.inserting_after(placeholder):
            device = graph.call_function(getattr, (placeholder, "device"))
        for node in creators:
            node.update_kwarg("device", device)
        model.recompile()
    return len(creators)


# --- turning operators back into modules ----------------------------------------------------------


def _named_arguments(node: fx.Node) -> dict[str, Any]:
    """An ATen call's arguments by schema name."""
    names = [argument.name for argument in node.target._schema.arguments]  # type: ignore[union-attr]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _attribute(model: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads; None for a None argument; raises LookupError otherwise."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError("computed in the graph")
    holder, _, name = str(node.target).rpartition(".")
    return getattr(model.get_submodule(holder), name)


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _place(model: fx.GraphModule, module: nn.Module, attribute: str, fallback: str, names: tuple[str, ...]) -> str:
    """Put ``module`` where the program's own module was (``attribute`` is one of its tensors, e.g.
    "layer1.0.bn1.weight") when that module held nothing but ``names``; else under a new name."""
    holder_path = attribute.rpartition(".")[0]
    if holder_path:
        holder = model.get_submodule(holder_path)
        held = [name for name, _ in holder.named_parameters(recurse=False)]
        held += [name for name, _ in holder.named_buffers(recurse=False)]
        if not list(holder.children()) and set(held) <= set(names):
            parent, _, leaf = holder_path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module)
            return holder_path
    name = fallback
    while hasattr(model, name):
        name += "_"
    model.add_module(name, module)
    return name


def _replace(model: fx.GraphModule, node: fx.Node, path: str, source: fx.Node, tuple_output: bool) -> None:
    """Replace the call ``node`` (or, for an operator returning a tuple, its ``[0]``) by a call of the
    module at ``path`` on ``source``; drop the attribute reads left unused."""
    graph = model.graph
    with graph.inserting_before(node):
        call = graph.call_module(path, (source,))
    users = list(node.users) if tuple_output else [node]
    call.meta = dict(users[0].meta) if users else dict(node.meta)
    for user in users:
        user.replace_all_uses_with(call)
        if user is not node:
            graph.erase_node(user)
    graph.erase_node(node)
    for unused in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(unused)


def install_batch_norm_modules(model: fx.GraphModule) -> list[str]:
    """Replace every eval-mode BatchNorm operator on a 2-4-d input whose weights the graph reads
    directly by a call of a :class:`ProgramBatchNorm1d`/:class:`ProgramBatchNorm2d` holding the same
    tensors; return their paths. Outputs are unchanged (the module runs the same operator)."""
    paths = []
    for node in list(model.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        op_name = target.__name__
        if op_name not in BATCH_NORM_OPS:
            continue
        arguments = _named_arguments(node)
        source = arguments["input"]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        tuple_output = op_name != "batch_norm.default"
        if (batch_statistics(op_name, arguments) or not isinstance(value, torch.Tensor) or value.dim() not in BN_RANKS
                or (tuple_output and any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users))):
            continue
        try:
            weight, bias, mean, var = (_attribute(model, arguments[k]) for k in _BN_NAMES[:4])
        except LookupError:
            continue
        numbers = all(type(arguments.get(k)) in (int, float) for k in ("eps", "momentum"))
        if mean is None or var is None or (weight is None) != (bias is None) or not numbers:
            continue
        kind = ProgramBatchNorm2d if value.dim() == 4 else ProgramBatchNorm1d
        module = kind(mean.numel(), eps=float(arguments["eps"]), momentum=float(arguments["momentum"]),
                      affine=weight is not None)
        if weight is not None and bias is not None:
            module.weight, module.bias = _as_parameter(weight), _as_parameter(bias)
        module.running_mean, module.running_var = mean, var
        path = _place(model, module, arguments["running_mean"].target, node.name, _BN_NAMES)
        _replace(model, node, path, source, tuple_output)
        paths.append(path)
    model.graph.lint()
    model.recompile()
    return paths


def _final_linear(model: fx.GraphModule) -> tuple[fx.Node, fx.Node, Any, Any] | None:
    """(call, features, weight node, bias node) when the program's one output is a linear layer:
    ``linear(x, w, b)``, or ``addmm(b, x, t(w))`` as core ATen writes it."""
    output = next(node for node in model.graph.nodes if node.op == "output")
    results = output.args[0]
    result = results[0] if isinstance(results, (tuple, list)) and len(results) == 1 else results
    if not isinstance(result, fx.Node) or result.op != "call_function" or len(result.users) != 1:
        return None
    if result.target is torch.ops.aten.linear.default:
        arguments = _named_arguments(result)
        return result, arguments["input"], arguments["weight"], arguments.get("bias")
    if result.target is torch.ops.aten.addmm.default and not result.kwargs:
        bias, features, transposed = result.args[:3]
        flips = (torch.ops.aten.t.default, torch.ops.aten.permute.default)
        if (isinstance(transposed, fx.Node) and transposed.target in flips and len(transposed.users) == 1
                and (transposed.target is torch.ops.aten.t.default or list(transposed.args[1]) == [1, 0])):
            return result, features, transposed.args[0], bias
    return None


def install_classifier(model: fx.GraphModule) -> str | None:
    """Replace the program's final linear layer, when there is one reading its weights directly,
    by a call of an ``nn.Linear`` holding them; return its path (the teacher's classifier)."""
    found = _final_linear(model)
    if found is None:
        return None
    call, features, weight_node, bias_node = found
    try:
        weight, bias = _attribute(model, weight_node), _attribute(model, bias_node)
    except LookupError:
        return None
    if weight is None or weight.dim() != 2:
        return None
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    module.weight = _as_parameter(weight)
    if bias is not None:
        module.bias = _as_parameter(bias)
    path = _place(model, module, str(weight_node.target), "classifier", ("weight", "bias"))
    transposed = call.args[2] if call.target is torch.ops.aten.addmm.default else None
    _replace(model, call, path, features, tuple_output=False)
    if isinstance(transposed, fx.Node) and not transposed.users:
        model.graph.erase_node(transposed)
        for unused in [n for n in model.graph.nodes if n.op == "get_attr" and not n.users]:
            model.graph.erase_node(unused)
    model.graph.lint()
    model.recompile()
    return path
