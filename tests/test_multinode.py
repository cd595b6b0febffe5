"""Multi-node lifecycle on loopback: a notice stops only the doomed node, the healthy ones carry on,
a replacement joins.

Every "node" is one ``python -m spotsafe.resume -- torchrun --nnodes=MIN:MAX --rdzv-backend=c10d``
process tree with one worker (tests/dist_workers/elastic.py) and its own AWS metadata
simulator (spotsafe.rehearsal.simulators.aws.AWSSimulator) in its environment, so a notice on one node's
simulator is that instance's alone. Real torchrun, real c10d rendezvous, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from spotsafe import EXIT_PREEMPTED
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.environment import simulated_environment
from tests.dist_workers import elastic
from tests.helpers import slow_enabled, stop_child, wait_until

PY = sys.executable
WORKER = Path(__file__).parent / "dist_workers" / "elastic.py"
#: seconds: generous, CI has 2 loaded cores and each torchrun start imports torch
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One simulated instance: its own IMDS simulator, its supervisor, its torchrun agent, its worker."""

    def __init__(self, name: str, out: Path, store: Path, port: int, nnodes: str, hold: str | None = None) -> None:
        self.name, self.out = name, out
        if hold is not None:
            (out / f"hold-{name}").write_text(hold)
        self.sim = AWSSimulator(instance_id=f"i-{name.lower() * 17}")
        self.sim.start()
        env = {**os.environ, **simulated_environment(self.sim), "OMP_NUM_THREADS": "1"}
        env.pop("SPOTSAFE_STORE", None)
        torchrun = [
            PY,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=multinode-test",
            "--rdzv-conf=last_call_timeout=3",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            str(WORKER),
            str(out),
            str(store),
            name,
        ]
        cmd = [PY, "-m", "spotsafe.resume", "--store", str(store), "--backoff", "1", "--", *torchrun]
        self.log = out / f"node-{name}.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {self.name} still running after {timeout} s:\n{self.tail()}") from None

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def held(self, world: int, since: float = 0.0) -> dict[str, Any] | None:
        path = self.out / f"held-{self.name}"
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.name} exited {self.proc.returncode} early:\n{self.tail()}")
        if not path.exists():
            return None
        try:
            info = json.loads(path.read_text())
        except ValueError:
            return None  # being written
        return info if info["world"] == world and info["time"] > since else None

    def stop(self) -> None:
        stop_child(self.proc, grace=30)
        self._log.close()
        self.sim.shutdown()


