"""How often to persist a checkpoint: the Young–Daly rule on measured costs and a known interruption rate.

A periodic checkpoint costs the run its save cost ``C`` (the training stall of the
snapshot plus whatever the background write slows the steps that overlap it);
an interruption that no notice save covers costs on average half an interval of
redone work. With interruptions arriving at rate ``λ`` (mean time between them
``M = 1/λ``) the interval that minimises the sum is, to first order (Young 1974,
Daly 2006)::

    T = sqrt(2 · C · M)

:class:`AutoInterval` applies it with ``C`` measured on this run's own saves and
``λ`` from, in order of preference: the store's history of interruptions (carried
in every checkpoint's run state, so it survives retention and relaunches), the
rate the user gave, an AWS Spot Instance Advisor bucket, else
:data:`DEFAULT_RATE_PER_HOUR`. The given (or default) rate acts as a prior worth
:data:`PRIOR_HOURS` hours of history, so a young run's estimate does not swing on
its first interruption. The result is bounded by ``min_seconds``/``max_seconds``
and never shorter than twice the last write (saves must not queue up).

Until a save has been measured the rule has no cost to work with: the first periodic
checkpoint comes after a warm-up of ``min_seconds`` (60 s), which measures the real save
cost; from then on the interval is the rule's. A crash or a ``kill -9`` in the first minutes
of a run loses at most that minute, whatever the model's size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("spotsafe.interval")

#: AWS Spot Instance Advisor "frequency of interruption" buckets: the fraction of
#: instances of a type reclaimed over the trailing month. A bucket stands for its upper edge
#: (">20%" for 25%): when in doubt, assume more interruptions, not fewer.
SPOT_ADVISOR_BUCKETS: dict[str, float] = {"<5%": 0.05, "5-10%": 0.10, "10-15%": 0.15, "15-20%": 0.20, ">20%": 0.25}
HOURS_PER_MONTH = 730.0
#: Assumed interruptions per hour when neither the store's history nor the user says.
#: Pessimistic on purpose (one every ten hours): losing work costs more than saving often.
DEFAULT_RATE_PER_HOUR = 0.10
#: How many hours of history the prior rate is worth.
PRIOR_HOURS = 10.0
#: Default bounds of the automatic interval, in seconds.
MIN_SECONDS = 60.0
MAX_SECONDS = 1800.0
#: Until a save has been measured, assume it costs this much (seconds of training); the interval
#: meanwhile is the warm-up (``min_seconds``), not the rule's answer for this guess.
INITIAL_COST_S = 1.0
#: A new interval is logged (and adopted) when it differs from the current one by more than this fraction.
CHANGE_THRESHOLD = 0.2


def rate_per_hour(value: float | str) -> float:
    """Interruptions per hour from a number (per hour) or a Spot Advisor bucket such as ``"5-10%"``."""
    if isinstance(value, str):
        key = value.replace(" ", "")
        if key not in SPOT_ADVISOR_BUCKETS:
            raise ValueError(
                f"interruption_rate {value!r} is not a Spot Advisor bucket ({', '.join(SPOT_ADVISOR_BUCKETS)}) "
                "nor a number of interruptions per hour"
            )
        monthly = SPOT_ADVISOR_BUCKETS[key]
        return -math.log1p(-monthly) / HOURS_PER_MONTH
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"interruption_rate must be a number of interruptions per hour > 0, not {value!r}")
    return float(value)


def young_daly(cost_s: float, rate_per_hour: float) -> float:
    """The first-order optimal checkpoint interval in seconds: ``sqrt(2 · cost · MTBF)``."""
    if cost_s < 0 or rate_per_hour <= 0:
        raise ValueError(f"young_daly needs cost >= 0 and rate > 0, not cost={cost_s!r}, rate={rate_per_hour!r}")
    mtbf_s = 3600.0 / rate_per_hour
    return math.sqrt(2.0 * cost_s * mtbf_s)


@dataclass(frozen=True)
class History:
    """What the store's checkpoints say about this run so far: training seconds and interruptions."""

    seconds: float = 0.0
    interruptions: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return {"seconds": round(self.seconds, 3), "interruptions": self.interruptions}

    @classmethod
    def from_dict(cls, data: object) -> History:
        if not isinstance(data, dict):
            return cls()
        try:
            return cls(float(data.get("seconds", 0.0)), int(data.get("interruptions", 0)))
        except (TypeError, ValueError):
            return cls()


