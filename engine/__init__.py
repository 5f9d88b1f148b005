"""batchmax engine: continuous batching over a bounded KV pool. Never imports the server."""
from engine.config import CacheConfig, EngineConfig, EvictionConfig, SchedulerConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import FinishReason, TokenLogprob
from engine.sampling import SamplingParams
from engine.stats import EngineStats

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "CacheConfig",
    "SchedulerConfig",
    "EvictionConfig",
    "SamplingParams",
    "RequestOutput",
    "EngineStats",
    "FinishReason",
    "TokenLogprob",
]
