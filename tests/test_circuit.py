"""The per-destination circuit breaker, its claim gate and its /metrics gauges, on an injected clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from cxrtriage.stages.circuit import CircuitBreaker, Circuits, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_consecutive_failures_open_the_circuit_and_a_success_in_between_resets_the_count(clock: Clock) -> None:
    breaker = CircuitBreaker(3, 60, clock=clock)
    assert breaker.failed() is False and breaker.failed() is False
    breaker.succeeded()  # not consecutive: counting starts again
    assert breaker.consecutive_failures == 0
    assert [breaker.failed() for _ in range(3)] == [False, False, True]
    assert breaker.state is CircuitState.OPEN and breaker.consecutive_failures == 3
    assert breaker.allow("w1") is False and breaker.allow("w2") is False  # nothing is claimed while open
    assert breaker.retry_in() == 60


def test_after_the_open_period_exactly_one_trial_goes_and_its_success_closes_the_circuit(clock: Clock) -> None:
    breaker = CircuitBreaker(2, 60, clock=clock)
    breaker.failed(), breaker.failed()
    clock.now += 59.9
    assert breaker.state is CircuitState.OPEN and not breaker.allow("w1")
    clock.now += 0.1
    assert breaker.state is CircuitState.HALF_OPEN and breaker.retry_in() == 0
    assert breaker.allow("w1") is True  # the trial
    assert breaker.allow("w2") is False and breaker.allow("w1") is False  # only one at a time
    breaker.succeeded()
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 0
    assert breaker.allow("w1") and breaker.allow("w2")  # everyone sends again


def test_a_failed_trial_opens_the_circuit_for_a_full_period_again(clock: Clock) -> None:
    breaker = CircuitBreaker(2, 60, clock=clock)
    breaker.failed(), breaker.failed()
    clock.now += 61
    assert breaker.allow("w1")
    assert breaker.failed() is True  # one failed trial is enough: not breaker_failures more
    assert breaker.state is CircuitState.OPEN and breaker.retry_in() == 60
    clock.now += 60
    assert breaker.allow("w2")  # the next trial, the failed one's slot is free


def test_a_trial_that_ended_without_a_verdict_is_given_to_the_next_claim(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 10, clock=clock)
    breaker.failed()
    clock.now += 10
    assert breaker.allow("w1")
    breaker.release("w2")  # not w2's trial: nothing changes
    assert not breaker.allow("w2")
    breaker.release("w1")  # w1 claimed no job after all
    assert breaker.state is CircuitState.HALF_OPEN and breaker.allow("w2")


def test_failures_of_sends_begun_while_closed_do_not_prolong_an_open_circuit(clock: Clock) -> None:
    breaker = CircuitBreaker(2, 60, clock=clock)
    breaker.failed(), breaker.failed()
    clock.now += 30
    assert breaker.failed() is True  # a straggler, begun before it opened
    assert breaker.retry_in() == 30  # still opens up after the first period


def test_a_success_while_open_closes_it_the_destination_answers(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 60, clock=clock)
    breaker.failed()
    breaker.succeeded()
    assert breaker.state is CircuitState.CLOSED and breaker.allow("w")


def test_the_breaker_refuses_settings_that_could_never_work() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 60)
    with pytest.raises(ValueError):
        CircuitBreaker(3, 0)


def test_circuits_show_each_destination_on_metrics_and_as_a_list(clock: Clock) -> None:
    registry = CollectorRegistry()
    circuits = Circuits(["PACS", "ARCHIVE"], 2, 60, registry=registry, clock=clock)

    def gauge(destination: str, state: str) -> float | None:
        return registry.get_sample_value("cxrtriage_destination_circuit_state",
                                         {"destination": destination, "state": state})

    assert gauge("PACS", "closed") == 1 and gauge("PACS", "open") == 0 and gauge("PACS", "half_open") == 0
    circuits["ARCHIVE"].failed(), circuits["ARCHIVE"].failed()
    assert gauge("ARCHIVE", "open") == 1 and gauge("ARCHIVE", "closed") == 0 and gauge("PACS", "closed") == 1
    assert registry.get_sample_value("cxrtriage_destination_consecutive_failures", {"destination": "ARCHIVE"}) == 2
    clock.now += 60
    assert gauge("ARCHIVE", "half_open") == 1  # read at scrape time: no event needed to turn half-open

    states = {s["destination"]: s for s in circuits.states()}
    assert states["PACS"] == {"destination": "PACS", "state": "closed", "consecutive_failures": 0,
                              "opened_at": None, "retry_in_seconds": 0.0}
    assert states["ARCHIVE"]["state"] == "half_open" and states["ARCHIVE"]["consecutive_failures"] == 2
    assert isinstance(states["ARCHIVE"]["opened_at"], str) and states["ARCHIVE"]["opened_at"].endswith("+00:00")
    assert circuits.get("NOWHERE") is None
