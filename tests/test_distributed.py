"""spotsafe.distributed under real torchrun jobs (2 ranks, gloo on CPU) and in-process.

The scripts torchrun launches live in tests/dist_workers/; each writes its
rank's findings as JSON into a directory the test then reads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import torch

from spotsafe.data import ElasticDistributedSampler, resplit
from spotsafe.distributed.commit import FileRecord, source_rank
from spotsafe.distributed.context import DistContext, missing_ranks
from spotsafe.distributed.dcp import load_sharded, save_sharded
from spotsafe.errors import CheckpointCorrupt, DistributedError, UnsafeCheckpoint
from spotsafe.storage.local import LocalStore
from spotsafe.storage.registry import open_store
from tests.helpers import checkpoint_dir, stop_child, wait_until

WORKERS = Path(__file__).parent / "dist_workers"


def torchrun(script: str, *args: object, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SPOTSAFE_STORE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKERS / script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:  # keep the whole story for a failure report
        Path(str(args[0]) + ".log").write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    return proc


def story(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed torchrun job's stderr for the assertion: the workers' own first lines and torchrun's summary."""
    err = proc.stderr
    return err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"


def results(out: Path, prefix: str, world: int = 2) -> list[dict]:
    found = []
    for rank in range(world):
        path = out / f"{prefix}-{rank}.json"
        assert path.exists() == True, f"rank {rank} wrote no result"  # noqa: E712
        found.append(json.loads(path.read_text()))
    return found


# --------------------------------------------------------------------- torchrun jobs


def test_notice_on_rank_1_only_is_agreed_by_every_rank_at_the_same_step(tmp_path: Path) -> None:
    notice_step = 7
    proc = torchrun("agree.py", tmp_path, notice_step)
    assert proc.returncode == 0, f"{story(proc)}"
    r0, r1 = results(tmp_path, "agree")
    expected_levels = [2, 2, 1, 2]  # terminate, terminate, rebalance, terminate (auto)
    notice_steps = [notice_step] * 3 + [30]
    for a, b, level, at in zip(r0["runs"], r1["runs"], expected_levels, notice_steps, strict=True):
        assert a["agreed_at"] == b["agreed_at"]
        assert a["every_then"] == b["every_then"]  # auto: every rank switched together
        assert a["every_max"] == b["every_max"]
        # auto: rank 0 proposes a new every from its step times at each agreement, so the bound is
        # that of the largest every in force between the notice and the agreement
        bound = 2 * a["every_max"] - 1 if a["every"] == "auto" else a["bound"]
        assert 0 <= a["agreed_at"] - at <= bound, f"{a}"
        assert a["level"] == b["level"] == level
        assert a["source_rank"] == b["source_rank"] == 1
        # every rank sees the doomed rank's deadline (a float64 timestamp: to the microsecond)
        assert a["deadline"] == b["deadline"]
        gap = datetime.fromisoformat(a["deadline"]) - datetime.fromisoformat(b["expected_deadline"])
        assert abs(gap.total_seconds()) < 1e-5
    # every=1 async agrees on the very next step; every=3 async within its 5-step bound
    assert r0["runs"][0]["agreed_at"] == notice_step + 1
    assert r0["runs"][1]["bound"] == 5
    assert r0["runs"][3]["every_then"] > 1  # auto spaced the agreements out
    assert 0.5 <= r1["abandoned"] < 5  # drain(timeout=) gave up on a reduce rank 0 had not joined


#: What a gloo rank prints when std::terminate kills it (seen rarely in this job on a loaded 2-core
#: machine: once in ~4 full test runs, once in 12 runs beside two CPU hogs, never in 62 beside four).
GLOO_ABORT = "terminate called without an active exception"


