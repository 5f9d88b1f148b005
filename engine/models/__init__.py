"""batchmax's own forward for the decoder families it serves."""
from engine.models.llama import DecoderModel, ModelSpec

__all__ = ["DecoderModel", "ModelSpec"]
