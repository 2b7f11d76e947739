"""Micro-batching: concurrent requests that arrive within a short window share one batch call.

One collector task pulls requests off a queue; the first request of a batch waits at most `window_s` for
companions (up to `max_batch`), then the batch runs in a worker thread so the event loop stays free to
accept more. Up to `concurrency` batches run at once (torch releases the GIL inside ops, so with one
intra-op thread each, two batches use two cores); while every slot is busy, new requests queue up and form
the next batch (with no window, each batch takes its 1/concurrency share of the queue, so the slots stay
evenly loaded): under load batches grow by themselves, and a lone request pays at most the window.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class MicroBatcher:
    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], window_s: float, max_batch: int,
                 concurrency: int = 1, name: str = "scorer"):
        # run(items) -> one result per item; an item's result may be an Exception to fail only that item.
        self._run = run
        self._window_s = window_s
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self._concurrency)
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
        q = self._queue
        while True:
            await self._slots.acquire()  # a free slot first: meanwhile arrivals queue into the next batch
            batch = [await q.get()]
            # Requests in one batch run one after another in its thread: without a window, leave the other
            # slots their share of what is queued, so concurrent batches finish together instead of one
            # taking all. (A window asks for companions: up to max_batch.)
            share = 1 + -(-q.qsize() // self._concurrency)
            limit = self._max_batch if self._window_s > 0 else min(self._max_batch, share)
            deadline = time.monotonic() + self._window_s
            while len(batch) < limit:
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
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, live: list) -> None:
        try:
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, [item for item, _ in live])
            except Exception as e:  # the whole batch failed (e.g. the state store is down)
                results = [e] * len(live)
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
        finally:
            self._slots.release()
