"""OpenAI's ``/v1/embeddings`` over the server's core, for a package exported with ``--task embed``:
each body parsed and tokenised on a preparation worker, then its rows run with the rows of every
request that came in meanwhile (:class:`EmbedBatcher`: one run for many small requests)."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import asyncio
import base64
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..embedding import Embedder
from ..errors import NextokenError
from .core import Service
from .protocol import APIError, api_error

__all__ = ["MAX_INPUTS", "EmbedBatcher", "EmbeddingsService"]

log = logging.getLogger("nextoken.serving")

#: The most inputs one request may embed (OpenAI's limit).
MAX_INPUTS = 2048


@dataclasses.dataclass
class _Job:
    rows: list[list[int]]
    width: int
    future: concurrent.futures.Future


class EmbedBatcher:
    """Runs the rows of requests that arrive together in one pass of the embedding graph: one
    thread takes a request and whatever came in behind it (up to ``max_rows`` rows), runs them
    together, and gives each request its own vectors. A run that fails is run again a request at
    a time, so only the request that brought the fault gets the error."""

    def __init__(self, embedder: Embedder, max_rows: int = 256) -> None:
        """
        Args:
            embedder: the engine's embedding runs.
            max_rows: the most rows taken into one pass.
        """
        self.embedder, self.max_rows = embedder, max_rows
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, rows: list[list[int]], width: int) -> concurrent.futures.Future:
        """A future of the ``[len(rows), width]`` vectors."""
        job = _Job(rows, width, concurrent.futures.Future())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nextoken-embed", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Stop the thread once what is queued has run."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, rows, stop = [job], len(job.rows), False
            while rows < self.max_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
                rows += len(more.rows)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: Sequence[_Job]) -> None:
        try:
            pooled = self.embedder.pooled([r for j in jobs for r in j.rows])
        except Exception as exc:
            if len(jobs) > 1:  # alone, each request meets only its own fault
                for job in jobs:
                    self._run([job])
                return
            jobs[0].future.set_exception(exc)
            return
        at = 0
        for job in jobs:
            job.future.set_result(self.embedder.finish(pooled[at : at + len(job.rows)], job.width))
            at += len(job.rows)


class EmbeddingsService:
    """``POST /v1/embeddings`` over one :class:`~nextoken.serving.core.Service`."""

    def __init__(self, core: Service) -> None:
        """
        Args:
            core: the server's shared core.
        """
        self.core = core
        embedder = core.engine.embedder
        #: the cross-request batching (None: the served package generates text)
        self.batcher = EmbedBatcher(embedder) if embedder is not None else None

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    async def create(self, request: Any) -> Any:
        core = self.core
        raw = await core.read(request)
        rows, width, encoding = await core.off_loop(self.prepare, raw)
        assert self.batcher is not None  # prepare refused a package without embeddings
        try:
            vectors = await asyncio.wrap_future(self.batcher.submit(rows, width))
        except NextokenError as exc:
            raise api_error(exc, param="input") from None
        tokens = sum(len(r) for r in rows)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i, v in enumerate(vectors)]
        return {
            "object": "list",
            "data": data,
            "model": core.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def prepare(self, raw: bytes) -> tuple[list[list[int]], int, str]:
        """A body parsed and tokenised: its rows, the vectors' size, and their encoding."""
        from .api_schema import EmbeddingsRequest

        core = self.core
        req = core.parse(raw, EmbeddingsRequest)
        engine = core.engine
        if engine.embedder is None:
            raise APIError(
                400,
                f"{core.model_name} generates text and makes no embeddings; serve a package exported "
                "with `nextoken export MODEL --task embed`",
                param="model",
                code="model_not_embedding",
            )
        inputs = req.input
        if isinstance(inputs, list) and len(inputs) > MAX_INPUTS and not all(isinstance(t, int) for t in inputs):
            raise APIError(400, f"input: at most {MAX_INPUTS} inputs a request, not {len(inputs)}", param="input")
        if isinstance(inputs, list) and not inputs:
            raise APIError(400, "input: give a text, token ids, or a list of them", param="input")
        if (isinstance(inputs, str) and not inputs) or (isinstance(inputs, list) and "" in inputs):
            raise APIError(400, "input: an input is an empty string; give some text", param="input")
        prompt = req.nextoken.prompt if req.nextoken is not None else None
        try:
            width = engine.embedder.check_dimensions(req.dimensions)
        except NextokenError as exc:
            raise api_error(exc, param="dimensions") from None
        try:
            engine.embedder.prompt_prefix(prompt)
        except NextokenError as exc:
            raise api_error(exc, param="nextoken.prompt") from None
        try:
            rows = engine.embedding_rows(inputs, prompt)
        except NextokenError as exc:
            raise api_error(exc, param="input") from None
        return rows, width, req.encoding_format


def _encoded(vector: np.ndarray, encoding: str) -> Any:
    """A vector as OpenAI's clients read it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
