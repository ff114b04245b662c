"""``aiayn serve``: a translation server with dynamic batching, and the attention explorer.

    engine.py    the model side: settings and limits, translation batches, attention maps
    batching.py  dynamic batching of concurrent requests, off the event loop
    app.py       the FastAPI application: the JSON API, error answers, the explorer's files
    server.py    binding the port, `BackgroundServer` (a server in a thread); the command is aiayn.commands.serve
    load.py      a load generator: N concurrent clients, latency percentiles (tests, benchmark)
    static/      the explorer: plain HTML, CSS and JavaScript, no build step, nothing remote

FastAPI and uvicorn are the ``serve`` extra; they are imported only when a server is built, so
the rest of aiayn works without them.
"""

from .server import BackgroundServer

__all__ = ["BackgroundServer"]
