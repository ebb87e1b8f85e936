#!/usr/bin/env bash
# Everything measured on a lent GPU, in one call (the device tool lends minutes, not hours):
#
#   OUT=/tmp/gpu BUDGET_S=555 bash benchmarks/gpu_session.sh
#
# 1. the GPU throughput table, eager: straightforward, one graph and fast paths, fp32 and bf16, batch 128 and
#    the largest batch that fits (benchmarks/throughput.py);
# 2. the fast path with its networks compiled (torch.compile), fp32 and bf16, at batch 128 (compile times
#    in the JSON);
# 3. `epure train` end to end on CUDA: train.precision bf16 with train.compile on, then fp32 eager (the
#    wiring of both keys; their losses side by side);
# 4. the reference's whole loss compiled, fp32 and bf16, at batch 128;
# 5. while the budget lasts: `small`-preset runs (its steps, and four times as many) trained on the GPU
#    (benchmarks/ablation.py, one process per variant, fp32), what four times the steps gives on five components.
# Each part has its own time limit and writes under $OUT as it goes, so a part that fails or runs out of
# time costs only itself. Runs from the repository root without installing epure (PYTHONPATH), W&B off.
set -u
OUT=${OUT:-/tmp/epure-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EPURE_CACHE_DIR=/tmp/epure-cache WANDB_MODE=disabled
# The CLI's sweep checks need jsonschema; a GPU image without it gets the wheels carried in .whl/ (if any).
if ! python3 -c "import jsonschema" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
end=$((SECONDS + ${BUDGET_S:-555}))
log=$OUT/log.txt
left() { echo $((end - SECONDS)); }
part() {  # part NAME LIMIT_S COMMAND...: COMMAND with a time limit (at most what is left), output to the log
    local name=$1 limit=$2; shift 2
    local allowed; allowed=$(( $(left) < limit ? $(left) : limit ))
    if (( allowed < 20 )); then echo "== $name: skipped, ${allowed}s left" | tee -a "$log"; return; fi
    echo "== $name (limit ${allowed}s) $(date -u +%T)" | tee -a "$log"
    timeout "$allowed" "$@" >> "$log" 2>&1
    echo "== $name: exit $? at ${SECONDS}s" | tee -a "$log"
}
bench=(python3 benchmarks/throughput.py --device cuda --configs mmvaeplus_default --bf16 --steps 3)

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
  nproc; free -g | head -2
} > "$log" 2>&1

part "1. throughput, eager" 170 "${bench[@]}" --batch-sizes 128 max --max-batch 2048 --json "$OUT/throughput_eager.json"
part "2. throughput, fast path compiled" 140 "${bench[@]}" --paths straightforward fast --compile fast --batch-sizes 128 \
    --json "$OUT/throughput_compile_fast.json"
for setting in "bf16 on 40 100" "fp32 off 40 45"; do
    set -- $setting
    part "3. epure train, precision $1, compile $2" "$4" python3 -m epure train --config small --device cuda \
        --wandb off --max-steps "$3" --set train.precision="$1" train.compile="$2" train.output_dir="/tmp/runs_$1"
    find "/tmp/runs_$1" -name metrics.csv -exec sh -c 'echo "-- $1"; cat "$1"' _ {} \; >> "$log" 2>&1
done
part "4. throughput, reference compiled" 120 "${bench[@]}" --paths straightforward --compile straightforward \
    --batch-sizes 128 --json "$OUT/throughput_compile_reference.json"
if (( $(left) > 60 )); then
    echo "== 5. small on the GPU, $(left)s left $(date -u +%T)" | tee -a "$log"
    python3 -c "from epure.config import load_config; from epure.data import load_data; load_data(load_config('small').data)" \
        >> "$log" 2>&1  # the cached dataset, before two processes want it
    run_variant() {  # NAME STEPS OVERRIDES...: one process per variant, all on the GPU at once
        local name=$1 steps=$2; shift 2
        OMP_NUM_THREADS=5 timeout "$(left)" python3 benchmarks/ablation.py --config small --max-steps "$steps" --eval-limit 900 \
            --samplers fitted --output-dir "/tmp/ablation_$name" --out "$OUT/ablation_$name.json" \
            --variant "$name" "$@" > "/tmp/ablation_$name.log" 2>&1
        echo "-- $name: exit $?"; tail -4 "/tmp/ablation_$name.log"
    }
    run_variant steps1926 1926 train.precision=fp32 >> "$log" 2>&1 &
    run_variant steps7704 7704 train.precision=fp32 >> "$log" 2>&1 &
    wait
fi
echo "== done at ${SECONDS}s" | tee -a "$log"
