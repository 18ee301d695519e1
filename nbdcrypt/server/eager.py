"""Finish in a task a coroutine that was stepped by hand and had to wait.

Most requests finish without awaiting anything (a page-cache read, a pwrite), and an asyncio
Task per request would cost more than the I/O itself. The connection steps each request's
coroutine once itself, as Python 3.12's eager task factory does: if it finished, nothing was
scheduled; if it waited, `finish_in_task` runs the rest in a Task that first waits on what the
coroutine was waiting for.

Caveat: until its first real wait, the coroutine runs outside any Task, so code on that path
must not rely on asyncio.current_task() (asyncio.timeout() does; Locks, Events, futures don't).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any


class _Resume:
    """An awaitable that re-yields what a started coroutine waits for, and drives it on."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: object) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                yield value
            except BaseException as exc:  # cancellation, thrown in by the task
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(None)
                except StopIteration:
                    return


async def _finish(resume: _Resume, done: Callable[[], None] | None) -> None:
    try:
        await resume
    finally:
        if done is not None:
            done()


def finish_in_task(
    coro: Coroutine[Any, Any, None],
    yielded: object,
    done: Callable[[], None] | None = None,
) -> asyncio.Task[None]:
    """Continue, in a new task, a coroutine that was stepped by hand and yielded `yielded`;
    `done` is called as soon as it has finished (in the task, not a loop iteration later)."""
    return asyncio.get_running_loop().create_task(_finish(_Resume(coro, yielded), done))
