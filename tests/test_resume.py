"""python -m spotsafe.resume: restart on crash, stop on 75, skip a complete run, forward SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spotsafe import EXIT_PREEMPTED
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.environment import simulated_environment
from spotsafe.resume import Supervisor, exit_status, main, supervise
from spotsafe.storage.local import LocalStore
from tests.helpers import child, wait_until

PY = sys.executable


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [PY, str(path)]


# A child that counts its launches in a file and exits with the status listed for that launch.
COUNTER = """
    import os, sys
    from pathlib import Path
    f = Path(os.environ["COUNT_FILE"])
    n = int(f.read_text()) if f.exists() else 0
    f.write_text(str(n + 1))
    codes = [int(c) for c in os.environ["CODES"].split(",")]
    print("launch", n, "store", os.environ.get("SPOTSAFE_STORE"), flush=True)
    sys.exit(codes[min(n, len(codes) - 1)])
"""


def counter_env(tmp_path: Path, codes: str) -> dict[str, str]:
    return {**os.environ, "COUNT_FILE": str(tmp_path / "count"), "CODES": codes}


def launches(tmp_path: Path) -> int:
    return int((tmp_path / "count").read_text())


def test_restarts_after_crashes_then_succeeds(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cmd = script(tmp_path, COUNTER)
    code = supervise(
        cmd, str(tmp_path / "store"), env=counter_env(tmp_path, "1,2,0"), backoff=0.01, check_complete=False
    )
    assert code == 0
    assert launches(tmp_path) == 3
    out, err = capfd.readouterr()
    # the child's output is streamed and it got the store
    assert f"launch 2 store {tmp_path / 'store'}" in out
    assert "restart 2/3" in err


def test_gives_up_after_max_restarts(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cmd = script(tmp_path, COUNTER)
    code = supervise(
        cmd, str(tmp_path / "store"), env=counter_env(tmp_path, "3"), max_restarts=2, backoff=0.01, check_complete=False
    )
    assert code == 3
    assert launches(tmp_path) == 3
    assert "GIVING UP" in capfd.readouterr().err


def test_preempted_child_is_not_restarted(tmp_path: Path) -> None:
    cmd = script(tmp_path, COUNTER)
    code = supervise(
        cmd,
        str(tmp_path / "store"),
        env=counter_env(tmp_path, f"{EXIT_PREEMPTED},0"),
        backoff=0.01,
        check_complete=False,
    )
    assert code == EXIT_PREEMPTED
    assert launches(tmp_path) == 1


def test_healthy_instance_relaunches_at_once_after_another_nodes_notice(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Exit 75 on an instance whose own metadata answers and is quiet: another node's notice."""
    cmd = script(tmp_path, COUNTER)
    with AWSSimulator() as sim:
        env = {**counter_env(tmp_path, f"{EXIT_PREEMPTED},0"), **simulated_environment(sim)}
        t0 = time.monotonic()
        code = supervise(cmd, str(tmp_path / "store"), env=env, backoff=60, check_complete=False)
    assert code == 0
    assert launches(tmp_path) == 2
    assert time.monotonic() - t0 < 30  # no crash backoff (60 s) before the relaunch
    err = capfd.readouterr().err
    assert "this instance is not going away (aws: quiet)" in err
    assert "relaunching now" in err


