"""A circuit breaker per send destination: a destination that keeps failing is left alone for a while.

``breaker_failures`` consecutive failures open a destination's circuit:
its jobs are not claimed (their attempts are not spent) for
``breaker_open_seconds``. Then it is half-open: one worker may claim one
trial job. Its success closes the circuit (every waiting job flows
again), its failure opens it for another period. A success at any time
closes it (the destination answers, so it is up).

State is per node process, in memory: a restarted node starts closed and
finds out again. The clock is injected so the logic is tested without
waiting.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from prometheus_client import CollectorRegistry, Gauge


class CircuitState(enum.StrEnum):
    CLOSED = "closed"  # sending normally
    OPEN = "open"  # failing: nothing is claimed until the open period has passed
    HALF_OPEN = "half_open"  # the open period has passed: one trial object may go


@dataclass(frozen=True)
class CircuitSnapshot:
    """One destination's circuit as the admin page and /metrics show it."""

    destination: str
    state: CircuitState
    consecutive_failures: int
    opened_at: str | None  # ISO 8601 UTC of the last opening; None while closed
    retry_in_seconds: float  # until the half-open trial may go; 0 unless open

    def as_dict(self) -> dict[str, object]:
        return {"destination": self.destination, "state": str(self.state),
                "consecutive_failures": self.consecutive_failures, "opened_at": self.opened_at,
                "retry_in_seconds": self.retry_in_seconds}


class CircuitBreaker:
    """The circuit of one destination; thread-safe.

    The send workers of a destination ask :meth:`allow` before claiming a
    job (the queue's claim gate), and report each send's verdict with
    :meth:`succeeded` or :meth:`failed`; :meth:`release` returns a trial
    that ended without a verdict (the job had nothing to send, say).
    """

    def __init__(self, failures: int, open_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if failures < 1 or open_seconds <= 0:
            raise ValueError("a circuit needs failures >= 1 and open_seconds > 0")
        self.failures = failures
        self.open_seconds = open_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened: float | None = None  # clock() when opened; None while closed
        self._opened_wall: float | None = None
        self._trial: str | None = None  # the worker holding the half-open trial

    def _state(self) -> CircuitState:
        if self._opened is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened < self.open_seconds:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def allow(self, worker: str) -> bool:
        """May ``worker`` claim a job now? In half-open state only one worker gets the one trial."""
        with self._lock:
            state = self._state()
            if state is CircuitState.CLOSED:
                return True
            if state is CircuitState.OPEN or self._trial is not None:
                return False
            self._trial = worker
            return True

    def release(self, worker: str) -> None:
        """``worker``'s claim ended without a verdict: its trial (if it held it) goes to the next claim."""
        with self._lock:
            if self._trial == worker:
                self._trial = None

    def succeeded(self) -> None:
        """The destination stored an object (or answered): close the circuit."""
        with self._lock:
            self._consecutive = 0
            self._opened = self._opened_wall = None
            self._trial = None

    def failed(self) -> bool:
        """The destination failed a send; returns whether the circuit is open now."""
        with self._lock:
            self._consecutive += 1
            state = self._state()
            if state is CircuitState.HALF_OPEN or (
                state is CircuitState.CLOSED and self._consecutive >= self.failures
            ):  # the trial failed, or the last straw: open (again) for a full period
                self._opened, self._opened_wall = self._clock(), self._wall_clock()
            self._trial = None
            return self._opened is not None

    def retry_in(self) -> float:
        """Seconds until a trial may be claimed (0 when closed or half-open)."""
        with self._lock:
            if self._opened is None:
                return 0.0
            return max(0.0, self.open_seconds - (self._clock() - self._opened))

    def snapshot(self, destination: str) -> CircuitSnapshot:
        with self._lock:
            state = self._state()
            opened = (None if self._opened_wall is None else
                      dt.datetime.fromtimestamp(self._opened_wall, dt.UTC).isoformat(timespec="seconds"))
            retry = 0.0 if self._opened is None else max(0.0, self.open_seconds - (self._clock() - self._opened))
            return CircuitSnapshot(destination, state, self._consecutive, opened, round(retry, 1))


def _is_in(breaker: CircuitBreaker, state: CircuitState) -> float:
    return 1.0 if breaker.state is state else 0.0


def _failures(breaker: CircuitBreaker) -> float:
    return float(breaker.consecutive_failures)


class Circuits:
    """The circuit of every configured destination, exposed on /metrics.

    ``cxrtriage_destination_circuit_state{destination, state}`` is 1 for
    the circuit's current state and 0 for the others;
    ``cxrtriage_destination_consecutive_failures{destination}`` counts the
    failures since the last success. Both are read at scrape time, so an
    open circuit turns half-open on the graph when its period ends.
    """

    def __init__(self, destinations: Iterable[str], failures: int, open_seconds: float, *,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.breakers = {d: CircuitBreaker(failures, open_seconds, clock=clock) for d in destinations}
        if registry is not None:
            self._export(registry)

    def _export(self, registry: CollectorRegistry) -> None:
        state = Gauge("cxrtriage_destination_circuit_state", "Send circuit of each destination: 1 for its state",
                      ["destination", "state"], registry=registry)
        failures = Gauge("cxrtriage_destination_consecutive_failures",
                         "Failed sends to each destination since its last success", ["destination"], registry=registry)
        for destination, breaker in self.breakers.items():
            for s in CircuitState:
                state.labels(destination=destination, state=s).set_function(partial(_is_in, breaker, s))
            failures.labels(destination=destination).set_function(partial(_failures, breaker))

    def __getitem__(self, destination: str) -> CircuitBreaker:
        return self.breakers[destination]

    def get(self, destination: str) -> CircuitBreaker | None:
        return self.breakers.get(destination)

    def states(self) -> list[dict[str, object]]:
        """Each destination's circuit (state, consecutive failures, opened_at, retry_in_seconds), for an admin route."""
        return [b.snapshot(d).as_dict() for d, b in sorted(self.breakers.items())]
