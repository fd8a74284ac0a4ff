#!/usr/bin/env bash
# The GPU checks and measurements, as one command for a machine with an NVIDIA GPU (stages run in order):
#   scripts/gpu_suite.sh tests kernels latency w256 w1000 peers
#     tests    kernel tests at full size, the Triton path against the reference path, the sampler
#     kernels  kernel timings (median, cold L2) against the PyTorch references
#     latency  batch-1 decode of a 512-token prompt (Llama-3-8B shape, random weights)
#     w256     offline throughput on w256 with the ablation table; w1000 the same without it
#     peers    Hugging Face transformers on w256 (continuous batching, and static generate on its first 128)
# Logs go to $OUT (default /tmp/pagestream-gpu). The peers read shared/peers (PEERS=path to override).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagestream-gpu}
PEERS=${PEERS:-../shared/peers}
mkdir -p "$OUT"
MODEL=(--model llama-3-8b --load-format dummy)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for stage in "$@"; do
    echo "=== $stage ($(date +%T))"
    case $stage in
        tests) sampler=$(python3 -c "import hypothesis" 2>/dev/null && echo tests/test_sampler.py)
               python3 -m pytest -q -x tests/test_kernels_small.py tests/test_kernels_attention.py \
                   tests/test_triton_engine.py $sampler 2>&1 | tee "$OUT/tests.log" | tail -20 ;;
        kernels) { python3 -m kernels.norm; python3 -c "from kernels.attention import bench_attention; bench_attention()"; } \
                   2>&1 | tee "$OUT/kernels.log" ;;
        latency) python3 -m services.cli bench latency "${MODEL[@]}" --num-scheduler-steps 8 2>&1 | tee "$OUT/latency.log" | tail -3 ;;
        w256) python3 -m services.cli bench throughput --workload w256 "${MODEL[@]}" --num-scheduler-steps 8 --ablation \
                  --result-json "$OUT/w256.json" 2>&1 | tee "$OUT/w256.log" | tail -12 ;;
        w1000) python3 -m services.cli bench throughput --workload w1000 "${MODEL[@]}" --num-scheduler-steps 8 \
                   --result-json "$OUT/w1000.json" 2>&1 | tee "$OUT/w1000.log" | tail -4 ;;
        peers) { python3 "$PEERS/hf_peer.py" cb w256 | tail -1; B=64 N=128 python3 "$PEERS/hf_peer.py" static w256 | tail -1; } \
                   2>&1 | tee "$OUT/peers.log" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
