#!/usr/bin/env bash
# Builds an offline install bundle of vLLM 0.26.0 (the last release built on torch 2.11, CUDA 13)
# for an x86-64 Linux GPU machine with Python 3.12 and torch 2.11 already installed and no
# network: vLLM's wheel stripped of kernels a dense Llama/Qwen model on Hopper never loads
# (FlashAttention-2, MoE, FlashMLA, Blackwell-only code), compressed and split into parts of at
# most 23 MB, plus the pure-Python and small binary wheels it imports.
#
#   bench/peers/vllm-bundle.sh OUT         # here, with pip and a package index
#   OUT/install.sh SITE                    # there, from OUT's parts; then PYTHONPATH=SITE
#
# Verified on an H200 (2026-12-01): `from vllm import LLM` with load_format="dummy", and
# `python -m vllm.entrypoints.openai.api_server` serving a local model.
set -euo pipefail
OUT=${1:?usage: vllm-bundle.sh OUTDIR}
mkdir -p "$OUT/deps" "$OUT/tmp"
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
   --platform manylinux_2_26_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64)
python3 -m pip download -q "${P[@]}" -d "$OUT/tmp" vllm==0.26.0
# What vLLM 0.26 imports that a torch 2.11 image lacks; versions that work together there
# (openai 3.x needs httpx2; xgrammar >= 0.2.8 needs tvm-ffi 0.1.11; pydantic pins its core).
DEPS=(cachetools blake3 "fastapi<0.137,>=0.133" "starlette>=1.0.1" pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types typing-inspection "openai>=2,<3" distro jiter sniffio prometheus-fastapi-instrumentator
  lm-format-enforcer==0.11.3 interegular "llguidance<1.8,>=1.7" outlines_core==0.2.14 lark==1.2.2 xgrammar==0.2.7
  apache-tvm-ffi==0.1.10 partial-json-parser jsonschema jsonschema-specifications referencing rpds-py pyzmq msgspec
  "mistral_common>=1.11.5" pycountry pydantic-extra-types compressed-tensors==0.17.0 depyf==0.20.0 astor dill
  watchfiles python-json-logger pybase64 cbor2 ijson setproctitle openai-harmony gguf uvicorn diskcache nvtx==0.2.15
  "model-hosting-container-standards<1.0,>=0.1.14" jmespath supervisor)
for d in "${DEPS[@]}"; do python3 -m pip download -q "${P[@]}" -d "$OUT/deps" "$d"; done
(cd "$OUT/tmp" && unzip -q vllm-0.26.0-*.whl && rm vllm-0.26.0-*.whl \
  && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs \
           vllm/_flashmla_C.abi3.so vllm/_qutlass_C.abi3.so \
  && rm -rf vllm/third_party/fmha_sm100 vllm/third_party/deep_gemm \
  && tar -cf - vllm vllm-0.26.0.dist-info | xz -T0 -6 > ../vllm.tar.xz)
rm -rf "$OUT/tmp"
(cd "$OUT" && split -b 23000000 -d vllm.tar.xz vllm.part. && rm vllm.tar.xz)
cat > "$OUT/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Installs the bundle beside this script into SITE (a folder for PYTHONPATH); no network needed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); SITE=${1:?usage: install.sh SITE}
mkdir -p "$SITE"
cat "$here"/vllm.part.* | xz -d | tar -x -C "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$here"/deps/*.whl
echo "vllm installed in $SITE: export PYTHONPATH=$SITE VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1"
INSTALL
chmod +x "$OUT/install.sh"
du -sh "$OUT"/deps "$OUT"/vllm.part.*
