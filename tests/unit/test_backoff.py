"""Backoff: the one retry pause the tier stack and the lookup client share."""

from __future__ import annotations

import pytest

from lmcache_core.backoff import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pause_doubles_up_to_its_cap_and_ends() -> None:
    clock = Clock()
    backoff = Backoff(1.0, 30.0, clock=clock)
    assert not backoff.active
    assert [backoff.failed() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.active
    clock.now += 29.9
    assert backoff.active
    clock.now += 0.2
    assert not backoff.active


def test_a_success_starts_the_next_pause_short_again() -> None:
    backoff = Backoff(1.0, 30.0, clock=Clock())
    backoff.failed()
    backoff.failed()
    assert backoff.succeeded()
    assert not backoff.succeeded()  # nothing to recover from twice
    assert backoff.failed() == 1.0


def test_equal_bounds_give_a_constant_pause() -> None:
    backoff = Backoff(1.0, 1.0, clock=Clock())
    assert {backoff.failed() for _ in range(100)} == {1.0}  # and no overflow however many failures


@pytest.mark.parametrize(("start_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_bounds_that_make_no_pause_are_refused(start_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="start_s"):
        Backoff(start_s, max_s)