def seen(out: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(out.glob("seen-*.jsonl")):
        node = path.stem[len("seen-") :]
        lines += [{**json.loads(line), "node": node} for line in path.read_text().splitlines()]
    return lines


def kept_rounds(lines: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Step -> the entries (one per rank) of the last round that trained it."""
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if "step" in line:
            by_step[line["step"]].append(line)
    kept = {}
    for step, entries in by_step.items():
        rounds: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for e in entries:
            rounds[(e["from"], e["world"])].append(e)
        last = max(rounds.values(), key=lambda es: max(e["time"] for e in es))
        per_rank = {}
        for e in sorted(last, key=lambda e: e["time"]):
            per_rank[e["rank"]] = e  # a crashed round with the same start: the later one wins
        kept[step] = [per_rank[r] for r in sorted(per_rank)]
    return kept


def replay(kept: dict[int, list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
    """Plain SGD in one process over the global batches (each the union of the ranks' batches)."""
    data = elastic.dataset()
    net = elastic.model()
    opt = elastic.optimizer(net)
    for step in sorted(kept):
        sizes = {len(e["idx"]) for e in kept[step]}
        assert len(sizes) == 1, f"step {step}: ranks had unequal batches {sizes}"
        idx = torch.tensor([i for e in kept[step] for i in e["idx"]])
        x, y = data.tensors[0][idx], data.tensors[1][idx]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()  # the mean over the union = DDP's mean of the ranks' means
        opt.step()
    return net.state_dict()


def lifecycle(
    tmp_path: Path, *, first: list[str], doomed: str, joiner: str, nnodes: str, holds: dict[str, str]
) -> dict[str, float]:
    """Start ``first`` one by one (each joins the running job), preempt ``doomed``, let ``joiner`` join."""
    out, store = tmp_path / "out", tmp_path / "store"
    out.mkdir()
    port = free_port()
    world = len(first)
    min_nodes = int(nnodes.split(":")[0])
    nodes: dict[str, Node] = {}
    timings: dict[str, float] = {}
    try:
        t_start = time.monotonic()
        # the first node hosts the c10d store (the first torchrun to bind the port)
        nodes[first[0]] = Node(first[0], out, store, port, nnodes, holds.get(first[0]))

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, TIMEOUT, interval=0.1, what="the first node's torchrun to host the c10d store")
        # 0. the job grows node by node: each newcomer joins a running job (torchrun restarts it)
        for k, name in enumerate(first[1:], start=1):
            if k >= min_nodes:  # the job is training on k nodes: wait until the last one holds mid-epoch
                last = first[k - 1]
                wait_until(lambda n=last, w=k: nodes[n].held(w), TIMEOUT, interval=0.1, what=f"{last} at world {k}")
            nodes[name] = Node(name, out, store, port, nnodes, holds.get(name))

        # 1. the doomed node's own instance gets the spot notice, mid-epoch
        wait_until(lambda: nodes[doomed].held(world), TIMEOUT, interval=0.1, what=f"node {doomed} at world {world}")
        t_notice = time.time()
        timings["start -> notice"] = time.monotonic() - t_start
        nodes[doomed].sim.arm("terminate")
        assert nodes[doomed].wait() == EXIT_PREEMPTED, f"{nodes[doomed].tail()}"
        timings["notice -> doomed supervisor exit"] = time.time() - t_notice

        # 2. the survivors carry the job on alone, then hold mid-epoch for the replacement
        survivors = [n for n in first if n != doomed]
        for name in survivors:
            wait_until(
                lambda n=name: nodes[n].held(world - 1, since=t_notice),
                TIMEOUT,
                interval=0.1,
                what=f"{name} at world {world - 1}",
            )
        after = [e for e in seen(out) if e.get("world") == world - 1 and "step" in e and e["time"] > t_notice]
        timings["notice -> survivors training"] = min(e["time"] for e in after) - t_notice

        # 3. a replacement boots and joins: the survivors save on torchrun's SIGTERM and re-form the group
        t_join = time.time()
        nodes[joiner] = Node(joiner, out, store, port, nnodes)
        for name in [*survivors, joiner]:
            assert nodes[name].wait() == 0, f"{nodes[name].tail()}"
        larger = [e for e in seen(out) if e.get("world") == world and "step" in e and e["time"] > t_join]
        timings["replacement start -> larger world training"] = min(e["time"] for e in larger) - t_join
        timings["whole story"] = time.monotonic() - t_start
    finally:
        for node in nodes.values():
            node.stop()
    print(f"\nmulti-node {'+'.join(first)} (doomed {doomed}, joined {joiner}):", json.dumps(timings, indent=1))

    # --- the supervisors' decisions: only the doomed node stopped for its own notice
    doomed_log = nodes[doomed].log.read_text()
    # it says so itself (its own account, issue 26): the supervisor needs no metadata to believe it
    assert "the training process stopped for its own notice (aws: terminate)" in doomed_log, f"{doomed_log[-4000:]}"
    assert "relaunching now" not in doomed_log
    for name in survivors:
        log = nodes[name].log.read_text()
        assert "this instance is not going away (aws: quiet)" in log, f"{log[-4000:]}"
        assert "relaunching now" in log

    # --- the store: the notice checkpoint, the join's checkpoint, the completion
    ckpt = Checkpointer(store)
    try:
        infos = ckpt.list()
        done = ckpt.completion()
    finally:
        ckpt.close()
    assert done is not None
    notices = [i for i in infos if i.reason == "notice"]
    # one per world change: each of the first nodes joining, the doomed node's notice, the replacement joining
    assert [i.world_size for i in notices] == [*range(min_nodes, world), world, world - 1]
    notice_ckpt, join_ckpt = notices[-2:]

    lines = seen(out)
    launches = [e for e in lines if "launch" in e]
    # every launch resumed from a notice checkpoint (or started the run): nothing was ever replayed
    assert {e["launch"]["from"] for e in launches} == {0} | {i.step for i in notices}
    # no step lost: the survivors resumed exactly at the notice's checkpoint, the larger world at the join's
    later = [e["launch"] for e in launches if e["time"] > notice_ckpt.time.timestamp()]
    assert sorted((lv["world"], lv["from"]) for lv in later) == sorted(
        [(world - 1, notice_ckpt.step)] * (world - 1) + [(world, join_ckpt.step)] * world
    )

    kept = kept_rounds(lines)
    final = done["step"]
    assert sorted(kept) == list(range(1, final + 1))  # every step once, none missing
    for step, entries in kept.items():
        assert len(entries) == entries[0]["world"], f"step {step}: {len(entries)} ranks of {entries[0]['world']}"
    # every sample of every epoch exactly once, the interrupted ones included (the world changed mid-epoch)
    for epoch in range(elastic.EPOCHS):
        got = sorted(i for es in kept.values() for e in es if e["epoch"] == epoch for i in e["idx"])
        assert got == list(range(elastic.SAMPLES)), f"epoch {epoch}"
    assert notice_ckpt.metadata["batch"] > 0  # both world changes happened mid-epoch
    assert join_ckpt.metadata["batch"] > 0

    # the final model: plain SGD over the same global batches (DDP's all-reduce sums in another order)
    want = replay(kept)
    got_weights = torch.load(out / "weights.pt", weights_only=True)
    for key, value in want.items():
        torch.testing.assert_close(got_weights[key], value, rtol=1e-5, atol=1e-6)
    return timings


@pytest.mark.slow
def test_two_nodes_notice_on_one_survivor_continues_then_a_replacement_joins(tmp_path: Path) -> None:
    lifecycle(
        tmp_path,
        first=["A", "B"],
        doomed="B",
        joiner="C",
        nnodes="1:2",
        # A holds alone (world 1) until a node joins, so that it saves at an odd batch (2 does not
        # divide the global batch count: the re-split must be at the sample count); B holds at
        # world 2 until its own notice
        holds={"A": "1 1 2 1", "B": "2 3 1 0"},
    )


@pytest.mark.slow
def test_three_nodes_the_rendezvous_host_is_preempted_two_carry_on_a_third_joins(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The two-node test's path, plus the c10d store's host going away (opt-in: a minute of both cores)."""
    if not slow_enabled(request.config):
        pytest.skip("three torchrun nodes, a minute of both cores: run with SPOTSAFE_SLOW=1 or -m slow")
    lifecycle(
        tmp_path,
        first=["A", "B", "C"],
        doomed="A",  # A started first: its torchrun hosts the c10d store, and it goes away
        joiner="D",
        nnodes="2:3",
        # every world change at a batch count the new world size does not divide
        holds={"A": "3 2 2 1", "B": "2 1 3 1", "C": "2 1 3 1"},
    )
