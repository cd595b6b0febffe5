"""What the three launchers (``spotsafe.cloud.{aws,gcp,azure}.launch``) share: plan steps, run settings, reports.

- :class:`Step` / :class:`Result`: one line of a plan or of what was done, and their list
  (``changes``: what a ``--yes`` would do or did);
- :class:`RunSpec`: what every cloud's run is asked for (name, command, store, code source), and
  :func:`settings_script`: the boot script's settings as shell lines that an already-set
  environment variable overrides;
- :func:`report_launch` / :func:`report_down`: the closing line of ``launch`` / ``down``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

Verb = Literal["create", "update", "keep", "delete", "note"]


@dataclass(frozen=True)
class Step:
    """One line of a plan or of what was done."""

    verb: Verb
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.verb:<7} {self.kind} {self.name}{tail}"


@dataclass
class Result:
    """What a launch or a down planned or did; ``applied`` False for a plan only."""

    steps: list[Step] = field(default_factory=list)
    applied: bool = False

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.verb in ("create", "update", "delete")]

    def recorder(self, on_step: Callable[[Step], None]) -> Callable[[Verb, str, str, str], None]:
        """A ``say(verb, kind, name, detail)`` that records a step and shows it."""

        def say(verb: Verb, kind: str, name: str, detail: str = "") -> None:
            s = Step(verb, kind, name, detail)
            self.steps.append(s)
            on_step(s)

        return say


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """The part of a GCP or Azure run's description that is the same on every cloud."""

    name: str
    command: str
    store: str
    repo: str | None = None
    ref: str | None = None
    pip_spec: str | None = None
    pip_sha256: str | None = None
    python: str | None = None
    shutdown_when_done: bool = True

    @property
    def resource(self) -> str:
        return f"spotsafe-{self.name}"

    def run_settings(self, cloud: str) -> list[tuple[str, str]]:
        """The boot script's settings every cloud's run has."""
        return [
            ("SPOTSAFE_CLOUD", cloud),
            ("SPOTSAFE_RUN", self.name),
            ("SPOTSAFE_STORE", self.store),
            ("SPOTSAFE_TRAIN_COMMAND", self.command),
            ("SPOTSAFE_SHUTDOWN_WHEN_DONE", "1" if self.shutdown_when_done else "0"),
            # Never an idle GPU after a failed boot: the group replaces the VM.
            ("SPOTSAFE_SHUTDOWN_ON_FAILURE", "1"),
        ]

    def source_settings(self) -> list[tuple[str, str]]:
        """Where the VM gets the training code and spotsafe (only what was given)."""
        out = [("SPOTSAFE_REPO", self.repo), ("SPOTSAFE_REF", self.ref or "HEAD")] if self.repo else []
        for key, value in (
            ("SPOTSAFE_PIP_SPEC", self.pip_spec),
            ("SPOTSAFE_PIP_SHA256", self.pip_sha256),
            ("SPOTSAFE_PYTHON", self.python),
        ):
            if value is not None:
                out.append((key, value))
        return [(k, str(v)) for k, v in out]


def run_options(ns: Any, mount: str) -> dict[str, Any]:
    """The :class:`RunSpec` fields of a parsed ``launch`` (``store``: None when neither ``--store`` nor a disk)."""
    return {
        "name": ns.name,
        "command": ns.train_command,
        "store": ns.store or (f"{mount}/{ns.name}" if ns.volume_size else None),
        "repo": ns.repo,
        "ref": ns.ref,
        "pip_spec": ns.pip_spec,
        "pip_sha256": ns.pip_sha256,
        "python": ns.python,
        "shutdown_when_done": not ns.keep_running_when_done,
    }


def settings_script(header: str, settings: Iterable[tuple[str, str]], boot: str) -> str:
    """``#!/usr/bin/env bash``, a comment, each setting (an environment variable already set wins), then ``boot``."""
    lines = ["#!/usr/bin/env bash", f"# {header}"]
    for key, value in settings:
        lines += [f'[ -n "${{{key}:-}}" ] || {key}={shlex.quote(value)}', f"export {key}"]
    return "\n".join(lines) + "\n\n" + boot


def report_launch(result: Result, yes: bool, out: TextIO) -> None:
    if not yes:
        print("plan only: rerun with --yes to make these changes" if result.changes else "nothing to change", file=out)


def report_down(result: Result, left: Sequence[str], yes: bool, out: TextIO) -> int:
    """The end of ``down``: the plan's last line, or what is still there (exit 1 when something is)."""
    if not yes:
        print("plan only: rerun with --yes to delete" if result.changes else "nothing to delete", file=out)
        return 0
    for item in left:
        print(f"still there: {item}", file=out)
    return 1 if left else 0
