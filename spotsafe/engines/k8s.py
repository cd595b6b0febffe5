"""``spotsafe k8s``: a Kubernetes Job (one node) or JobSet (several) for spot node pools.

    spotsafe k8s mnist --image ghcr.io/you/train:1 --store s3://bucket/runs/mnist \\
        --command "python train.py" --provider eks | kubectl apply -f -

The pod runs ``python -m spotsafe.resume`` as PID 1 (or under ``tini`` with ``--init tini``):
the supervisor installs SIGTERM/SIGINT handlers, so the kernel delivers the kubelet's SIGTERM
to it although it is PID 1, and it forwards the signal to the training process and waits for
its save. ``terminationGracePeriodSeconds`` is the provider's notice (``--grace`` to change it)
and ``SPOTSAFE_SIGNAL_GRACE`` tells the run the same deadline. The Job's ``podFailurePolicy``
ignores exit 75 (state saved, run me elsewhere) and pods disrupted by the cluster
(``DisruptionTarget``), fails the Job on exit 77 (another writer holds the store), and counts
anything else against ``backoffLimit``. docs/engines.md says which labels and taints each
provider puts on its spot nodes and how long its notice is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.engines.workload import (
    DEFAULT_MAX_RESTARTS,
    RDZV_PORT,
    Workload,
    WorkloadError,
    build,
    dump_yaml,
    supervisor,
    torchrun,
)
from spotsafe.exitcodes import EXIT_FENCED, EXIT_PREEMPTED

#: The container's name: the failure policy's exit-code rules name it.
CONTAINER = "train"
#: The JobSet's one replicated job; pod ``i`` is ``NAME-workers-0-i.NAME`` in the JobSet's headless Service.
REPLICATED_JOB = "workers"
#: Kubernetes minor versions the manifests are validated against (podFailurePolicy and the
#: Job successPolicy are GA from 1.31 and 1.33; successPolicy is beta, on by default, in 1.31-1.32).
SUPPORTED_VERSIONS = tuple(f"1.{minor}" for minor in range(31, 38))
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
INITS = ("none", "tini")


@dataclass(frozen=True)
class Provider:
    """Where a managed Kubernetes puts its spot nodes, and how long a pod has once one is reclaimed."""

    name: str
    #: Seconds from the pod's SIGTERM to the node's end (the pod's terminationGracePeriodSeconds).
    grace: int
    #: Node labels that mark spot capacity (any one matches: nodeSelectorTerms are ORed).
    labels: tuple[tuple[str, str], ...]
    #: Taints the provider puts on spot nodes, tolerated.
    taints: tuple[tuple[str, str], ...]


PROVIDERS = {
    # EC2's notice is 2 minutes; Karpenter (its interruption queue) or the AWS Node Termination
    # Handler cordons and drains on it, a few seconds after it appears: 100 s of it for the pod.
    "eks": Provider(
        "eks",
        100,
        (("karpenter.sh/capacity-type", "spot"), ("eks.amazonaws.com/capacityType", "SPOT")),
        (),
    ),
    # GKE's graceful node shutdown splits the 30 s of a Spot VM's preemption: 15 s for ordinary
    # pods, then 15 s for system pods (extendable to 120 s on node pools that set it).
    "gke": Provider("gke", 15, (("cloud.google.com/gke-spot", "true"),), (("cloud.google.com/gke-spot", "true"),)),
    # Azure's Preempt scheduled event comes at least 30 s ahead; AKS node auto-drain cordons and
    # drains the node on it (best effort).
    "aks": Provider(
        "aks",
        25,
        (("kubernetes.azure.com/scalesetpriority", "spot"),),
        (("kubernetes.azure.com/scalesetpriority", "spot"),),
    ),
}


def _any_provider() -> Provider:
    labels = tuple(label for p in PROVIDERS.values() for label in p.labels)
    taints = tuple(dict.fromkeys(t for p in PROVIDERS.values() for t in p.taints))
    return Provider("any", min(p.grace for p in PROVIDERS.values()), labels, taints)


def provider(name: str) -> Provider:
    if name == "any":
        return _any_provider()
    try:
        return PROVIDERS[name]
    except KeyError:
        raise WorkloadError(f"--provider {name!r}: one of {', '.join([*PROVIDERS, 'any'])}") from None


@dataclass(frozen=True)
class PodOptions:
    image: str
    provider: Provider
    grace: int
    init: str = "none"
    namespace: str | None = None
    pvc: str | None = None
    mount: str | None = None
    service_account: str | None = None
    cpu: str | None = None
    memory: str | None = None


def rendezvous_host(work: Workload) -> str:
    """Pod 0 of the JobSet, by its stable DNS name: a recreated pod 0 gets the same name."""
    return f"{work.name}-{REPLICATED_JOB}-0-0.{work.name}"


def container_command(work: Workload, opts: PodOptions) -> list[str]:
    if work.multinode:
        inner = torchrun(
            work,
            nnodes=f"{work.min_nodes}:{work.max_nodes}",
            rendezvous=[
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rendezvous_host(work)}:{RDZV_PORT}",
                f"--rdzv-id={work.name}",
                "--rdzv-conf=last_call_timeout=5",
            ],
        )
    else:
        inner = list(work.command)
    cmd = supervisor(work, inner)
    # tini as PID 1 reaps orphaned grandchildren and forwards signals to its one child, the
    # supervisor (not -g: the supervisor forwards to the training process itself, once).
    return ["tini", "--", *cmd] if opts.init == "tini" else cmd


def environment(work: Workload, opts: PodOptions) -> list[dict[str, Any]]:
    env = {
        "SPOTSAFE_STORE": work.store,
        "SPOTSAFE_SIGNAL_GRACE": str(opts.grace),
        "PYTHONUNBUFFERED": "1",
        **work.env,
    }
    return [{"name": k, "value": v} for k, v in env.items()]


def pod_spec(work: Workload, opts: PodOptions) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": opts.image,
        "command": container_command(work, opts),
        "env": environment(work, opts),
    }
    limits: dict[str, Any] = {}
    if work.gpus:
        limits["nvidia.com/gpu"] = work.gpus
    if opts.cpu:
        limits["cpu"] = opts.cpu
    if opts.memory:
        limits["memory"] = opts.memory
    if limits:
        container["resources"] = {"limits": limits}
    if work.multinode:
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT}]
    spec: dict[str, Any] = {"restartPolicy": "Never", "terminationGracePeriodSeconds": opts.grace}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    if opts.provider.labels:
        terms = [{"matchExpressions": [{"key": k, "operator": "In", "values": [v]}]} for k, v in opts.provider.labels]
        spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        }
    tolerations = [{"key": k, "operator": "Equal", "value": v, "effect": "NoSchedule"} for k, v in opts.provider.taints]
    if work.gpus:  # GPU pools are commonly tainted so that only GPU pods land there
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    if opts.pvc:
        container["volumeMounts"] = [{"name": "store", "mountPath": opts.mount}]
        spec["volumes"] = [{"name": "store", "persistentVolumeClaim": {"claimName": opts.pvc}}]
    spec["containers"] = [container]
    return spec


def failure_policy() -> dict[str, Any]:
    """Exit 75 and disruptions are not failures; 77 ends the Job (the run lives on elsewhere)."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_FENCED]},
            },
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _metadata(work: Workload, opts: PodOptions, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/managed-by": "spotsafe", "spotsafe-run": work.name},
    }
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def job_spec(work: Workload, opts: PodOptions) -> dict[str, Any]:
    """The batch/v1 JobSpec: one pod per node, recreated after a notice without counting a failure."""
    spec: dict[str, Any] = {
        # crashes the supervisor gave up on (it restarts in place --max-restarts times first)
        "backoffLimit": 3,
        "podFailurePolicy": failure_policy(),
        # a replacement only once the old pod is gone: two pods never train on one store at once
        "podReplacementPolicy": "Failed",
    }
    if work.multinode:
        spec.update(
            parallelism=work.max_nodes,
            completions=work.max_nodes,
            completionMode="Indexed",
            # torchrun ends every node together; pod 0 done is the job done (pods never scheduled
            # because fewer than MAX nodes were free are then removed)
            successPolicy={"rules": [{"succeededIndexes": "0"}]},
        )
    spec["template"] = {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "spotsafe", "spotsafe-run": work.name}},
        "spec": pod_spec(work, opts),
    }
    return spec


