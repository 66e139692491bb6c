"""Reading state dicts from ``.pt`` / ``.pth`` / ``.bin`` and ``.safetensors`` files, safely.

PyTorch files are read with ``torch.load(weights_only=True)``, which runs no pickled code; a file
that needs pickled code (a whole saved ``nn.Module``) is refused unless ``trust_pickle`` is set.
Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and the
``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes stripped. The per-module
format versions a PyTorch state dict records (its ``_metadata``) are kept: some modules need them
to load (:func:`with_module_versions`).

Example:
    >>> state = read_state_dict(Path("teacher.pt"))
    >>> sorted(state)[:2]
    ['bn1.bias', 'bn1.num_batches_tracked']
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy
import safetensors.torch
import torch
from torch import nn

from dfkd_cli.errors import DfkdError, shown

NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Leading bytes of files that get passed for weights by mistake, and what to call them.
_FOREIGN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x89HDF", "an HDF5 file (Keras or TensorFlow weights?)"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"version https://git-lfs", "a Git LFS pointer (run git lfs pull to fetch the weights)"),
)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks.

    Example:
        >>> sha256_file(Path("teacher.pt"))[:12]
        '3f1c0e9ab2d4'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path`` as a flat ``{name: tensor}`` dict on the CPU.

    Example:
        >>> read_state_dict(Path("model.safetensors"))["fc.weight"].shape
        torch.Size([10, 64])
    """
    path = Path(path)
    _check_file(path)
    if _looks_like_safetensors(path):
        raw: Any = _load_safetensors(path)
    else:
        raw = _load_torch(path, trust_pickle)
    source = _tensor_source(_unwrap(raw))
    if source is None:
        raise DfkdError(
            f"checkpoint '{path}' contains no tensors{_describe_keys(raw)}; "
            "save the weights with torch.save(model.state_dict(), PATH)"
        )
    state: OrderedDict[str, torch.Tensor] = OrderedDict(
        (_strip_prefixes(str(key)), value) for key, value in source.items() if isinstance(value, torch.Tensor)
    )
    state._metadata = _module_versions(getattr(source, "_metadata", None))  # type: ignore[attr-defined]
    return state


