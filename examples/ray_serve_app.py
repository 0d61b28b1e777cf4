"""chatstream-asgi on Ray Serve: replicas of the chat app behind Ray's HTTP proxy, sessions in Redis.

Needs ``pip install ".[ray]"`` (and ``.[transformers]`` for a real model) and a Redis for more than one
replica. Run ``python examples/ray_serve_app.py``: it starts a local Ray, serves on
http://127.0.0.1:8000/ (chat page, ``/chat_stream``, ``/v1/chat/completions``, ``/get_load``, ``/metrics``)
until Ctrl-C. Environment, besides the engine choice of ``common.py`` (``CHATSTREAM_ENGINE``, ...):

- ``CHATSTREAM_SESSION_SECRET`` (required): the same secret on every replica;
- ``CHATSTREAM_REDIS``: ``redis://host:port/db`` shared by the replicas (required with ``CHATSTREAM_REPLICAS`` > 1);
- ``CHATSTREAM_REPLICAS`` (2).

Each replica builds its own engine (``make_engine`` runs in the replica, on its own event loop),
``ChatStream`` and middleware; Ray gets ``max_ongoing_requests`` above the app's own limits (the app
queues and answers 429 itself), a graceful shutdown that covers the longest request (which every request
ends within), and a router that sends each request to the replica with a free slot, a conversation's
turns to the replica of its last turn while that one has a free slot. Ctrl-C drains: open replies end
(done, or a deadline error frame past ``longest_reply_s``) before Serve shuts down.
"""

from __future__ import annotations

import os
import signal

from common import make_engine

from chatstream_asgi.integrations.ray_serve import chat_app, shutdown

app = chat_app(
    make_engine,
    session_secret=os.environ["CHATSTREAM_SESSION_SECRET"],
    session_store_url=os.environ.get("CHATSTREAM_REDIS"),
    num_replicas=int(os.environ.get("CHATSTREAM_REPLICAS", "2")),
    longest_reply_s=120.0,  # 256 tokens at no less than ~2 tokens/s, queue wait included
    num_of_concurrent_executions=int(os.environ.get("CHATSTREAM_CONCURRENCY", "4")),
    max_queue_size=int(os.environ.get("CHATSTREAM_QUEUE", "16")),
    max_new_tokens=256,
    shutdown_timeout=10.0,
)

if __name__ == "__main__":
    from pathlib import Path

    import ray
    from ray import serve

    here = Path(__file__).resolve().parent
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}})
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ.get("PORT", "8000"))})
    serve.run(app, name="chatstream", route_prefix="/")
    try:
        signal.pause()  # until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()  # open replies end first (serve.shutdown() alone would cut them)
        ray.shutdown()