def test_doomed_instance_exits_75_without_restarting(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cmd = script(tmp_path, COUNTER)
    with AWSSimulator() as sim:
        sim.arm("terminate")
        env = {**counter_env(tmp_path, f"{EXIT_PREEMPTED},0"), **simulated_environment(sim)}
        code = supervise(cmd, str(tmp_path / "store"), env=env, backoff=0.01, check_complete=False)
    assert code == EXIT_PREEMPTED
    assert launches(tmp_path) == 1
    assert "this instance is going away (aws: terminate notice)" in capfd.readouterr().err


def test_peer_notices_without_progress_are_counted_as_failures(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A child that exits 75 at once forever on a quiet instance must not spin: one free relaunch,
    then the crash rule (backoff, --max-restarts) until the run moves on."""
    cmd = script(tmp_path, COUNTER)
    with AWSSimulator() as sim:
        env = {**counter_env(tmp_path, f"{EXIT_PREEMPTED}"), **simulated_environment(sim)}
        code = supervise(cmd, str(tmp_path / "store"), env=env, max_restarts=2, backoff=0.01, check_complete=False)
    assert code == EXIT_PREEMPTED
    assert launches(tmp_path) == 4  # 1 + the free relaunch + 2 counted restarts
    err = capfd.readouterr().err
    assert "counting it as a failed launch" in err
    assert "GIVING UP" in err


def test_a_signal_to_the_supervisor_stops_it_even_on_quiet_metadata(tmp_path: Path) -> None:
    """systemctl stop / Kubernetes: the supervisor's own SIGTERM is proof enough; no relaunch."""
    ready, count = tmp_path / "ready", tmp_path / "count"
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        f = Path({str(count)!r})
        f.write_text(str(int(f.read_text()) + 1 if f.exists() else 1))
        signal.signal(signal.SIGTERM, lambda *a: sys.exit({EXIT_PREEMPTED}))
        Path({str(ready)!r}).write_text("1")
        time.sleep(60)
    """)
    )
    with AWSSimulator() as sim:
        env = {**os.environ, **simulated_environment(sim)}
        proc = subprocess.Popen(
            [PY, "-m", "spotsafe.resume", "--store", str(tmp_path / "store"), "--", PY, str(child)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        wait_until(lambda: proc.poll() is None and ready.exists(), 30, what="the child to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, f"{err}"
    assert count.read_text() == "1"
    assert "relaunching" not in err


def test_killed_child_status_and_restart(tmp_path: Path) -> None:
    cmd = script(
        tmp_path,
        """
        import os, signal
        from pathlib import Path
        f = Path(os.environ["COUNT_FILE"])
        n = int(f.read_text()) if f.exists() else 0
        f.write_text(str(n + 1))
        if n == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    """,
    )
    sup = Supervisor(cmd, env=counter_env(tmp_path, "0"), backoff=0.01)
    assert sup.run() == 0
    assert sup.history == [128 + signal.SIGKILL, 0]
    assert exit_status(-15) == 143


def test_sigterm_is_forwarded_and_child_status_returned(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        def on_term(signum, frame):
            time.sleep(0.3)  # the "final save"
            Path({str(tmp_path / "saved")!r}).write_text("saved")
            sys.exit({EXIT_PREEMPTED})
        signal.signal(signal.SIGTERM, on_term)
        Path({str(ready)!r}).write_text("1")
        time.sleep(60)
    """)
    )
    proc = subprocess.Popen(
        [PY, "-m", "spotsafe.resume", "--store", str(tmp_path / "store"), "--backoff", "0", "--", PY, str(child)],
        stderr=subprocess.PIPE,
        text=True,
    )

    def child_ready() -> bool:
        assert proc.poll() is None, "the supervisor exited early"
        return ready.exists()

    wait_until(child_ready, 30, what="the child to start")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED
    assert (tmp_path / "saved").read_text() == "saved"  # it waited for the child's final save
    assert "forwarding" in err


def test_cli_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--store", "/tmp/x"])
    assert e.value.code == 2
    assert "give the training command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--", "true"])
    assert "--store is required" in capsys.readouterr().err


def test_missing_command_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        supervise([str(tmp_path / "no-such-program")], str(tmp_path / "store"), check_complete=False)
    assert "no-such-program" in str(e.value.code)


def finished_store(path: Path, steps: int = 4) -> None:
    from spotsafe import Run

    run = Run(path, model=torch_linear(), watch=False)
    for _ in range(steps):
        run.step()
    run.finish()


def torch_linear() -> object:
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(2, 2)


def test_complete_run_is_not_run_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    finished_store(store)
    marker = tmp_path / "ran"
    code = main(["--store", str(store), "--", PY, "-c", f"open({str(marker)!r}, 'w').write('x')"])
    assert code == 0
    assert not marker.exists()
    assert "already complete (step 4" in capsys.readouterr().out