class AutoInterval:
    """The periodic persist interval, recomputed from measured save costs and the interruption rate.

    ``interruption_rate``: interruptions per hour, or a Spot Advisor bucket
    (``"<5%"``, ``"5-10%"``, ``"10-15%"``, ``"15-20%"``, ``">20%"``); None:
    :data:`DEFAULT_RATE_PER_HOUR`. It is the prior; the store's history refines it.
    """

    def __init__(
        self,
        interruption_rate: float | str | None = None,
        *,
        min_seconds: float = MIN_SECONDS,
        max_seconds: float = MAX_SECONDS,
        history: History | None = None,
    ) -> None:
        if not 0 < min_seconds <= max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds!r}, {max_seconds!r}")
        self.prior_rate = DEFAULT_RATE_PER_HOUR if interruption_rate is None else rate_per_hour(interruption_rate)
        self.prior_source = "default" if interruption_rate is None else f"given ({interruption_rate})"
        self.min_seconds = float(min_seconds)
        self.max_seconds = float(max_seconds)
        self.history = history or History()
        self.cost_s = INITIAL_COST_S
        self.write_s = 0.0
        self._measured = False
        self._busy_step: float | None = None
        self._idle_step: float | None = None
        self.seconds = self._compute()
        log.info(
            "first checkpoint after %.0f s: a warm-up that measures the save cost; then the Young-Daly "
            "interval sqrt(2 x save cost x MTBF), at %.3f interruptions/h from %s for now",
            self.seconds,
            self.rate_per_hour,
            self.prior_source,
        )

    @property
    def rate_per_hour(self) -> float:
        """The interruption rate in use: the prior blended with the store's history."""
        hours = self.history.seconds / 3600.0
        return (self.history.interruptions + self.prior_rate * PRIOR_HOURS) / (hours + PRIOR_HOURS)

    def observe_step(self, seconds: float, *, saving: bool) -> None:
        """One training step's duration; ``saving`` when a background write overlapped it."""
        if saving:
            self._busy_step = seconds if self._busy_step is None else 0.9 * self._busy_step + 0.1 * seconds
        else:
            self._idle_step = seconds if self._idle_step is None else 0.9 * self._idle_step + 0.1 * seconds

    def interference(self, write_s: float) -> float:
        """Seconds a background write of ``write_s`` adds to the steps it overlaps (0 until both step kinds are seen)."""
        busy, idle = self._busy_step, self._idle_step
        if busy is None or idle is None or busy <= 0:
            return 0.0
        return max(0.0, busy - idle) * (write_s / busy)

    def observe_save(self, stall_s: float, write_s: float) -> float | None:
        """Record one save's measured cost; returns the new interval when it changed, else None.

        ``stall_s``: seconds the training loop waited (the snapshot); ``write_s``: the
        background write and commit. The cost also counts the steps' slowdown while the
        write ran, as measured by :meth:`observe_step`.
        """
        cost = max(0.0, stall_s) + self.interference(max(0.0, write_s))
        # A moving average: one slow save (a cold page cache, a noisy neighbour) should not halve the cadence.
        first = not self._measured
        self.cost_s = cost if first else 0.5 * self.cost_s + 0.5 * cost
        self.write_s = max(0.0, write_s)
        self._measured = True
        return self._update("first save measured" if first else "save cost", force=first)

    def observe_history(self, history: History) -> float | None:
        """Adopt the store's history (on resume); returns the new interval when it changed."""
        self.history = history
        return self._update("interruption history")

    def _compute(self) -> float:
        if not self._measured:
            return self.min_seconds  # the warm-up: no save cost measured yet
        t = young_daly(self.cost_s, self.rate_per_hour)
        t = max(t, 2.0 * self.write_s)
        return min(self.max_seconds, max(self.min_seconds, t))

    def _update(self, why: str, *, force: bool = False) -> float | None:
        new = self._compute()
        old = self.seconds
        if abs(new - old) <= CHANGE_THRESHOLD * old and not force:
            return None
        self.seconds = new
        source = "history" if self.history.interruptions or self.history.seconds else self.prior_source
        log.info(
            "checkpoint interval %.0f s -> %.0f s (%s; Young-Daly: save cost %.3f s, %.3f interruptions/h from %s)",
            old,
            new,
            why,
            self.cost_s,
            self.rate_per_hour,
            source,
        )
        return new


