"""The boot tests' harness, for the three clouds: userdata/spot-boot.sh run as each cloud's VM would run it.

:class:`BootBox` is one "VM" in a sandbox: the cloud's metadata simulator (this VM's identity),
the cloud's API (moto's EC2 and Auto Scaling; the Compute Engine and ARM fakes), a loop device
as the run's disk (behind a fake NVMe /sys tree on AWS, a fake by-id / LUN link on GCP and
Azure), a local bare git repository (the code remote) and every path the script writes under
tmp_path. The ``bootbox`` fixture (tests/plugins/boot.py) builds one per cloud; the helpers
below serve the fast tests that need no VM (:func:`bare_env`, :func:`run_script`).
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import git

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "userdata" / "spot-boot.sh"
UNIT = ROOT / "userdata" / "spotsafe-train.service"
#: The GCP project and zone of the simulated VM and its managed instance group.
PROJECT, ZONE = "spotsafe-sim", "us-central1-a"

#: The training code in the code remote: a Run that logs each step and can crash at a step
#: (CRASH_AT); 2 epochs of 6 steps, a checkpoint every 2 steps and no watcher unless the
#: environment says otherwise (BATCHES, EVERY_STEPS, WATCH=1, STEP_SLEEP seconds).
TRAIN_PY = """\
import os, sys, time
import torch
import spotsafe

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
every = int(os.environ.get("EVERY_STEPS", "2"))
watch = os.environ.get("WATCH") == "1"
run = spotsafe.Run(model=model, optimizer=opt, every_steps=every, watch=watch, async_=False)
print("resumed from", run.resumed_from.step if run.resumed_from else None, flush=True)
crash_at = int(os.environ.get("CRASH_AT", "0"))
pause = float(os.environ.get("STEP_SLEEP", "0"))
data = [torch.full((4,), float(i)) for i in range(int(os.environ.get("BATCHES", "6")))]
with open(os.environ["STEPS_FILE"], "a") as steps:
    for epoch in run.epochs(2):
        for x in run.batches(data):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss.item())
            steps.write(f"{os.environ.get('TRAIN_TAG', '?')} {run.step_count}\\n")
            steps.flush()
            if crash_at and run.step_count == crash_at:
                os._exit(3)  # the instance vanished
            time.sleep(pause)
run.finish()
print("finished at step", run.step_count, flush=True)
"""


# --------------------------------------------------------------------------- no VM


def bare_env(tmp_path: Path, cloud: str | None = None, **overrides: str) -> dict[str, str]:
    """The script's paths under tmp_path; nothing reachable (conftest's closed loopback endpoints).

    ``cloud``: SPOTSAFE_CLOUD, so that a phase that needs the cloud does not look for a
    metadata service (none answers here); None leaves it to the script (auto).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_") and k != "PYTHONPATH"}
    env.update(
        {
            "SPOTSAFE_RUN": "r",
            "SPOTSAFE_USER": getpass.getuser(),
            "SPOTSAFE_MOUNT": str(tmp_path / "mnt"),
            "SPOTSAFE_SHUTDOWN_CMD": f"touch {tmp_path}/shutdown-called",
            "SPOTSAFE_ETC": str(tmp_path / "etc"),
            "SPOTSAFE_INSTALL_PATH": str(tmp_path / "sbin" / "spotsafe-boot"),
            "SPOTSAFE_UNIT_DIR": str(tmp_path / "systemd"),
            "SPOTSAFE_PER_BOOT_DIR": str(tmp_path / "per-boot"),
            "SPOTSAFE_BOOT_LOG": str(tmp_path / "boot.log"),
            "SPOTSAFE_VOLUME_ARGS": "--metadata-retry-for 0 --metadata-timeout 0.5",
        }
    )
    if cloud is not None:
        env["SPOTSAFE_CLOUD"] = cloud
    env.update(overrides)
    return env


def run_script(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``bash spot-boot.sh ARGS`` in ``env``, from /, its output captured."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd="/", capture_output=True, text=True, timeout=timeout
    )


def fake_systemd(bindir: Path, calls: Path, tools: tuple[str, ...] = ("systemctl",), *, bare: bool = True) -> str:
    """Recorders standing in for systemd's tools (systemd cannot run here); the PATH that finds them.

    Each call is appended to ``calls``: its arguments (``bare``), or the tool's name and its
    arguments; ``is-active`` answers "no".
    """
    bindir.mkdir(exist_ok=True)
    for tool in tools:
        line = "$*" if bare else f"{tool} $*"
        (bindir / tool).write_text(f'#!/bin/sh\necho "{line}" >> {calls}\ncase "$1" in is-active) exit 3 ;; esac\n')
        (bindir / tool).chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


def code_remote(tmp_path: Path, work: Path, files: dict[str, str]) -> tuple[Path, str]:
    """A bare repository under tmp_path holding ``files`` (committed in ``work``): (its path, the commit)."""
    work.mkdir(exist_ok=True)
    for name, text in files.items():
        (work / name).write_text(text)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", *files, cwd=work)
    git("commit", "-q", "-m", "train", cwd=work)
    git("push", "-q", str(remote), "main", cwd=work)
    return remote, git("rev-parse", "HEAD", cwd=work)


