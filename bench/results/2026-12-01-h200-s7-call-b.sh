#!/bin/bash
# call B: bundle part 1 to $HOME; #17 long-prompt workload through the offline engine, variants; recall profile (W1)
set -u
mkdir -p $HOME/bundle && cp -r .peers/vllm/deps .peers/vllm/vllm.part.00 .peers/vllm/install.sh $HOME/bundle/
python3 -m pip install -q --no-index --no-deps --no-compile --target $HOME/site $HOME/bundle/deps/*.whl > /dev/null 2>&1
export PYTHONPATH=$HOME/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
L=$OUT/logs; mkdir -p $L
python3 -m bench.serve_compare --make-model $HOME/m1b --tokenizer .peers/tok > $L/make.log 2>&1
LONG="--num-requests 128 --concurrency 128 --prompt-len 8192:16384 --output-len 256:512 --warmup-requests 8"
i=0
for args in "--kv-policy snapkv --kv-budget 512 --kv-recall" "--kv-policy snapkv --kv-budget 512" "--kv-policy snapkv --kv-budget 512 --chunk 2048" \
            "--kv-policy snapkv --kv-budget 512 --kv-recall --chunk 2048" "--kv-policy snapkv --kv-budget 512 --kv-recall --host-kv-tokens 1600000" \
            "--max-num-batched-tokens 8192" "--kv-policy snapkv --kv-budget 512 --kv-recall"; do
  i=$((i+1))
  timeout 150 python3 -m bench.serve_compare --model $HOME/m1b --systems offline --kv-tokens 400000 $LONG --batchmax-args "$args" \
     --label "long-offline-$i $args" --json $OUT/long.jsonl > $L/long-$i.log 2>&1
  echo "$i [$args]: $(grep -h ' offline:' $L/long-$i.log) | $(grep -h 'fallbacks' $L/long-$i.log)"
  grep -h "^| batchmax offline" $L/long-$i.log
done
for r in "" "--kv-recall"; do
  timeout 150 python3 -m bench.profile_steps --num-prompts 64 --prompt-len 4096 --output-len 32 --kv-policy snapkv --kv-budget 512 $r --profile \
     --json $L/prof.jsonl > $L/prof${r:+-recall}.log 2>&1
  tail -c 300 $L/prof${r:+-recall}.log; echo
done
tar -czf $OUT/b-logs.tgz -C $OUT logs
