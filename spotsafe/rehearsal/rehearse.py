"""The rehearsal: a whole spot interruption, on this machine, in one command.

    python -m spotsafe.simulate rehearse --notice-after-steps 300 -- python examples/mnist_cnn.py
    python -m spotsafe.simulate rehearse --notice-after 20 -- python examples/mnist_cnn.py

1. starts the AWS metadata simulator (a real HTTP server on 127.0.0.1) and points the
   command at it (``AWS_EC2_METADATA_SERVICE_ENDPOINT``; the watcher's sources are
   limited to ``aws,signal`` so nothing probes real metadata addresses);
2. runs the command through the resume supervisor with ``SPOTSAFE_STORE`` set to
   ``--store`` (or a temporary directory) and makes a spot interruption notice appear
   once the run has taken ``--notice-after-steps`` steps since it started or resumed
   (counted from the ``step`` progress lines of its events file, which the rehearsal watches), or
   ``--notice-after`` seconds after launch. Steps land mid-training on a laptop and on
   an H100 alike; seconds do not;
3. the run checkpoints and exits 75; the rehearsal disarms the notice and runs the
   command again, the way a replacement instance's boot script would;
4. prints what happened: the step interrupted at and resumed at, steps lost, and the
   time from the notice appearing to the checkpoint being durable vs the deadline;
5. writes the run's report (``spotsafe report``, from the events kept in the store)
   and ends the summary with its path: ``report.html`` in the store given with
   ``--store``, else ``spotsafe-report.html`` here (or ``--report PATH``).

The run reports those facts through a JSON-lines events file (``SPOTSAFE_EVENTS``)
that :class:`spotsafe.Run` appends to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotsafe.exitcodes import EXIT_PREEMPTED
from spotsafe.resume import DEFAULT_MAX_RESTARTS, supervise
from spotsafe.settings import EVENTS_ENV

#: The command learns the --notice-after-steps count (Settings.rehearsal_after_steps); the rehearsal
#: counts the steps itself, from the run's events file.
AFTER_STEPS_ENV = "SPOTSAFE_REHEARSAL_AFTER_STEPS"

#: Where the other metadata sources point during a rehearsal: a closed loopback port.
CLOSED_ENDPOINT = "127.0.0.1:9"


@dataclass(frozen=True)
class Outcome:
    """What a rehearsal measured (times are UNIX seconds)."""

    exit_code: int
    launches: int
    notice_appeared: list[float]
    events: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9: the rest still count
    return events


def summary(outcome: Outcome, *, launched_at: float, store: str, notice_after_steps: int | None = None) -> str:
    lines = ["", "=" * 64, "spotsafe rehearsal summary", "=" * 64]
    notices = outcome.of("notice")
    durables = outcome.of("durable")
    resumes = outcome.of("resumed")
    complete = outcome.of("complete")
    lines.append(f"store:              {store}")
    processes = len({e.get("pid") for e in outcome.events if e.get("event") in ("start", "resumed")})
    lines.append(f"instances launched: {outcome.launches} ({processes} training processes, crash restarts included)")
    if not notices:
        if notice_after_steps is not None and not outcome.notice_appeared:
            lines.append(
                f"the run ended within {notice_after_steps} steps, so no notice appeared: "
                "try a smaller --notice-after-steps"
            )
        elif outcome.notice_appeared and outcome.notice_appeared[0] > time.time():
            lines.append("the run ended before the notice was due: try a smaller --notice-after")
        else:
            lines.append("NO NOTICE WAS SEEN by the run (is it using spotsafe.Run with watch=True?)")
    for i, notice in enumerate(notices):
        appeared = outcome.notice_appeared[i] if i < len(outcome.notice_appeared) else None
        where = f"step {notice.get('step')} (epoch {notice.get('epoch')}, batch {notice.get('batch')})"
        lines.append(f"-- interruption {i + 1} ({notice.get('source')} {notice.get('action')})")
        if appeared is not None:
            lines.append(f"notice appeared:    {appeared - launched_at:.1f} s after launch")
            lines.append(f"seen by the run:    {notice['time'] - appeared:+.2f} s, at {where}")
        else:
            lines.append(f"seen by the run:    at {where}")
        durable = next((d for d in durables if d.get("pid") == notice.get("pid")), None)
        if durable is None:
            lines.append("checkpoint durable: NO (the process died before its checkpoint was durable)")
            continue
        deadline = notice.get("deadline")
        since = durable["time"] - (appeared if appeared is not None else notice["time"])
        lines.append(
            f"checkpoint durable: step {durable.get('step')} ({durable.get('seconds', 0.0):.2f} s to save), "
            f"{since:.2f} s after the notice appeared"
        )
        if deadline:
            lines.append(
                f"deadline:           {deadline - durable['time']:.1f} s to spare "
                f"(the notice gave {deadline - (appeared or notice['time']):.0f} s)"
            )
        later = [r for r in resumes if r["time"] > durable["time"]]
        if later:
            resumed = later[0]
            lost = int(notice.get("step", 0)) - int(resumed.get("step", 0))
            lines.append(
                f"resumed at:         step {resumed.get('step')} (epoch {resumed.get('epoch')}, "
                f"batch {resumed.get('batch')}) on the replacement instance"
            )
            lines.append(f"steps lost:         {lost}")
        else:
            lines.append("resumed at:         (no replacement run resumed)")
    if complete:
        last = complete[-1]
        lines.append(f"run complete:       step {last.get('step')}, epoch {last.get('epoch')}")
    lines.append(f"exit status:        {outcome.exit_code}")
    lines.append("=" * 64)
    return "\n".join(lines)


class _StepTrigger(threading.Thread):
    """Makes the notice appear once this launch's run has taken ``steps`` steps since it started or resumed.

    It watches the run's events file as any monitor could: a process's ``start`` or ``resumed``
    line gives the step it began at, its ``step`` progress lines (a few a second at most) how far
    it got. Once one has taken ``steps`` steps the trigger notes a ``reached`` line (the step it
    counted to) in the file and the notice appears.
    """

    def __init__(self, sim: Any, action: str, events_path: Path, steps: int, appeared: list[float]) -> None:
        super().__init__(name="spotsafe-rehearsal-trigger", daemon=True)
        self.sim, self.action, self.path, self.steps = sim, action, events_path, steps
        self.appeared = appeared
        self.done = threading.Event()
        self._offset = events_path.stat().st_size if events_path.exists() else 0
        #: The step each of this launch's processes started or resumed at, by pid.
        self._began: dict[Any, int] = {}

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                with open(self.path, encoding="utf-8") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next look
            self._offset += len(complete.encode("utf-8"))
            for line in complete.splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                target = self._target_reached(event)  # only this launch's: read from its start on
                if target is not None:
                    self._note_reached(event.get("pid"), target)
                    self.sim.arm(self.action, delay=0)
                    self.appeared.append(time.time())
                    print(
                        f"spotsafe rehearsal: the run reached step {target} ({self.steps} steps "
                        f"in): the spot '{self.action}' notice appears now",
                        file=sys.stderr,
                        flush=True,
                    )
                    return

    def _target_reached(self, event: dict[str, Any]) -> int | None:
        """The step counted to, when ``event`` shows a process has taken ``steps`` steps; else None."""
        kind, pid = event.get("event"), event.get("pid")
        if kind in ("start", "resumed"):
            self._began[pid] = int(event.get("step") or 0)
            return None
        began = self._began.get(pid)
        if kind != "step" or began is None or int(event.get("step") or 0) < began + self.steps:
            return None
        return began + self.steps

    def _note_reached(self, pid: Any, step: int) -> None:
        """Append the ``reached`` line: the step the rehearsal counted to, before the notice appears."""
        record = {"event": "reached", "time": time.time(), "pid": pid, "step": step}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def stop(self) -> None:
        self.done.set()
        self.join()


def rehearse(
    command: Sequence[str],
    *,
    store: str,
    notice_after: float | None = 20.0,
    notice_after_steps: int | None = None,
    action: str = "terminate",
    preemptions: int = 1,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    backoff: float = 1.0,
    events_path: Path,
) -> tuple[Outcome, float]:
    """Run the rehearsal; the outcome and the first launch time."""
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    sim = AWSSimulator().start()
    try:
        env = dict(os.environ)
        env.update(
            {
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
                "SPOTSAFE_SOURCES": "aws,signal",
                EVENTS_ENV: str(events_path),
            }
        )
        env.pop("AWS_EC2_METADATA_DISABLED", None)
        # Only the simulator may be asked: nothing probes real metadata addresses.
        env.setdefault("GCE_METADATA_HOST", CLOSED_ENDPOINT)
        env.setdefault("SPOTSAFE_AZURE_METADATA_ENDPOINT", f"http://{CLOSED_ENDPOINT}")
        appeared: list[float] = []
        launches = 0
        launched_at = time.time()
        code = EXIT_PREEMPTED
        while code == EXIT_PREEMPTED:
            launches += 1
            sim.instance_id = f"i-{launches:017x}"  # each launch is a replacement instance
            trigger: _StepTrigger | None = None
            env.pop(AFTER_STEPS_ENV, None)
            if launches <= preemptions and notice_after_steps is not None:
                env[AFTER_STEPS_ENV] = str(notice_after_steps)
                trigger = _StepTrigger(sim, action, events_path, notice_after_steps, appeared)
                trigger.start()
                print(
                    f"spotsafe rehearsal: instance {launches}: a spot '{action}' notice will appear once the "
                    f"run has taken {notice_after_steps} steps, on the simulated IMDS at {sim.endpoint}",
                    file=sys.stderr,
                    flush=True,
                )
            elif launches <= preemptions and notice_after is not None:
                sim.arm(action, delay=notice_after)
                appeared.append(time.time() + notice_after)
                print(
                    f"spotsafe rehearsal: instance {launches}: a spot '{action}' notice will appear in "
                    f"{notice_after:g} s on the simulated IMDS at {sim.endpoint}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"spotsafe rehearsal: replacement instance {launches} (no notice armed)",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                code = supervise(command, store, env=env, max_restarts=max_restarts, backoff=backoff)
            finally:
                if trigger is not None:
                    trigger.stop()
            sim.disarm()
            if code == EXIT_PREEMPTED:
                print(
                    f"spotsafe rehearsal: instance {launches} exited {EXIT_PREEMPTED} (preempted, state saved); "
                    "starting a replacement instance",
                    file=sys.stderr,
                    flush=True,
                )
            if launches > preemptions + max_restarts + 1:
                break
    finally:
        sim.shutdown()
    return Outcome(code, launches, appeared, read_events(events_path)), launched_at


def write_rehearsal_report(store: str, output: str | None, *, kept: bool) -> str:
    """Write the run's report; where it went (or why not), for the summary's last line."""
    from spotsafe.errors import MissingDependency, SpotsafeError
    from spotsafe.storage.registry import open_store
    from spotsafe.story.live import LIVE_REPORT, write_report

    try:
        if output is None and kept:
            opened = open_store(store)
            try:
                _facts, page = write_report(opened)
                opened.commit_file(LIVE_REPORT, page.encode())
            finally:
                opened.close()
            if "://" not in store:
                return os.path.abspath(os.path.join(store, LIVE_REPORT))
            return f"{store.rstrip('/')}/{LIVE_REPORT}"
        path = os.path.abspath(output or "spotsafe-report.html")
        write_report(store, path)
        return path
    except MissingDependency as e:
        return f"not written ({e})"
    except (SpotsafeError, OSError, ValueError) as e:
        return f"not written: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.simulate rehearse",
        description="Rehearse a spot interruption: simulated AWS notice, checkpoint, exit 75, resume.",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--notice-after-steps",
        type=int,
        default=None,
        metavar="N",
        help="the notice appears once the run has taken N steps since it started or resumed "
        "(mid-training on any hardware)",
    )
    when.add_argument(
        "--notice-after",
        type=float,
        default=None,
        metavar="S",
        help="the notice appears S seconds after launch (default 20 when neither is given)",
    )
    parser.add_argument(
        "--action",
        default="terminate",
        choices=["terminate", "stop", "hibernate"],
        help="the instance-action of the notice",
    )
    parser.add_argument("--preemptions", type=int, default=1, help="how many instances get a notice (default 1)")
    parser.add_argument("--store", help="checkpoint store (default: a temporary directory, removed afterwards)")
    parser.add_argument(
        "--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, help="restarts after crashes, per instance"
    )
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before a restart after a crash")
    parser.add_argument("--events", help="keep the run's JSON-lines events file here (default: a temporary file)")
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="write the HTML report here (default: report.html in the --store, else ./spotsafe-report.html)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the training command after --")
    if args.notice_after is not None and args.notice_after < 0:
        parser.error("--notice-after must be >= 0")
    if args.notice_after_steps is not None and args.notice_after_steps < 1:
        parser.error("--notice-after-steps must be >= 1")
    if args.notice_after_steps is None and args.notice_after is None:
        args.notice_after = 20.0
    temp = None
    store = args.store
    if store is None:
        temp = tempfile.mkdtemp(prefix="spotsafe-rehearsal-")
        store = os.path.join(temp, "store")
    work = Path(tempfile.mkdtemp(prefix="spotsafe-events-"))
    try:
        outcome, launched_at = rehearse(
            command,
            store=store,
            notice_after=args.notice_after,
            notice_after_steps=args.notice_after_steps,
            action=args.action,
            preemptions=args.preemptions,
            max_restarts=args.max_restarts,
            backoff=args.backoff,
            events_path=Path(args.events) if args.events else work / "events.jsonl",
        )
        text = summary(
            outcome,
            launched_at=launched_at,
            store=store if temp is None else f"{store} (temporary)",
            notice_after_steps=args.notice_after_steps,
        )
        where = write_rehearsal_report(store, args.report if args.report else None, kept=temp is None)
        # the summary's last line names the report
        lines = text.split("\n")
        lines.insert(len(lines) - 1, f"report:             {where}")
        print("\n".join(lines), flush=True)
        return outcome.exit_code
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
