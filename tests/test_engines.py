"""spotsafe k8s and spotsafe skypilot: the manifests and task files validate, and the pod's command
behaves under the kubelet's SIGTERM, grace period and SIGKILL as a preempted pod must."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from spotsafe.checkpoint.catalog import Catalog
from spotsafe.cli.main import main as spotsafe_main
from spotsafe.engines import k8s, skypilot
from spotsafe.engines.workload import Workload, dump_yaml
from spotsafe.storage.registry import open_store
from tests.helpers import child, wait_until

ROOT = Path(__file__).resolve().parent.parent


def generate(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """What ``spotsafe ARGV`` prints, read back as YAML (the CLI dispatch included)."""
    assert spotsafe_main(list(argv)) == 0
    return yaml.safe_load(capsys.readouterr().out)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert spotsafe_main(list(argv)) == 2
    return capsys.readouterr().err


# -- Kubernetes: the schemas of every supported version -------------------------------------------------

K8S = ("k8s", "mnist", "--image", "ghcr.io/you/train:1", "--command", "python train.py --epochs 10")
VARIANTS = {
    "s3-eks-gpu": ("--store", "s3://bucket/runs/mnist", "--provider", "eks", "--gpus", "1"),
    "gcs-gke-tini": ("--store", "gs://bucket/runs/mnist", "--provider", "gke", "--init", "tini", "--namespace", "ml"),
    "az-aks-limits": ("--store", "az://box/runs/mnist", "--provider", "aks", "--cpu", "8", "--memory", "64Gi"),
    "pvc-any": ("--store", "/mnt/store/mnist", "--pvc", "mnist-store", "--service-account", "trainer"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("version", k8s.SUPPORTED_VERSIONS)
def test_one_node_job_validates_strictly(capsys: pytest.CaptureFixture[str], variant: str, version: str) -> None:
    doc = generate(capsys, *K8S, *VARIANTS[variant])
    assert doc["kind"] == "Job"
    kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or mistyped field


def test_strict_validation_catches_a_misspelt_field(capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the validator really looks at the fields this module writes."""
    doc = generate(capsys, *K8S, *VARIANTS["s3-eks-gpu"])
    doc["spec"]["podFailurePolicy"]["rules"][1]["onExitCode"] = doc["spec"]["podFailurePolicy"]["rules"][1].pop(
        "onExitCodes"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, k8s.SUPPORTED_VERSIONS[-1], strict=True)


