"""Why a training process stopped, told to the supervisor that started it.

``python -m spotsafe.resume`` names a private directory in ``SPOTSAFE_STOP_DIR`` for each
launch; a :class:`~spotsafe.Run` that stops on a final notice writes one small JSON file
there (atomically: a temporary file renamed) before it exits: whether the notice was its
own (its instance's metadata, or a signal sent to this very process) or one agreed from
another rank, with its source and action. The supervisor reads them after the command
exits (:func:`read_accounts`) and asks the instance's metadata only when there is none.

One file per process (``stop-<pid>.json``): every rank of a torchrun launch on the node
tells its own account.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

#: The environment variable naming the directory a supervisor reads the accounts from.
STOP_DIR_ENV = "SPOTSAFE_STOP_DIR"
_PREFIX = "stop-"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopAccount:
    """One process's reason for stopping on a notice."""

    #: True: the notice was this process's own (its instance's metadata, or a signal to it);
    #: False: a final notice another rank saw, agreed by all.
    own: bool
    #: Where the notice came from: ``aws``, ``gcp``, ``azure``, ``signal``, or ``rank N``.
    source: str
    #: ``terminate``, ``stop`` or ``hibernate``.
    action: str
    #: The step the run saved and stopped at.
    step: int
    pid: int
    #: True: not a notice: another writer took the store over (exit 77, which torchrun reports as 1);
    #: the supervisor must not restart the command here.
    fenced: bool = False

    def describe(self) -> str:
        if self.fenced:
            return f"another writer taking the store over at step {self.step}"
        whose = "its own notice" if self.own else "a notice agreed from another rank"
        return f"{whose} ({self.source}: {self.action}) at step {self.step}"


def record_stop(account: StopAccount, env: Mapping[str, str] | None = None) -> Path | None:
    """Write ``account`` where the supervisor looks (None when no supervisor named a directory)."""
    directory = (os.environ if env is None else env).get(STOP_DIR_ENV)
    if not directory:
        return None
    target = Path(directory) / f"{_PREFIX}{account.pid}.json"
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(account), f)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:  # the state is saved either way; the supervisor falls back on the metadata
        log.warning("could not tell the supervisor why this run stopped (%s=%s): %s", STOP_DIR_ENV, directory, e)
        return None
    return target


def read_accounts(directory: str | Path) -> list[StopAccount]:
    """Every account in ``directory``; a file that is not one is skipped (it cannot vouch for anything)."""
    out: list[StopAccount] = []
    for path in sorted(Path(directory).glob(f"{_PREFIX}*.json")):
        try:
            data = json.loads(path.read_text())
            out.append(
                StopAccount(
                    own=bool(data["own"]),
                    source=str(data["source"]),
                    action=str(data["action"]),
                    step=int(data["step"]),
                    pid=int(data["pid"]),
                    fenced=data.get("fenced", False) is True,
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def final_accounts(directory: str | Path) -> list[StopAccount]:
    """The accounts of the launch's last stop: those at its newest step.

    An elastic torchrun restarts its workers inside one launch (a node joined or left: it sends
    them SIGTERM, they save and exit 75, new workers resume); those earlier stops left accounts
    too, at earlier steps. Only the last one says why the launch ended.
    """
    accounts = read_accounts(directory)
    newest = max((a.step for a in accounts), default=0)
    return [a for a in accounts if a.step == newest]


def clear(directory: str | Path) -> None:
    """Forget the accounts of an earlier launch."""
    for path in Path(directory).glob(f"{_PREFIX}*.json"):
        path.unlink(missing_ok=True)
