"""A request's constraint compiled where a failure cannot reach the server.

llguidance compiles a grammar recursively: a Lark grammar of a few thousand chained rules, or a
JSON schema of a thousand ``$ref`` s in a chain, overflows a thread's stack and kills the process
(a native crash no ``except`` catches); a list of 100,000 choices takes seconds; some grammars
compile and then fail at their first mask (too many alternatives in a row, too many lexer
states). So the server checks every constraint (``response_format``, ``regex``, ``choice``,
``grammar``, and the grammar ``tool_choice`` makes) in a child process before the request goes
anywhere: the child validates it, builds a matcher over the model's vocabulary and computes its
masks along a few tokens it allows, on a thread of :data:`CHECK_STACK` bytes, within
``budget_s`` seconds and :data:`MEMORY` bytes. A child that dies or runs over is killed and
started again, and the request is a 400 naming its field. Two children (``workers``) check at
once, so one slow constraint does not hold every other request's.

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
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from ..errors import InvalidRequestError
from ..plugins.structured import FIELDS, constrained_field
from ..threads import STACK, start

__all__ = ["BUDGET_S", "CHECK_STACK", "ConstraintChecker", "StackPool"]

#: The stack of the checker's compiling thread: a quarter of the server's (:data:`nextoken.threads.STACK`).
CHECK_STACK = STACK // 4
#: The longest a constraint may take to compile, by default (seconds).
BUDGET_S = 0.8
#: The checker's address space at most (its own Python and llguidance take ~1 GiB of it).
MEMORY = 4 << 30


def child_main(read_fd: int, write_fd: int, memory_bytes: int = 0) -> None:
    """The checker process (``python -c``, started by :class:`ConstraintChecker`): read the
    vocabulary's spec, then answer each constraint sent with ("ok", None) or ("error", message).
    ``memory_bytes``: its address space at most (0: as inherited), so a grammar that would take
    the host's memory ends the child instead."""
    from multiprocessing.connection import Connection

    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash here is expected: no core file

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
                conn_out.send(
                    ("ok", None)
                    if problem is None or found is None
                    else ("error", f"the {structured.FIELDS[found[0]]} cannot be used: {problem}")
                )
            except InvalidRequestError as exc:  # its message names the field: the caller does
                conn_out.send(("error", str(exc).split(": ", 1)[-1]))
            except Exception as exc:  # noqa: BLE001 - whatever llguidance raises is the constraint's fault
                conn_out.send(("error", f"the constraint cannot be used: {structured.clean(str(exc))}"))

    start(threading.Thread(target=serve, name="nextoken-constraint-check"), CHECK_STACK).join()


