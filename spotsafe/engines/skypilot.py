"""``spotsafe skypilot``: a SkyPilot task file for ``sky jobs launch`` (managed jobs on spot).

    spotsafe skypilot mnist --store s3://bucket/runs/mnist --command "python train.py" \\
        --gpus A100:1 > mnist.yaml && sky jobs launch mnist.yaml

SkyPilot's controller recreates the cluster after a preemption (any region or cloud the task
allows) and reruns ``setup`` and ``run``; it does not save anything on the notice. The task's
``run`` is the supervisor (``python -m spotsafe.resume``) around the command, so the run saves
on the cloud's own notice (the watcher reads the instance's metadata) and exits 75, and the
exit statuses map onto the controller's recovery:

- 75 (state saved on a notice): in ``recover_on_exit_codes``: recovered on a new cluster;
- 0 (done, or the run was already complete): SUCCEEDED, not recovered;
- 77 (another writer holds the store) or a crash the supervisor gave up on: FAILED, unless
  ``--max-restarts-on-errors`` (SkyPilot's ``max_restarts_on_errors``) allows more.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from spotsafe.engines.workload import (
    DEFAULT_MAX_RESTARTS,
    RDZV_PORT,
    Workload,
    WorkloadError,
    build,
    dump_yaml,
    scheme,
    supervisor,
    torchrun,
)
from spotsafe.exitcodes import EXIT_PREEMPTED

#: What a fresh cluster installs for each store scheme (``--setup`` replaces it).
SETUP = {
    "s3": "pip install 'spotsafe[s3]'",
    "gs": "pip install spotsafe gcsfs",
    "gcs": "pip install spotsafe gcsfs",
    "az": "pip install spotsafe adlfs",
    "abfs": "pip install spotsafe adlfs",
    "abfss": "pip install spotsafe adlfs",
}
_ACCELERATOR = re.compile(r"^[A-Za-z0-9_.-]+(:([0-9]+))?$")
_INFRA = re.compile(r"^[A-Za-z0-9*_./-]+$")


class Expand(str):
    """A shell word whose ``$VARIABLES`` expand (double-quoted), unlike the literal words around it."""


def shell_line(words: Sequence[str]) -> str:
    return " ".join(f'"{w}"' if isinstance(w, Expand) else shlex.quote(w) for w in words)


def run_script(work: Workload) -> str:
    """The task's ``run``: the supervisor, exec'd so its exit status is the job's."""
    lines = []
    if work.multinode:
        # SkyPilot's head node is the first of SKYPILOT_NODE_IPS on every node; it hosts torchrun's c10d store.
        lines.append('HEAD_IP="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"')
        inner = torchrun(
            work,
            nnodes=str(work.max_nodes),
            rendezvous=[
                "--rdzv-backend=c10d",
                Expand(f"--rdzv-endpoint=$HEAD_IP:{RDZV_PORT}"),
                Expand("--rdzv-id=$SKYPILOT_TASK_ID"),
                "--rdzv-conf=last_call_timeout=5",
            ],
        )
    else:
        inner = list(work.command)
    lines.append("exec " + shell_line(supervisor(work, inner)))
    return "\n".join(lines) + "\n"


def task(
    work: Workload,
    *,
    accelerators: str | None = None,
    infra: str | None = None,
    setup: str | None = None,
    workdir: str | None = None,
    max_restarts_on_errors: int = 0,
) -> dict[str, Any]:
    """The task as plain data, in the order SkyPilot's docs write it."""
    resources: dict[str, Any] = {}
    if infra:
        resources["infra"] = infra
    if accelerators:
        resources["accelerators"] = accelerators
    resources["use_spot"] = True
    resources["job_recovery"] = {
        "max_restarts_on_errors": max_restarts_on_errors,
        "recover_on_exit_codes": [EXIT_PREEMPTED],
    }
    doc: dict[str, Any] = {"name": work.name, "resources": resources}
    if work.multinode:
        doc["num_nodes"] = work.max_nodes
    if workdir:
        doc["workdir"] = workdir
    doc["envs"] = {"SPOTSAFE_STORE": work.store, "PYTHONUNBUFFERED": "1", **work.env}
    text = SETUP.get(scheme(work.store), "pip install spotsafe") if setup is None else setup
    if text:
        doc["setup"] = text
    doc["run"] = run_script(work)
    return doc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spotsafe skypilot",
        description="Print a SkyPilot task for `sky jobs launch` that trains on spot under python -m spotsafe.resume.",
    )
    p.add_argument("name", help="the managed job's name")
    p.add_argument("--store", required=True, help="s3://, gs:// or az:// URL (the cluster is recreated anywhere)")
    p.add_argument("--command", required=True, help="the training command, e.g. 'python train.py'")
    p.add_argument("--gpus", default=None, help="accelerators per node, SkyPilot's spelling: A100:8, H100, L4:1")
    p.add_argument("--cloud", default=None, help="SkyPilot's infra: aws, gcp, azure, aws/us-east-1, k8s, ...")
    p.add_argument("--nodes", default="1", help="nodes (several: torchrun with the head node's c10d rendezvous)")
    p.add_argument("--setup", default=None, help="the task's setup (default: pip install spotsafe for the store)")
    p.add_argument("--workdir", default=None, help="a directory SkyPilot syncs to every node (your code)")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, help="crash restarts on the node")
    p.add_argument(
        "--max-restarts-on-errors",
        type=int,
        default=0,
        help="SkyPilot's relaunches on a new cluster after the supervisor gave up (default 0)",
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more environment (repeatable)")
    return p.parse_args(argv)


def from_args(ns: argparse.Namespace) -> dict[str, Any]:
    count = 0
    if ns.gpus is not None:
        m = _ACCELERATOR.match(ns.gpus)
        if not m:
            raise WorkloadError(f"--gpus {ns.gpus!r}: SkyPilot's spelling is NAME or NAME:COUNT, e.g. A100:8")
        count = int(m.group(2) or 1)
    if ns.nodes.count(":"):
        raise WorkloadError(
            f"--nodes {ns.nodes!r}: SkyPilot recovers the whole cluster after a preemption, so its size is one "
            "number (elastic MIN:MAX is for Kubernetes, spotsafe k8s)"
        )
    if ns.cloud is not None and not _INFRA.match(ns.cloud):
        raise WorkloadError(f"--cloud {ns.cloud!r}: SkyPilot's infra, e.g. aws, gcp/us-central1, azure")
    if ns.max_restarts_on_errors < 0:
        raise WorkloadError(f"--max-restarts-on-errors must be >= 0, not {ns.max_restarts_on_errors}")
    work = build(ns.name, ns.store, ns.command, nodes=ns.nodes, gpus=count, max_restarts=ns.max_restarts, env=ns.env)
    if not work.remote_store:
        raise WorkloadError(
            f"--store {work.store!r}: SkyPilot recreates the cluster on any machine, whose disks start empty: "
            "give an s3://, gs:// or az:// store"
        )
    return task(
        work,
        accelerators=ns.gpus,
        infra=ns.cloud,
        setup=ns.setup,
        workdir=ns.workdir,
        max_restarts_on_errors=ns.max_restarts_on_errors,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        doc = from_args(ns)
    except WorkloadError as e:
        print(f"spotsafe skypilot: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
