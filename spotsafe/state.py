"""Live training objects <-> a plain tree of tensors and JSON values, with no pickle.

:func:`flatten` turns what a caller hands to ``Checkpointer.save`` (modules,
optimizers, schedulers, ``GradScaler``, :class:`RNGState`, nested dicts and lists
of tensors and plain values) into

- a JSON-able *tree* in which every tensor is replaced by ``{"T": "tensor", "id": i}``,
- a *tensor table* (dtype, shape, strides, storage offset, device) and
- a list of *blobs*: one byte range per distinct storage, so two names for one
  storage (tied weights, views) come back as views of one storage.

:func:`unflatten` builds the tree again from the JSON and one byte buffer per
blob (``torch.frombuffer``; no pickle, no code from the checkpoint ever runs).

Plain values allowed: None, bool, int, float (incl. nan/inf), str, list, tuple,
dict / OrderedDict with str, int, float, bool, None or tuple keys (key types
are kept: optimizer state uses int keys), torch.Size, torch.dtype,
torch.device, NumPy arrays and scalars, and tensors of every dense dtype.
Anything else raises :class:`spotsafe.errors.StateError` naming its key path.
"""

from __future__ import annotations

import enum
import functools
import math
import random
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from spotsafe.errors import CheckpointCorrupt, SpotsafeError, StateError, StateMismatch

#: Every blob starts at a multiple of this in the data file (and in the snapshot
#: buffer): enough for any dtype and for cache-line aligned copies.
ALIGN = 64
# A blob's start inside its storage is rounded down to this, so every view of
# the storage keeps an offset that is a multiple of its own item size.
_STORAGE_ALIGN = 16
#: How deeply containers may nest in a saved state (each dict, list or tuple is a level).
#: Checked at save (StateError) and at load (CheckpointCorrupt): no recursion limit is ever hit.
MAX_DEPTH = 100
#: Most dimensions a saved tensor may have (torch allows 64), and the largest size or stride claimed.
MAX_DIMS = 64
_MAX_DIM = 1 << 48
#: Ints with more bits than this are saved as hex ({"T": "int"}): Python refuses to print
#: (and JSON to read) decimal ints of over 4,300 digits.
_BIG_INT_BITS = 13_000
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_device_name = functools.lru_cache(maxsize=256)(str)  # str(torch.device) costs 0.4 us: once per device


@functools.cache  # once per dtype, as the device's name: a save names every tensor's
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object, where: str) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) and len(name) <= 64 else None
    if not isinstance(value, torch.dtype):
        raise CheckpointCorrupt(f"{where}: unknown dtype {str(name)[:80]!r}")
    return value


@dataclass(frozen=True)
class Blob:
    """One byte range of one storage: ``nbytes`` bytes at ``offset`` in the data file."""

    offset: int
    nbytes: int


@dataclass
class FlatState:
    """The result of :func:`flatten`: JSON-able description plus the tensors' bytes to copy.

    ``sources[i]`` is a flat ``uint8`` tensor (any device) holding blob ``i``'s
    bytes; the snapshot copies it into ``blobs[i].offset`` of a CPU buffer.
    """

    tree: Any
    tensors: list[dict[str, Any]]
    blobs: list[Blob]
    sources: list[torch.Tensor] = field(repr=False)
    nbytes: int  # size of the data file: end of the last blob, aligned

    def description(self) -> dict[str, Any]:
        """What goes into the tree file (JSON)."""
        return {
            "tree": self.tree,
            "tensors": self.tensors,
            "blobs": [[b.offset, b.nbytes] for b in self.blobs],
            "nbytes": self.nbytes,
        }


def _path(parent: str, key: object) -> str:
    try:
        text = str(key)
    except ValueError:  # an int too long to print in decimal
        text = f"<{type(key).__name__} too long to print>"
    return f"{parent}.{text}" if parent else text


