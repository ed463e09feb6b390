"""The tests' one wait (tests/_wait.py): it returns the predicate's value, says what
it waited for and what it last saw when it gives up, and stops at once when told the
condition can no longer come true."""

from __future__ import annotations

import asyncio
import time

import pytest

from _wait import WaitAborted, WaitTimeout, wait_until, wait_until_async

pytestmark = pytest.mark.unit


def test_returns_the_first_true_value() -> None:
    calls = iter([None, 0, {}, {"state": "serving"}, "never reached"])
    assert wait_until(lambda: next(calls), 5, "serving", interval=0) == {"state": "serving"}
    assert next(calls) == "never reached"


def test_exceptions_mean_not_yet() -> None:
    calls = iter([ConnectionRefusedError("not listening"), OSError("reset"), 42])

    def probe() -> object:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_until(probe, 5, "an answer", interval=0) == 42


def test_a_timeout_names_what_it_waited_for_the_last_error_and_the_detail() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("nothing listens on 127.0.0.1:1")

    with pytest.raises(WaitTimeout) as info:
        wait_until(refused, 0.2, "the MDM to answer", interval=0.05, detail=lambda: "LOG TAIL")
    text = str(info.value)
    assert "timed out after 0.2 s waiting for the MDM to answer" in text
    assert "nothing listens on 127.0.0.1:1" in text
    assert text.endswith("\nLOG TAIL")
    assert isinstance(info.value, AssertionError)  # a failed test, not an error


def test_the_last_false_value_is_named() -> None:
    with pytest.raises(WaitTimeout, match=r"\(last: \[\]\)"):
        wait_until(lambda: [], 0.1, "a copy job")


def test_aborted_ends_the_wait_at_once() -> None:
    t0 = time.monotonic()

    def gone() -> bool:
        raise WaitAborted("the SDS exited with code 1")

    with pytest.raises(WaitAborted, match="exited with code 1"):
        wait_until(gone, 30, "the SDS to serve")
    assert time.monotonic() - t0 < 10  # not the 30 s timeout


def test_the_async_variant_lets_the_loop_run_while_it_waits() -> None:
    async def main() -> str:
        seen: list[str] = []

        async def later() -> None:
            await asyncio.sleep(0.05)
            seen.append("done")

        task = asyncio.create_task(later())
        value = await wait_until_async(lambda: seen[0] if seen else None, 5, "the task")
        await task
        with pytest.raises(WaitTimeout, match="waiting for nothing"):
            await wait_until_async(lambda: False, 0.05, "nothing", interval=0.01)
        return value

    assert asyncio.run(main()) == "done"