def job(work: Workload, opts: PodOptions) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(work, opts, work.name),
        "spec": job_spec(work, opts),
    }


def jobset(work: Workload, opts: PodOptions) -> dict[str, Any]:
    """A JobSet of one Indexed Job with MAX pods; its headless Service gives pod 0 a stable name."""
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": _metadata(work, opts, work.name),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": work.name, "publishNotReadyAddresses": True},
            "failurePolicy": {
                # the Job failed: BackoffLimitExceeded (crashes) restarts the whole set from the
                # newest checkpoint; exit 77 (PodFailurePolicy: FailJob) ends it
                "maxRestarts": 3,
                "rules": [
                    {"name": "fenced", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                ],
            },
            "successPolicy": {"operator": "All"},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec(work, opts)}}],
        },
    }


def manifest(work: Workload, opts: PodOptions) -> dict[str, Any]:
    """The one document to apply: a Job for one node, a JobSet for several."""
    return jobset(work, opts) if work.multinode else job(work, opts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spotsafe k8s",
        description="Print a Kubernetes Job (one node) or JobSet (several) that trains on spot nodes "
        "under python -m spotsafe.resume; apply it with: ... | kubectl apply -f -",
    )
    p.add_argument("name", help="the run's name: names the Job and its pods (a DNS label)")
    p.add_argument("--image", required=True, help="a container image with your code, torch and spotsafe")
    p.add_argument(
        "--store", required=True, help="s3://, gs:// or az:// URL (pods move between nodes), or a path on --pvc"
    )
    p.add_argument("--command", required=True, help="the training command, e.g. 'python train.py --epochs 10'")
    p.add_argument("--nodes", default="1", help="N or MIN:MAX: several print a JobSet running elastic torchrun")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (nvidia.com/gpu), one training process each")
    p.add_argument("--provider", default="any", help="eks, gke, aks or any (spot labels and taints of all three)")
    p.add_argument(
        "--grace", type=int, default=None, help="seconds from SIGTERM to SIGKILL (default: the provider's notice)"
    )
    p.add_argument("--init", choices=INITS, default="none", help="PID 1: the supervisor itself, or tini (in the image)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--pvc", default=None, help="a PersistentVolumeClaim mounted at the --store path")
    p.add_argument("--service-account", default=None, help="for the store's credentials (IRSA, Workload Identity)")
    p.add_argument("--cpu", default=None, help="CPU limit, e.g. 8")
    p.add_argument("--memory", default=None, help="memory limit, e.g. 64Gi")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, help="crash restarts in the pod")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more environment (repeatable)")
    return p.parse_args(argv)


