"""Asking the engine, before admission, whether it can serve what a request wants beyond plain sampling.

A schema for the reply or log-probabilities (``GenerationParams.json_schema``, ``.logprobs``) go to
``Engine.check_params`` off the event loop: compiling a schema takes milliseconds, and the first one
reads the tokenizer into the grammar library (about a second). Its refusal becomes the endpoint's 400,
sent before anything streams.
"""

from __future__ import annotations

import anyio

from chatstream_asgi.engines.base import Engine, GenerationParams, UnsupportedFeature

__all__ = ["UnsupportedFeature", "check_features"]


async def check_features(engine: Engine, params: GenerationParams) -> None:
    """Raise :class:`UnsupportedFeature` where ``engine`` cannot serve ``params``' schema or log-probabilities."""
    if params.json_schema is None and params.logprobs is None:
        return
    await anyio.to_thread.run_sync(engine.check_params, params)
