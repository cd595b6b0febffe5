"""userdata/spot-boot.sh on GCP and Azure end to end, under each cloud's metadata simulator.

Real components: the GCE metadata server simulator (the zone, the ``created-by`` attribute
of a managed instance group's VM, the service account's token) and Azure IMDS (the scale
set, the managed identity's token endpoint); local fakes of the Compute Engine and ARM REST
APIs (tests/gcefake.py, tests/armfake.py: the requests checked against the published
schemas); a loop device behind a fake ``/dev/disk/by-id/google-<device name>`` link (GCP)
or ``/dev/disk/azure/scsi1/lun0`` link (Azure); a local bare git repository (the code);
the real ``python -m spotsafe.volume mount``, ``python -m spotsafe.resume`` and
``python -m spotsafe.cloud.{gcp,azure}.finish``. systemd cannot run here: one ending records
the ``systemctl`` calls and runs what the unit would. The harness is the AWS tests' own
(tests/bootbox.py, the ``bootbox`` fixture).

The three endings, on each cloud: training (under systemd), a clean "run complete" with the
group / scale set at 0, and a shutdown after the training command keeps crashing. And GCP's
preemption as a user meets it: the metadata server's notice and the shutdown-script together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.filesystem import filesystem_type, mounted_at
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from tests.armfake import ARMFake
from tests.bootbox import (
    PROJECT,
    ROOT,
    SCRIPT,
    UNIT,
    ZONE,
    BootBox,
    bare_env,
    fake_systemd,
    is_complete,
    run_script,
    steps,
)
from tests.gcefake import ComputeFake
from tests.helpers import child, wait_until

# --------------------------------------------------------------------------- settings, phases (no root)


def _declared() -> set[str]:
    return set(re.findall(r'^: "\$\{(SPOTSAFE_[A-Z0-9_]+):=', SCRIPT.read_text(), re.M))


def _assigned(rendered: str) -> set[str]:
    """The settings a launcher's header assigns before the script."""
    return set(re.findall(r'^\[ -n "\$\{(SPOTSAFE_[A-Z0-9_]+):-\}" \] \|\|', rendered, re.M))


def test_every_launcher_renders_the_one_script_and_sets_only_settings_it_declares() -> None:
    """One script and one name per setting on every cloud: what each launcher writes, the script reads."""
    from spotsafe.cloud.aws.launch.spec import LaunchSpec
    from spotsafe.cloud.aws.launch.userdata import user_data
    from spotsafe.cloud.azure.launch.up import AzureLaunchSpec, custom_data
    from spotsafe.cloud.gcp.launch.spec import GcpLaunchSpec, startup_script

    pip = "git+https://example.invalid/spotsafe.git@" + "0" * 40
    rendered = {
        "aws": user_data(
            LaunchSpec(name="r", store="s3://b/r", instance_types=("g5.xlarge",), image_id="ami-1", command="t"),
            region="us-east-1",
            volume_id=None,
            ref=None,
        ),
        "gcp": startup_script(
            GcpLaunchSpec(
                name="r",
                project="p",
                zone=ZONE,
                machine_type="g2-standard-4",
                image="projects/p/global/images/i",
                command="t",
                store="/mnt/spotsafe/r",
                service_account="sa@p.iam.gserviceaccount.com",
                disk_size=100,
                pip_spec=pip,
            )
        ),
        "azure": custom_data(
            AzureLaunchSpec(
                name="r",
                resource_group="rg",
                location="eastus",
                vm_size="Standard_NC4as_T4_v3",
                image="a:b:c:latest",
                subnet_id="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/d",
                ssh_public_key="ssh-ed25519 AAAA test",
                command="t",
                store="az://runs/r",
                pip_spec=pip,
            )
        ),
    }
    declared = _declared()
    for cloud, text in rendered.items():
        assert text.endswith(SCRIPT.read_text()), f"{cloud}: not the script, whole"
        assert {"SPOTSAFE_RUN", "SPOTSAFE_STORE", "SPOTSAFE_TRAIN_COMMAND"} <= _assigned(text), f"{cloud}"
        assert _assigned(text) <= declared, f"{cloud}: {_assigned(text) - declared}"


