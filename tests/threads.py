"""Which threads belong to a test: for spies and fault injectors that replace ``os.*`` for
the whole process while the session's own threads (background script runs and work) call
the same functions."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def own_threads() -> Iterator[set[threading.Thread]]:
    """The set of this thread and every thread that it, or a thread in the set, starts
    while the block runs (an async save's writer, and the threads that one starts).
    ``Thread.start`` is wrapped for the block: a thread joins the set before it runs, so
    its first call counts."""
    own = {threading.current_thread()}
    start = threading.Thread.start

    def start_own(thread: threading.Thread) -> None:  # a function: Thread binds it
        if threading.current_thread() in own:
            own.add(thread)
        start(thread)

    threading.Thread.start = start_own
    try:
        yield own
    finally:
        threading.Thread.start = start