def test_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spotsafe import Run

    store = tmp_path / "store"
    assert main(["--status", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "complete: no" in out and "checkpoints: none" in out
    run = Run(store, model=torch_linear(), watch=False, every_steps=3)
    for _ in range(3):
        run.step()
    run.close()
    assert main(["--status", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "complete: no" in out
    assert "newest: step 3 (epoch 0, batch 0), reason periodic" in out
    finished_store(tmp_path / "done", steps=5)
    assert main(["--status", "--store", str(tmp_path / "done")]) == 0
    assert "complete: yes (step 5, epoch 0" in capsys.readouterr().out


def test_crash_then_resume_through_the_cli(tmp_path: Path) -> None:
    """A real Run crashes once mid-way; the supervisor restarts it and it resumes, then completes."""
    child = tmp_path / "train.py"
    child.write_text(
        textwrap.dedent("""
        import os, sys, torch
        from pathlib import Path
        import spotsafe
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        run = spotsafe.Run(model=model, watch=False, every_steps=5)
        print("start", run.step_count, flush=True)
        crashed = Path(sys.argv[1])
        while run.step_count < 20:
            run.step()
            if run.step_count == 12 and not crashed.exists():
                crashed.write_text("1")
                raise RuntimeError("simulated crash")
        run.finish()
    """)
    )
    proc = subprocess.run(
        [
            PY,
            "-m",
            "spotsafe.resume",
            "--store",
            str(tmp_path / "store"),
            "--backoff",
            "0",
            "--",
            PY,
            str(child),
            str(tmp_path / "crashed"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.stderr}"
    words = proc.stdout.split()
    # the restart resumed from a periodic checkpoint (10, or 5 when 10's save was still queued behind 5's)
    assert words[:3] == ["start", "0", "start"] and words[3] in ("5", "10")
    assert len(words) == 4
    assert "simulated crash" in proc.stderr
    assert "restart 1/3" in proc.stderr


@pytest.mark.slow
def test_torchrun_preemption_then_resume_on_one_process(tmp_path: Path) -> None:
    """torchrun turns its ranks' exit 75 into 1: the supervisor still sees a preemption (the notice
    checkpoint in the store) and does not restart; a one-process replacement resumes the 2-rank run."""
    worker = Path(__file__).parent / "dist_workers" / "run_ddp.py"
    store = str(tmp_path / "store")
    out = tmp_path / "out"
    env = {**os.environ, "SPOTSAFE_SOURCES": "none"}
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = subprocess.run(
        [
            PY,
            "-m",
            "spotsafe.resume",
            "--store",
            store,
            "--backoff",
            "0",
            "--",
            *torchrun,
            str(worker),
            str(out),
            store,
            "7",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert first.returncode == EXIT_PREEMPTED, f"{first.stderr[-3000:]}"
    assert "treating it as preempted" in first.stderr
    from spotsafe.checkpoint.writer import Checkpointer

    ckpt = Checkpointer(store)
    newest = ckpt.latest(verify=True)
    ckpt.close()
    assert newest is not None
    assert (newest.reason, newest.world_size) == ("notice", 2)
    second = subprocess.run(
        [PY, "-m", "spotsafe.resume", "--store", store, "--", PY, str(worker), str(out), store, "0", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert second.returncode == 0, f"{second.stderr[-3000:]}"
    import json

    seen = [json.loads(line) for line in (out / "seen-w1-r0.jsonl").read_text().splitlines()]
    assert seen[0]["resumed"] == newest.step
    # every sample of the interrupted epoch is trained on exactly once across the 2 ranks and the 1
    epoch = newest.epoch
    before = [
        i
        for f in ("seen-w2-r0.jsonl", "seen-w2-r1.jsonl")
        for d in map(json.loads, (out / f).read_text().splitlines())
        if d.get("epoch") == epoch
        for i in d["idx"]
    ]
    after = [i for d in seen[1:] if d.get("epoch") == epoch for i in d["idx"]]
    assert sorted(before + after) == list(range(48))


# ----------------------------------------------------------------------------- hostile inputs


def test_a_child_ignoring_sigterm_is_killed_after_the_deadline(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        textwrap.dedent(f"""
        import signal, time
        from pathlib import Path
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path({str(ready)!r}).write_text("1")
        time.sleep(600)
    """)
    )
    with child(
        [PY, "-m", "spotsafe.resume", "--store", str(tmp_path / "store"), "--kill-after", "2", "--", PY, str(stubborn)],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:

        def started() -> bool:
            assert proc.poll() is None
            return ready.exists()

        wait_until(started, 60, what="the stubborn child to start")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)  # not the child's 600 s
    assert time.monotonic() - t0 >= 1.5
    assert proc.returncode == 128 + signal.SIGKILL
    assert "SIGKILL" in err


def test_the_kill_deadline_defaults_to_the_signal_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotsafe.resume import KILL_MARGIN, _default_kill_after

    monkeypatch.setenv("SPOTSAFE_SIGNAL_GRACE", "45")
    assert _default_kill_after() == 45 + KILL_MARGIN


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "1e9"])
def test_bad_backoff_is_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--store", "/tmp/x", "--backoff", value, "--", "true"])
    assert e.value.code == 2
    assert "--backoff must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--store", "/tmp/x", "--kill-after", "0", "--", "true"])


@pytest.mark.parametrize(
    ("store", "match"), [("garbage://x", "Protocol not known"), ("s3://", "no bucket"), ("FILE", "not a directory")]
)
def test_an_unusable_store_is_one_line_and_exit_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], store: str, match: str
) -> None:
    if store == "FILE":
        store = str(tmp_path / "file")
        Path(store).write_text("x")
    marker = tmp_path / "launched"
    for argv in (["--store", store, "--", PY, "-c", f"open({str(marker)!r}, 'w')"], ["--store", store, "--status"]):
        assert main(argv) == 2
        err = capfd.readouterr().err
        assert match in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]"])
def test_a_corrupt_completion_record_still_trains(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], content: bytes
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "COMPLETE.json").write_bytes(content)
    marker = tmp_path / "launched"
    assert main(["--store", str(store), "--", PY, "-c", f"open({str(marker)!r}, 'w')"]) == 0
    assert marker.exists()  # an empty COMPLETE.json used to crash the supervisor before it started training
    assert "unreadable completion record" in capfd.readouterr().err
    assert main(["--store", str(store), "--status"]) == 0
    assert "complete: unknown (unreadable" in capfd.readouterr().out


# --------------------------------------------------------------------------- issue 26: the child's own account

#: A real Run that stops where the test says: at step 13 it waits (its pid in a file) for the test's
#: SIGTERM; after step 29 it waits for the test to arm the metadata's notice and for its watcher to see it.
OWN_ACCOUNT_TRAIN = """
    import os, sys, time, torch
    from pathlib import Path
    import spotsafe
    here = Path(sys.argv[1])
    model = torch.nn.Linear(2, 2)
    run = spotsafe.Run(model=model, every_steps=5, async_=False)
    print("start", run.step_count, flush=True)
    while run.step_count < 40:
        if run.step_count == 12 and not (here / "sigterm-sent").exists():
            (here / "pid").write_text(str(os.getpid()))
            while not (here / "sigterm-sent").exists():
                time.sleep(0.05)
        if run.step_count == 29 and not (here / "notice-armed").exists():
            (here / "at-29").write_text("1")
            while not (here / "notice-armed").exists():
                time.sleep(0.05)
            while run.watcher.notice is None:  # the metadata is polled: wait until the watcher has seen it
                time.sleep(0.05)
        run.step()
    run.finish()
    print("finished", run.step_count, flush=True)
"""


def test_a_sigterm_to_the_child_stops_the_supervisor_on_quiet_metadata(tmp_path: Path) -> None:
    """Issue 26: a SIGTERM to the training process alone (an operator's kill, a container runtime)
    is the child's own notice: the supervisor exits 75 though its metadata is quiet, and asks
    nothing; an AWS notice later exits 75 too; the last launch completes: 75, 75, 0."""
    train = tmp_path / "train.py"
    train.write_text(textwrap.dedent(OWN_ACCOUNT_TRAIN))
    store = str(tmp_path / "store")
    cmd = [PY, "-m", "spotsafe.resume", "--store", store, "--backoff", "0", "--", PY, str(train), str(tmp_path)]
    codes: list[int] = []
    with AWSSimulator() as sim:
        env = {**os.environ, **simulated_environment(sim)}
        # 1: SIGTERM to the child at step 13, the instance quiet.
        sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        pid = int(
            wait_until(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 120, what="step 12")
        )
        os.kill(pid, signal.SIGTERM)
        (tmp_path / "sigterm-sent").write_text("1")
        out1, err1 = sup.communicate(timeout=120)
        codes.append(sup.returncode)
        # 2: the AWS notice at step 30.
        sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_until(lambda: (tmp_path / "at-29").exists() or sup.poll() is not None, 120, what="step 29")
        sim.arm("terminate")
        (tmp_path / "notice-armed").write_text("1")
        out2, err2 = sup.communicate(timeout=120)
        codes.append(sup.returncode)
        # 3: a replacement instance, quiet: the run completes.
        sim.disarm()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        codes.append(p.returncode)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED, 0], f"{err1}\n{err2}\n{p.stderr}"
    assert "its own notice (signal: terminate) at step 13" in err1
    assert "relaunching" not in err1 and "this instance is not going away" not in err1
    assert out1.split() == ["start", "0"]
    assert "its own notice (aws: terminate) at step 30" in err2
    assert out2.split() == ["start", "13"]
    assert p.stdout.split() == ["start", "30", "finished", "40"]


def test_a_notice_agreed_from_another_rank_still_asks_the_metadata(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An account of a peer's notice is not this node's: on quiet metadata the supervisor relaunches."""
    from spotsafe.stopaccount import StopAccount, record_stop

    body = """
        import os, sys
        from pathlib import Path
        from spotsafe.stopaccount import StopAccount, record_stop
        f = Path(os.environ["COUNT_FILE"])
        n = int(f.read_text()) if f.exists() else 0
        f.write_text(str(n + 1))
        if n == 0:
            record_stop(StopAccount(False, "rank 3", "terminate", 7, os.getpid()))
            sys.exit(75)
    """
    cmd = script(tmp_path, body)
    with AWSSimulator() as sim:
        env = {**counter_env(tmp_path, "0"), **simulated_environment(sim)}
        code = supervise(cmd, str(tmp_path / "store"), env=env, backoff=60, check_complete=False)
    assert code == 0
    assert launches(tmp_path) == 2
    err = capfd.readouterr().err
    assert "a notice agreed from another rank (rank 3: terminate) at step 7: asking this instance's metadata" in err
    assert "relaunching now" in err
    # Outside a supervisor nothing is written.
    assert record_stop(StopAccount(True, "aws", "terminate", 1, 1), env={}) is None


def test_a_fenced_run_behind_a_launcher_that_reports_1_is_not_restarted(tmp_path: Path) -> None:
    """torchrun turns its workers' exit 77 into 1: the child's own account tells the supervisor it was fenced."""
    child = tmp_path / "train.py"
    child.write_text(
        textwrap.dedent("""
        import os, sys, torch
        import spotsafe
        from spotsafe.checkpoint.writer import Checkpointer
        count = sys.argv[1]
        n = int(open(count).read()) if os.path.exists(count) else 0
        open(count, "w").write(str(n + 1))
        run = spotsafe.Run(model=torch.nn.Linear(2, 2), watch=False, every_steps=2)
        for _ in range(3):
            run.step()
        # Another writer takes the store over (here: in this very process, at once, with a warning).
        successor = Checkpointer(os.environ["SPOTSAFE_STORE"], async_=False)
        successor.save(100, {"w": torch.zeros(1)})
        import time
        end = time.monotonic() + 120
        while time.monotonic() < end:  # until a save finds the successor: exit 77 (async: a save or two later)
            run.step()
            time.sleep(0.01)
        """)
    )
    launcher = tmp_path / "launcher.sh"  # what torchrun does to a worker's 77
    count = tmp_path / "launches"
    launcher.write_text(
        f'#!/bin/sh\n"{PY}" "{child}" "{count}"\nstatus=$?\n[ "$status" = 77 ] && exit 1\nexit "$status"\n'
    )
    launcher.chmod(0o755)
    store = tmp_path / "store"
    proc = subprocess.run(
        [PY, "-m", "spotsafe.resume", "--store", str(store), "--backoff", "0", "--", str(launcher)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 77, f"{proc.stderr}"
    assert count.read_text() == "1"  # not restarted
    assert "not restarting on this instance" in proc.stderr
    # The fenced run wrote nothing more to the store once superseded: its launch has no exit event.
    from spotsafe.story.events import read_events

    kinds = [e["kind"] for e in read_events(LocalStore(store))]
    assert "launch" in kinds and "exit" not in kinds, f"{kinds}"


def test_only_the_last_stop_of_a_launch_counts_not_an_elastic_restart_before_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An elastic torchrun restarts its workers on a membership change (SIGTERM: they save, exit 75, new
    ones resume); that earlier stop's account must not make the launch's last stop, a peer's notice, look
    like this node's own."""
    body = """
        import os, sys
        from pathlib import Path
        from spotsafe.stopaccount import StopAccount, record_stop
        f = Path(os.environ["COUNT_FILE"])
        n = int(f.read_text()) if f.exists() else 0
        f.write_text(str(n + 1))
        if n == 0:
            record_stop(StopAccount(True, "signal", "terminate", 3, 1001))  # the agent's restart of the workers
            record_stop(StopAccount(False, "rank 1", "terminate", 8, 1002))  # the launch's end: a peer's notice
            sys.exit(75)
    """
    cmd = script(tmp_path, body)
    with AWSSimulator() as sim:
        env = {**counter_env(tmp_path, "0"), **simulated_environment(sim)}
        code = supervise(cmd, str(tmp_path / "store"), env=env, backoff=60, check_complete=False)
    assert code == 0
    assert launches(tmp_path) == 2
    assert "relaunching now" in capfd.readouterr().err
