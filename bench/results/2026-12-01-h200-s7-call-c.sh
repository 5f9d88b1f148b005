#!/bin/bash
# call C: bundle parts 01-03, install vLLM; W1 against vLLM (bench/throughput.py --peers vllm); then MODE:
#   long "<batchmax serve args>": long-prompt workload, batchmax server vs vLLM server (issue 17)
#   kv6: W1 with both KV pools capped at 6 GiB (issue 18)
set -u
MODE=${1:-kv6}; BEST=${2:-}
mkdir -p $HOME/bundle && cp -r .peers/vllm/vllm.part.0[123] $HOME/bundle/
[ -f $HOME/bundle/vllm.part.00 ] || { echo "part.00 gone (machine was released): stop"; exit 3; }
bash $HOME/bundle/install.sh $HOME/site > /dev/null 2>&1 || { echo install failed; exit 4; }
export PYTHONPATH=$HOME/site VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
L=$OUT/logs; mkdir -p $L
timeout 290 python3 -m bench.throughput --workload W1 --configs full snapkv@512 snapkv@512+recall --peers vllm --warmup-prompts 16 \
   --json $OUT/w1-vllm.jsonl > $L/w1-vllm.log 2>&1
grep -v "^{" $L/w1-vllm.log | tail -9
if [ "$MODE" = long ]; then
  [ -d $HOME/m1b ] || python3 -m bench.serve_compare --make-model $HOME/m1b --tokenizer .peers/tok > $L/make.log 2>&1
  timeout 240 python3 -m bench.serve_compare --model $HOME/m1b --systems batchmax vllm --kv-tokens 400000 --num-requests 128 --concurrency 128 \
     --prompt-len 8192:16384 --output-len 256:512 --warmup-requests 8 --batchmax-args "$BEST" --label "long $BEST" \
     --log-dir $L --json $OUT/long-serve.jsonl > $L/long-serve.log 2>&1
  tail -6 $L/long-serve.log
else
  timeout 230 python3 -m bench.throughput --workload W1 --configs full snapkv@512 --peers vllm --warmup-prompts 0 --kv-gib 6 \
     --json $OUT/w1-kv6.jsonl > $L/w1-kv6.log 2>&1
  grep -v "^{" $L/w1-kv6.log | tail -7
fi
tar -czf $OUT/c-logs.tgz -C $OUT logs
