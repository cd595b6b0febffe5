"""``spotsafe export STORE [--step N] [--key model] -o model.safetensors|model.pt``: the end of a run.

Writes one checkpoint's model weights (the newest intact one, or ``--step N``) as a standard
file that loads with no spotsafe installed: ``.safetensors`` through the safetensors library
(``safetensors.torch.load_file``), ``.pt``/``.pth`` as a plain ``state_dict`` of tensors
(``torch.load(path, weights_only=True)``). ``--key`` picks the object: ``model`` (default), or
one of several given as a mapping, ``model/G`` (``model.G`` too). Every checksum is verified
first; each tensor is copied out of the checkpoint's shared buffer, so the file holds exactly
the weights (no shared storage, nothing more). The file is written whole under a temporary
name and renamed: an interrupted export leaves no half file. Exit statuses: 0 written; 2 the
store, the step, the key or the output name cannot be used, with one line naming the cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spotsafe.errors import SpotsafeError, require

__all__ = ["export_weights", "main"]

EXIT_ERROR = 2
_SUFFIXES = (".safetensors", ".pt", ".pth")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotsafe export", description="A checkpoint's model weights as model.safetensors or a plain model.pt."
    )
    p.add_argument("store", help="a path (the EBS mount) or a URL such as s3://bucket/run")
    p.add_argument("-o", "--output", required=True, help="the file to write: NAME.safetensors, NAME.pt or NAME.pth")
    p.add_argument("--step", type=int, default=None, help="this step's checkpoint (default: the newest intact one)")
    p.add_argument("--key", default="model", help="the object to export: model (default), or model/G of several")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="storage option (repeatable)")
    return p


def _pick(tree: Mapping[str, Any], key: str, where: str) -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` mapping under ``key`` (parts joined by ``/`` or ``.``)."""
    node: Any = tree
    for part in key.replace(".", "/").split("/"):
        if not isinstance(node, Mapping) or part not in node:
            have = sorted(str(k) for k in node) if isinstance(node, Mapping) else []
            raise ValueError(f"{where} holds no {key!r} (at {part!r}, there is: {', '.join(have) or 'nothing'})")
        node = node[part]
    if not isinstance(node, Mapping) or not node:
        raise ValueError(f"{where}: {key!r} is not a state_dict of tensors")
    nested = sorted(str(k) for k, v in node.items() if isinstance(v, Mapping))
    if nested:
        raise ValueError(f"{where}: {key!r} holds several objects ({', '.join(nested)}): give --key {key}/{nested[0]}")
    bad = sorted(str(k) for k, v in node.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{where}: {key!r} is not a state_dict of tensors (not a tensor: {', '.join(bad[:5])})")
    # Own storage for each: the loaded tensors are views of one buffer, which safetensors refuses
    # and torch.save would write whole.
    return {str(k): v.detach().to("cpu").contiguous().clone() for k, v in node.items()}


def export_weights(
    store: str,
    output: str | os.PathLike[str],
    *,
    step: int | None = None,
    key: str = "model",
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """Write ``key``'s weights of a checkpoint to ``output``; returns (the checkpoint's step, tensors written)."""
    from spotsafe.checkpoint.catalog import Catalog
    from spotsafe.storage.registry import open_store

    out = Path(output)
    if out.suffix not in _SUFFIXES:
        raise ValueError(f"{out}: the name must end in .safetensors, .pt or .pth (the format follows it)")
    if out.suffix == ".safetensors":
        save_file = require("safetensors.torch", "export").save_file
    catalog = Catalog(open_store(store, storage_options=dict(storage_options) if storage_options else None))
    try:
        info, tree = catalog.load(step, verify=True)
    finally:
        catalog.store.close()
    tensors = _pick(tree, key, info.url)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"spotsafe_checkpoint": info.url, "step": str(info.step), "key": key})
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return info.step, len(tensors)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options: dict[str, Any] = {}
    for pair in args.option:
        name, sep, value = pair.partition("=")
        if not sep:
            print(f"spotsafe export: --option wants KEY=VALUE, got {pair!r}", file=sys.stderr)
            return EXIT_ERROR
        options[name] = value
    try:
        step, count = export_weights(args.store, args.output, step=args.step, key=args.key, storage_options=options)
    except (SpotsafeError, ValueError, OSError) as e:
        print(f"spotsafe export: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"spotsafe export: {args.output}: {count} tensors of {args.key!r} from step {step}")
    return 0