def test_job_runs_the_supervisor_as_pid_1_with_the_failure_policy(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *K8S, *VARIANTS["s3-eks-gpu"])
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "spotsafe.resume", "--store", "s3://bucket/runs/mnist", "--max-restarts", "3",
        "--", "python", "train.py", "--epochs", "10",
    ]  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SPOTSAFE_STORE"] == "s3://bucket/runs/mnist"
    # the run's deadline is the kubelet's: SIGKILL comes terminationGracePeriodSeconds after SIGTERM
    assert pod["terminationGracePeriodSeconds"] == k8s.PROVIDERS["eks"].grace == 100
    assert env["SPOTSAFE_SIGNAL_GRACE"] == "100"
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    rules = doc["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [77]},
    }
    assert rules[1] == {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In", "values": [75]}}
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert doc["spec"]["podReplacementPolicy"] == "Failed"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == [
        "karpenter.sh/capacity-type",
        "eks.amazonaws.com/capacityType",
    ]
    # EKS puts no taint on spot nodes; GPU pools commonly carry nvidia.com/gpu
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize(
    ("provider", "grace", "label", "taint"),
    [
        ("gke", 15, "cloud.google.com/gke-spot", "cloud.google.com/gke-spot"),
        ("aks", 25, "kubernetes.azure.com/scalesetpriority", "kubernetes.azure.com/scalesetpriority"),
    ],
)
def test_each_provider_selects_and_tolerates_its_spot_nodes(
    capsys: pytest.CaptureFixture[str], provider: str, grace: int, label: str, taint: str
) -> None:
    doc = generate(capsys, *K8S, "--store", "s3://b/r", "--provider", provider)
    pod = doc["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == [label]
    assert [t["key"] for t in pod["tolerations"]] == [taint]


def test_any_provider_matches_every_spot_label_with_the_shortest_grace(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *K8S, "--store", "s3://b/r", "--grace", "40")
    pod = doc["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 40  # --grace wins
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 4  # ORed: Karpenter, EKS managed groups, GKE, AKS
    assert k8s.provider("any").grace == 15
    assert {t["key"] for t in pod["tolerations"]} == {
        "cloud.google.com/gke-spot",
        "kubernetes.azure.com/scalesetpriority",
    }


def test_tini_is_pid_1_and_the_supervisor_its_child(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *K8S, *VARIANTS["gcs-gke-tini"])
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    assert container["command"][:5] == ["tini", "--", "python", "-m", "spotsafe.resume"]
    assert doc["metadata"]["namespace"] == "ml"


def test_a_volume_store_is_mounted_from_the_claim(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *K8S, *VARIANTS["pvc-any"])
    pod = doc["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "store", "persistentVolumeClaim": {"claimName": "mnist-store"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "store", "mountPath": "/mnt/store/mnist"}]
    assert pod["serviceAccountName"] == "trainer"


# -- JobSet: no schema in kubernetes-validate for a CRD ---------------------------------------------------

#: JobSetSpec (jobset.x-k8s.io/v1alpha2) transcribed from the CRD the JobSet project publishes
#: (config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml, generated by controller-gen v0.16.2):
#: every field of the spec with its type and enums; the Job template inside is a batch/v1 JobSpec,
#: checked separately against Kubernetes' own schema (kubernetes-validate has no CRD schemas).
JOBSET_SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["replicatedJobs"],
    "properties": {
        "coordinator": {
            "type": "object",
            "additionalProperties": False,
            "required": ["replicatedJob"],
            "properties": {
                "jobIndex": {"type": "integer"},
                "podIndex": {"type": "integer"},
                "replicatedJob": {"type": "string"},
            },
        },
        "failurePolicy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "maxRestarts": {"type": "integer"},
                "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["action", "name"],
                        "properties": {
                            "action": {"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"]},
                            "name": {"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
                            "onJobFailureReasons": {"type": "array", "items": {"type": "string"}},
                            "targetReplicatedJobs": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "managedBy": {"type": "string"},
        "network": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enableDNSHostnames": {"type": "boolean"},
                "publishNotReadyAddresses": {"type": "boolean"},
                "subdomain": {"type": "string"},
            },
        },
        "replicatedJobs": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "template"],
                "properties": {
                    "dependsOn": {"type": "array", "maxItems": 1},
                    "groupName": {"type": "string"},
                    "name": {"type": "string"},
                    "replicas": {"type": "integer"},
                    "template": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
                    },
                },
            },
        },
        "startupPolicy": {
            "type": "object",
            "required": ["startupPolicyOrder"],
            "properties": {"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}},
        },
        "successPolicy": {
            "type": "object",
            "additionalProperties": False,
            "required": ["operator"],
            "properties": {
                "operator": {"enum": ["All", "Any"]},
                "targetReplicatedJobs": {"type": "array", "items": {"type": "string"}},
            },
        },
        "suspend": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer"},
    },
}

MULTI = (*K8S, "--store", "s3://bucket/runs/ddp", "--nodes", "2:4", "--gpus", "8", "--provider", "gke")


@pytest.mark.parametrize("version", k8s.SUPPORTED_VERSIONS)
def test_jobset_validates_its_job_against_kubernetes_and_its_spec_against_the_crd(
    capsys: pytest.CaptureFixture[str], version: str
) -> None:
    doc = generate(capsys, *MULTI)
    assert (doc["apiVersion"], doc["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    jsonschema.validate(doc["spec"], JOBSET_SPEC_SCHEMA)
    (replicated,) = doc["spec"]["replicatedJobs"]
    as_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "mnist-workers-0"},
        **replicated["template"],
    }
    kubernetes_validate.validate(as_job, version, strict=True)


def test_the_crd_schema_refuses_what_the_crd_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *MULTI)
    bad = copy.deepcopy(doc["spec"])
    bad["failurePolicy"]["rules"][0]["action"] = "FailJob"  # a Job's action, not a JobSet's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, JOBSET_SPEC_SCHEMA)


