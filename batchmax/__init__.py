"""batchmax: an OpenAI-compatible LLM server that bounds every request's KV cache.

The repository keeps its parts in top-level folders (``server/``, ``engine/``, ``policies/``);
they install under this one namespace as ``batchmax.server``, ``batchmax.engine`` and
``batchmax.policies`` (``pyproject.toml`` maps the folders). Layers, top to bottom: server ->
engine -> policies (``docs/ARCHITECTURE.md``).

The offline API::

    from batchmax import LLM, SamplingParams, StructuredOutputsParams
"""
import os as _os

# In a source checkout this folder holds only this file; the parts are the checkout's top-level
# folders. An install maps them (pyproject.toml), but when Python finds this folder first (run
# from the checkout's root with no install, or with an editable install whose finder maps only
# top-level names) the parts are looked up beside it instead.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "engine")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)

from batchmax.engine import LLM, EngineConfig, RequestOutput, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput"]
