"""Run a coroutine to completion from synchronous code, inside or outside a running event loop.

``asyncio.run`` refuses to start while a loop runs in the same thread (Jupyter, an async web
app); there the coroutine runs in a worker thread with a loop of its own, and the caller blocks
until it is done. Exceptions travel back unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``make()``'s coroutine run to its result; in a worker thread when a loop is running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1, thread_name_prefix="fairdistill") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
