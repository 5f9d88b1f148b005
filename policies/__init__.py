"""KV eviction policies: each scores a layer's held keys; the engine keeps the top-k per KV head."""
from .base import EvictionPolicy, ScoreContext, ScoreResult, attention_received, window_attention
from .full import FullPolicy
from .h2o import H2OPolicy
from .knorm import KNormPolicy
from .pyramid import PyramidPolicy
from .registry import available_policies, get_policy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

__all__ = [
    "EvictionPolicy",
    "ScoreContext",
    "ScoreResult",
    "window_attention",
    "attention_received",
    "get_policy",
    "available_policies",
    "FullPolicy",
    "StreamingPolicy",
    "H2OPolicy",
    "TOVAPolicy",
    "SnapKVPolicy",
    "KNormPolicy",
    "PyramidPolicy",
]
