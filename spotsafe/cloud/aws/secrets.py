"""Secrets for a launched run: named in the launch, read on the instance, given to training only.

``spotsafe launch --secret NAME=ssm:/path`` (or ``NAME=secretsmanager:ID``) puts only the
reference in the user data (``SPOTSAFE_SECRETS``); the instance's role may read exactly
those parameters and secrets. On the instance the boot script starts the supervisor through

    python -m spotsafe.cloud.aws.secrets [--region R] -- python -m spotsafe.resume ...

which reads each value with the role and ``exec``s the command with ``NAME=value`` added to
its environment: the values are in the training process tree's environment, never in the
user data, the environment file or a log. ``--check`` reads them and prints the names only
(the boot does it first, so a missing parameter fails the boot with its name).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.cloud.aws.clients import client, error_code
from spotsafe.errors import LaunchConfigError

__all__ = ["ENV", "SecretRef", "main", "parse_refs", "resolve"]

#: The setting that carries the references (space-separated ``NAME=source:id``).
ENV = "SPOTSAFE_SECRETS"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SSM_RE = re.compile(r"[A-Za-z0-9_.\-/]{1,1011}")
_SM_RE = re.compile(r"[A-Za-z0-9/_+=.@\-]{1,512}")
SOURCES = ("ssm", "secretsmanager")


@dataclass(frozen=True)
class SecretRef:
    """``NAME=ssm:/path`` or ``NAME=secretsmanager:ID``: an environment variable and where its value is."""

    name: str
    source: str
    ident: str

    def __str__(self) -> str:
        return f"{self.name}={self.source}:{self.ident}"

    @property
    def arn(self) -> str:
        """The ARN pattern the instance's role may read (any region and account of the role's own)."""
        if self.source == "ssm":
            return f"arn:aws:ssm:*:*:parameter/{self.ident.lstrip('/')}"
        # Secrets Manager appends a dash and six random characters to a secret's name in its ARN.
        return f"arn:aws:secretsmanager:*:*:secret:{self.ident}-??????"

    @property
    def action(self) -> str:
        return "ssm:GetParameter" if self.source == "ssm" else "secretsmanager:GetSecretValue"

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        name, sep, where = text.partition("=")
        source, colon, ident = where.partition(":")
        if not sep or not colon or not _NAME_RE.fullmatch(name) or source not in SOURCES:
            raise LaunchConfigError(
                f"--secret {text!r}: give NAME=ssm:/parameter/path or NAME=secretsmanager:secret-name "
                "(NAME: the environment variable the training process gets)"
            )
        if name.startswith("SPOTSAFE_") or name.startswith("AWS_"):
            raise LaunchConfigError(f"--secret {text!r}: {name} is spotsafe's or AWS's own variable: pick another name")
        pattern = _SSM_RE if source == "ssm" else _SM_RE
        if not pattern.fullmatch(ident) or "*" in ident or "?" in ident:
            raise LaunchConfigError(f"--secret {text!r}: {ident!r} is not a {source} name (no wildcards, no spaces)")
        return cls(name, source, ident)


def parse_refs(text: str) -> list[SecretRef]:
    """The references in a ``SPOTSAFE_SECRETS`` value; a repeated NAME is refused."""
    refs = [SecretRef.parse(t) for t in text.split()]
    names = [r.name for r in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LaunchConfigError(f"--secret: {', '.join(dupes)} given twice")
    return refs


def resolve(refs: Sequence[SecretRef], region: str, *, clients: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{NAME: value}``, read with this process's credentials (the instance role)."""
    made: dict[str, Any] = dict(clients or {})
    out: dict[str, str] = {}
    for ref in refs:
        c = made.get(ref.source)
        if c is None:
            c = made[ref.source] = client(ref.source, region)
        try:
            if ref.source == "ssm":
                out[ref.name] = str(c.get_parameter(Name=ref.ident, WithDecryption=True)["Parameter"]["Value"])
            else:
                got = c.get_secret_value(SecretId=ref.ident)
                out[ref.name] = str(got["SecretString"]) if "SecretString" in got else got["SecretBinary"].decode()
        except Exception as e:
            code = error_code(e) or type(e).__name__
            raise LaunchConfigError(
                f"secret {ref}: cannot read it ({code}): is it there in {region}, and may the instance role "
                f"call {ref.action} on it (and kms:Decrypt with a customer-managed key)?"
            ) from e
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.cloud.aws.secrets",
        description=f"Run a command with the secrets ${ENV} names in its environment.",
    )
    parser.add_argument("--region", default=os.environ.get("SPOTSAFE_REGION") or None)
    parser.add_argument("--check", action="store_true", help="read the secrets, print their names, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.check and not command:
        parser.error("give the command after --")
    try:
        refs = parse_refs(os.environ.get(ENV, ""))
        region = args.region or _region()
        values = resolve(refs, region)
    except Exception as e:  # noqa: BLE001 - one line naming the secret, never its value
        print(f"spotsafe secrets: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(" ".join(sorted(values)) or "no secrets")
        return 0
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(values)
    os.execvpe(command[0], command, env)


def _region() -> str:
    from spotsafe.cloud.aws.metadata import AWSMetadata

    return AWSMetadata().region


if __name__ == "__main__":
    raise SystemExit(main())
