"""KV eviction policies: each scores a layer's held keys; the engine keeps the top-k per KV head."""
from batchmax.policies.base import EvictionPolicy, ScoreContext, ScoreResult, attention_received, window_attention
from batchmax.policies.full import FullPolicy
from batchmax.policies.h2o import H2OPolicy
from batchmax.policies.knorm import KNormPolicy
from batchmax.policies.pyramid import PyramidPolicy
from batchmax.policies.registry import available_policies, get_policy
from batchmax.policies.snapkv import SnapKVPolicy
from batchmax.policies.streaming import StreamingPolicy
from batchmax.policies.tova import TOVAPolicy

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
