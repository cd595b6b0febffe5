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

import math
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from spotsafe.errors import CheckpointCorrupt, StateError

#: Every blob starts at a multiple of this in the data file (and in the snapshot
#: buffer): enough for any dtype and for cache-line aligned copies.
ALIGN = 64
# A blob's start inside its storage is rounded down to this, so every view of
# the storage keeps an offset that is a multiple of its own item size.
_STORAGE_ALIGN = 16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise CheckpointCorrupt(f"{where}: unknown dtype {name!r}")
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
    return f"{parent}.{key}" if parent else str(key)


def to_plain(obj: Any) -> Any:
    """Replace every object with a ``state_dict()`` by that state dict (recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, type):
        return to_plain(state_dict())
    if isinstance(obj, Mapping):
        out = {k: to_plain(v) for k, v in obj.items()}
        if isinstance(obj, OrderedDict):
            od: OrderedDict[Any, Any] = OrderedDict(out)
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                od._metadata = meta  # type: ignore[attr-defined]
            return od
        return out
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size) and not hasattr(obj, "_fields"):
        return tuple(to_plain(v) for v in obj)
    return obj


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[dict[str, Any]] = []
        self.blob_ranges: list[list[int]] = []  # [start, end] byte range in the storage
        self.blob_storages: list[torch.Tensor] = []  # a tensor on the storage (keeps it alive)
        self.by_storage: dict[tuple[str, int], int] = {}
        self.keep: list[torch.Tensor] = []

    # -- values -------------------------------------------------------------
    def value(self, obj: Any, path: str) -> Any:
        if type(obj).__module__ == "numpy":  # before float/int: np.float64 subclasses float
            return self.numpy_value(obj, path)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            return {"T": "float", "v": repr(float(obj))}
        if isinstance(obj, torch.Tensor):
            return {"T": "tensor", "id": self.tensor(obj, path)}
        if isinstance(obj, torch.Size):
            return {"T": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, torch.dtype):
            return {"T": "dtype", "v": _dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {"T": "device", "v": str(obj)}
        if isinstance(obj, Mapping):
            return self.mapping(obj, path)
        if isinstance(obj, list):
            return [self.value(v, _path(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return {"T": "tuple", "v": [self.value(v, _path(path, i)) for i, v in enumerate(obj)]}
        if callable(obj):
            raise StateError(
                f"{path or '<root>'}: a callable ({type(obj).__qualname__}) cannot be saved without pickle; "
                "drop it from the state (e.g. a LambdaLR lambda: recreate the scheduler instead)"
            )
        raise StateError(
            f"{path or '<root>'}: values of type {type(obj).__module__}.{type(obj).__qualname__} are not supported "
            "(allowed: tensors, None, bool, int, float, str, list, tuple, dict, torch.Size/dtype/device, NumPy "
            "arrays, and objects with state_dict())"
        )

    def numpy_value(self, obj: Any, path: str) -> Any:
        import numpy as np

        where = path or "<root>"
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise StateError(f"{where}: NumPy array of Python objects cannot be saved without pickle")
            try:
                t = torch.from_numpy(np.ascontiguousarray(obj))
            except TypeError as e:
                raise StateError(f"{where}: NumPy dtype {obj.dtype} is not supported: {e}") from e
            return {"T": "ndarray", "id": self.tensor(t, path)}
        if isinstance(obj, (np.bool_, np.integer, np.floating)):
            return {"T": "npscalar", "dtype": obj.dtype.str, "v": self.value(obj.item(), path)}
        raise StateError(f"{where}: NumPy values of type {type(obj).__name__} are not supported")

    def key(self, key: Any, path: str) -> Any:
        if key is None or isinstance(key, (bool, int, float, str)):
            return self.value(key, path)
        if isinstance(key, tuple):
            return self.value(key, path)
        raise StateError(f"{path}: dict key {key!r} of type {type(key).__name__} is not supported")

    def mapping(self, obj: Mapping[Any, Any], path: str) -> dict[str, Any]:
        kind = "odict" if isinstance(obj, OrderedDict) else "dict"
        out: dict[str, Any] = {"T": kind}
        if all(isinstance(k, str) for k in obj):
            out["v"] = {k: self.value(v, _path(path, k)) for k, v in obj.items()}
        else:
            out["items"] = [[self.key(k, path or "<root>"), self.value(v, _path(path, k))] for k, v in obj.items()]
        meta = getattr(obj, "_metadata", None)
        if meta is not None and isinstance(obj, OrderedDict):
            out["meta"] = self.value(meta, _path(path, "_metadata"))
        return out

    # -- tensors ------------------------------------------------------------
    def tensor(self, t: torch.Tensor, path: str) -> int:
        where = path or "<root>"
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise StateError(
                f"{where}: tensor subclass {type(t).__qualname__} is not supported "
                "(DTensor/sharded state: use spotsafe.distributed)"
            )
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise StateError(f"{where}: only dense strided tensors are supported, not {t.layout}")
        if t.device.type == "meta":
            raise StateError(f"{where}: a meta tensor has no data to save")
        entry: dict[str, Any] = {
            "dtype": _dtype_name(t.dtype),
            "shape": list(t.shape),
            "device": str(t.device),
        }
        if isinstance(t, torch.nn.Parameter):
            entry["param"] = True
        if t.requires_grad:
            entry["requires_grad"] = True
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()  # a fresh copy with its own storage
        t = t.detach()
        itemsize = t.element_size()
        if t.numel() == 0:
            entry.update(blob=-1, stride=list(t.stride()), offset=0)
            self.tensors.append(entry)
            return len(self.tensors) - 1
        storage = t.untyped_storage()
        lo = int(t.storage_offset())
        hi = lo
        for size, stride in zip(map(int, t.shape), map(int, t.stride()), strict=True):
            if stride < 0:  # not producible by torch, but be safe
                raise StateError(f"{where}: negative strides are not supported")
            hi += (size - 1) * stride
        start, end = lo * itemsize, (hi + 1) * itemsize
        key = (str(t.device), storage.data_ptr())
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
        entry.update(blob=index, stride=list(t.stride()), byte_offset=start)
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StateError(
            f"the checkpoint holds tensors saved on {device} but CUDA is not available here: pass map_location='cpu'"
        )
    return dev


def unflatten(
    description: Mapping[str, Any],
    blob_bytes: Callable[[int], torch.Tensor],
    *,
    map_location: MapLocation = None,
    where: str = "checkpoint",
) -> Any:
    """Build the tree again.

    ``blob_bytes(i)`` returns blob ``i`` as a flat CPU ``uint8`` tensor (typically
    a zero-copy view of the data file). ``where`` names the file in errors.
    """
    try:
        tensors_desc = description["tensors"]
        tree = description["tree"]
    except (KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{where}: not a spotsafe tree description ({e})") from e
    moved: dict[tuple[int, str], torch.Tensor] = {}  # one copy per (blob, device): ties survive moves
    built: list[torch.Tensor | None] = [None] * len(tensors_desc)

    def tensor(i: int) -> torch.Tensor:
        if not isinstance(i, int) or not 0 <= i < len(tensors_desc):
            raise CheckpointCorrupt(f"{where}: tensor reference {i!r} out of range")
        done = built[i]
        if done is not None:
            return done
        e = tensors_desc[i]
        try:
            dtype = _dtype_from_name(e["dtype"], where)
            shape = [int(s) for s in e["shape"]]
            stride = [int(s) for s in e["stride"]]
            dev = resolve_device(e["device"], map_location)
            b = int(e["blob"])
            if b < 0:
                t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
            else:
                key = (b, str(dev))
                base = moved.get(key)
                if base is None:
                    base = blob_bytes(b)
                    if dev.type != "cpu":
                        base = base.to(dev)
                    moved[key] = base
                itemsize = dtype.itemsize
                off = int(e["offset"])
                if off % itemsize:
                    raise CheckpointCorrupt(f"{where}: tensor {i} offset {off} is not aligned to {itemsize}")
                need = off // itemsize + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1
                if min(shape, default=1) > 0 and (need * itemsize > base.numel() or off < 0):
                    raise CheckpointCorrupt(f"{where}: tensor {i} reaches past the end of its blob")
                t = _typed_view(base, dtype, itemsize).as_strided(shape, stride, off // itemsize)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CheckpointCorrupt):
                raise
            raise CheckpointCorrupt(f"{where}: bad entry for tensor {i}: {err}") from err
        if e.get("param"):
            t = torch.nn.Parameter(t, requires_grad=bool(e.get("requires_grad")))
        elif e.get("requires_grad") and t.is_floating_point():
            t.requires_grad_(True)
        built[i] = t
        return t

    def value(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [value(v) for v in node]
        if not isinstance(node, dict) or "T" not in node:
            raise CheckpointCorrupt(f"{where}: unexpected node {str(node)[:80]!r}")
        kind = node["T"]
        if kind == "tensor":
            return tensor(node["id"])
        if kind in ("dict", "odict"):
            if "v" in node:
                items = [(k, value(v)) for k, v in node["v"].items()]
            else:
                items = [(_hashable(value(k)), value(v)) for k, v in node["items"]]
            if kind == "dict":
                return dict(items)
            od: OrderedDict[Any, Any] = OrderedDict(items)
            if "meta" in node:
                od._metadata = value(node["meta"])  # type: ignore[attr-defined]
            return od
        if kind == "tuple":
            return tuple(value(v) for v in node["v"])
        if kind == "float":
            return float(node["v"])
        if kind == "size":
            return torch.Size(int(d) for d in node["v"])
        if kind == "dtype":
            return _dtype_from_name(node["v"], where)
        if kind == "device":
            return torch.device(node["v"])
        if kind == "ndarray":
            np = _numpy_required(where)
            return tensor(node["id"]).cpu().numpy()
        if kind == "npscalar":
            np = _numpy_required(where)
            return np.dtype(node["dtype"]).type(value(node["v"]))
        raise CheckpointCorrupt(f"{where}: unknown node type {kind!r} (written by a newer spotsafe?)")

    try:
        return value(tree)
    except (KeyError, TypeError, AttributeError) as e:
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
    if blob.offset < 0 or blob.offset + blob.nbytes > len(buffer):
        raise CheckpointCorrupt(f"{where}: blob at {blob.offset}+{blob.nbytes} reaches past the end of the file")
    if blob.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if buffer.readonly:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(buffer, dtype=torch.uint8, offset=blob.offset, count=blob.nbytes)
        return view.clone()  # never hand out a tensor a write would crash on
    return torch.frombuffer(buffer, dtype=torch.uint8, offset=blob.offset, count=blob.nbytes)


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