def test_no_metadata_service_is_a_clear_failed_boot(tmp_path: Path) -> None:
    """Off every cloud (conftest points the three at a closed port): the boot says so and shuts down."""
    p = run_script(bare_env(tmp_path), "boot")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "no metadata service answered" in out and "set SPOTSAFE_CLOUD=aws, gcp or azure" in out, f"{out}"
    assert (tmp_path / "shutdown-called").exists()


def test_an_unknown_cloud_is_refused(tmp_path: Path) -> None:
    p = run_script(bare_env(tmp_path, "ibm"), "boot", timeout=60)
    assert p.returncode != 0 and "SPOTSAFE_CLOUD=ibm: use auto, aws, gcp or azure" in p.stdout + p.stderr


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_the_cloud_is_found_from_its_metadata_service(
    cloud: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SPOTSAFE_CLOUD=auto: the simulator that answers names the cloud; the training user follows it."""
    from spotsafe.rehearsal.simulators.environment import simulated_environment

    sim = request.getfixturevalue(cloud)  # tests/plugins/servers.py: the cloud's metadata simulator
    os_release = tmp_path / "os-release"
    os_release.write_text('ID="amzn"\n')
    env = {**bare_env(tmp_path, SPOTSAFE_OS_RELEASE=str(os_release)), **simulated_environment(sim)}
    del env["SPOTSAFE_USER"]
    p = run_script(env, "settings", timeout=60)
    assert p.returncode == 0, f"{p.stderr}"
    lines = p.stdout.splitlines()
    assert f"SPOTSAFE_CLOUD='{cloud}'" in lines
    # AWS: the image's login user (Amazon Linux's here); GCP, Azure: a user of its own, whatever the image.
    assert f"SPOTSAFE_USER='{'ec2-user' if cloud == 'aws' else 'spotsafe'}'" in lines


def test_the_stop_phase_stops_the_unit(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    p = run_script(bare_env(tmp_path, PATH=fake_systemd(tmp_path / "bin", calls)), "stop", timeout=60)
    assert p.returncode == 0, f"{p.stderr}"
    assert calls.read_text().splitlines() == ["stop spotsafe-train.service"]


def test_aws_only_settings_are_refused_or_dropped_elsewhere(tmp_path: Path) -> None:
    p = run_script(bare_env(tmp_path, "gcp", SPOTSAFE_SECRETS="HF=ssm:/hf"), "settings", timeout=60)
    assert p.returncode != 0 and "SPOTSAFE_SECRETS names AWS SSM parameters" in p.stderr, f"{p.stderr}"
    p = run_script(bare_env(tmp_path, "azure", SPOTSAFE_SNAPSHOT_EVERY="600"), "settings", timeout=60)
    assert p.returncode == 0 and "SPOTSAFE_SNAPSHOT_EVERY='0'" in p.stdout.splitlines(), f"{p.stderr}"


# --------------------------------------------------------------------------- end to end (root)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_boot_ends_in_training_under_systemd(bootbox: BootBox) -> None:
    """Ending 1: a blank disk formatted (SPOTSAFE_MKFS=1), the unit installed and started."""
    cb = bootbox
    calls = cb.root / "systemctl.calls"
    path = fake_systemd(cb.root / "bin", calls)
    assert filesystem_type(cb.device) is None
    # The az:// store's account, as `launch --cloud azure` sets it, must reach the training process.
    p = cb.boot(PATH=path, SPOTSAFE_MKFS="1", AZURE_STORAGE_ACCOUNT_NAME="spotsafeacct")
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
    assert "AZURE_STORAGE_ACCOUNT_NAME='spotsafeacct'" in env_file
    # Later boots: Azure through cloud-init's per-boot hook; GCP reruns its startup-script by itself.
    assert (cb.root / "per-boot" / "spotsafe-boot.sh").exists() == (cb.cloud == "azure")
    assert steps(cb.steps, "second") == []  # training is the unit's, not the boot's
    assert cb.group_size() == 1
    assert not (cb.root / "shutdown-called").exists()

    # What systemd then runs: train, then after-train, with the environment file only.
    p = cb.phase("train")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert steps(cb.steps, "second") == [f"second {i}" for i in range(1, 13)]
    p = cb.phase("after-train", EXIT_STATUS="0", SERVICE_RESULT="success")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert cb.group_size() == 0
    assert (cb.root / "shutdown-called").exists()
    assert cb.api.violations == []


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_boot_resumes_completes_and_scales_the_group_to_zero(bootbox: BootBox) -> None:
    """Ending 2: the run resumes from the disk's checkpoint, completes; group/scale set to 0, shutdown."""
    cb = bootbox
    saved = cb.populate()
    assert saved in (2, 4)
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{out}"
    assert steps(cb.steps, "second") == [f"second {i}" for i in range(saved + 1, 13)], f"{out}"
    assert f"resumed from {saved}" in out
    assert is_complete(cb.store)
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
    cb.scale_up()
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1")
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert "complete: not restarting it" in p.stdout + p.stderr
    assert steps(cb.steps, "second") == [f"second {i}" for i in range(saved + 1, 13)]
    assert cb.group_size() == 0 and (cb.root / "shutdown-called").exists()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # several python + torch processes on a loaded machine
def test_a_crash_looping_run_ends_in_a_shut_down_vm(bootbox: BootBox) -> None:
    """Ending 3: the supervisor gives up; the VM shuts down, the group is left alone (a retry may succeed)."""
    cb = bootbox
    p = cb.boot(SPOTSAFE_SKIP_SYSTEMD="1", SPOTSAFE_MKFS="1", SPOTSAFE_TRAIN_COMMAND="false", SPOTSAFE_MAX_RESTARTS="0")
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"{out}"
    assert "gave up (exit 1)" in out
    assert (cb.root / "shutdown-called").exists()
    assert cb.group_size() == 1
    assert cb.api.log == []  # nothing asked of the API


@pytest.mark.root
def test_a_missing_disk_is_a_clear_failed_boot(bootbox: BootBox) -> None:
    cb = bootbox
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
def test_rehearsal_of_a_preemption_through_the_boot_scripts_supervisor(bootbox: BootBox) -> None:
    """GCP preemption / Azure eviction of the README's example: 0 steps lost, bit-identical to an uninterrupted run."""
    import torch

    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.rehearsal.rehearse import read_events

    cb = bootbox
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


# --------------------------------------------------------------------------- GCP preemption, as a user meets it (root)


def _serve_gcp_simulator(proc: subprocess.Popen[str]) -> tuple[dict[str, str], str]:
    """What ``python -m spotsafe.simulate gcp`` prints: its environment (export lines) and its control URL."""
    env: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").strip().partition("=")
            env[key] = value
        elif "/spotsafe/state" in line:
            return env, line.split()[-1].removesuffix("/state")
    raise AssertionError(f"python -m spotsafe.simulate gcp exited ({proc.wait()}) before serving")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)  # python + torch processes on a loaded machine
