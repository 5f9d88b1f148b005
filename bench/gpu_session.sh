#!/usr/bin/env bash
# The measurements the open issues (17, 18) wait for, as device calls of at most 10 minutes
# each, in the order to run them on one H200. Every figure lands in $OUT (the device tool's
# output folder) as a log and JSON lines; copy them to bench/results/ afterwards.
#
# Prerequisites on the GPU machine (they last while it stays warm):
#   - vLLM 0.26 and the server's packages: bench/peers/vllm-bundle.sh BUNDLE here; carry
#     BUNDLE/deps and BUNDLE/vllm.part.00 in one call and the other parts in the next, copy
#     them to $HOME/bundle in each, and run `$HOME/bundle/install.sh $HOME/site` in the second.
#   - a tokenizer folder (SmolLM2's): carry it as a .tar.xz (0.45 MB; the 3.4 MB folder with
#     deps and part.00 is over the 64 MiB a call carries) and unpack it to TOK there.
#   Session 11's calls: model + profile 274 s, install + w1 240 s, w2 28 383 s, w2 all 383 s.
#   Session 12's: model + profile 305 s, model + host 104 s, model + batch 319 s, install + w1
#   270 s, w2 all 372 s; a lease's start adds ~80 s of device time before the first call.
#
#   bench/gpu_session.sh model TOK        # the 1.07B m1b model of the long-prompt workload -> $HOME/m1b
#   bench/gpu_session.sh profile          # gpu_check; pytest -m gpu; m1b long prefill steps (no recall, recall); W1 prefill, recall (~6 min)
#   bench/gpu_session.sh batch            # gpu_check, pytest -m gpu, m1b and W1 steps per layer and batched, W1 step kernels (~6.5 min)
#   bench/gpu_session.sh host             # the 1B long prefill's host side (cProfile), and at 16,384 batched tokens    (~2 min)
#   bench/gpu_session.sh w1               # W1 whole H200: full, snapkv@512, + recall, against vLLM           (~8 min)
#   bench/gpu_session.sh serve            # the 1B serving workload through HTTP: batchmax, vLLM, offline          (~5 min)
#   bench/gpu_session.sh long             # long prompts through HTTP: batchmax (recall, none), offline, vLLM  (~9 min)
#   bench/gpu_session.sh w2 GIB [CFG...]  # W2 with both pools capped at GIB (6, 28, 60; all: no cap) against vLLM (~8 min at 6)
set -euo pipefail
OUT=${OUT:?set OUT (the device tool sets it)}
export PYTHONPATH=${HOME}/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
M1B=${HOME}/m1b
LONG=(--model "$M1B" --kv-tokens 400000 --num-requests 128 --concurrency 128 --prompt-len 8192:16384
      --output-len 256:512 --warmup-requests 8 --log-dir "$OUT" --json "$OUT/long.jsonl")
run() { echo "\$ $*" | tee -a "$OUT/commands.txt"; "$@" 2>&1 | tee -a "$OUT/$STEP.log"; }

STEP=${1:?usage: gpu_session.sh model TOK | profile | w1 | serve | long | w2 GIB}
case "$STEP" in
model)
    run python -m bench.serve_compare --make-model "$M1B" --tokenizer "${2:?tokenizer folder}" ;;
profile)
    # correctness of this tree on the device first: CPU = CUDA (torch, Triton, graphs), sync = async
    run timeout 150 python -m bench.gpu_check || echo "!! gpu_check failed (rc $?)"
    # the CUDA-only tests (schemathesis, which the fuzz suite imports, is not on the GPU machine)
    run timeout 200 python -m pytest -q -m gpu --ignore=tests/reliability/test_fuzz_openapi.py || echo "!! pytest -m gpu failed"
    # the 1B long-prompt prefill: where a 2,440-token step's time goes (kernel tables of steps 20-22)
    for recall in "" --kv-recall; do
        run python -m bench.profile_steps --model "$M1B" --num-prompts 32 --prompt-len 12288 --output-len 64 --chunk 2048 \
            --kv-policy snapkv --kv-budget 512 $recall --profile-at 20 21 22 --json "$OUT/profile.jsonl"
    done
    # W1 (8B): a steady prefill step without recall (16 chunks of 512, the step W2's prefill
    # repeats, which bounds W2 at ~86% of its roofline), and the completing step with recall
    run python -m bench.profile_steps --num-prompts 128 --prompt-len 4096 --output-len 16 --kv-policy snapkv \
        --kv-budget 512 --profile-at 4 5 --json "$OUT/profile.jsonl"
    run python -m bench.profile_steps --num-prompts 128 --prompt-len 4096 --output-len 16 --kv-policy snapkv \
        --kv-budget 512 --kv-recall --profile-at 7 --json "$OUT/profile.jsonl" ;;