def with_module_versions(model: nn.Module, state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A copy of ``state`` whose ``_metadata`` gives every module of ``model`` a format version.

    ``load_state_dict`` passes each module the version its weights were saved with, and some
    modules need it to read them (torchvision's MNASNet refuses a missing one; BatchNorm and ViT's
    MLP block read a missing one as the oldest format). A version the file recorded is kept; a
    module it says nothing about (safetensors files and rebuilt dicts record none) is taken to be
    in the model's own, current format.

    Example:
        >>> model.load_state_dict(with_module_versions(model, read_state_dict(Path("m.safetensors"))))
    """
    recorded = getattr(state, "_metadata", None) or {}
    filled: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    filled._metadata = {  # type: ignore[attr-defined]
        name: {"version": recorded.get(name, {}).get("version", module._version)}
        for name, module in model.named_modules()
    }
    return filled


def _module_versions(metadata: Any) -> dict[str, dict[str, int]]:
    """The per-module ``{"version": int}`` entries of a state dict's ``_metadata``, their names with
    the prefixes :func:`_strip_prefixes` removes from keys stripped too. A wrapper's own entry
    ("" of a DataParallel) gives way to the wrapped model's ("module")."""
    if not isinstance(metadata, Mapping):
        return {}
    versions: dict[str, dict[str, int]] = {}
    names = sorted((str(name) for name in metadata), key=lambda name: _strip_prefixes(name + ".") != name + ".")
    for name in names:
        entry = metadata[name]
        version = entry.get("version") if isinstance(entry, Mapping) else None
        if isinstance(version, int) and not isinstance(version, bool):
            versions[_strip_prefixes(name + ".")[:-1]] = {"version": version}
    return versions


def _check_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        found = f" (found there: {', '.join(inside[:5])})" if inside else ""
        raise DfkdError(f"checkpoint '{path}' is a directory; pass the weights file inside it{found}")
    if not path.exists():
        raise DfkdError(f"checkpoint '{path}' {why_missing(path)}")
    if path.stat().st_size == 0:
        raise DfkdError(f"checkpoint '{path}' is empty (0 bytes); re-save or re-download it")
    if not os.access(path, os.R_OK):
        raise DfkdError(f"checkpoint '{path}' is not readable (permission denied); check its permissions")


def why_missing(path: Path) -> str:
    """Why ``path`` cannot be opened although given, with the fix: a symbolic link loop, a link to
    nothing, or plainly not there."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (its links lead back to themselves); point the link at the file"
        if os.path.islink(path):
            return f"is a broken symbolic link (to '{os.readlink(path)}', which does not exist); fix the link"
    return "not found; check the path"


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length and a JSON object.

    A damaged ``.safetensors`` file goes to the safetensors reader too (its errors say more), but
    not a PyTorch file under that name: a zip, or a legacy pickle (PROTO opcode first).
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{":
        return True
    return path.suffix == ".safetensors" and not head.startswith((b"PK", b"\x80"))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # the Rust SafetensorError and I/O errors alike
        raise DfkdError(_unreadable(path, exc)) from exc


def _data_only_globals() -> list[Any]:
    """Classes that training scripts store next to the weights and that build data, not code.

    NumPy scalars and arrays (``best_acc1``) and ``argparse.Namespace`` (``args``) would otherwise
    make ``weights_only`` refuse the whole checkpoint.
    """
    multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
    allowed: list[Any] = [argparse.Namespace, numpy.ndarray, numpy.dtype]
    for name in ("_reconstruct", "scalar"):
        function = getattr(multiarray, name)
        allowed += [function, (function, f"numpy.core.multiarray.{name}")]  # NumPy 1.x name
    dtypes = getattr(numpy, "dtypes", None)  # NumPy >= 1.25
    allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    return allowed


def _load_torch(path: Path, trust_pickle: bool) -> Any:
    try:
        # A file object, not the path: torch.load reads any path ending in .safetensors as safetensors.
        with open(path, "rb") as handle, warnings.catch_warnings(), \
                torch.serialization.safe_globals(_data_only_globals()):
            warnings.simplefilter("ignore")  # torch warns about the very cases reported below
            return torch.load(handle, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch.load raises many types on foreign or damaged files
        text = str(exc)
        if "TorchScript" in text:
            raise DfkdError(
                f"checkpoint '{path}' is a TorchScript archive; re-save the model as a state dict "
                "(torch.save(model.state_dict(), ...)) or pass --trust-pickle to read it with torch.jit"
            ) from exc
        if not trust_pickle and "Weights only load failed" in text and _holds_valid_pickle(path):
            raise DfkdError(
                f"checkpoint '{path}' needs pickled code to load, which can run arbitrary code; "
                "re-save it as a state dict (torch.save(model.state_dict(), ...)) "
                "or pass --trust-pickle if you trust its source"
            ) from exc
        raise DfkdError(_unreadable(path, exc)) from exc


def _unreadable(path: Path, exc: BaseException) -> str:
    foreign = _foreign_content(path)
    if foreign:
        return (f"checkpoint '{path}' is {foreign}, not a PyTorch or safetensors checkpoint; "
                "pass the model's weights file (.pt, .pth, .bin or .safetensors)")
    text = str(exc).strip()
    reason = text.split(". ")[0].splitlines()[0][:100] if text else ""
    if "Weights only load failed" in text or isinstance(exc, KeyError) or len(reason) < 12:
        reason = "unrecognised content"
    return (
        f"checkpoint '{path}' is not a readable PyTorch or safetensors file ({reason}); "
        "it may be truncated or corrupted: re-save or re-download it"
    )


def _foreign_content(path: Path) -> str | None:
    """What the file is when its first bytes say it is no checkpoint at all (an image, text, ...)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return name
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:  # binary, or a multi-byte character cut at 512 bytes: say nothing
        return None
    if not all(c.isprintable() or c.isspace() for c in text):
        return None
    if text.lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download?)"
    return "JSON text" if text.startswith(("{", "[")) else "a text file"


def _holds_valid_pickle(path: Path) -> bool:
    """Whether the file is a well-formed pickle (legacy torch) or a torch zip with one inside.

    Tells a checkpoint that ``weights_only`` refuses apart from random or damaged bytes.
    """
    if _is_zip(path):
        try:
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return member is not None and _is_pickle(archive.read(member))
        except Exception:  # a damaged zip raises BadZipFile, UnicodeDecodeError, zlib.error, EOFError, ...
            return False
    with open(path, "rb") as handle:
        return _is_pickle(handle.read(1 << 20))


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # is_zipfile itself raises BadZipFile on some damaged end records
        return False


def _is_pickle(data: bytes) -> bool:
    if not data.startswith(b"\x80"):  # PROTO opcode: every pickle torch writes starts with it
        return False
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:  # genops raises ValueError on bad opcodes and others on short data
        return False
    return True


def _unwrap(obj: Any) -> Any:
    """Follow ``state_dict`` / ``model`` / ... nesting down to the dict of tensors."""
    for _ in range(4):
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            return obj
        nested = next(
            (obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None
        )
        if nested is None:
            return obj
        obj = nested
    return obj


def _tensor_source(obj: Any) -> Mapping[Any, Any] | None:
    """``obj`` when it holds tensors (its other entries are skipped); failing that, its only
    sub-dict made of tensors; else None."""
    if not isinstance(obj, Mapping):
        return None
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    candidates = [
        v for v in obj.values()
        if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
    ]
    return candidates[0] if len(candidates) == 1 else None


def _describe_keys(obj: Any) -> str:
    if isinstance(obj, Mapping) and obj:
        keys = [shown(str(k), 40, quote=False) for k in list(obj)[:5]]
        return f" (top-level keys: {', '.join(keys)}{', ...' if len(obj) > 5 else ''})"
    return f" (it holds a {type(obj).__name__})"


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key
