"""The events of a job on the HTTP side: delivery from the worker thread to the request's
coroutine, cancellation when the client goes, server-sent events, and streamed text that
adds up to the final answer."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

from starlette.requests import Request

from .errors import APIError
from .queue import Job, Result, Worker
from .tasks import CLEANERS

log = logging.getLogger("lavit.serve")


class Channel:
    """Events of one job, from the worker thread to the request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def deliver(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Pending:
    """A submitted job seen from its request: its events; cancelled when the client leaves."""

    def __init__(self, worker: Worker, job: Job, channel: Channel, request: Request):
        self.worker, self.job, self.channel = worker, job, channel
        self.watch = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.worker.cancel(self.job)
                return

    async def next(self) -> Any:
        """The next event; an `APIError` event is raised."""
        event = await self.channel.events.get()
        if isinstance(event, APIError):
            raise event
        return event

    async def result(self) -> Any:
        while True:
            event = await self.next()
            if isinstance(event, Result):
                return event.value

    def close(self) -> None:
        self.watch.cancel()
        self.worker.cancel(self.job)  # nothing left to do if it has finished


def sse(data: Any, event: Optional[str] = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


class TextStream:
    """Deltas of the cleaned text while tokens arrive, such that the deltas add up to the
    final answer: the cleaners cut at stop strings, so the last `hold` characters wait
    until they cannot be cut any more. Beam search is not streamed (its best beam changes
    until the end): its answer comes as one delta."""

    HOLD = {"caption": 0, "vqa": len("Long answer:")}  # the longest stop string of the cleaner

    def __init__(self, task: str, live: bool):
        self.clean, self.hold, self.live = CLEANERS[task], self.HOLD[task], live
        self.sent = ""

    def update(self, raw: str) -> str:
        if not self.live:
            return ""
        text = self.clean(raw)
        text = text[:len(text) - self.hold] if self.hold else text
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 character
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent, final)
            return ""
        return final[len(self.sent):]