batch)
    # session 12's eviction batched over layers, on the device: correct (CPU = CUDA, sync =
    # async, the CUDA tests), then each workload's steps with every layer alone (0) and batched
    run timeout 150 python -m bench.gpu_check || echo "!! gpu_check failed (rc $?)"
    run timeout 200 python -m pytest -q -m gpu --ignore=tests/reliability/test_fuzz_openapi.py || echo "!! pytest -m gpu failed"
    for mib in 0 512; do
        for recall in "" --kv-recall; do
            run python -m bench.profile_steps --model "$M1B" --num-prompts 32 --prompt-len 12288 --output-len 64 --chunk 2048 \
                --kv-policy snapkv --kv-budget 512 $recall --layer-batch-mib $mib --json "$OUT/batch.jsonl"
        done
        run python -m bench.profile_steps --num-prompts 128 --prompt-len 4096 --output-len 16 --kv-policy snapkv \
            --kv-budget 512 --layer-batch-mib $mib --json "$OUT/batch.jsonl"
    done
    # the 8B steady prefill step's kernels with the batched evictor (session 12's per-layer
    # table: 201 ms of kernels, ~24 ms of them eviction's), to see what batching changed there
    run python -m bench.profile_steps --num-prompts 128 --prompt-len 4096 --output-len 16 --kv-policy snapkv \
        --kv-budget 512 --profile-at 4 5 --json "$OUT/batch-profile.jsonl" ;;
host)
    # the 1B long-prompt prefill is host-bound (session 12: 35 ms of kernels in a ~59 ms step):
    # the host side of three steady steps by function (cProfile), without and with recall, and
    # the same run at twice the step's token budget (the host's share per token halves)
    for recall in "" --kv-recall; do
        run python -m bench.profile_steps --model "$M1B" --num-prompts 32 --prompt-len 12288 --output-len 64 --chunk 2048 \
            --kv-policy snapkv --kv-budget 512 $recall --cprofile-at 20 21 22 --json "$OUT/host.jsonl"
    done
    run python -m bench.profile_steps --model "$M1B" --num-prompts 32 --prompt-len 12288 --output-len 64 --chunk 2048 \
        --kv-policy snapkv --kv-budget 512 --max-num-batched-tokens 16384 --json "$OUT/host.jsonl" ;;
w1)
    run python -m bench.throughput --workload W1 --configs full snapkv@512 snapkv@512+recall --peers vllm \
        --warmup-prompts 16 ${EXTRA:-} --json "$OUT/w1.jsonl" ;;
serve)
    # issue 17's first workload (serve_compare's defaults: 1,024 requests, prompts 256-1,024,
    # outputs 128-256, 256 clients, 400k KV tokens): batchmax's server, vLLM's, the offline engine
    run python -m bench.serve_compare --model "$M1B" --systems batchmax vllm offline --log-dir "$OUT" \
        --json "$OUT/serve.jsonl" --label w1b ;;
long)
    run python -m bench.serve_compare "${LONG[@]}" --systems batchmax offline \
        --batchmax-args "--kv-policy snapkv --kv-budget 512 --kv-recall --chunk 2048" --label recall
    run python -m bench.serve_compare "${LONG[@]}" --systems batchmax offline \
        --batchmax-args "--kv-policy snapkv --kv-budget 512 --chunk 2048" --label no-recall
    run python -m bench.serve_compare "${LONG[@]}" --systems vllm --label vllm ;;
w2)
    # snapkv@512 only by default (the targets'); more configs after GIB, e.g. `w2 28 full snapkv@512`;
    # GIB "all": no cap (what fits on the device, both systems)
    gib=${2:?GiB}; shift 2
    cap=(--kv-gib "$gib"); [ "$gib" = all ] && cap=()
    # EXTRA: more bench.throughput options, e.g. EXTRA="--max-num-batched-tokens 16384" (vLLM's
    # offline default on a GPU of 70 GB or more; batchmax's bench default is 8,192)
    run python -m bench.throughput --workload W2 --num-prompts 192 --configs "${@:-snapkv@512}" --peers vllm \
        --warmup-prompts 4 "${cap[@]}" ${EXTRA:-} --json "$OUT/w2.jsonl" ;;
*)
    echo "unknown step $STEP" >&2; exit 2 ;;
esac
