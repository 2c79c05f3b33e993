"""Scorer calls of concurrent requests, batched: what arrives while a batch runs goes in the next one.

A gateway answers many requests at once, and each asks its scorers (CLIP, the reward model)
for a few items: one image, one answer, ``n`` candidate sentences. Run one by one, each
is a small forward pass; ``Batcher`` runs them together, in one worker thread, so the
model sees one batch per step and the event loop never blocks. No request waits for a
timer: a call that finds the batcher idle runs at once (with the calls made in the same
turn of the event loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any


class Batcher:
    """``await batcher(items)`` -> ``function(items)``, batched with the items of concurrent calls.

    ``function`` maps a list of items to a list of results, one per item, in order (a model's
    batched scoring); at most ``max_items`` go into one call.
    """

    def __init__(self, function: Callable[[list], Sequence[Any]], max_items: int = 64):
        self.function, self.max_items = function, max_items
        self._waiting: list[tuple[list, asyncio.Future]] = []
        self._draining = False

    async def __call__(self, items: Sequence[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, size = [], 0
                while self._waiting and (not batch or size + len(self._waiting[0][0]) <= self.max_items):
                    items, future = self._waiting.pop(0)
                    batch.append((items, future))
                    size += len(items)
                flat = [item for items, _ in batch for item in items]
                try:
                    results = list(await asyncio.to_thread(self.function, flat))
                    if len(results) != len(flat):
                        raise RuntimeError(f"the scorer returned {len(results)} results for {len(flat)} items")
                except Exception as error:  # noqa: BLE001 - each caller gets the scorer's failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for items, future in batch:
                    if not future.done():  # a caller that was cancelled meanwhile wants nothing
                        future.set_result(results[start : start + len(items)])
                    start += len(items)
        finally:
            self._draining = False
