"""One event loop per process, on a daemon thread, for the coroutines of tools and environments.

Async tools and an environment's async `get_reward` all run here, as TRL runs them on its
trainer's one loop: a turn's async calls run at once as coroutines, and what one coroutine
makes (a client session, a lock) still works in the next, which per-call loops would break.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None  # a forked child inherits the variable but not the thread: it starts its own


def shared_loop() -> asyncio.AbstractEventLoop:
    global _loop, _loop_pid
    with _lock:
        if _loop is None or _loop_pid != os.getpid() or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="fastgrpo-rollouts-loop", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def submit(awaitable) -> concurrent.futures.Future:
    """Run `awaitable` on the shared loop; cancelling the returned future cancels it there."""
    return asyncio.run_coroutine_threadsafe(_awaited(awaitable), shared_loop())


async def _awaited(awaitable):
    return await awaitable


async def outcome(awaitable) -> tuple[str, object]:
    """("value", what it returned) or ("error", what it raised). A coroutine's SystemExit or KeyboardInterrupt
    would otherwise stop the shared loop itself; cancellation still goes through."""
    try:
        return "value", await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return "error", exc
