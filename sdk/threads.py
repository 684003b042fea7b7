"""Threads with a stack of a chosen size.

A thread's stack is fixed when it starts, from a process-wide setting (``threading.stack_size``);
the default (8 MiB on Linux, less elsewhere) is too small for compiling a deep grammar. The
threads that compile what requests bring (the scheduler's, the server's preparation workers)
start through :func:`start` with :data:`STACK` bytes.
"""

from __future__ import annotations

import threading

__all__ = ["STACK", "start"]

#: The stack of threads that compile what requests bring (32 MiB: only what is touched is memory).
STACK = 32 << 20
_LOCK = threading.Lock()


def start(thread: threading.Thread, stack: int = STACK) -> threading.Thread:
    """Start ``thread`` with a stack of ``stack`` bytes (the setting restored for other threads)."""
    with _LOCK:
        before = threading.stack_size(stack)
        try:
            thread.start()
        finally:
            threading.stack_size(before)
    return thread