def test_jobset_runs_elastic_torchrun_with_pod_0_as_the_rendezvous(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *MULTI)
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (4, 4, "Indexed")
    assert job["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    command = job["template"]["spec"]["containers"][0]["command"]
    inner = command[command.index("--") + 1 :]
    assert inner == [
        "torchrun", "--nnodes=2:4", "--nproc-per-node=8", "--max-restarts=0", "--rdzv-backend=c10d",
        # pod 0's name in the JobSet's headless Service: a recreated pod 0 answers to it again
        "--rdzv-endpoint=mnist-workers-0-0.mnist:29400", "--rdzv-id=mnist", "--rdzv-conf=last_call_timeout=5",
        "train.py", "--epochs", "10",
    ]  # fmt: skip
    assert doc["spec"]["network"]["subdomain"] == "mnist"
    assert doc["spec"]["failurePolicy"]["rules"] == [
        {"name": "fenced", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--store", "/data/run"), "a pod's own disk goes with the pod"),
        (("--store", "s3://b/r", "--pvc", "c"), "give one or the other"),
        (("--store", "relative/run", "--pvc", "c"), "absolute path"),
        (("--store", "s3://b/r", "--nodes", "3:2"), "1 <= MIN <= MAX"),
        (("--store", "s3://b/r", "--nodes", "two"), "--nodes wants N or MIN:MAX"),
        (("--store", "s3://b/r", "--provider", "oci"), "--provider 'oci'"),
        (("--store", "s3://b/r", "--grace", "0"), "--grace must be at least 1"),
        (("--store", "s3://b/r", "--env", "1X=2"), "--env wants NAME=VALUE"),
        (("--store", "ftp://host/run"), "not one a worker can reach"),
    ],
)
def test_k8s_bad_input_is_refused_with_the_cause(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    err = refused(capsys, *K8S, *argv)
    assert err.startswith("spotsafe k8s: ")
    assert message in err


def test_a_name_that_is_no_dns_label_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, "k8s", "My_Run", "--image", "i", "--store", "s3://b/r", "--command", "python t.py")
    assert "NAME 'My_Run'" in err


def test_the_spotsafe_command_prints_the_manifest(tmp_path: Path) -> None:
    """One real process: the console entry's module, as `spotsafe k8s ... | kubectl apply -f -` runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "spotsafe.cli.main", *K8S, "--store", "s3://b/r"],
        capture_output=True, text=True, env=env, timeout=120, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert yaml.safe_load(out)["kind"] == "Job"


@pytest.mark.parametrize(
    "value",
    ["yes", "on", "0755", "1e3", "", "a: b", "# not a comment", "quote \" and \\ and 'x'", "é ✓", "two\nlines\n",
     " lead\n", "tab\tin\n", "end\n\n", "-", "~", "null", "@x", "*y"],
)  # fmt: skip
def test_yaml_text_reads_back_as_written(value: str) -> None:
    doc = {"k": value, "yes": [value, {"n": value, "m": [1, True, None]}], "e": {}, "l": [], "list": [[value]]}
    assert yaml.safe_load(dump_yaml(doc)) == doc


# -- The pod's command under the kubelet: SIGTERM, the grace period, SIGKILL ------------------------------

TRAIN = textwrap.dedent("""
    import hashlib, os, time
    from pathlib import Path
    import torch
    from torch import nn
    import spotsafe
    if "WORLD_SIZE" in os.environ:  # a JobSet's pod: torchrun started this process
        import torch.distributed as dist
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(80, 4, generator=g), torch.randint(0, 2, (80,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    run = spotsafe.Run(model=model, optimizer=opt, every_steps=10)
    if run.resumed_from is not None:
        print("resumed at step", run.step_count, flush=True)
    pause_at = int(os.environ.get("PAUSE_AT", "0"))
    marker = Path(os.environ.get("PAUSE_MARKER", "/nonexistent/marker"))
    for epoch in run.epochs(3):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            if run.step_count + 1 == pause_at and not marker.exists():
                # mid-epoch, at a known step on any machine: hold here until the SIGTERM arrives
                marker.write_text(str(os.getpid()))
                deadline = time.monotonic() + 300
                while run.watcher.notice is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            run.step()
    run.finish()
    state = [*model.state_dict().values(), *(s["momentum_buffer"] for s in opt.state.values())]
    digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in state)).hexdigest()
    if os.environ.get("RANK", "0") == "0":
        print("final", run.step_count, digest, flush=True)
""")
GRACE = 120  # the kubelet's grace in these tests: generous, the machine is shared


def container_of(doc: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    return [*container["command"], *container.get("args", [])], env


def as_container(command: list[str], hosts: Path | None = None) -> list[str]:
    """PID 1 of a fresh PID namespace, as a container runtime starts the container's command.

    With ``hosts``, also a network namespace of its own (torchrun's fixed rendezvous port is the
    pod's alone), the pod's hostname (the hosts file's last name) and that file as /etc/hosts, as
    the kubelet writes it for a pod with a subdomain (its own names, the JobSet's pod 0).
    """
    if hosts is None:
        return ["unshare", "--pid", "--fork", "--kill-child", "--", *command]
    hostname = hosts.read_text().split()[-1]
    setup = f'ip link set lo up && hostname {hostname} && mount --bind {hosts} /etc/hosts && exec "$@"'
    namespaces = ["--pid", "--fork", "--mount", "--net", "--uts", "--kill-child"]
    return ["unshare", *namespaces, "--", "sh", "-c", setup, "sh", *command]


def pid_1(runtime: subprocess.Popen[str]) -> int:
    """The host pid of the namespace's PID 1 (unshare's one child)."""

    def find() -> int | None:
        try:
            text = Path(f"/proc/{runtime.pid}/task/{runtime.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(text[0]) if text else None

    pid = wait_until(find, 60, what="the container's PID 1")
    status = Path(f"/proc/{pid}/status").read_text()
    (nspid,) = [ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")]
    assert nspid[-1] == "1"  # it is PID 1 inside its namespace, as in a container
    return pid


def supervisor_running(pid: int) -> bool:
    """PID 1 is the supervisor by now (the JobSet pod's sh has exec'd it)."""
    return b"spotsafe.resume" in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture
def pid_namespaces() -> None:
    probe = subprocess.run(as_container(["true"]), capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here (unshare --pid needs root): {probe.stderr.strip()}")


def kubelet(
    command: list[str], env: dict[str, str], *, preempt: Path | None, cwd: Path, hosts: Path | None = None
) -> tuple[int, str]:
    """Start the container's command as PID 1; with ``preempt`` (the pause marker), SIGTERM it once
    the run holds mid-epoch, and SIGKILL the whole container GRACE seconds later if it still runs."""
    with child(
        as_container(command, hosts), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as runtime:
        if preempt is not None:
            init = pid_1(runtime)
            wait_until(preempt.exists, 240, what="the run to reach the pause step")
            assert supervisor_running(init)
            os.kill(init, signal.SIGTERM)  # the kubelet's stop: SIGTERM to the container's PID 1
            try:
                runtime.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                os.kill(init, signal.SIGKILL)  # the grace is over: everything in the container dies
        out, _ = runtime.communicate(timeout=600)
        return runtime.returncode, out


@pytest.mark.slow
@pytest.mark.timeout(600)  # three launches of a torch program on a shared machine
@pytest.mark.parametrize("init", ["none", "tini"])
def test_a_preempted_pod_saves_within_the_grace_exits_75_and_its_rerun_ends_bit_identical(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pid_namespaces: None, init: str
) -> None:
    if init == "tini" and shutil.which("tini") is None:
        pytest.skip("tini is not installed (apt-get install tini; .ci/run installs it)")
    (tmp_path / "train.py").write_text(TRAIN)
    marker = tmp_path / "paused"
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}

    def pod(store: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
        doc = generate(
            capsys, "k8s", "mnist", "--image", "i", "--store", str(store), "--pvc", "claim",
            "--command", f"python {tmp_path / 'train.py'}", "--grace", str(GRACE), "--init", init,
            "--env", "SPOTSAFE_SOURCES=signal", *extra,
        )  # fmt: skip
        command, env = container_of(doc)
        assert env["SPOTSAFE_SIGNAL_GRACE"] == str(GRACE)
        return command, {**base, **env}

    command, env = pod(tmp_path / "plain")
    code, out = kubelet(command, env, preempt=None, cwd=tmp_path)
    assert code == 0, f"{out}"
    (reference,) = [ln for ln in out.splitlines() if ln.startswith("final ")]

    store = tmp_path / "store"
    command, env = pod(store, "--env", "PAUSE_AT=27", "--env", f"PAUSE_MARKER={marker}")
    code, out = kubelet(command, env, preempt=marker, cwd=tmp_path)
    assert code == 75, f"{out}"  # saved within the grace: the pod's failure policy ignores 75
    with open_store(str(store)) as opened:
        newest = Catalog(opened).latest()
    assert newest is not None
    assert (newest.reason, newest.step) == ("notice", 27)

    code, out = kubelet(command, env, preempt=None, cwd=tmp_path)  # the Job's replacement pod: same command
    assert code == 0, f"{out}"
    assert "resumed at step 27" in out
    assert [ln for ln in out.splitlines() if ln.startswith("final ")] == [reference]


@pytest.mark.slow
@pytest.mark.timeout(900)  # three torchrun launches on a shared machine
def test_a_jobset_pod_runs_torchrun_through_its_rendezvous_name_and_exits_75_on_sigterm(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pid_namespaces: None
) -> None:
    """The JobSet's pod command (torchrun under the supervisor, pod 0 as the rendezvous), one pod of
    --nodes 1:2: the rendezvous forms at MIN, SIGTERM reaches the worker through torchrun, the pod
    exits 75 (what the failure policy ignores) and the same command resumes bit-identical."""
    (tmp_path / "train.py").write_text(TRAIN)
    hosts = tmp_path / "hosts"
    # as the kubelet writes a JobSet pod's /etc/hosts (its FQDN and hostname), plus the short name the
    # cluster DNS answers through the pod's search domains (the rendezvous endpoint): pod 0 here
    pod_0 = "mnist-workers-0-0.mnist.default.svc.cluster.local mnist-workers-0-0.mnist mnist-workers-0-0"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {pod_0}\n")
    marker = tmp_path / "paused"
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}

    def pod(store: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
        doc = generate(
            capsys, "k8s", "mnist", "--image", "i", "--store", str(store), "--pvc", "claim", "--nodes", "1:2",
            "--command", f"python {tmp_path / 'train.py'}", "--grace", str(GRACE),
            "--env", "SPOTSAFE_SOURCES=signal", *extra,
        )  # fmt: skip
        assert doc["kind"] == "JobSet"
        command, env = container_of(doc["spec"]["replicatedJobs"][0]["template"])
        assert command[command.index("--") + 1] == "torchrun"
        return command, {**base, **env}

    command, env = pod(tmp_path / "plain")
    code, out = kubelet(command, env, preempt=None, cwd=tmp_path, hosts=hosts)
    assert code == 0, f"{out}"
    (reference,) = [ln for ln in out.splitlines() if ln.startswith("final ")]

    store = tmp_path / "store"
    command, env = pod(store, "--env", "PAUSE_AT=27", "--env", f"PAUSE_MARKER={marker}")
    code, out = kubelet(command, env, preempt=marker, cwd=tmp_path, hosts=hosts)
    assert code == 75, f"{out}"
    with open_store(str(store)) as opened:
        newest = Catalog(opened).latest()
    assert newest is not None
    assert (newest.reason, newest.step) == ("notice", 27)

    code, out = kubelet(command, env, preempt=None, cwd=tmp_path, hosts=hosts)
    assert code == 0, f"{out}"
    assert "resumed at step 27" in out
    assert [ln for ln in out.splitlines() if ln.startswith("final ")] == [reference]


# -- SkyPilot ---------------------------------------------------------------------------------------------

SKY = ("skypilot", "mnist", "--store", "s3://bucket/runs/mnist", "--command", "python train.py --epochs 10")


def test_skypilot_task_maps_exit_statuses_onto_recovery(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *SKY, "--gpus", "A100:1", "--cloud", "aws")
    assert doc["resources"] == {
        "infra": "aws",
        "accelerators": "A100:1",
        "use_spot": True,
        # a notice save (75) is recovered on a new cluster; 0 (done) and 77 (fenced) are not
        "job_recovery": {"max_restarts_on_errors": 0, "recover_on_exit_codes": [75]},
    }
    assert doc["envs"]["SPOTSAFE_STORE"] == "s3://bucket/runs/mnist"
    assert doc["setup"] == "pip install 'spotsafe[s3]'"
    assert doc["run"] == (
        "exec python -m spotsafe.resume --store s3://bucket/runs/mnist --max-restarts 3 -- "
        "python train.py --epochs 10\n"
    )


def test_skypilot_multinode_runs_torchrun_on_the_head_node(capsys: pytest.CaptureFixture[str]) -> None:
    doc = generate(capsys, *SKY, "--gpus", "H100:8", "--nodes", "2")
    assert doc["num_nodes"] == 2
    first, second = doc["run"].splitlines()
    assert first == 'HEAD_IP="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"'
    assert second.startswith("exec python -m spotsafe.resume --store s3://bucket/runs/mnist --max-restarts 3 -- ")
    assert (
        'torchrun --nnodes=2 --nproc-per-node=8 --max-restarts=0 --rdzv-backend=c10d "--rdzv-endpoint=$HEAD_IP:29400" '
        '"--rdzv-id=$SKYPILOT_TASK_ID" --rdzv-conf=last_call_timeout=5 train.py --epochs 10'
    ) in second


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--nodes", "2:4"), "recovers the whole cluster"),
        (("--gpus", "A100:x"), "NAME or NAME:COUNT"),
        (("--cloud", "aws us"), "SkyPilot's infra"),
        (("--max-restarts-on-errors", "-1"), ">= 0"),
    ],
)
def test_skypilot_bad_input_is_refused_with_the_cause(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    err = refused(capsys, *SKY, *argv)
    assert err.startswith("spotsafe skypilot: ")
    assert message in err


def test_the_docs_example_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    docs = (ROOT / "docs" / "engines.md").read_text()
    example = docs.split("prints\n\n```yaml\n", 1)[1].split("```", 1)[0]
    argv = ("skypilot", "mnist", "--store", "s3://bucket/runs/mnist", "--command", "python train.py")
    assert spotsafe_main([*argv, "--gpus", "A100:1", "--workdir", "."]) == 0
    assert capsys.readouterr().out == example


def test_skypilot_refuses_a_path_store(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, "skypilot", "m", "--store", "/mnt/run", "--command", "python t.py")
    assert "disks start empty" in err


@pytest.mark.parametrize(("child_exit", "recovered"), [(75, True), (77, False), (0, False)])
def test_the_run_script_passes_the_supervisors_status_to_skypilot(
    tmp_path: Path, child_exit: int, recovered: bool
) -> None:
    """SkyPilot runs `run` with bash; its exit status is what recover_on_exit_codes is matched against."""
    work = Workload(
        "m", str(tmp_path / "store"), ("python", "-c", f"import sys; sys.exit({child_exit})"), max_restarts=0
    )
    doc = skypilot.task(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPOTSAFE_SOURCES": "none", **doc["envs"]}
    done = subprocess.run(["bash", "-c", doc["run"]], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == child_exit, f"{done.stderr}"
    assert (done.returncode in doc["resources"]["job_recovery"]["recover_on_exit_codes"]) is recovered


@pytest.fixture(scope="session")
def sky_python() -> str:
    """A Python that imports SkyPilot: this one, $SPOTSAFE_SKYPILOT_PYTHON, or /opt/skypilot (.ci/run makes it:
    skypilot pins click below the version import-linter's environment has, so it lives in its own venv)."""
    for python in (sys.executable, os.environ.get("SPOTSAFE_SKYPILOT_PYTHON", ""), "/opt/skypilot/bin/python"):
        if python and Path(python).exists():
            probe = subprocess.run([python, "-c", "import sky"], capture_output=True, timeout=300)
            if probe.returncode == 0:
                return python
    pytest.skip("SkyPilot is not installed (python -m venv --system-site-packages /opt/skypilot && "
                "/opt/skypilot/bin/pip install skypilot; .ci/run does it)")  # fmt: skip


PARSE = textwrap.dedent("""
    import sys, sky
    task = sky.Task.from_yaml(sys.argv[1])
    (res,) = task.resources
    print(task.name, task.num_nodes, res.use_spot, res.job_recovery["recover_on_exit_codes"], sorted(task.envs))
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "nodes"), [(("--gpus", "A100:1", "--cloud", "aws"), 1), (("--gpus", "H100:8", "--nodes", "2"), 2)]
)
def test_skypilot_parses_the_task_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sky_python: str, extra: tuple[str, ...], nodes: int
) -> None:
    assert spotsafe_main([*SKY, *extra]) == 0
    path = tmp_path / "task.yaml"
    path.write_text(capsys.readouterr().out)
    env = {**os.environ, "HOME": str(tmp_path)}  # SkyPilot keeps its state under ~/.sky
    done = subprocess.run([sky_python, "-c", PARSE, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"{done.stderr}"
    assert done.stdout.split("\n")[0] == f"mnist {nodes} True [75] ['PYTHONUNBUFFERED', 'SPOTSAFE_STORE']"


@pytest.mark.slow
def test_skypilots_parser_refuses_a_misspelt_field(tmp_path: Path, sky_python: str) -> None:
    """The control: the parser the tests above rely on does check the task's fields."""
    work = Workload("m", "s3://b/r", ("python", "t.py"))
    doc = skypilot.task(work)
    doc["resources"]["job_recovery"]["recover_on_exit_code"] = doc["resources"]["job_recovery"].pop(
        "recover_on_exit_codes"
    )
    doc["run_script"] = doc.pop("run")
    path = tmp_path / "task.yaml"
    path.write_text(dump_yaml(doc))
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run([sky_python, "-c", PARSE, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "run_script" in done.stderr