def to_plain(obj: Any) -> Any:
    """Replace every object with a ``state_dict()`` by that state dict (recursively).

    Raises :class:`StateError` for what would not come back as it went in: a reference
    cycle, nesting deeper than :data:`MAX_DEPTH`, a dict subclass (``defaultdict``,
    ``Counter``: only ``dict`` and ``OrderedDict`` keep their type).
    """
    return _to_plain(obj, "", 0, set())


def _to_plain(obj: Any, path: str, depth: int, active: set[int]) -> Any:
    where = path or "<root>"
    if depth > MAX_DEPTH:
        raise StateError(f"{where}: the state is nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, torch.Tensor):
        return obj
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, type):
        if id(obj) in active:
            raise StateError(f"{where}: a reference cycle (the object contains itself)")
        active.add(id(obj))
        try:
            return _to_plain(state_dict(), path, depth, active)
        finally:
            active.discard(id(obj))
    container = isinstance(obj, (Mapping, list)) or (isinstance(obj, tuple) and not isinstance(obj, torch.Size))
    if not container:
        return obj
    if id(obj) in active:
        raise StateError(f"{where}: a reference cycle (the container contains itself)")
    active.add(id(obj))
    try:
        if isinstance(obj, Mapping):
            if depth > 0 and type(obj) not in (dict, OrderedDict):
                raise StateError(
                    f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} would come back as a plain dict "
                    "(only dict and OrderedDict keep their type): save dict(...) of it instead"
                )
            out = {k: _to_plain(v, _path(path, k), depth + 1, active) for k, v in obj.items()}
            if isinstance(obj, OrderedDict):
                od: OrderedDict[Any, Any] = OrderedDict(out)
                meta = getattr(obj, "_metadata", None)
                if meta is not None:
                    od._metadata = meta  # type: ignore[attr-defined]
                return od
            return out
        if type(obj) is list:
            return [_to_plain(v, _path(path, i), depth + 1, active) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(_to_plain(v, _path(path, i), depth + 1, active) for i, v in enumerate(obj))
        raise StateError(
            f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} (a list or tuple subclass) would not come "
            "back as one: save a plain list or tuple instead"
        )
    finally:
        active.discard(id(obj))


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[dict[str, Any]] = []
        self.blob_ranges: list[list[int]] = []  # [start, end] byte range in the storage
        self.blob_storages: list[torch.Tensor] = []  # a tensor on the storage (keeps it alive)
        self.by_storage: dict[tuple[str, int], int] = {}
        self.keep: list[torch.Tensor] = []

    # -- values -------------------------------------------------------------
    def value(self, obj: Any, path: str, depth: int = 0) -> Any:
        if type(obj) in (torch.nn.Parameter, torch.Tensor):  # the bulk of a state: first
            return {"T": "tensor", "id": self.tensor(obj, path)}
        where = path or "<root>"
        if depth > MAX_DEPTH:
            raise StateError(f"{where}: the state is nested deeper than {MAX_DEPTH} levels")
        if type(obj).__module__ == "numpy":  # before float/int: np.float64 subclasses float
            return self.numpy_value(obj, path, depth)
        if obj is None or type(obj) in (bool, str):
            return obj
        if type(obj) is int:
            if obj.bit_length() > _BIG_INT_BITS:
                return {"T": "int", "v": hex(obj)}
            return obj
        if type(obj) is float:
            if math.isfinite(obj):
                return obj
            return {"T": "float", "v": repr(obj)}
        if isinstance(obj, enum.Enum):
            raise StateError(
                f"{where}: the enum member {obj!r} would come back as a plain value: save its .value or .name"
            )
        if isinstance(obj, (int, float, str)):
            base = next(t for t in (bool, int, float, str) if isinstance(obj, t))
            raise StateError(
                f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} would come back as a plain "
                f"{base.__name__}: save {base.__name__}(...) of it instead"
            )
        if isinstance(obj, torch.Tensor):
            return {"T": "tensor", "id": self.tensor(obj, path)}
        if isinstance(obj, torch.Size):
            return {"T": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, torch.dtype):
            return {"T": "dtype", "v": _dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {"T": "device", "v": str(obj)}
        if type(obj) in (dict, OrderedDict):
            return self.mapping(obj, path, depth)
        if type(obj) is list:
            return [self.value(v, _path(path, i), depth + 1) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {"T": "tuple", "v": [self.value(v, _path(path, i), depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, (Mapping, list, tuple)):
            raise StateError(
                f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} would not come back as one "
                "(only dict, OrderedDict, list and tuple keep their type): convert it first"
            )
        if callable(obj):
            raise StateError(
                f"{where}: a callable ({type(obj).__qualname__}) cannot be saved without pickle; "
                "drop it from the state (e.g. a LambdaLR lambda: recreate the scheduler instead)"
            )
        raise StateError(
            f"{where}: values of type {type(obj).__module__}.{type(obj).__qualname__} are not supported "
            "(allowed: tensors, None, bool, int, float, str, list, tuple, dict, torch.Size/dtype/device, NumPy "
            "arrays, and objects with state_dict())"
        )

    def numpy_value(self, obj: Any, path: str, depth: int) -> Any:
        import numpy as np

        where = path or "<root>"
        if type(obj) is np.ndarray:
            if obj.dtype.hasobject:
                raise StateError(f"{where}: NumPy array of Python objects cannot be saved without pickle")
            if not obj.dtype.isnative:
                raise StateError(
                    f"{where}: a NumPy array of non-native byte order ({obj.dtype.str}) cannot be saved as it is: "
                    "save arr.astype(arr.dtype.newbyteorder('=')) instead"
                )
            # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
            arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
            try:
                t = torch.from_numpy(arr)
            except TypeError as e:
                raise StateError(f"{where}: NumPy dtype {obj.dtype} is not supported: {e}") from e
            return {"T": "ndarray", "id": self.tensor(t, path)}
        if type(obj) in (np.bool_,) or (
            isinstance(obj, (np.integer, np.floating)) and obj.dtype.kind in "iuf" and obj.dtype.itemsize <= 16
        ):
            return {"T": "npscalar", "dtype": obj.dtype.str, "v": self.value(obj.item(), path, depth + 1)}
        raise StateError(f"{where}: NumPy values of type {type(obj).__name__} are not supported")

    def key(self, key: Any, path: str, depth: int) -> Any:
        if key is None or isinstance(key, (bool, int, float, str, tuple)):
            return self.value(key, path, depth)
        raise StateError(f"{path}: dict key {_path('', key)[:80]!r} of type {type(key).__name__} is not supported")

    def mapping(self, obj: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
        kind = "odict" if isinstance(obj, OrderedDict) else "dict"
        out: dict[str, Any] = {"T": kind}
        if all(type(k) is str for k in obj):
            out["v"] = {k: self.value(v, _path(path, k), depth + 1) for k, v in obj.items()}
        else:
            out["items"] = [
                [self.key(k, path or "<root>", depth + 1), self.value(v, _path(path, k), depth + 1)]
                for k, v in obj.items()
            ]
        meta = getattr(obj, "_metadata", None)
        if meta is not None and isinstance(obj, OrderedDict):
            out["meta"] = self.value(meta, _path(path, "_metadata"), depth + 1)
        return out

    # -- tensors ------------------------------------------------------------
    def tensor(self, t: torch.Tensor, path: str) -> int:
        # Once per tensor, in a sync save's stall: no detach (only the storage is kept), no str() per call.
        kind = type(t)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            raise StateError(
                f"{path or '<root>'}: tensor subclass {kind.__qualname__} is not supported "
                "(DTensor/sharded state: use spotsafe.distributed)"
            )
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise StateError(f"{path or '<root>'}: only dense strided tensors are supported, not {t.layout}")
        if t.is_meta:
            raise StateError(f"{path or '<root>'}: a meta tensor has no data to save")
        shape, strides, dev = t.shape, t.stride(), _device_name(t.device)
        entry: dict[str, Any] = {"dtype": _dtype_name(t.dtype), "shape": list(shape), "device": dev}
        if kind is torch.nn.Parameter:
            entry["param"] = True
        if t.requires_grad:
            entry["requires_grad"] = True
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()  # a fresh copy with its own storage
            strides = t.stride()
        itemsize = t.element_size()
        if t.numel() == 0:
            entry.update(blob=-1, stride=list(strides), offset=0)
            self.tensors.append(entry)
            return len(self.tensors) - 1
        storage = t.untyped_storage()
        lo = int(t.storage_offset())
        hi = lo
        for size, stride in zip(shape, strides, strict=True):
            if stride < 0:  # not producible by torch, but be safe
                raise StateError(f"{path or '<root>'}: negative strides are not supported")
            hi += (size - 1) * stride
        start, end = lo * itemsize, (hi + 1) * itemsize
        key = (dev, storage.data_ptr())
        index = self.by_storage.get(key)
        if index is None:
            index = len(self.blob_ranges)
            self.by_storage[key] = index
            self.blob_ranges.append([start, end])
            self.blob_storages.append(t)
        else:
            rng = self.blob_ranges[index]
            rng[0] = min(rng[0], start)
            rng[1] = max(rng[1], end)
        entry.update(blob=index, stride=list(strides), byte_offset=start)
        self.tensors.append(entry)
        return len(self.tensors) - 1

    def finish(self, tree: Any) -> FlatState:
        blobs: list[Blob] = []
        sources: list[torch.Tensor] = []
        offset = 0
        starts: list[int] = []
        for (start, end), t in zip(self.blob_ranges, self.blob_storages, strict=True):
            start -= start % _STORAGE_ALIGN
            end = min(end, t.untyped_storage().nbytes())
            starts.append(start)
            n = end - start
            blobs.append(Blob(offset, n))
            u8 = torch.empty(0, dtype=torch.uint8, device=t.device)
            u8.set_(t.untyped_storage(), start, (n,), (1,))
            sources.append(u8)
            offset += n
            offset += -offset % ALIGN
        for entry in self.tensors:
            b = entry["blob"]
            if b >= 0:
                entry["offset"] = entry.pop("byte_offset") - starts[b]
        return FlatState(tree, self.tensors, blobs, sources, offset)


def flatten(state: Any) -> FlatState:
    """Describe ``state`` (live objects allowed) as JSON plus blobs to copy. No copy is made here."""
    f = _Flattener()
    tree = f.value(to_plain(state), "")
    return f.finish(tree)


# ----------------------------------------------------------------------------- load


MapLocation = Any  # None | str | torch.device | Mapping[str, str] | Callable[[str], str]


def resolve_device(device: str, map_location: MapLocation) -> torch.device:
    """Where a tensor saved on ``device`` goes under ``map_location`` (torch.load's conventions)."""
    if map_location is None:
        target = device
    elif isinstance(map_location, (str, torch.device)):
        target = str(map_location)
    elif isinstance(map_location, Mapping):
        target = str(map_location.get(device, device))
    elif callable(map_location):
        target = str(map_location(device))
    else:
        raise TypeError(f"map_location must be a device, a dict or a callable, not {type(map_location).__name__}")
    dev = torch.device(target)
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StateError(
                f"the checkpoint holds tensors saved on {device} but CUDA is not available here: "
                "pass map_location='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StateError(
                f"the checkpoint holds tensors for {dev} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s): pass map_location (e.g. 'cuda:0' or 'cpu')"
            )
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise StateError(
            f"the checkpoint holds tensors for {dev}, a device this machine does not have: pass map_location='cpu'"
        )
    return dev


def _corrupt_int(x: object, what: str, where: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
    """``x`` as an int within ``lo..hi``, else CheckpointCorrupt naming ``what``."""
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise CheckpointCorrupt(f"{where}: bad {what} {str(x)[:80]!r}")
    return x


def _corrupt_ints(x: object, what: str, where: str) -> list[int]:
    if not isinstance(x, list) or len(x) > MAX_DIMS:
        raise CheckpointCorrupt(f"{where}: bad {what} {str(x)[:80]!r}")
    return [_corrupt_int(v, what, where) for v in x]


def _device_from_name(name: object, where: str) -> torch.device:
    if not isinstance(name, str) or len(name) > 64:
        raise CheckpointCorrupt(f"{where}: bad device {str(name)[:80]!r}")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointCorrupt(f"{where}: bad device {name!r} ({e})") from e


_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class _Unflattener:
    """Builds a tree back from its description, checking every claim before it is used (see :func:`unflatten`)."""

    def __init__(
        self,
        tensors_desc: list[Any],
        blob_bytes: Callable[[int], torch.Tensor],
        map_location: MapLocation,
        where: str,
        validate_only: bool,
    ) -> None:
        self.tensors_desc = tensors_desc
        self.blob_bytes = blob_bytes
        self.map_location = map_location
        self.where = where
        self.validate_only = validate_only
        self.moved: dict[tuple[int, str], torch.Tensor] = {}  # one copy per (blob, device): ties survive moves
        self.built: list[torch.Tensor | None] = [None] * len(tensors_desc)

    def tensor(self, i: object) -> torch.Tensor:
        """Tensor ``i`` of the table, built once (every reference to it gets the same tensor)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.tensors_desc):
            raise CheckpointCorrupt(f"{self.where}: tensor reference {str(i)[:80]!r} out of range")
        done = self.built[i]
        if done is not None:
            return done
        e = self.tensors_desc[i]
        w = f"{self.where}: tensor {i}"
        if not isinstance(e, dict):
            raise CheckpointCorrupt(f"{w}: not an object")
        t = self.built[i] = self.build_tensor(e, w)
        return t

    def build_tensor(self, e: dict[str, Any], w: str) -> torch.Tensor:
        """The tensor entry ``e`` describes, on its device: a view of its blob, checked to lie inside it."""
        dtype = _dtype_from_name(e.get("dtype"), w)
        shape = _corrupt_ints(e.get("shape"), "shape", w)
        stride = _corrupt_ints(e.get("stride"), "stride", w)
        if len(stride) != len(shape):
            raise CheckpointCorrupt(f"{w}: {len(shape)} dimensions but {len(stride)} strides")
        saved_on = _device_from_name(e.get("device"), w)
        if saved_on.type == "meta":
            raise CheckpointCorrupt(f"{w}: a meta tensor has no data (none is ever saved)")
        dev = torch.device("meta") if self.validate_only else resolve_device(str(saved_on), self.map_location)
        b = _corrupt_int(e.get("blob"), "blob", w, lo=-1)
        numel = math.prod(shape)
        if b < 0:
            # Only an empty tensor is saved without bytes: a claim of any other shape would allocate it.
            if numel != 0:
                raise CheckpointCorrupt(f"{w}: shape {shape} but no bytes in the data file")
            t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
        else:
            key = (b, str(dev))
            base = self.moved.get(key)
            if base is None:
                base = self.blob_bytes(b)
                if dev.type != base.device.type:
                    base = base.to(dev)
                self.moved[key] = base
            itemsize = dtype.itemsize
            off = _corrupt_int(e.get("offset"), "offset", w, hi=base.numel())
            if off % itemsize:
                raise CheckpointCorrupt(f"{w}: offset {off} is not aligned to {itemsize}")
            if numel > 0:
                need = off // itemsize + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1
                if need * itemsize > base.numel():
                    raise CheckpointCorrupt(f"{w}: reaches past the end of its blob")
            typed = _typed_view(base, dtype, itemsize)  # offsets are the blob's: from where its bytes start
            t = typed.as_strided(shape, stride, typed.storage_offset() + off // itemsize)
        grad = bool(e.get("requires_grad")) and (t.is_floating_point() or t.is_complex())
        if e.get("param"):
            t = torch.nn.Parameter(t, requires_grad=grad)
        elif grad:
            t.requires_grad_(True)
        return t

    def items(self, node: dict[str, Any], depth: int) -> list[tuple[Any, Any]]:
        """The (key, value) pairs of a dict node: ``v`` (str keys) or ``items`` (keys of any saved type)."""
        if "v" in node:
            v = node["v"]
            if not isinstance(v, dict):
                raise CheckpointCorrupt(f"{self.where}: a {node['T']} node whose v is not an object")
            return [(k, self.value(x, depth + 1)) for k, x in v.items()]
        pairs = node.get("items")
        if not isinstance(pairs, list):
            raise CheckpointCorrupt(f"{self.where}: a {node['T']} node without v or items")
        out = []
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CheckpointCorrupt(f"{self.where}: a {node['T']} item that is not a [key, value] pair")
            k = _hashable(self.value(pair[0], depth + 1))
            try:
                hash(k)
            except TypeError as err:
                raise CheckpointCorrupt(f"{self.where}: an unhashable dict key {str(k)[:80]!r}") from err
            out.append((k, self.value(pair[1], depth + 1)))
        return out

    def value(self, node: Any, depth: int) -> Any:
        """The value of ``node``: plain JSON as it is, containers and tensors built again."""
        if depth > MAX_DEPTH:
            raise CheckpointCorrupt(f"{self.where}: the tree is nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.value(v, depth + 1) for v in node]
        if not isinstance(node, dict) or "T" not in node:
            raise CheckpointCorrupt(f"{self.where}: unexpected node {str(node)[:80]!r}")
        kind = node["T"]
        v = node.get("v")
        if kind == "tensor":
            return self.tensor(node.get("id"))
        if kind in ("dict", "odict"):
            pairs = self.items(node, depth)
            if kind == "dict":
                return dict(pairs)
            od: OrderedDict[Any, Any] = OrderedDict(pairs)
            if "meta" in node:
                od._metadata = self.value(node["meta"], depth + 1)  # type: ignore[attr-defined]
            return od
        if kind == "tuple":
            if not isinstance(v, list):
                raise CheckpointCorrupt(f"{self.where}: a tuple node whose v is not a list")
            return tuple(self.value(x, depth + 1) for x in v)
        if kind in ("ndarray", "npscalar"):
            return self.numpy_value(kind, node, v, depth)
        return self.special_value(kind, v)

    def special_value(self, kind: Any, v: Any) -> Any:
        """A value JSON has no plain form for: nan/inf, a huge int, torch.Size, torch.dtype, torch.device."""
        if kind == "float":
            if v not in _SPECIAL_FLOATS:
                raise CheckpointCorrupt(f"{self.where}: bad float node {str(v)[:80]!r}")
            return _SPECIAL_FLOATS[v]
        if kind == "int":
            if not isinstance(v, str) or not _HEX_INT.fullmatch(v):
                raise CheckpointCorrupt(f"{self.where}: bad int node {str(v)[:80]!r}")
            return int(v, 16)
        if kind == "size":
            if not isinstance(v, list):
                raise CheckpointCorrupt(f"{self.where}: bad torch.Size node {str(v)[:80]!r}")
            return torch.Size(_corrupt_int(d, "torch.Size dimension", self.where, hi=(1 << 63) - 1) for d in v)
        if kind == "dtype":
            return _dtype_from_name(v, self.where)
        if kind == "device":
            return _device_from_name(v, self.where)
        raise CheckpointCorrupt(f"{self.where}: unknown node type {str(kind)[:80]!r} (written by a newer spotsafe?)")

    def numpy_value(self, kind: str, node: dict[str, Any], v: Any, depth: int) -> Any:
        """A NumPy array (from its tensor) or scalar (from its dtype and plain value)."""
        np = _numpy_required(self.where)
        if kind == "ndarray":
            t = self.tensor(node.get("id"))
            if self.validate_only:
                torch.empty(0, dtype=t.dtype).numpy()  # a dtype NumPy has, as the real conversion needs
                return _ArrayStandIn()  # unhashable, like the array load() builds (a dict key must fail alike)
            return t.cpu().numpy()
        try:
            dt = np.dtype(node.get("dtype"))
        except (TypeError, ValueError) as err:
            raise CheckpointCorrupt(f"{self.where}: bad NumPy scalar dtype {str(node.get('dtype'))[:80]!r}") from err
        x = self.value(v, depth + 1)
        if dt.kind not in "biuf" or dt.itemsize > 16 or not isinstance(x, (bool, int, float)):
            raise CheckpointCorrupt(f"{self.where}: bad NumPy scalar {str(node)[:80]!r}")
        try:
            return dt.type(x)
        except (OverflowError, ValueError, TypeError) as err:
            raise CheckpointCorrupt(f"{self.where}: bad NumPy scalar {str(node)[:80]!r} ({err})") from err


def unflatten(
    description: Mapping[str, Any],
    blob_bytes: Callable[[int], torch.Tensor],
    *,
    map_location: MapLocation = None,
    where: str = "checkpoint",
    validate_only: bool = False,
) -> Any:
    """Build the tree again.

    ``blob_bytes(i)`` returns blob ``i`` as a flat CPU ``uint8`` tensor (typically
    a zero-copy view of the data file). ``where`` names the file in errors.

    Everything the description claims (dtypes, shapes, strides, offsets, devices,
    node types, nesting depth) is checked before it is used or allocated: a damaged
    or hostile description raises :class:`CheckpointCorrupt`, never another error,
    and never allocates more than its blobs. With ``validate_only`` the same checks
    run on ``meta`` tensors (``blob_bytes`` may return meta tensors of the blobs'
    sizes): nothing is read or built; what :meth:`Checkpointer.check` runs.
    """
    if not isinstance(description, Mapping):
        raise CheckpointCorrupt(f"{where}: not a spotsafe tree description")
    tensors_desc = description.get("tensors")
    tree = description.get("tree")
    if not isinstance(tensors_desc, list) or "tree" not in description:
        raise CheckpointCorrupt(f"{where}: not a spotsafe tree description (no tensor table or tree)")
    builder = _Unflattener(tensors_desc, blob_bytes, map_location, where, validate_only)
    try:
        return builder.value(tree, 0)
    except SpotsafeError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, OverflowError, RecursionError) as e:
        # Everything above is checked; this is the net under it: a damaged tree is never another error.
        raise CheckpointCorrupt(f"{where}: malformed tree: {e!r}") from e


def _typed_view(base: torch.Tensor, dtype: torch.dtype, itemsize: int) -> torch.Tensor:
    """The blob's storage seen as ``dtype`` elements (sharing memory with every other view of it)."""
    if itemsize == 1:
        return base.view(dtype)
    start = base.storage_offset()
    if start % itemsize:
        raise CheckpointCorrupt(f"blob storage offset {start} is not aligned to {itemsize}")
    return torch.empty(0, dtype=dtype, device=base.device).set_(
        base.untyped_storage(), start // itemsize, (base.numel() // itemsize,), (1,)
    )


class _ArrayStandIn:
    """What a validate-only unflatten puts where a NumPy array would be: unhashable, as an array is."""

    __hash__ = None  # type: ignore[assignment]  # an array as a dict key must fail in validation as in a load


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _numpy_required(where: str) -> Any:
    np = _numpy()
    if np is None:
        raise StateError(f"{where}: the checkpoint holds NumPy values but NumPy is not installed")
    return np


def blob_from_buffer(buffer: memoryview, blob: Blob, where: str) -> torch.Tensor:
    """Blob bytes as a CPU uint8 tensor: a zero-copy view of a writable buffer, else a copy."""
    if blob.offset < 0 or blob.nbytes < 0 or blob.offset + blob.nbytes > len(buffer):
        raise CheckpointCorrupt(f"{where}: blob at {blob.offset}+{blob.nbytes} reaches past the end of the file")
    if blob.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if buffer.readonly:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(buffer, dtype=torch.uint8, offset=blob.offset, count=blob.nbytes)
        return view.clone()  # never hand out a tensor a write would crash on
    return torch.frombuffer(buffer, dtype=torch.uint8, offset=blob.offset, count=blob.nbytes)


def blobs_from_description(description: object, payload_size: int, where: str) -> list[Blob]:
    """The blob table of a tree description, each range checked to lie inside ``payload_size`` bytes."""
    raw = description.get("blobs") if isinstance(description, Mapping) else None
    if not isinstance(raw, list):
        raise CheckpointCorrupt(f"{where}: malformed tree file (no blob table)")
    blobs: list[Blob] = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CheckpointCorrupt(f"{where}: blob {i} is not an [offset, nbytes] pair")
        offset = _corrupt_int(pair[0], f"blob {i} offset", where, hi=payload_size)
        nbytes = _corrupt_int(pair[1], f"blob {i} size", where, hi=payload_size - offset)
        blobs.append(Blob(offset, nbytes))
    return blobs


# ----------------------------------------------------------------------------- RNG


class RNGState:
    """The random number generators' state as a stateful object.

    Put one in the state you save (``Run`` always does); ``restore()`` loads it
    back so the next draw is the one the interrupted run would have made.
    Captures Python ``random``, NumPy's global generator (when NumPy is
    installed), torch's CPU generator and every CUDA device's generator.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        out: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "torch": torch.get_rng_state(),
        }
        np = _numpy()
        if np is not None:
            name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
            out["numpy"] = {
                "bit_generator": str(name),
                "key": [int(k) for k in keys],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        if torch.cuda.is_available():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        torch.set_rng_state(state["torch"].cpu())
        npstate = state.get("numpy")
        np = _numpy()
        if npstate is not None and np is not None:
            np.random.set_state(
                (
                    npstate["bit_generator"],
                    np.array(npstate["key"], dtype=np.uint32),
                    int(npstate["pos"]),
                    int(npstate["has_gauss"]),
                    float(npstate["cached_gaussian"]),
                )
            )
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            n = min(len(cuda), torch.cuda.device_count())
            if n != len(cuda):
                warnings.warn(
                    f"checkpoint has RNG states for {len(cuda)} CUDA devices, this machine has "
                    f"{torch.cuda.device_count()}: restoring the first {n}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            for i in range(n):
                torch.cuda.set_rng_state(cuda[i].cpu(), i)

    def __repr__(self) -> str:
        return "RNGState()"


class StateGroup:
    """Several stateful objects saved and restored as one: ``{"G": netG, "D": netD}``.

    ``spotsafe.Run(model={"G": g, "D": d}, optimizer={"G": opt_g, "D": opt_d})`` wraps
    each mapping in one of these, so a GAN's two models and two optimizers go into a
    checkpoint without the user merging state dicts by hand. A list or tuple is
    keyed by position. Loading checks that the checkpoint holds exactly these names.
    """

    def __init__(self, what: str, objects: Mapping[str, Any] | list[Any] | tuple[Any, ...]) -> None:
        items = dict(objects) if isinstance(objects, Mapping) else {str(i): o for i, o in enumerate(objects)}
        if not items:
            raise ValueError(f"{what}: an empty mapping or sequence holds nothing to save")
        for key, obj in items.items():
            if not isinstance(key, str):
                raise TypeError(f"{what}: keys must be strings, not {key!r}")
            if not callable(getattr(obj, "state_dict", None)) or not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(f"{what}[{key!r}]: {type(obj).__name__} has no state_dict()/load_state_dict()")
        self.what = what
        self.objects: dict[str, Any] = items

    def state_dict(self) -> dict[str, Any]:
        return {key: obj.state_dict() for key, obj in self.objects.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.objects):
            raise StateMismatch(
                f"{self.what}: the checkpoint holds {sorted(state)}, this run has {sorted(self.objects)}"
            )
        for key, obj in self.objects.items():
            obj.load_state_dict(state[key])

    def __repr__(self) -> str:
        return f"StateGroup({self.what!r}, {sorted(self.objects)})"
