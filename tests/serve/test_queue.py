"""The worker and its queue with stand-in runners (no model, no HTTP): batching, the
bound, cancellation at the next step, the time limit, and errors that never kill it."""

from __future__ import annotations

import queue as stdlib_queue
import threading
import time

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.serve.errors import APIError
from lavit_mlx.serve.queue import Job, Result, Worker


class Recorder:
    """Runners that record their batches; `gate` holds the first step until it is set."""

    def __init__(self, steps: int = 3, step_seconds: float = 0.0):
        self.batches = []
        self.steps_run = 0
        self.steps_of = {}  # request -> steps run for it
        self.gate = threading.Event()
        self.gate.set()
        self.steps = steps
        self.step_seconds = step_seconds

    def echo(self, model, requests):
        self.batches.append(list(requests))
        self.gate.wait(10)
        for step in range(self.steps):
            self.steps_run += 1
            for request in requests:
                self.steps_of[request] = self.steps_of.get(request, 0) + 1
            time.sleep(self.step_seconds)
            for index in range(len(requests)):
                yield index, ("step", step)
        for index, request in enumerate(requests):
            yield index, Result(f"done {request}")

    def broken(self, model, requests):
        yield 0, ("step", 0)
        raise RuntimeError("boom")

    def refused(self, model, requests):
        raise LaVITError("prompt of 900 tokens is longer than the LLM's context of 512 tokens")
        yield  # noqa: unreachable - makes this a generator


def make_job(kind: str, request, key=None, time_limit: float = 30.0):
    events = stdlib_queue.Queue()
    return Job(kind, request, events.put, time_limit, key), events


def final(events, timeout: float = 10):
    """The last event of a job (its Result or APIError)."""
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, (Result, APIError)):
            return event


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def worker(recorder):
    running = Worker(None, {"echo": recorder.echo, "broken": recorder.broken, "refused": recorder.refused},
                     max_queue=4, max_batch=3, batch_wait=0.05)
    running.start()
    yield running
    running.stop()


def test_jobs_with_one_key_that_wait_together_run_as_one_batch(worker, recorder):
    recorder.gate.clear()  # the first job holds the worker while the others queue up
    first, first_events = make_job("echo", "a", key="k")
    worker.submit(first)
    time.sleep(0.2)
    jobs = [make_job("echo", name, key=key) for name, key in (("b", "k"), ("c", "other"), ("d", "k"), ("e", "k"))]
    for job, _ in jobs:
        worker.submit(job)
    recorder.gate.set()
    results = [final(events).value for _, events in [(first, first_events), *jobs]]
    assert results == ["done a", "done b", "done c", "done d", "done e"]
    # a alone (it was taken first), then b, d, e together (max_batch 3), then c (another key)
    assert recorder.batches == [["a"], ["b", "d", "e"], ["c"]]
    assert worker.stats()["largest_batch"] == 3


def test_a_full_queue_refuses_with_429_and_retry_after(worker, recorder):
    recorder.gate.clear()
    running, _ = make_job("echo", "running")
    worker.submit(running)
    time.sleep(0.2)
    for i in range(4):
        worker.submit(make_job("echo", i)[0])
    with pytest.raises(APIError) as refused:
        worker.submit(make_job("echo", "one too many")[0])
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "4 requests are waiting" in refused.value.message
    recorder.gate.set()


def test_a_cancelled_waiting_job_frees_its_place_and_never_runs(worker, recorder):
    recorder.gate.clear()
    worker.submit(make_job("echo", "running")[0])
    time.sleep(0.2)
    waiting = [make_job("echo", i) for i in range(4)]
    for job, _ in waiting:
        worker.submit(job)
    worker.cancel(waiting[0][0])
    worker.submit(make_job("echo", "fits now")[0])  # no 429: the cancelled job left the queue
    recorder.gate.set()
    final(waiting[-1][1])
    assert 0 not in [r for batch in recorder.batches for r in batch]
    assert worker.stats()["cancelled"] == 1


def test_a_cancelled_running_job_stops_at_the_next_step():
    slow = Recorder(steps=50, step_seconds=0.05)
    worker = Worker(None, {"echo": slow.echo}, max_queue=4)
    worker.start()
    try:
        job, events = make_job("echo", "long")
        worker.submit(job)
        assert events.get(timeout=10) == ("step", 0)
        worker.cancel(job)
        assert final(events).status == 499  # the request's coroutine is told, so it ends
        follow, follow_events = make_job("echo", "next")
        worker.submit(follow)
        assert final(follow_events).value == "done next"
        assert slow.steps_of["long"] <= 5, f"the cancelled job ran {slow.steps_of['long']} of 50 steps"
        assert slow.steps_of["next"] == 50 and worker.stats()["cancelled"] == 1
        assert slow.batches == [["long"], ["next"]]
    finally:
        worker.stop()


def test_a_job_past_its_time_limit_gets_a_504_and_the_runner_stops():
    slow = Recorder(steps=100, step_seconds=0.02)
    worker = Worker(None, {"echo": slow.echo}, max_queue=4)
    worker.start()
    try:
        job, events = make_job("echo", "slow", time_limit=0.3)
        worker.submit(job)
        error = final(events)
        assert isinstance(error, APIError) and error.status == 504 and "0.3 s" in error.message
        time.sleep(0.2)
        assert slow.steps_run < 40, f"the runner went on after the time limit ({slow.steps_run} steps)"
        assert worker.stats()["timed_out"] == 1
    finally:
        worker.stop()


def test_errors_end_as_api_errors_and_the_worker_goes_on(worker):
    broken, broken_events = make_job("broken", "x")
    refused, refused_events = make_job("refused", "y")
    after, after_events = make_job("echo", "z")
    for job in (broken, refused, after):
        worker.submit(job)
    crash = final(broken_events)
    assert crash.status == 500 and crash.type == "server_error" and "boom" not in crash.message
    fault = final(refused_events)
    assert fault.status == 400 and "longer than the LLM's context" in fault.message
    assert final(after_events).value == "done z"
    assert worker.stats()["failed"] == 2


def test_a_batch_waits_for_requests_still_being_checked(recorder):
    worker = Worker(None, {"echo": recorder.echo}, max_queue=8, max_batch=4, batch_wait=2.0)
    worker.start()
    try:
        first, first_events = make_job("echo", "first", key="k")
        later, later_events = make_job("echo", "later", key="k")
        with worker.arriving():  # "later" is being checked when "first" reaches the queue
            worker.submit(first)
            time.sleep(0.3)
            worker.submit(later)
        assert final(first_events).value == "done first" and final(later_events).value == "done later"
        assert recorder.batches == [["first", "later"]]
        alone, alone_events = make_job("echo", "alone", key="k")
        start = time.monotonic()
        worker.submit(alone)  # nothing is arriving: no wait
        final(alone_events)
        assert time.monotonic() - start < 1.0
    finally:
        worker.stop()
