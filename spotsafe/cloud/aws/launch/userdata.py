"""The user data of a run's launch template: its settings, then ``userdata/spot-boot.sh`` unchanged.

Also the way back (:func:`decode_user_data`, :func:`settings_from_user_data`: what
``launch`` compares and the tests read) and the pinning of ``--ref`` to a commit
(:func:`resolve_ref`), so that every instance of a run runs the same code.
"""

from __future__ import annotations

import base64
import gzip
import re
import shlex
import subprocess

from spotsafe.cloud import bootscript
from spotsafe.cloud.aws.launch.spec import LaunchSpec
from spotsafe.errors import LaunchError

#: EC2's limit on user data, in bytes, before base64.
USER_DATA_LIMIT = 16384
#: A setting the packaged boot script must honour for a volume-less (S3) run.
NO_VOLUME_SETTING = "SPOTSAFE_ATTACH"
#: A commit id, as ``--ref`` may give it and as a pinned ref always is.
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def boot_script() -> str:
    """The text of ``userdata/spot-boot.sh``, the boot script of all three clouds."""
    return bootscript.boot_script()


def run_settings(spec: LaunchSpec, *, region: str, volume_id: str | None, ref: str | None) -> list[tuple[str, str]]:
    """The SPOTSAFE_* settings of the boot script for this run, in order."""
    settings = [
        ("SPOTSAFE_CLOUD", "aws"),  # known: the boot script need not ask the metadata services which cloud
        ("SPOTSAFE_RUN", spec.name),
        ("SPOTSAFE_REGION", region),
        ("SPOTSAFE_STORE", spec.store),
        ("SPOTSAFE_TRAIN_COMMAND", spec.command),
        ("SPOTSAFE_SHUTDOWN_WHEN_DONE", "1" if spec.shutdown_when_done else "0"),
        # Never an idle GPU after a failed boot: the group replaces the instance.
        ("SPOTSAFE_SHUTDOWN_ON_FAILURE", "1"),
    ]
    if spec.repo:
        settings += [("SPOTSAFE_REPO", spec.repo), ("SPOTSAFE_REF", ref or "HEAD")]
    if spec.secrets:
        # Where each value is, never the value: the instance reads them with its role (spotsafe.cloud.aws.secrets).
        settings.append(("SPOTSAFE_SECRETS", " ".join(str(r) for r in spec.secret_refs)))
    if spec.volume_mode:
        # No id: the boot script finds the volume by its tag spotsafe-run=NAME.
        settings += [("SPOTSAFE_VOLUME_ID", volume_id)] if volume_id else []
        settings += [
            # The group stays in the volume's zone: no moves (docs/launch.md, "Zones").
            ("SPOTSAFE_MOVE", "0"),
            ("SPOTSAFE_MOUNT", _mount(spec)),
        ]
    else:
        settings += [(NO_VOLUME_SETTING, "0"), ("SPOTSAFE_MOUNT", "/var/lib/spotsafe")]
    for key, value in (
        ("SPOTSAFE_USER", spec.user),
        ("SPOTSAFE_PIP_SPEC", spec.pip_spec),
        ("SPOTSAFE_PIP_SHA256", spec.pip_sha256),
        ("SPOTSAFE_PYTHON", spec.python),
        ("SPOTSAFE_REQUIREMENTS", spec.requirements),
    ):
        if value is not None:
            settings.append((key, value))
    return settings


def _mount(spec: LaunchSpec) -> str:
    return spec.mount.rstrip("/") or "/"


def user_data(
    spec: LaunchSpec, *, region: str, volume_id: str | None, ref: str | None, script: str | None = None
) -> str:
    """The launch template's user data: the run's settings, then the boot script unchanged.

    Each setting is assigned only when the environment has none (as the script's own
    ``: "${VAR:=default}"`` lines do), so an operator can still override one.
    """
    lines = [
        "#!/usr/bin/env bash",
        f"# spotsafe launch {spec.name}: this run's settings (generated; `spotsafe launch` rewrites them),",
        "# then userdata/spot-boot.sh unchanged. Settings already in the environment win.",
    ]
    for key, value in run_settings(spec, region=region, volume_id=volume_id, ref=ref):
        # A string for `bash -c` later, quotes and all: not meant to be split or expanded here.
        quiet = "# shellcheck disable=SC2016,SC2089,SC2090\n" if any(c in value for c in '"\\$`') else ""
        lines.append(f'{quiet}[ -n "${{{key}:-}}" ] || {key}={shlex.quote(value)}')
        lines.append(f"{quiet}export {key}")
    return "\n".join(lines) + "\n\n" + (boot_script() if script is None else script)


def encode_user_data(text: str) -> str:
    """Gzipped (cloud-init unpacks it) and base64-encoded, as a launch template takes it.

    EC2 takes at most 16 KiB of user data and the boot script alone is larger; gzip
    brings it to about a third. ``mtime=0``: the same text always encodes the same, so
    a rerun of ``launch`` sees no change.
    """
    raw = gzip.compress(text.encode(), compresslevel=9, mtime=0)
    if len(raw) > USER_DATA_LIMIT:
        raise LaunchError(
            f"the user data is {len(raw)} bytes gzipped, over EC2's {USER_DATA_LIMIT}: shorten the settings"
        )
    return base64.b64encode(raw).decode()


def decode_user_data(b64: str) -> str:
    """What cloud-init runs: the base64 user data, gunzipped when it is gzip."""
    raw = base64.b64decode(b64)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode()


def settings_from_user_data(text: str) -> dict[str, str]:
    """The settings a generated header assigns (``status`` and tests read them back)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\[ -n "\$\{(SPOTSAFE_[A-Z_]+):-\}" \] \|\| \1=(.*)', line)
        if m:
            out[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return out


def resolve_ref(repo: str, ref: str | None, *, timeout: float = 60.0) -> str:
    """The commit ``ref`` names in ``repo`` now (``git ls-remote``), so every instance runs the same code."""
    if ref and COMMIT_RE.fullmatch(ref):
        return ref
    want = ref or "HEAD"
    try:
        p = subprocess.run(
            ["git", "ls-remote", "--", repo, want, want + "^{}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"--repo {repo}: cannot run git ls-remote to pin --ref {want} ({e}); pass a commit id") from e
    if p.returncode != 0:
        raise LaunchError(
            f"--repo {repo}: git ls-remote failed ({p.stderr.strip() or p.returncode}); pass --ref as a commit id"
        )
    refs: dict[str, str] = {}
    for line in p.stdout.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    for name in (want, f"refs/heads/{want}", f"refs/tags/{want}^{{}}", f"refs/tags/{want}"):
        if name in refs:
            return refs[name]
    raise LaunchError(f"--repo {repo}: no branch or tag named {want!r} (pass --ref as a commit id)")
