"""Serving: the OpenAI-compatible HTTP server over a :class:`~nextoken.Scheduler` (extra ``serve``),
its typed request schemas, and scale-out on Ray Serve (extra ``ray``).

    from nextoken.serving.server import create_app
"""
