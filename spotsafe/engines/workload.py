"""What both engines are given: the run's name, store, command, nodes and settings; YAML text.

The engines differ in how they recreate a worker, but the process they start is the same
supervisor (``python -m spotsafe.resume``) around the user's command, or around torchrun
for several nodes; this module builds that command line once.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: torchrun's rendezvous port on every engine (c10d backend).
RDZV_PORT = 29400
#: Restarts after crashes that the supervisor does in place before the engine's own policy counts one.
DEFAULT_MAX_RESTARTS = 3
#: Object-store schemes a worker on another machine can reach; a path needs a volume that follows the pod.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WorkloadError(ValueError):
    """Bad input for an engine's generator: names the option and the cause."""


@dataclass(frozen=True)
class Workload:
    """One training run as an engine will start it."""

    name: str
    store: str
    command: Sequence[str]
    min_nodes: int = 1
    max_nodes: int = 1
    gpus: int = 0
    max_restarts: int = DEFAULT_MAX_RESTARTS
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def multinode(self) -> bool:
        return self.max_nodes > 1

    @property
    def nproc_per_node(self) -> int:
        """Training processes per node: one per GPU, one on a CPU node."""
        return max(self.gpus, 1)

    @property
    def remote_store(self) -> bool:
        return scheme(self.store) in REMOTE_SCHEMES


def scheme(store: str) -> str:
    head, sep, _ = store.partition("://")
    return head.lower() if sep else ""


def parse_nodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` (torchrun's elastic ``--nnodes``) as (min, max)."""
    low, sep, high = text.partition(":")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise WorkloadError(f"--nodes wants N or MIN:MAX (whole numbers), not {text!r}") from None
    if lo < 1 or hi < lo:
        raise WorkloadError(f"--nodes {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise WorkloadError(f"--env wants NAME=VALUE with NAME a shell variable name, not {pair!r}")
        out[key] = value
    return out


def build(
    name: str,
    store: str,
    command: str,
    *,
    nodes: str = "1",
    gpus: int = 0,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    env: Sequence[str] = (),
) -> Workload:
    """A checked :class:`Workload` from command-line text; :class:`WorkloadError` names what is wrong."""
    if len(name) > 40 or not _NAME.match(name):
        raise WorkloadError(
            f"NAME {name!r}: lower-case letters, digits and '-', starting with a letter, at most 40 "
            "characters (it names the Job, its pods and the rendezvous host)"
        )
    if not store.strip():
        raise WorkloadError("--store is empty: give s3://bucket/runs/NAME (or gs://, az://), or a path on a volume")
    if "://" in store and scheme(store) not in (*REMOTE_SCHEMES, "file"):
        raise WorkloadError(f"--store {store!r}: the scheme {scheme(store)!r} is not one a worker can reach")
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise WorkloadError(f"--command {command!r} does not parse as a command line: {e}") from e
    if not argv:
        raise WorkloadError("--command is empty: give the training command, e.g. --command 'python train.py'")
    if gpus < 0:
        raise WorkloadError(f"--gpus must be >= 0, not {gpus}")
    if max_restarts < 0:
        raise WorkloadError(f"--max-restarts must be >= 0, not {max_restarts}")
    lo, hi = parse_nodes(nodes)
    extra = parse_env(env)
    for key in extra:
        if key == "SPOTSAFE_STORE":
            raise WorkloadError("--env SPOTSAFE_STORE: the store is --store")
    return Workload(name, store, tuple(argv), lo, hi, gpus, max_restarts, extra)


def torchrun(work: Workload, *, nnodes: str, rendezvous: Sequence[str]) -> list[str]:
    """torchrun around the user's command: elastic over ``nnodes``, the supervisor decides restarts.

    ``--max-restarts=0``: the supervisor (python -m spotsafe.resume) knows whose instance is going
    away and relaunches the survivors itself (docs/distributed.md); ``last_call_timeout=5`` keeps
    the survivors of a notice from idling torchrun's default 30 s.
    """
    cmd = list(work.command)
    if re.fullmatch(r"python[0-9.]*", cmd[0].rsplit("/", 1)[-1]):
        script = cmd[1:]  # torchrun runs its own python: "train.py ARGS" or "-m module ARGS"
    else:
        script = ["--no-python", *cmd]
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={work.nproc_per_node}",
        "--max-restarts=0",
        *rendezvous,
        *script,
    ]


def supervisor(work: Workload, inner: Sequence[str], *, python: str = "python") -> list[str]:
    """``python -m spotsafe.resume`` around ``inner``: the process each engine starts."""
    return [
        python,
        "-m",
        "spotsafe.resume",
        "--store",
        work.store,
        "--max-restarts",
        str(work.max_restarts),
        "--",
        *inner,
    ]


def dump_yaml(doc: Any) -> str:
    """Block-style YAML for plain data (dicts, lists, str, int, bool, None); strings double-quoted.

    A double-quoted YAML scalar accepts JSON's escapes, so ``json.dumps`` quotes every string
    exactly (no YAML 1.1 surprises such as ``on`` or ``0755``); no dependency on a YAML library.
    """
    lines: list[str] = []
    _emit(doc, 0, lines)
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"dump_yaml: cannot write a {type(value).__name__}")


def _emit(doc: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(doc, Mapping):
        for key, value in doc.items():
            head = f"{pad}{_scalar(str(key)) if not _plain_key(str(key)) else key}:"
            _child(head, value, indent, lines)
    elif isinstance(doc, list):
        for item in doc:
            if isinstance(item, Mapping) and item:
                sub: list[str] = []
                _emit(item, indent + 2, sub)
                sub[0] = f"{pad}- {sub[0][indent + 2 :]}"
                lines.extend(sub)
            else:
                _child(f"{pad}-", item, indent, lines)
    else:
        lines.append(pad + _scalar(doc))


def _child(head: str, value: Any, indent: int, lines: list[str]) -> None:
    if isinstance(value, (Mapping, list)) and value:
        lines.append(head)
        _emit(value, indent + 2, lines)
    elif isinstance(value, Mapping):
        lines.append(f"{head} {{}}")
    elif isinstance(value, list):
        lines.append(f"{head} []")
    elif isinstance(value, str) and _block(value):
        lines.append(f"{head} |")  # a literal block: a script reads as the script
        lines.extend(" " * (indent + 2) + line if line else "" for line in value[:-1].split("\n"))
    else:
        lines.append(f"{head} {_scalar(value)}")


def _block(text: str) -> bool:
    """Whether a literal block scalar (clip chomping) gives ``text`` back exactly."""
    if not text.endswith("\n") or text.endswith("\n\n") or text.startswith((" ", "\n")):
        return False
    return all(c == "\n" or (c.isprintable() and c != "\t") for c in text) and not any(
        line.endswith(" ") for line in text.split("\n")
    )


def _plain_key(key: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", key) is not None and key.lower() not in (
        "y",
        "n",
        "yes",
        "no",
        "on",
        "off",
        "true",
        "false",
        "null",
    )
