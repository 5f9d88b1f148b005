"""batchmax's own forward for the decoder families it serves."""
from batchmax.engine.models.llama import DecoderModel, ModelSpec

__all__ = ["DecoderModel", "ModelSpec"]