def from_args(ns: argparse.Namespace) -> tuple[Workload, PodOptions]:
    work = build(ns.name, ns.store, ns.command, nodes=ns.nodes, gpus=ns.gpus, max_restarts=ns.max_restarts, env=ns.env)
    prov = provider(ns.provider)
    grace = prov.grace if ns.grace is None else ns.grace
    if grace < 1:
        raise WorkloadError(f"--grace must be at least 1 second, not {grace}")
    mount = None
    if work.remote_store:
        if ns.pvc:
            raise WorkloadError(f"--pvc {ns.pvc!r} with an object store ({work.store}): give one or the other")
    else:
        path = work.store.removeprefix("file://")
        if not ns.pvc:
            raise WorkloadError(
                f"--store {work.store!r} is a path, and a pod's own disk goes with the pod: use an s3://, "
                "gs:// or az:// store, or mount a volume that follows the pod there with --pvc CLAIM"
            )
        if not path.startswith("/") or path == "/":
            raise WorkloadError(f"--store {work.store!r}: with --pvc, give the absolute path the claim is mounted at")
        mount = path
    opts = PodOptions(
        ns.image, prov, grace, ns.init, ns.namespace, ns.pvc, mount, ns.service_account, ns.cpu, ns.memory
    )
    return work, opts


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        work, opts = from_args(ns)
    except WorkloadError as e:
        print(f"spotsafe k8s: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(manifest(work, opts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
