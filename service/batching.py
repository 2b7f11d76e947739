"""Micro-batching: concurrent requests that arrive within a short window share one batch call.

One collector task pulls requests off a queue; the first request of a batch waits at most `window_s` for
companions (up to `max_batch`), then the batch runs in a single worker thread so the event loop stays free
to accept more. While a batch runs, new requests queue up and form the next one: under load batches grow
by themselves, and a lone request pays at most the window.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class MicroBatcher:
    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], window_s: float, max_batch: int,
                 name: str = "scorer"):
        # run(items) -> one result per item; an item's result may be an Exception to fail only that item.
        self._run = run
        self._window_s = window_s
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            batch = [await q.get()]
            deadline = time.monotonic() + self._window_s
            while len(batch) < self._max_batch:
                if not q.empty():
                    batch.append(q.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # the client may have gone
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, [item for item, _ in live])
            except Exception as e:  # the whole batch failed (e.g. the state store is down)
                results = [e] * len(live)
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
