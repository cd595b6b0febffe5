"""The two porting examples (issue 29) end bit-identical to their uninterrupted run under a rehearsal,
a SIGTERM to the training process then a kill -9, and a SIGINT to the supervisor.

``examples/gan_ring.py``: two models, two optimizers, an every-N-batches block on the batch index.
``examples/word_lm.py``: an LSTM's hidden state carried across batches, an lr annealed by hand, a
best validation loss, all in ``run.state``. Each step is paced (a sleep wrapped around
``Run.step``, which changes no number) so that the signals land mid-training on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotsafe import EXIT_PREEMPTED
from tests.helpers import child, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"gan_ring": ROOT / "examples" / "gan_ring.py", "word_lm": ROOT / "examples" / "word_lm.py"}
PY = sys.executable
#: Seconds added to every run.step(): 80-96 steps take 4-5 s at least, so a signal sent at step 20-45 lands mid-run.
PACE = 0.05

PACED = f"""
import runpy, sys, time
import spotsafe.run

_step = spotsafe.run.Run.step


def paced(self, **metrics):
    time.sleep({PACE})
    _step(self, **metrics)


spotsafe.run.Run.step = paced
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_plain: dict[str, str] = {}


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SPOTSAFE_SOURCES": "signal",
        "SPOTSAFE_EVENTS": str(tmp_path / "events.jsonl"),
        "SPOTSAFE_QUIET": "1",
        "OMP_NUM_THREADS": "1",  # the same float reduction order in every run
    }


def _command(tmp_path: Path, name: str) -> list[str]:
    paced = tmp_path / "paced.py"
    paced.write_text(PACED)
    return [PY, str(paced), str(EXAMPLES[name])]


def _done(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("done:")]
    return line


def _uninterrupted(name: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    if name not in _plain:
        tmp = tmp_path_factory.mktemp(f"{name}-plain")
        cmd = [*_command(tmp, name), "--store", str(tmp / "store")]
        r = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, f"{r.stderr}"
        _plain[name] = _done(r.stdout)
    return _plain[name]


def _steps(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]
    return [e for e in lines if e.get("event") == "step"]


def _supervised(tmp_path: Path, name: str) -> list[str]:
    store = str(tmp_path / "store")
    return [
        PY,
        "-m",
        "spotsafe.resume",
        "--store",
        store,
        "--backoff",
        "0",
        "--kill-after",
        "300",
        "--",
        *_command(tmp_path, name),
    ]


def _wait_for_step(proc: subprocess.Popen[str], tmp_path: Path, at_least: int, not_pid: int | None = None) -> int:
    """The pid of the training process once it has reported a step >= ``at_least``."""

    def reached() -> int | None:
        assert proc.poll() is None, f"the supervisor exited ({proc.returncode}) before step {at_least}"
        for e in reversed(_steps(tmp_path)):
            if e["step"] >= at_least and e["pid"] != not_pid:
                return int(e["pid"])
        return None

    return wait_until(reached, 600, interval=0.02, what=f"step {at_least}")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rehearsal_ends_bit_identical(name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    plain = _uninterrupted(name, tmp_path_factory)
    cmd = [
        *[PY, "-m", "spotsafe.simulate", "rehearse", "--notice-after-steps", "20", "--backoff", "0"],
        *["--store", str(tmp_path / "store"), "--", *_command(tmp_path, name)],
    ]
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{r.stdout[-3000:] + r.stderr[-3000:]}"
    assert "steps lost:         0" in r.stdout
    assert _done(r.stdout) == plain


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_sigterm_then_kill_minus_9_end_bit_identical(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plain = _uninterrupted(name, tmp_path_factory)
    env = _env(tmp_path)
    with child(_supervised(tmp_path, name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sup:
        pid = _wait_for_step(sup, tmp_path, 20)
        os.kill(pid, signal.SIGTERM)  # the platform's notice to the training process
        out, err = sup.communicate(timeout=600)
        assert sup.returncode == EXIT_PREEMPTED, f"{err[-3000:]}"
    with child(_supervised(tmp_path, name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sup:
        pid2 = _wait_for_step(sup, tmp_path, 45, not_pid=pid)
        os.kill(pid2, signal.SIGKILL)  # no notice, no save: the supervisor restarts it from the newest checkpoint
        out, err = sup.communicate(timeout=600)
        assert sup.returncode == 0, f"{err[-3000:]}"
    assert "restart 1/3" in err
    assert _done(out) == plain


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_sigint_to_the_supervisor_ends_bit_identical(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plain = _uninterrupted(name, tmp_path_factory)
    env = _env(tmp_path)
    with child(_supervised(tmp_path, name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sup:
        _wait_for_step(sup, tmp_path, 30)
        sup.send_signal(signal.SIGINT)
        out, err = sup.communicate(timeout=600)
        assert sup.returncode == EXIT_PREEMPTED, f"{err[-3000:]}"
    assert "exiting from training early" not in out
    again = subprocess.run(_supervised(tmp_path, name), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, f"{again.stderr[-3000:]}"
    assert _done(again.stdout) == plain