@pytest.mark.parametrize("bootbox", ["gcp"], indirect=True)
def test_gcp_preemption_and_the_shutdown_script_save_once_and_exit_75(bootbox: BootBox) -> None:
    """GCE preempts: instance/preempted turns TRUE, then the shutdown-script runs `spotsafe-boot stop`.

    Both reach the supervisor (the watcher hears the metadata, the unit's stop sends SIGTERM):
    one notice checkpoint, exit 75, the unit's after-train takes it as an interruption.
    """
    from spotsafe.checkpoint.catalog import Catalog
    from spotsafe.cloud.gcp.launch.spec import SHUTDOWN_SCRIPT
    from spotsafe.rehearsal.rehearse import read_events
    from spotsafe.storage.registry import open_store

    cb = bootbox
    install = cb.env["SPOTSAFE_INSTALL_PATH"]
    # The launcher's shutdown-script calls the script where the startup-script installs it.
    default_install = re.search(r': "\$\{SPOTSAFE_INSTALL_PATH:=([^}]+)\}"', SCRIPT.read_text())
    assert default_install is not None and f"exec {default_install.group(1)} stop\n" in SHUTDOWN_SCRIPT
    shutdown_script = cb.root / "shutdown-script"
    shutdown_script.write_text(SHUTDOWN_SCRIPT.replace(default_install.group(1), install))
    shutdown_script.chmod(0o755)
    events = cb.root / "events.jsonl"
    # systemd, as far as the unit goes: `stop` sends SIGTERM to the main process only (KillMode=mixed)
    # and returns once it is gone (the test reaps it).
    mainpid, calls, bindir = cb.root / "mainpid", cb.root / "systemctl.calls", cb.root / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'if [ "$1" = stop ]; then\n  pid=$(cat {mainpid})\n  kill -TERM "$pid"\n'
        f'  while [ -e /proc/"$pid" ] && ! grep -q "^[0-9]* ([^)]*) Z" /proc/"$pid"/stat; do sleep 0.1; done\nfi\n'
    )
    (bindir / "systemctl").chmod(0o755)
    path = f"{bindir}:{cb.env['PATH']}"

    sim_cmd = [sys.executable, "-m", "spotsafe.simulate", "gcp"]
    with child(sim_cmd, env=cb.env, stdout=subprocess.PIPE, text=True) as sim:
        sim_env, control = _serve_gcp_simulator(sim)
        assert set(sim_env) >= {"GCE_METADATA_HOST", "SPOTSAFE_SOURCES"}
        p = cb.boot(**sim_env, PATH=path, SPOTSAFE_MKFS="1")
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"{out}"
        assert (
            "boot on gcp (" in out and calls.read_text().splitlines()[-1] == "start --no-block spotsafe-train.service"
        )

        # The unit's main process: the train phase, with the environment file only.
        # Training that goes on until it is stopped: a step every 50 ms, the watcher on, no periodic checkpoint.
        slow = {"BATCHES": "100000", "STEP_SLEEP": "0.05", "WATCH": "1", "EVERY_STEPS": "100000"}
        unit_env = cb.unit_env(PATH=path, SPOTSAFE_EVENTS=str(events), **slow)
        with child(
            [install, "train"], env=unit_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as unit:
            mainpid.write_text(str(unit.pid))
            wait_until(lambda: len(steps(cb.steps, "second")) >= 3, 300, what="training steps")
            # The preemption: the metadata server's notice, then the shutdown-script (GCE runs it at once).
            urllib.request.urlopen(urllib.request.Request(f"{control}/preempt", method="POST"), timeout=30).close()
            with child([str(shutdown_script)], env={**unit_env, "PATH": path}) as stop:
                unit_out, _ = unit.communicate(timeout=300)
                stop.wait(timeout=120)
            assert stop.returncode == 0
        rc = unit.returncode
    assert rc == 75, f"{unit_out}"
    # systemd's ExecStopPost: the exit of the main process, as systemd passes it.
    after = cb.phase("after-train", EXIT_CODE="exited", EXIT_STATUS=str(rc), SERVICE_RESULT="success")
    assert after.returncode == 0, f"{after.stderr}"
    assert "training stopped for the interruption with its state safe (exit 75)" in after.stderr
    assert not cb.shutdown_called.exists() and cb.group_size() == 1 and cb.api.log == []
    assert "stop spotsafe-train.service" in calls.read_text().splitlines()

    # One save: one notice, one durable checkpoint, at the notice's step.
    seen = read_events(events)
    (notice,) = [e for e in seen if e.get("event") == "notice"]
    (durable,) = [e for e in seen if e.get("event") == "durable"]
    store = open_store(str(cb.store))
    try:
        saved = Catalog(store).list()
    finally:
        store.close()
    assert [(c.step, c.reason) for c in saved] == [(int(notice["step"]), "notice")], f"{saved} {notice} {durable}"
