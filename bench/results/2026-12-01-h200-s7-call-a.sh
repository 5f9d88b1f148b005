#!/bin/bash
# call A: bundle part 1 to $HOME; #19 sampler cost when unused (ABBA); recall's cost on W1; recall profile
set -u
mkdir -p $HOME/bundle && cp -r .peers/vllm/deps .peers/vllm/vllm.part.00 .peers/vllm/install.sh $HOME/bundle/
python3 -m pip install -q --no-index --no-deps --no-compile --target $HOME/site $HOME/bundle/deps/*.whl > $OUT/deps-install.log 2>&1
export PYTHONPATH=$HOME/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
ROOT=$PWD
run() {  # dir label configs...
  local d=$1 l=$2; shift 2
  (cd $d && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 && \
   python3 -m bench.throughput --workload W1 --configs "$@" --peers --warmup-prompts 16 --json $OUT/ab-$l.jsonl) > $OUT/ab-$l.log 2>&1
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader >> $OUT/gpu.txt
}
run $ROOT 1-after snapkv@512 snapkv@512+recall snapkv@512
run $ROOT/.peers/before 2-before snapkv@512 snapkv@512
run $ROOT/.peers/before 3-before snapkv@512 snapkv@512
run $ROOT 4-after snapkv@512 snapkv@512+recall snapkv@512
cd $ROOT
for r in "" "--kv-recall"; do
  python3 -m bench.profile_steps --num-prompts 64 --prompt-len 4096 --output-len 32 --kv-policy snapkv --kv-budget 512 $r --profile --json $OUT/prof.jsonl > $OUT/prof${r:+-recall}.log 2>&1
done
grep -h total_tok_s $OUT/ab-*.jsonl | python3 -c "
import sys,json
for l in sys.stdin:
  r=json.loads(l); print(r['system'], r['config'], round(r['total_tok_s']), round(r['matmul_tflops']))"
tail -3 $OUT/prof*.log
