"""Execute's request queue: the order in which waiting requests run, FIFO or shortest-predicted-job-first with
ageing."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from calm_cli.errors import QueueFull

AGEING = 1.0  # SJF: ms of priority a waiting job gains per ms it waits (see RequestQueue)
T = TypeVar("T")


class QueueClosed(Exception):
    """The queue is closed: no more puts, and get() has nothing left to return."""


class RequestQueue(Generic[T]):
    """Waiting requests for single worker threads (on 2 cores one model runs at a time).

    'fifo' serves in arrival order. 'sjf' serves the smallest effective priority
    predicted_ms - ageing * waited_ms. With ageing = 1 (AGEING) a waiting job gains one ms of priority per
    ms it waits, so it is passed by a later arrival only while it has waited less than the difference of
    their predicted times: no job waits longer than its own predicted run time (plus the job in service)
    because of jobs that came after it. ageing = 0 is pure SJF, which can starve long jobs. As every waiting
    job ages at the same rate, the order is fixed at put time: the heap key is predicted_ms + ageing * arrival.
    close() lets get() drain what is left and then raise QueueClosed, so a consumer loop ends cleanly."""

    def __init__(self, discipline: str = "fifo", max_waiting: int = 512, ageing: float = AGEING,
                 clock: Callable[[], float] = time.monotonic):
        if discipline not in ("fifo", "sjf"):
            raise ValueError(f"queue discipline {discipline!r} is not one of fifo, sjf")
        self.discipline, self.max_waiting, self.ageing = discipline, max_waiting, ageing
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T, predicted_ms: float = 0.0) -> None:
        with self._cond:
            if self._closed:
                raise QueueClosed("the request queue is closed")
            if len(self._heap) >= self.max_waiting:
                raise QueueFull(f"{len(self._heap)} requests are already waiting (queue.max_waiting)")
            seq = next(self._seq)
            key = float(seq) if self.discipline == "fifo" else predicted_ms + self.ageing * self._clock() * 1000
            heapq.heappush(self._heap, (key, seq, item))
            self._cond.notify()

    def get(self) -> T:
        """The next request, blocking while none waits; QueueClosed once closed and drained."""
        with self._cond:
            while not self._heap:
                if self._closed:
                    raise QueueClosed("the request queue is closed")
                self._cond.wait()
            return heapq.heappop(self._heap)[2]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def __iter__(self) -> Iterator[T]:
        """Requests until the queue is closed and drained: `for request in queue: ...`."""
        while True:
            try:
                yield self.get()
            except QueueClosed:
                return
