"""batchmax engine: continuous batching over a bounded KV pool. Never imports the server."""
from batchmax.engine.config import CacheConfig, EngineConfig, EvictionConfig, SchedulerConfig, StructuredOutputsConfig
from batchmax.engine.llm import LLM
from batchmax.engine.llm_engine import LLMEngine
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.request import FinishReason, TokenLogprob
from batchmax.engine.sampling import SamplingParams, StructuredOutputsParams
from batchmax.engine.stats import EngineStats

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "CacheConfig",
    "SchedulerConfig",
    "EvictionConfig",
    "SamplingParams",
    "StructuredOutputsParams",
    "StructuredOutputsConfig",
    "RequestOutput",
    "EngineStats",
    "FinishReason",
    "TokenLogprob",
]
