"""The batching engine over HuggingFace transformers models (needs the ``transformers`` extra).

Importing this package imports torch and transformers; ``import chatstream_asgi`` does not. Without
them the import fails with an :class:`ImportError` that names the extra to install.
"""

_EXTRA_MODULES = frozenset({"torch", "transformers", "gguf", "accelerate", "jinja2"})

try:
    from chatstream_asgi.engines.transformers.engine import TransformersEngine
except ModuleNotFoundError as exc:  # pragma: no branch - depends on the install
    if exc.name is None or exc.name.split(".")[0] not in _EXTRA_MODULES:
        raise
    raise ImportError(
        f"the transformers engine needs {exc.name}, which is not installed: install the 'transformers' extra "
        "(from a checkout: pip install -e '.[transformers]'; torch first if you want a particular CPU/CUDA build)",
        name=exc.name,
    ) from exc

__all__ = ["TransformersEngine"]