def test_fsdp_state_round_trips_through_dcp_and_reshards_to_one_rank(tmp_path: Path) -> None:
    out, root = tmp_path / "out", tmp_path / "store"
    proc = torchrun("dcp_roundtrip.py", out, root)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        # A std::terminate in torch's native code (spotsafe has none), cause not found yet: one more
        # try from scratch for that crash only; any other failure, or the same one twice, fails the
        # test with both stories.
        first = story(proc)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        proc = torchrun("dcp_roundtrip.py", out, root)
        assert proc.returncode == 0, f"{story(proc)}\n---- the first try ----\n{first}"
    assert proc.returncode == 0, f"{story(proc)}"
    r0, r1 = results(out, "dcp")
    assert r0["equal"] == r1["equal"] == True  # noqa: E712
    assert r0["local_shape"] == [8, 8]  # really sharded: 16 rows over 2 ranks

    step = root / "step-000000000002"
    manifest = json.loads((step / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk == {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    for path, rec in listed.items():
        assert (step / path).stat().st_size == rec["size"]

    # world size 2 -> 1: a plain, unsharded model and optimizer take the sharded checkpoint
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    files = [FileRecord(**f) for f in manifest["files"]]
    load_sharded(state, LocalStore(root), "step-000000000002", files=files)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    expected = torch.load(out / "expected.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected["model"][key])
    _, got_osd = get_state_dict(model, opt)
    for fqn, moments in expected["optim"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(got_osd["state"][fqn][name], value)


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_rank_lost_mid_save_commits_nothing_and_names_the_rank(tmp_path: Path, mode: str) -> None:
    out, root = tmp_path / "out", tmp_path / "store"
    timeout = 4.0
    proc = torchrun("kill_mid_save.py", out, root, timeout, mode)
    assert proc.returncode != 0
    report = json.loads((out / "kill-0.json").read_text())
    assert report["type"] == "DistributedError"
    assert "rank 1 did not reach the barrier" in report["error"]
    assert report["committed"] == []
    assert report["elapsed"] < timeout + 3
    if mode == "hang":  # no socket reset to notice: the timeout itself ended the wait
        assert report["elapsed"] >= timeout * 0.9
    # the torn step has no manifest; the previous one is intact and is what resumes
    assert (root / "step-000000000002" / "manifest.json").exists() == False  # noqa: E712
    manifest = json.loads((root / "step-000000000001" / "manifest.json").read_text())
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 64)
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    state = {"model": model.state_dict()}
    load_sharded(state, LocalStore(root), "step-000000000001", files=[FileRecord(**f) for f in manifest["files"]])
    assert torch.equal(state["model"]["weight"], reference.weight.detach())
    assert torch.equal(state["model"]["bias"], reference.bias.detach())


def test_a_rank_whose_write_fails_votes_no_and_nobody_waits(tmp_path: Path) -> None:
    out, root = tmp_path / "out", tmp_path / "store"
    timeout = 30.0
    proc = torchrun("kill_mid_save.py", out, root, timeout, "fail")
    assert proc.returncode != 0
    r0, r1 = results(out, "kill")
    assert r0["type"] == "DistributedError"
    assert "rank(s) 1 failed to write their files; nothing was committed" in r0["error"]
    assert r1["type"] == "OSError" and "No space left" in r1["error"]
    assert r0["committed"] == r1["committed"] == []
    assert r0["elapsed"] < timeout / 3  # decided by the vote, not by the timeout
    assert (root / "step-000000000002" / "manifest.json").exists() == False  # noqa: E712


# --------------------------------------------------------------------- in-process


def _saved_single(tmp_path: Path) -> tuple[LocalStore, list[FileRecord], torch.nn.Module]:
    store = LocalStore(tmp_path / "store")
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 3)
    committed: list[list[FileRecord]] = []
    files = save_sharded(
        {"model": model.state_dict(), "meta": {"lr": 0.5}}, store, "step-000000000010", commit=committed.append
    )
    assert committed == [files]
    return store, files, model


def test_single_process_sharded_save_and_load_without_a_process_group(tmp_path: Path) -> None:
    store, files, model = _saved_single(tmp_path)
    assert {f.path for f in files} == {"dcp/.metadata", "dcp/__0_0.distcp"}
    target = torch.nn.Linear(4, 3)
    state = {"model": target.state_dict(), "meta": {"lr": 0.0}}
    load_sharded(state, store, "step-000000000010", files=files)
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert state["meta"] == {"lr": 0.5}


def test_sharded_state_goes_to_s3_under_the_manifest(s3_bucket: str, s3_options: dict, s3_client: object) -> None:
    store = open_store(f"s3://{s3_bucket}/runs/fsdp", storage_options=s3_options)
    try:
        torch.manual_seed(3)
        model = torch.nn.Linear(4, 3)
        directory = "step-000000000007"

        def commit(files: list[FileRecord]) -> None:
            body = {"files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in files]}
            store.commit_file(f"{directory}/manifest.json", json.dumps(body).encode())

        files = save_sharded({"model": model.state_dict()}, store, directory, commit=commit)
        keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}  # type: ignore[attr-defined]
        assert keys == {
            f"runs/fsdp/{directory}/{name}" for name in ("manifest.json", "dcp/.metadata", "dcp/__0_0.distcp")
        }
        target = {"model": torch.nn.Linear(4, 3).state_dict()}
        listed = json.loads(bytes(store.read_file(f"{directory}/manifest.json")))["files"]
        load_sharded(target, store, directory, files=[FileRecord(**f) for f in listed])
        assert torch.equal(target["model"]["weight"], model.weight.detach())
        assert [f.path for f in files] == sorted(f["path"] for f in listed)
    finally:
        store.close()


def test_a_torn_shard_is_refused_naming_the_file(tmp_path: Path) -> None:
    store, files, _ = _saved_single(tmp_path)
    shard = tmp_path / "store" / "step-000000000010" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    state = {"model": torch.nn.Linear(4, 3).state_dict(), "meta": {"lr": 0.0}}
    with pytest.raises(CheckpointCorrupt, match=r"__0_0\.distcp"):
        load_sharded(state, store, "step-000000000010", files=files)


class _Planted:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/spotsafe-dcp-pickle-marker")


def test_dcp_metadata_cannot_run_code(tmp_path: Path) -> None:
    store, _, _ = _saved_single(tmp_path)
    MARKER.unlink(missing_ok=True)
    meta = tmp_path / "store" / "step-000000000010" / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_Planted()))
    state = {"model": torch.nn.Linear(4, 3).state_dict(), "meta": {"lr": 0.0}}
    with pytest.raises(UnsafeCheckpoint, match=r"posix\.system|os\.system"):
        load_sharded(state, store, "step-000000000010")
    assert MARKER.exists() == False  # noqa: E712


def test_detect_without_a_process_group_is_none() -> None:
    assert DistContext.detect() is None


def test_missing_ranks_are_read_from_gloo_messages() -> None:
    assert missing_ranks("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms") == [1, 3]
    assert missing_ranks("[Rank 0]: Rank 2 failed to pass monitoredBarrier in 5000 ms") == [2]
    assert missing_ranks("Connection closed by peer") == []
    assert issubclass(DistributedError, RuntimeError)


def test_source_rank_of_a_changed_world() -> None:
    assert [source_rank(r, 2) for r in range(2)] == [0, 1]
    assert [source_rank(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [source_rank(r, 4) for r in range(1)] == [0]


@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (4, 2), (1, 2)])
def test_resplit_reads_every_remaining_sample_once(old: int, new: int) -> None:
    total, per_rank_consumed = 50, 5
    consumed = per_rank_consumed * old
    before = {p for r in range(old) for p in resplit(0, total, old, r)[:per_rank_consumed]}
    assert before == set(range(consumed))  # round-robin: the first n per rank are a prefix
    after = [p for r in range(new) for p in resplit(consumed, total, new, r)]
    assert set(after) == set(range(consumed, total))
    assert len(after) - len(set(after)) < new  # only DistributedSampler-style padding repeats


@pytest.mark.parametrize(
    "n,world,shuffle,drop_last",
    [(10, 2, True, False), (11, 3, True, False), (11, 3, False, True), (7, 2, False, False)],
)
def test_elastic_sampler_matches_distributed_sampler(n: int, world: int, shuffle: bool, drop_last: bool) -> None:
    from torch.utils.data import DistributedSampler

    data = list(range(n))
    for rank in range(world):
        ours = ElasticDistributedSampler(data, world, rank, shuffle=shuffle, seed=4, drop_last=drop_last)
        theirs = DistributedSampler(data, world, rank, shuffle=shuffle, seed=4, drop_last=drop_last)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_elastic_sampler_resumes_on_another_world_size() -> None:
    data = list(range(20))
    old = [ElasticDistributedSampler(data, 2, r, seed=1) for r in range(2)]
    for s in old:
        s.set_epoch(3)
    read = {i for s in old for i in list(s)[:4]}  # each rank read 4 samples: 8 globally
    new = [ElasticDistributedSampler(data, 3, r, seed=1) for r in range(3)]
    for s in new:
        s.set_position(3, 8)
    rest = [i for s in new for i in s]
    assert sum(len(s) for s in new) == len(rest)
    assert set(rest) | read == set(data)
    assert set(rest) & read == set()  # padding repeats remaining samples, never read ones
    for s in new:
        s.set_epoch(4)  # a new epoch starts from its beginning
        assert s.start == 0


# --------------------------------------------------------------------- spotsafe.Run under torchrun


def _events(out: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"events-{tag}.jsonl").read_text().splitlines()]