class Cadence:
    """When a run's periodic save is due: every N steps, seconds or epochs, or at the automatic interval.

    Checks the arguments as :class:`spotsafe.Run` takes them (none given: ``every="auto"``) and
    keeps what the automatic interval learns from: step durations, save costs and the run's
    history (seconds trained and interruptions over every launch, restored on resume).
    """

    def __init__(
        self,
        every_steps: int | None,
        every_seconds: float | None,
        every_epochs: int | None,
        every: str | None,
        interruption_rate: float | str | None,
    ) -> None:
        #: The automatic interval policy (``every="auto"``), else None.
        self.interval = _interval_for(every_steps, every_seconds, every_epochs, every, interruption_rate)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.every_epochs = every_epochs
        #: ``time.monotonic()`` of the last save's start (or of the run's start).
        self.last_save = time.monotonic()
        #: When the current step began (None before the first).
        self.step_entered: float | None = None
        #: What the store's checkpoints say about this run's past launches (restored on resume).
        self._past = History()
        self._launched = time.monotonic()
        self._save_observed = True

    @property
    def seconds(self) -> float | None:
        """The periodic interval in seconds now: fixed, automatic, or None (steps/epochs only)."""
        if self.interval is not None:
            return self.interval.seconds
        return self.every_seconds

    def clock_due(self) -> bool:
        """The interval in seconds has passed since the last save."""
        every_s = self.seconds
        return every_s is not None and time.monotonic() - self.last_save >= every_s

    def step_due(self, step: int) -> bool:
        return self.every_steps is not None and step % self.every_steps == 0

    def epoch_due(self, epoch: int) -> bool:
        return self.every_epochs is not None and epoch % self.every_epochs == 0

    def history(self) -> History:
        """Seconds trained and interruptions over all launches so far (this one's seconds included)."""
        return History(self._past.seconds + time.monotonic() - self._launched, self._past.interruptions)

    def resumed(self, past: History) -> None:
        """This launch resumes an unfinished run: the previous one was interrupted (a notice, a kill, a crash)."""
        self._past = History(past.seconds, past.interruptions + 1)
        if self.interval is not None:
            self.interval.observe_history(self._past)

    def saved(self) -> None:
        """A save started now."""
        self.last_save = time.monotonic()
        self._save_observed = False

    def observe(self, entered: float, idle: bool, last_timings: Callable[[], Mapping[str, float]]) -> None:
        """Feed the automatic interval: this step's duration, and the last save's cost once it landed."""
        interval = self.interval
        if interval is None:
            return
        if self.step_entered is not None:
            interval.observe_step(entered - self.step_entered, saving=not idle)
        if idle and not self._save_observed:
            self._save_observed = True
            # the hours trained so far, so a run that is rarely interrupted sees its rate fall
            interval.observe_history(self.history())
            t = last_timings()
            if t:
                interval.observe_save(t.get("snapshot_s", 0.0), t.get("write_s", 0.0) + t.get("commit_s", 0.0))


def _interval_for(
    every_steps: int | None,
    every_seconds: float | None,
    every_epochs: int | None,
    every: str | None,
    interruption_rate: float | str | None,
) -> AutoInterval | None:
    """Check the cadence arguments; the automatic interval policy when ``every`` is (or defaults to) "auto"."""
    for name, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if every_seconds is not None and every_seconds <= 0:
        raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
    if every not in (None, "auto"):
        raise ValueError(f"every must be 'auto' or None, not {every!r} (for a fixed interval use every_seconds)")
    if every == "auto" and every_seconds is not None:
        raise ValueError("every='auto' chooses the interval in seconds itself: do not also give every_seconds")
    if every is None and every_steps is None and every_seconds is None and every_epochs is None:
        every = "auto"
    interval = AutoInterval(interruption_rate) if every == "auto" else None
    if every != "auto" and interruption_rate is not None:
        raise ValueError("interruption_rate only steers every='auto'")
    return interval
