"""Every environment knob spotsafe reads, in one place.

Read through :meth:`Settings.from_env` at the moment a component is built (not at
import), so a test or a supervisor that sets a variable before constructing a
watcher or a run is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

AWS_DEFAULT_ENDPOINT = "http://169.254.169.254"
GCP_DEFAULT_HOST = "metadata.google.internal"
AZURE_DEFAULT_ENDPOINT = "http://169.254.169.254"

#: When a process gets a path here, it appends one JSON line per notable event
#: (start, resumed, notice, durable, complete); the rehearsal reads them.
EVENTS_ENV = "SPOTSAFE_EVENTS"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be > 0 seconds")
    return value


def _steps(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of steps") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be >= 1 step")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise ValueError(f"{name}={env.get(name)!r} is not one of {', '.join(choices)}")
    return raw


@dataclass(frozen=True)
class Settings:
    #: SPOTSAFE_STORE: the store ``Run()`` uses when given none (set by ``spotsafe.resume``).
    store: str | None
    #: AWS_EC2_METADATA_SERVICE_ENDPOINT (botocore's name): base URL of IMDS.
    aws_endpoint: str
    #: AWS_EC2_METADATA_DISABLED=true turns the AWS source off (botocore's name).
    aws_disabled: bool
    #: GCE_METADATA_HOST (google-auth's name): host[:port] of the GCP metadata server.
    gcp_host: str
    #: SPOTSAFE_AZURE_METADATA_ENDPOINT: base URL of the Azure instance metadata service.
    azure_endpoint: str
    #: SPOTSAFE_SOURCES: comma-separated watcher sources overriding "auto" (e.g. "aws,signal").
    sources: str | None
    #: SPOTSAFE_SIGNAL_GRACE: seconds between a SIGTERM and the kill that follows it (default 30,
    #: as Kubernetes and systemd); set it to the platform's grace period.
    signal_grace: float
    #: SPOTSAFE_EVENTS: a file spotsafe.Run appends JSON-lines events to (the rehearsal reads it).
    events: str | None
    #: SPOTSAFE_REHEARSAL_AFTER_STEPS: set by the rehearsal for the command: the notice appears once
    #: the run has taken this many steps since it started (or resumed). The rehearsal counts them
    #: itself, from the run's events file (spotsafe.rehearsal.rehearse).
    rehearsal_after_steps: int | None = None
    #: SPOTSAFE_LEASE_SECONDS: how long a writer's lease on a store lasts without renewal
    #: (default 60). The holder renews every third of it; a replacement takes over a lease
    #: left unrenewed this long. 60 s is half of AWS's two-minute notice and twice GCP's and
    #: Azure's 30 s: a replacement that boots while the old instance dies unannounced waits at
    #: most a minute, yet a live writer survives two missed renewals (a slow S3 PUT, a GC pause).
    lease_seconds: float = 60.0
    #: SPOTSAFE_SIGINT: what SIGINT does to a training process whose Run watches signals.
    #: ``save`` (default): the same as SIGTERM, a notice (checkpoint, exit 75), so a supervisor's
    #: or a platform's SIGINT never costs the steps since the last checkpoint; ``interrupt``:
    #: Python's own KeyboardInterrupt, Ctrl+C in a terminal as "stop now" (the Run then never
    #: marks the run complete; ``finish()`` saves and leaves it resumable).
    sigint: str = "save"
    #: SPOTSAFE_QUIET=1: no "resuming from step N" line on stderr when logging is not configured.
    quiet: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            store=env.get("SPOTSAFE_STORE") or None,
            aws_endpoint=(env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or AWS_DEFAULT_ENDPOINT).rstrip("/"),
            aws_disabled=_truthy(env.get("AWS_EC2_METADATA_DISABLED")),
            gcp_host=env.get("GCE_METADATA_HOST") or GCP_DEFAULT_HOST,
            azure_endpoint=(env.get("SPOTSAFE_AZURE_METADATA_ENDPOINT") or AZURE_DEFAULT_ENDPOINT).rstrip("/"),
            sources=env.get("SPOTSAFE_SOURCES") or None,
            signal_grace=_seconds(env, "SPOTSAFE_SIGNAL_GRACE", 30.0),
            events=env.get("SPOTSAFE_EVENTS") or None,
            rehearsal_after_steps=_steps(env, "SPOTSAFE_REHEARSAL_AFTER_STEPS"),
            lease_seconds=_seconds(env, "SPOTSAFE_LEASE_SECONDS", 60.0),
            sigint=_choice(env, "SPOTSAFE_SIGINT", ("save", "interrupt")),
            quiet=_truthy(env.get("SPOTSAFE_QUIET")),
        )