def _seen(out: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"seen-{tag}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_under_torchrun_notice_on_one_rank_resume_bit_identical_and_on_one_rank(tmp_path: Path) -> None:
    notice_step = 8
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # an uninterrupted 2-rank run
    proc = torchrun("run_ddp.py", ref / "out", ref / "store", 0, -1)
    assert proc.returncode == 0, f"{story(proc)}"

    # the same run; rank 1 alone gets a notice at step 8
    proc = torchrun("run_ddp.py", cut / "out", cut / "store", notice_step, 1)
    assert proc.returncode != 0  # torchrun reports its workers' exit 75 as a failure
    # the first rank to exit is reported with 75; torchrun may SIGTERM the other while it exits
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "75" in codes and set(codes) <= {"75", "-15"}, f"{story(proc)}"
    saved = []
    for rank in (0, 1):
        events = _events(cut / "out", f"w2-r{rank}")
        kinds = [e["event"] for e in events]
        assert kinds[-3:] == ["notice", "durable", "exit"]
        assert events[-1]["code"] == 75
        saved.append(events[-2]["step"])
    assert saved[0] == saved[1]
    step = saved[0]
    assert notice_step <= step <= notice_step + 1  # agree_every=1: async, bound 1 step
    # the run's story has every rank's view: its notice, its checkpoints' stall and persist
    from spotsafe.story.facts import StoreReport

    facts, _ = StoreReport(LocalStore(cut / "store")).build()
    ranks = {r["rank"]: r for r in facts["ranks"]}
    assert sorted(ranks) == [0, 1], f"{facts['ranks']}"
    assert [n["step"] for n in ranks[1]["notices"]] == [step] == [n["step"] for n in ranks[0]["notices"]]
    assert ranks[1]["checkpoints"] == ranks[0]["checkpoints"] >= 1
    assert ranks[1]["persist_s"]["count"] >= 1 and facts["problems"] == []
    manifest = json.loads((checkpoint_dir(cut / "store", step) / "manifest.json").read_text())
    assert manifest["reason"] == "notice"
    assert manifest["world_size"] == 2
    assert sorted({f["rank"] for f in manifest["files"]}) == [0, 1]
    # rank 0 held the writer lease (generation 1) and let go on exit 75: a replacement takes over at once
    from spotsafe.checkpoint.lease import read_record

    assert manifest["metadata"]["spotsafe_generation"] == 1
    record = read_record(LocalStore(cut / "store"), 1)
    assert record is not None and record.released
    # keep a copy of the interrupted store for the 2 -> 1 resume
    shutil.copytree(cut / "store", tmp_path / "store1")

    # damage rank 1's own file of the notice checkpoint: both ranks must fall back together
    rank1 = next(f for f in manifest["files"] if f["rank"] == 1 and f["role"] == "data")
    damaged = checkpoint_dir(cut / "store", step) / rank1["path"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    from spotsafe.checkpoint.catalog import Catalog

    # the newest committed checkpoint before the damaged one (directory names carry the writer generation)
    previous = max(info.step for info in Catalog(LocalStore(cut / "store")).list() if info.step < step)

    # resumed on 2 ranks (from the previous checkpoint): bit-identical to the uninterrupted run
    proc = torchrun("run_ddp.py", cut / "out", cut / "store", 0, -1)
    assert proc.returncode == 0, f"{story(proc)}"
    assert "every rank falls back to the previous one" in proc.stderr
    a = torch.load(ref / "out" / "weights-w2-r0.pt", weights_only=True)
    b = torch.load(cut / "out" / "weights-w2-r0.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}"
    for rank in (0, 1):
        resumed = [s for s in _seen(cut / "out", f"w2-r{rank}") if "resumed" in s]
        assert resumed[0]["resumed"] == previous

    # world size 2 -> 1: one plain process resumes the DDP run
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "run_ddp.py"), one, tmp_path / "store1", "0", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{story(proc)}"
    seen1 = _seen(one, "w1-r0")
    assert seen1[0]["resumed"] == step
    epoch = seen1[0]["epoch"]

    def first_launch(rank: int) -> list[dict]:
        lines = _seen(cut / "out", f"w2-r{rank}")
        return lines[: next(i for i, s in enumerate(lines) if "resumed" in s)]

    before = [
        i for rank in (0, 1) for s in first_launch(rank) if s["epoch"] == epoch and s["step"] <= step for i in s["idx"]
    ]
    after = [i for s in seen1[1:] if s.get("epoch") == epoch for i in s["idx"]]
    # the interrupted epoch is finished on one rank: every sample exactly once
    assert sorted(before + after) == list(range(48))
    # the rest of the run at one rank's pace: every sample not yet read, 4 a step
    assert sum(1 for s in seen1 if "idx" in s) == (3 * 48 - epoch * 48 - len(before)) // 4
    assert (one / "weights-w1-r0.pt").exists() == True  # noqa: E712


@pytest.mark.slow
def test_fsdp_run_under_torchrun_saves_through_dcp_and_resumes_bit_identical(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = torchrun("run_ddp.py", ref / "out", ref / "store", 0, -1, "fsdp")
    assert proc.returncode == 0, f"{story(proc)}"
    proc = torchrun("run_ddp.py", cut / "out", cut / "store", 8, 1, "fsdp")
    assert proc.returncode != 0
    steps = {_events(cut / "out", f"w2-r{rank}")[-1]["step"] for rank in (0, 1)}
    assert len(steps) == 1
    step = steps.pop()
    manifest = json.loads((checkpoint_dir(cut / "store", step) / "manifest.json").read_text())
    assert manifest["reason"] == "notice"
    dcp = sorted(f["path"] for f in manifest["files"] if f["role"] == "dcp")
    assert dcp == ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"]
    proc = torchrun("run_ddp.py", cut / "out", cut / "store", 0, -1, "fsdp")
    assert proc.returncode == 0, f"{story(proc)}"
    a = torch.load(ref / "out" / "weights-w2-r0.pt", weights_only=True)
    b = torch.load(cut / "out" / "weights-w2-r0.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}"


@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun_and_resumes_in_one_process(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "mnist_ddp.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", SPOTSAFE_SOURCES="none")
    store = tmp_path / "store"
    args = ["--data", "synthetic", "--store", str(store), "--every-steps", "3"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(example),
            *args,
            "--epochs",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"{story(proc)}"
    assert "on 2 rank(s)" in proc.stdout
    # one more epoch in one plain process, from the 2-rank run's final checkpoint
    proc = subprocess.run(
        [sys.executable, str(example), *args, "--epochs", "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{story(proc)}"
    assert "of a 2-rank run" in proc.stdout
    assert "done:" in proc.stdout and "on 1 rank(s)" in proc.stdout


@pytest.mark.slow
def test_torchrun_job_waits_for_the_store_then_every_rank_stops_77_once_superseded(tmp_path: Path) -> None:
    """2 ranks: rank 0 takes the writer lease (after the live holder lets go); when another
    instance takes the store over mid-run, the next commit is fenced and every rank stops."""
    from spotsafe.checkpoint.lease import Lease, LeaseRecord, generations, lease_path, read_record
    from spotsafe.checkpoint.writer import Checkpointer

    store, out = tmp_path / "store", tmp_path / "out"
    holder = Lease(LocalStore(store), seconds=60)
    holder.acquire()  # another live instance holds the store
    env = dict(os.environ, OMP_NUM_THREADS="1", STEP_SLEEP="0.3")
    env.pop("SPOTSAFE_STORE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [*cmd, str(WORKERS / "run_ddp.py"), str(out), str(store), "0", "-1"], stderr=log, env=env
        )
    try:

        def wait(what: str, cond: Callable[[], bool], timeout: float = 120) -> None:
            def ready() -> bool:
                assert job.poll() is None, f"the job exited before {what}: {(tmp_path / 'job.log').read_text()}"
                return cond()

            wait_until(ready, timeout, what=what)

        wait("rank 0 to wait for the lease", lambda: "is being written by" in (tmp_path / "job.log").read_text())
        assert not (out / "seen-w2-r0.jsonl").exists() or _seen(out, "w2-r0") == []  # nobody trained yet
        holder.release()
        wait("a first checkpoint", lambda: any((store / d / "manifest.json").exists() for d in os.listdir(store)))
        # Another instance takes the store over (the job's host looked partitioned to it).
        with Checkpointer(store) as reader:
            base = reader.list()[-1].step
        gen = generations(LocalStore(store))[-1]
        assert gen == 2
        taken = read_record(LocalStore(store), gen)
        assert taken is not None
        record: LeaseRecord = replace(taken, generation=gen + 1, pid=os.getpid(), base_step=base, token="test")
        assert LocalStore(store).create_file(lease_path(gen + 1), record.to_json())
        assert job.wait(timeout=120) != 0
    finally:
        stop_child(job)
    log_text = (tmp_path / "job.log").read_text()
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", log_text)
    assert "77" in codes and set(codes) <= {"77", "-15"}, f"{log_text[-4000:]}"
    assert [e["event"] for e in _events(out, "w2-r0")][-1] == "fenced"
    with Checkpointer(store) as reader:
        infos = reader.list()
        assert infos and all(i.step <= base for i in infos)  # nothing the fenced job wrote later counts
        for info in infos:
            reader.check(info)


def test_a_checkpointer_alone_saves_and_restores_collectively_under_torchrun(tmp_path: Path) -> None:
    proc = torchrun("ckpt_alone.py", tmp_path / "out", tmp_path / "store")
    assert proc.returncode == 0, f"{story(proc)}"
    found = results(tmp_path / "out", "alone")
    # every rank restored the same (newest) step, the replicated model, and its own per-rank value
    assert [(r["step"], r["weight"], r["mine"]) for r in found] == [(3, 3.0, 3), (3, 3.0, 103)]
    assert [r["generation"] for r in found] == [1, None]  # rank 0 alone holds the writer lease
    manifest = json.loads((checkpoint_dir(tmp_path / "store", 3) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and sorted({f["rank"] for f in manifest["files"]}) == [0, 1]
