"""The batching engine over HuggingFace transformers models (needs the ``transformers`` extra).

Importing this package imports torch and transformers; ``import chatstream_asgi`` does not.
"""

from chatstream_asgi.engines.transformers.engine import TransformersEngine

__all__ = ["TransformersEngine"]