def env_file(path: Path) -> dict[str, str]:
    """The NAME='value' lines of the environment file the script writes, as systemd reads them."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        assert value.startswith("'") and value.endswith("'"), f"{line}"
        out[key] = value[1:-1]
    return out


def steps(path: Path, tag: str = "") -> list[str]:
    """The steps the training logged (those of the ``tag`` run when given)."""
    return [s for s in (path.read_text().splitlines() if path.exists() else []) if s.startswith(tag)]


def is_complete(store: Path) -> bool:
    from spotsafe.checkpoint.writer import Checkpointer

    ckpt = Checkpointer(str(store))
    try:
        return ckpt.completion() is not None
    finally:
        ckpt.close()


# --------------------------------------------------------------------------- one VM


@dataclass
class BootBox:
    """One VM of ``cloud`` in a sandbox; ``env`` is the environment its boot script runs in."""

    cloud: str
    root: Path
    env: dict[str, str]
    device: str
    mount: Path
    run: str
    steps: Path
    first_commit: str
    sim: Any  # the metadata simulator
    api: Any  # AWS: the EC2 client; GCP: the ComputeFake; Azure: the ARMFake
    volume_id: str = ""  # AWS
    request_id: str = ""  # AWS: the persistent spot request that launched the "instance"

    @property
    def store(self) -> Path:
        return self.mount / self.run

    @property
    def shutdown_called(self) -> Path:
        return self.root / "shutdown-called"

    def boot(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env={**self.env, **overrides}, capture_output=True, text=True, timeout=300
        )

    def replacing(self) -> bool:
        """Whether the platform would replace this VM: the spot request open, the group / scale set at 1."""
        if self.cloud == "aws":
            r = self.api.describe_spot_instance_requests(
                Filters=[{"Name": "spot-instance-request-id", "Values": [self.request_id]}]
            )
            return any(q["State"] in ("open", "active") for q in r["SpotInstanceRequests"])
        return self.group_size() > 0

    def group(self) -> dict[str, Any]:
        """GCP: the managed instance group; Azure: the scale set (as the fake holds them)."""
        if self.cloud == "gcp":
            return dict(self.api.groups[(PROJECT, ZONE, self.run)])
        return dict(self.api.scale_sets[(self.sim.subscription_id, self.sim.resource_group, self.run)])

    def group_size(self) -> int:
        group = self.group()
        return int(group["targetSize"] if self.cloud == "gcp" else group["sku"]["capacity"])

    def scale_up(self) -> None:
        """Someone sets the group / scale set back to 1."""
        if self.cloud == "gcp":
            self.api.groups[(PROJECT, ZONE, self.run)]["targetSize"] = 1
        else:
            self.api.scale_sets[(self.sim.subscription_id, self.sim.resource_group, self.run)]["sku"]["capacity"] = 1

    def tokens(self) -> list[str]:
        """The access tokens the metadata service issued to this VM."""
        return list(self.sim.tokens_issued) if self.cloud == "gcp" else [t for _, t in self.sim.tokens_issued]

    def populate(self) -> int:
        """The disk's content: ext4 and a run that checkpointed (step 4, or 2) and died at step 5; the step saved.

        Step 2 when Run deferred the step-4 save behind a save still in flight (spotsafe.Run
        never stalls the loop for a periodic save).
        """
        subprocess.run(["mkfs.ext4", "-q", self.device], check=True)
        pre = self.root / "pre"
        pre.mkdir()
        subprocess.run(["mount", self.device, str(pre)], check=True)
        try:
            env = {
                **os.environ,
                "SPOTSAFE_STORE": str(pre / self.run),
                "CRASH_AT": "5",
                "STEPS_FILE": str(self.steps),
                "TRAIN_TAG": "first",
                "SPOTSAFE_SOURCES": "signal",
            }
            p = subprocess.run(
                [sys.executable, "train.py"],
                cwd=self.root / "work",
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert p.returncode == 3, f"{p.stdout + p.stderr}"
            assert steps(self.steps, "first") == [f"first {i}" for i in range(1, 6)]
            from spotsafe.checkpoint.writer import Checkpointer

            ckpt = Checkpointer(str(pre / self.run))
            try:
                info = ckpt.latest()
                assert info is not None
                return int(info.step)
            finally:
                ckpt.close()
        finally:
            subprocess.run(["umount", str(pre)], check=True)

    def phase(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """A phase of the installed script as the unit runs it (:meth:`unit_env`, and ``env``)."""
        return subprocess.run(
            [self.env["SPOTSAFE_INSTALL_PATH"], *args],
            env=self.unit_env(**env),
            capture_output=True,
            text=True,
            timeout=300,
        )

    def unit_env(self, **extra: str) -> dict[str, str]:
        """What systemd gives the unit's phases: the environment file (and what the test's training reads)."""
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/root",
            "STEPS_FILE": str(self.steps),
            "TRAIN_TAG": "second",
            "PYTHONPATH": self.env.get("PYTHONPATH", ""),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        env.update(env_file(self.root / "etc" / "spotsafe.env"))
        env.update(extra)
        return env
