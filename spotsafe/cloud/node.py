"""Is *this* instance going away? The supervisor's own look at its own instance.

In a job of several nodes a notice reaches one instance, but every rank of every
node saves and exits 75 (:mod:`spotsafe.distributed` agrees on it). So a worker's
exit 75, and a notice checkpoint in the shared store, say "the job stopped for a
notice somewhere", not "this instance is doomed". :func:`check` asks this
instance's own metadata, fresh, at the moment the supervisor must decide:

* ``"doomed"``: a source of this instance (AWS IMDS, GCP metadata, Azure Scheduled
  Events) announces a final notice (terminate, stop, hibernate; a rebalance
  recommendation is not one);
* ``"healthy"``: at least one source answered and none announces anything;
* ``"unknown"``: no source answered (not on a cloud, or every source turned off):
  nothing here can tell, and the caller keeps the conservative reading.

A signal to the supervisor itself (SIGTERM from systemd, Kubernetes, SLURM) is its
own proof and is handled by the supervisor, not here.

The sources are chosen as :class:`spotsafe.cloud.watcher.InterruptionWatcher` chooses
them, from the environment given (the training command's, so a simulator set up for
the child is the supervisor's instance too): ``SPOTSAFE_SOURCES`` names them (then
they are asked directly), else AWS, GCP and Azure are probed with a short timeout
(``AWS_EC2_METADATA_DISABLED`` turns AWS off). Only the metadata endpoints are
contacted, read-only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from spotsafe.cloud.aws.notices import AWSSource
from spotsafe.cloud.azure.notices import AzureSource
from spotsafe.cloud.gcp.notices import GCPSource
from spotsafe.cloud.notice import Notice, Source
from spotsafe.settings import Settings

__all__ = ["InstanceState", "Verdict", "check"]

log = logging.getLogger(__name__)

Verdict = Literal["doomed", "healthy", "unknown"]
_PROVIDERS = ("aws", "gcp", "azure")


@dataclass(frozen=True)
class InstanceState:
    """What this instance's own metadata says now."""

    verdict: Verdict
    #: The final notice when ``verdict == "doomed"``.
    notice: Notice | None
    #: Names of the sources that answered.
    answered: tuple[str, ...]
    #: One line for a log: which sources said what.
    detail: str


def _make(name: str, settings: Settings, timeout: float) -> Source:
    if name == "aws":
        return AWSSource(settings.aws_endpoint, rebalance=False, timeout=timeout)
    if name == "gcp":
        return GCPSource(settings.gcp_host, timeout=timeout)
    return AzureSource(settings.azure_endpoint, timeout=timeout)


def _candidates(settings: Settings) -> tuple[list[str], bool]:
    """(provider names to ask, whether to probe them first)."""
    spec = (settings.sources or "auto").strip().lower()
    names = [s.strip() for s in spec.split(",")]
    unknown = [n for n in names if n not in ("", "none", "auto", "signal", *_PROVIDERS)]
    if unknown:
        raise ValueError(
            f"unknown interruption source {unknown[0]!r} in SPOTSAFE_SOURCES={settings.sources!r}; "
            "use auto, aws, gcp, azure, signal or none"
        )
    probe = "auto" in names
    wanted = list(_PROVIDERS) if probe else [n for n in _PROVIDERS if n in names]
    if settings.aws_disabled and "aws" in wanted:
        wanted.remove("aws")
    return wanted, probe


def check(env: Mapping[str, str] | None = None, *, timeout: float = 1.0, probe_timeout: float = 0.5) -> InstanceState:
    """Ask this instance's metadata, now, whether it is going away (see the module docstring).

    Every source is asked in parallel; the whole check is bounded by about
    ``probe_timeout + timeout`` seconds (a DNS lookup that hangs included). Never
    raises for an unreachable or misbehaving endpoint: that source just did not answer.
    """
    settings = Settings.from_env(env)
    names, probe = _candidates(settings)
    results: dict[str, Notice | Exception | None] = {}
    guard = threading.Lock()

    def ask(name: str) -> None:
        source = _make(name, settings, timeout)
        outcome: Notice | Exception | None
        try:
            if probe and not source.probe(probe_timeout):
                return  # not this cloud
            outcome = source.poll(0.0)
        except Exception as e:  # noqa: BLE001 - an unreachable source says nothing either way
            outcome = e
        finally:
            source.close()
        with guard:
            results[name] = outcome

    threads = [threading.Thread(target=ask, args=(n,), name=f"spotsafe-node-{n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    # Connect and read timeouts bound each request, not a DNS lookup: one overall deadline does.
    deadline = time.monotonic() + probe_timeout + 2 * timeout + 0.5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with guard:
        seen = dict(results)
    answered = tuple(n for n, r in seen.items() if not isinstance(r, Exception))
    finals = [r for r in seen.values() if isinstance(r, Notice) and r.is_final]
    parts = []
    for name in names:
        r = seen.get(name)
        if name not in seen:
            parts.append(f"{name}: absent")
        elif isinstance(r, Exception):
            parts.append(f"{name}: no answer ({r})")
        elif isinstance(r, Notice):
            parts.append(f"{name}: {r.action} notice")
        else:
            parts.append(f"{name}: quiet")
    detail = "; ".join(parts) if parts else "no metadata source configured"
    if finals:
        return InstanceState("doomed", finals[0], answered, detail)
    if answered:
        return InstanceState("healthy", None, answered, detail)
    return InstanceState("unknown", None, answered, detail)
