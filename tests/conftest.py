from __future__ import annotations

import pytest

from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def default_model_path():
    from batchmax.engine.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, default_model_path):
    """Llama with GQA (4 query heads, 2 KV heads), 3 layers."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", default_model_path)


@pytest.fixture(scope="session")
def tiny_llama_mha(tmp_path_factory, default_model_path):
    """Llama with as many KV heads as query heads."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama_mha"), "llama", default_model_path, num_key_value_heads=4, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, default_model_path):
    """Qwen2: bias on q/k/v, tied embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", default_model_path, tie_word_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, default_model_path):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), "mistral", default_model_path, seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, default_model_path):
    """Qwen3: RMSNorm on q and k per head."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", default_model_path, seed=4)