class _Child:
    """One checker process and its two pipes, started again after it dies or is killed."""

    def __init__(self, spec: tuple, memory_bytes: int) -> None:
        self.spec, self.memory_bytes = spec, memory_bytes
        self.lock = threading.RLock()  # a check, a start and a stop (close) exclude each other
        self.process: Any = None
        self.send: Any = None
        self.recv: Any = None

    def ensure(self) -> None:
        with self.lock:
            self._ensure()

    def _ensure(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.stop()
        # a plain child (not multiprocessing's spawn, which runs the parent's main script again)
        # that imports only what checking needs; two pipes of its own, stdout left alone
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        code = (
            f"from nextoken.serving.constraints import child_main; "
            f"child_main({from_parent}, {to_parent}, {self.memory_bytes if os.name == 'posix' else 0})"
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(from_parent, to_parent),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            os.close(from_parent)
            os.close(to_parent)
        self.send, self.recv = Connection(to_child, readable=False), Connection(from_child, writable=False)
        try:
            self.send.send(self.spec)
            ready = self.recv.poll(120) and self.recv.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise InvalidRequestError("the constraint checker did not start; constrained requests cannot be served")

    def stop(self) -> None:
        with self.lock:
            self._stop()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.send.close()
            self.recv.close()
        self.process = self.send = self.recv = None

    def ask(self, fields: dict, budget_s: float) -> tuple[str | None, str]:
        """(the verdict, how it came: "answered", "died" or "timeout")."""
        with self.lock:
            return self._ask(fields, budget_s)

    def _ask(self, fields: dict, budget_s: float) -> tuple[str | None, str]:
        self._ensure()
        try:
            self.send.send(fields)
            answered = self.recv.poll(budget_s)
            verdict = self.recv.recv() if answered else None
        except (EOFError, OSError):
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.stop()
            return (
                f"the constraint is too deep or too large to compile (the checker died, exit code {code}); "
                "make it smaller or flatter",
                "died",
            )
        if verdict is None:
            self.stop()
            return f"the constraint took over {budget_s:g} s to compile; make it smaller or simpler", "timeout"
        return verdict[1], "answered"


class ConstraintChecker:
    """Checks requests' constraints in ``workers`` child processes (see the module's doc), one
    check at a time each. ``budget_s``: the longest a check may take; ``cache``: verdicts kept
    (a constraint that ran over is refused again while its verdict is kept); ``memory_bytes``:
    each child's address space at most (a check that needs more ends it: a 400). :meth:`problem`
    says what is wrong, and with which field."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: list[int] | None = None,
        budget_s: float = BUDGET_S,
        cache: int = 1024,
        memory_bytes: int = MEMORY,
        workers: int = 2,
    ) -> None:
        import queue

        if not budget_s > 0:
            raise InvalidRequestError(f"the constraint budget must be a positive number of seconds, not {budget_s!r}")
        self.budget_s, self.cache, self.memory_bytes = float(budget_s), int(cache), int(memory_bytes)
        spec = (tokenizer_json, int(vocab_size), list(eos_token_ids or []))
        self._children = [_Child(spec, self.memory_bytes) for _ in range(max(1, workers))]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for child in self._children:
            self._idle.put(child)
        self._lock = threading.Lock()
        self._verdicts: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()
        #: checks that killed or outran a child (each started a new one)
        self.restarts = 0
        self._closed = False

    @classmethod
    def for_engine(cls, engine: Any, budget_s: float = BUDGET_S, workers: int = 2) -> "ConstraintChecker | None":
        """A checker over ``engine``'s tokenizer and vocabulary (None when its tokenizer cannot give
        its ``tokenizer.json``: the structured plugin refuses constraints there anyway)."""
        to_json = getattr(engine.tokenizer, "to_json", None)
        if to_json is None:
            return None
        return cls(to_json(), engine.manifest.vocab_size, list(engine.eos_token_ids), budget_s, workers=workers)

    def start(self) -> "ConstraintChecker":
        """Start the children now (else the first checks do)."""
        for child in self._children:
            child.ensure()
        return self

    def _restart(self, child: _Child) -> None:
        with self._lock:
            if self._closed:
                return
        try:
            child.ensure()
        except InvalidRequestError:
            pass  # the next check that takes it tries again
        with self._lock:
            if self._closed:
                child.stop()
                return
        self._idle.put(child)

    def close(self) -> None:
        """Stop the children (a check after this fails)."""
        with self._lock:
            self._closed = True
        for child in self._children:
            child.stop()

    def problem(self, params: Any) -> tuple[str, str] | None:
        """None when ``params``' constraint compiles and gives its first masks within the budget
        (or it has none); else (the field, what is wrong with it)."""
        field = constrained_field(params)
        if field is None:
            return None
        fields = {name: getattr(params, name, None) for name in (*FIELDS, "thinking")}
        try:
            key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).digest()
        except (TypeError, ValueError, RecursionError):
            return field, "the constraint is not plain JSON data"
        with self._lock:
            known = key in self._verdicts
            if known:
                self._verdicts.move_to_end(key)
                problem = self._verdicts[key]
        if not known:
            child = self._idle.get()
            how = "died"
            try:
                problem, how = child.ask(fields, self.budget_s)
            finally:
                if how == "answered":
                    self._idle.put(child)
                else:  # started again off this request's time
                    threading.Thread(target=self._restart, args=(child,), daemon=True).start()
            with self._lock:
                self.restarts += how != "answered"
                self._verdicts[key] = problem
                while len(self._verdicts) > self.cache:
                    self._verdicts.popitem(last=False)
        return None if problem is None else (field, problem)


class StackPool:
    """``workers`` threads of ``stack`` bytes each, running what :meth:`submit` hands them (a
    ThreadPoolExecutor's threads take the process's default stack, too small for grammars)."""

    def __init__(self, workers: int, stack: int = STACK, name: str = "nextoken-prep") -> None:
        import queue

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            start(threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True), stack) for i in range(workers)
        ]

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
