"""A request's constraint compiled where a failure cannot reach the server.

llguidance compiles a grammar recursively: a Lark grammar of a few thousand chained rules, or a
JSON schema of a thousand ``$ref`` s in a chain, overflows a thread's stack and kills the process
(a native crash no ``except`` catches); a list of 100,000 choices takes seconds; some grammars
compile and then fail at their first mask (too many alternatives in a row, too many lexer
states). So the server checks every constraint (``response_format``, ``regex``, ``choice``,
``grammar``, and the grammar ``tool_choice`` makes) in a child process before the request goes
anywhere: the child validates it, builds a matcher over the model's vocabulary and computes its
first mask, on a thread of :data:`CHECK_STACK` bytes, within ``budget_s`` seconds. A child that
dies or runs over is killed and started again, and the request is a 400 naming its field.

What passes is compiled again in the server (by the ``structured`` plugin) on threads of
:data:`nextoken.threads.STACK` bytes, four times the checker's, so a grammar's depth that the checker
survived cannot crash the server. Verdicts are kept by the constraint's hash: the same schema
is checked once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import threading
import types
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Callable

from ..errors import InvalidRequestError
from ..threads import STACK, start

__all__ = ["ConstraintChecker", "StackPool", "CHECK_STACK"]

#: The stack of the checker's compiling thread: a quarter of the server's (:data:`nextoken.threads.STACK`).
CHECK_STACK = STACK // 4
#: What each checked field is called in messages (the structured plugin's names).
_FIELDS = ("response_format", "regex", "choice", "grammar")


def child_main(read_fd: int, write_fd: int) -> None:
    """The checker process (``python -c``, started by :class:`ConstraintChecker`): read the
    vocabulary's spec, then answer each constraint sent with ("ok", None) or ("error", message)."""
    from multiprocessing.connection import Connection

    conn_in, conn_out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

    def serve() -> None:
        from nextoken.plugins import structured

        tokenizer_json, vocab_size, eos = conn_in.recv()
        vocab = structured.vocabulary(tokenizer_json, vocab_size, eos)
        conn_out.send(("ready", None))
        while True:
            try:
                fields = conn_in.recv()
            except (EOFError, OSError):
                return
            try:
                found = structured.grammar_of(types.SimpleNamespace(**fields))
                problem = structured.check(found[1], vocab) if found else None
                conn_out.send(("ok", None) if problem is None else
                              ("error", f"the {structured.FIELDS[found[0]]} cannot be used: {problem}"))
            except InvalidRequestError as exc:
                conn_out.send(("error", str(exc)))
            except Exception as exc:  # noqa: BLE001 - whatever llguidance raises is the constraint's fault
                conn_out.send(("error", f"the constraint cannot be used: {structured.clean(str(exc))}"))

    start(threading.Thread(target=serve, name="nextoken-constraint-check"), CHECK_STACK).join()


class ConstraintChecker:
    """Checks requests' constraints in a child process (see the module's doc). ``budget_s``: the
    longest a check may take; ``cache``: verdicts kept. :meth:`check` raises the 400's
    :class:`~nextoken.InvalidRequestError`, its message starting with the field's name."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int] | None = None,
                 budget_s: float = 2.0, cache: int = 1024) -> None:
        if not budget_s > 0:
            raise InvalidRequestError(f"the constraint budget must be a positive number of seconds, not {budget_s!r}")
        self.budget_s, self.cache = float(budget_s), int(cache)
        self._spec = (tokenizer_json, int(vocab_size), list(eos_token_ids or []))
        self._lock = threading.Lock()
        self._verdicts: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()
        self._process: Any = None
        self._send: Any = None
        self._recv: Any = None
        #: checks that killed or outran the child (each started a new one)
        self.restarts = 0

    @classmethod
    def for_engine(cls, engine: Any, budget_s: float = 2.0) -> "ConstraintChecker | None":
        """A checker over ``engine``'s tokenizer and vocabulary (None when its tokenizer cannot give
        its ``tokenizer.json``: the structured plugin refuses constraints there anyway)."""
        to_json = getattr(engine.tokenizer, "to_json", None)
        if to_json is None:
            return None
        return cls(to_json(), engine.manifest.vocab_size, list(engine.eos_token_ids), budget_s)

    def start(self) -> "ConstraintChecker":
        """Start the child now (else the first check does)."""
        with self._lock:
            self._ensure()
        return self

    def _ensure(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop()
        # a plain child (not multiprocessing's spawn, which runs the parent's main script again)
        # that imports only what checking needs; two pipes of its own, stdout left alone
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        code = f"from nextoken.serving.constraints import child_main; child_main({from_parent}, {to_parent})"
        try:
            process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(from_parent, to_parent),
                                       stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(from_parent)
            os.close(to_parent)
        self._process = process
        self._send, self._recv = Connection(to_child, readable=False), Connection(from_child, writable=False)
        self._send.send(self._spec)
        if not self._recv.poll(120) or self._recv.recv()[0] != "ready":
            self._stop()
            raise InvalidRequestError("the constraint checker did not start; constrained requests cannot be served")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._send.close()
            self._recv.close()
        self._process = self._send = self._recv = None

    def close(self) -> None:
        """Stop the child."""
        with self._lock:
            self._stop()

    def check(self, params: Any) -> None:
        """Nothing when ``params``' constraint compiles and gives a first mask within the budget
        (or it has none); else an :class:`~nextoken.InvalidRequestError` naming the field."""
        field = next((name for name in _FIELDS if getattr(params, name, None)), None)
        if field is None:
            return
        fields = {name: getattr(params, name, None) for name in _FIELDS}
        try:
            key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).digest()
        except (TypeError, ValueError, RecursionError):
            raise InvalidRequestError(f"{field}: the constraint is not plain JSON data") from None
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                problem = self._verdicts[key]
            else:
                problem, keep = self._ask(field, fields)
                if keep:
                    self._verdicts[key] = problem
                    while len(self._verdicts) > self.cache:
                        self._verdicts.popitem(last=False)
        if problem is not None:
            raise InvalidRequestError(f"{field}: {problem}")

    def _ask(self, field: str, fields: dict) -> tuple[str | None, bool]:
        """(the child's verdict, whether to keep it); the lock held."""
        self._ensure()
        try:
            self._send.send(fields)
            answered = self._recv.poll(self.budget_s)
            verdict = self._recv.recv() if answered else None
        except (EOFError, OSError):
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self._stop()
            self.restarts += 1
            return (f"the constraint is too deep or too large to compile (the checker died, exit code {code}); "
                    "make it smaller or flatter", True)
        if verdict is None:
            self._stop()
            self.restarts += 1
            return (f"the constraint took over {self.budget_s:g} s to compile; make it smaller or simpler", False)
        return verdict[1], True


class StackPool:
    """``workers`` threads of ``stack`` bytes each, running what :meth:`submit` hands them (a
    ThreadPoolExecutor's threads take the process's default stack, too small for grammars)."""

    def __init__(self, workers: int, stack: int = STACK, name: str = "nextoken-prep") -> None:
        import queue

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [start(threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True), stack)
                         for i in range(workers)]

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker; its future."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let the workers end once the jobs before this are done."""
        for _ in self._threads:
            self._jobs.put(None)
