"""batchmax: an OpenAI-compatible LLM server that bounds every request's KV cache.

The repository keeps its parts in top-level folders (``server/``, ``engine/``, ``policies/``);
they install under this one namespace as ``batchmax.server``, ``batchmax.engine`` and
``batchmax.policies`` (``pyproject.toml`` maps the folders). Layers, top to bottom: server ->
engine -> policies (``docs/ARCHITECTURE.md``).

The offline API::

    from batchmax import LLM, SamplingParams, StructuredOutputsParams
"""
from batchmax.engine import LLM, EngineConfig, RequestOutput, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput"]
