#!/usr/bin/env bash
# The GPU checks and measurements, as one command for a machine with an NVIDIA GPU (stages run in order):
#   scripts/gpu_suite.sh tests kernels latency w256 w1000 peers
#     tests    kernel tests at full size, the Triton path against the reference path, the mixed-step graphs
#              against the eager forward, nothing compiled after the warm-up (the 1B shape), the sampler
#     kernels  kernel timings (median, cold L2) against the PyTorch references
#     latency  batch-1 decode of a 512-token prompt (Llama-3-8B shape, random weights)
#     w256     offline throughput on w256 with the ablation table; w1000 the same without it
#     peers    Hugging Face transformers on w256 (continuous batching, and static generate on its first 128)
#     pipeline     the served pipeline's cost: offline and served on the same dummy Llama-3-8B, w256 all at once
#                  (3 runs) and at 16 req/s, one table and the hop breakdown (pagestream bench pipeline)
#     pipeline-1b  the same for the Llama-3.2-1B shape, all at once (2 runs)
#     data-parallel  2 GPUs, the same dummy Llama-3-8B served: w1000 all at once on 1 worker and on 2, then the
#                  prefix-sharing dataset (32 prefixes of 1000 tokens, 512 requests) on 2 workers placed round-robin
#                  and by prefix; one table: throughput, 2 workers / 1, TTFT, prefix-cache hit rate, placements
#                  and w1000 again with worker w1 killed (kill -9) under load: the requests moved and their added
#                  end-to-end time (pagestream bench data-parallel)
#     data-parallel-1gpu  the same on ONE GPU shared by 2 workers (CUDA_VISIBLE_DEVICES=0,0, a fixed KV pool of
#                  12000 blocks each), w256 and 256 prefix-dataset requests: no data-parallel speed-up (one GPU), but
#                  placement and the kill measure the same
# Logs go to $OUT (default /tmp/pagestream-gpu), the served stacks' under $OUT/<stage>-serve/ (kept when a stage
# is cut short). The peers read shared/peers (PEERS=path to override). The pipeline and data-parallel stages serve
# text through TOKENIZER (default smollm2-135m-instruct: a model alias or a directory).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagestream-gpu}
PEERS=${PEERS:-../shared/peers}
TOKENIZER=${TOKENIZER:-smollm2-135m-instruct}
SERVED=(--tokenizer "$TOKENIZER" --load-format dummy --tokenizers 4 --detokenizers 2 --gateways 4)
mkdir -p "$OUT"
MODEL=(--model llama-3-8b --load-format dummy)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for stage in "$@"; do
    echo "=== $stage ($(date +%T))"
    case $stage in
        tests) sampler=$(python3 -c "import hypothesis" 2>/dev/null && echo tests/test_sampler.py)
               python3 -m pytest -q -x tests/test_kernels_small.py tests/test_kernels_attention.py \
                   tests/test_triton_engine.py tests/test_mixed_graphs.py tests/test_host_stalls.py tests/test_staging.py $sampler 2>&1 | tee "$OUT/tests.log" | tail -20 ;;
        kernels) { python3 -m kernels.norm; python3 -c "from kernels.attention import bench_attention; bench_attention()"; } \
                   2>&1 | tee "$OUT/kernels.log" ;;
        latency) python3 -m services.cli bench latency "${MODEL[@]}" --num-scheduler-steps 8 2>&1 | tee "$OUT/latency.log" | tail -3 ;;
        w256) python3 -m services.cli bench throughput --workload w256 "${MODEL[@]}" --num-scheduler-steps 8 --ablation \
                  --result-json "$OUT/w256.json" 2>&1 | tee "$OUT/w256.log" | tail -12 ;;
        w1000) python3 -m services.cli bench throughput --workload w1000 "${MODEL[@]}" --num-scheduler-steps 8 \
                   --result-json "$OUT/w1000.json" 2>&1 | tee "$OUT/w1000.log" | tail -4 ;;
        peers) { python3 "$PEERS/hf_peer.py" cb w256 | tail -1; B=64 N=128 python3 "$PEERS/hf_peer.py" static w256 | tail -1; } \
                   2>&1 | tee "$OUT/peers.log" ;;
        pipeline) python3 -m services.cli bench pipeline --model llama-3-8b "${SERVED[@]}" --workload w256 \
                      --rates inf,16 --runs 3 --result-json "$OUT/pipeline.json" --server-logs "$OUT/pipeline-serve" \
                      > "$OUT/pipeline.log" 2>&1
                  grep -v " INFO \|WARN" "$OUT/pipeline.log" | tail -50 ;;
        pipeline-1b) python3 -m services.cli bench pipeline --model llama-3.2-1b "${SERVED[@]}" --workload w256 \
                      --rates inf --runs 2 --result-json "$OUT/pipeline-1b.json" --server-logs "$OUT/pipeline-1b-serve" \
                      > "$OUT/pipeline-1b.log" 2>&1
                  grep -v " INFO \|WARN" "$OUT/pipeline-1b.log" | tail -30 ;;
        data-parallel) python3 -m services.cli bench data-parallel --model llama-3-8b "${SERVED[@]}" --data-parallel-size 2 \
                      --result-json "$OUT/data-parallel.json" --server-logs "$OUT/data-parallel-serve" \
                      > "$OUT/data-parallel.log" 2>&1
                  grep -v " INFO \|WARN" "$OUT/data-parallel.log" | tail -16 ;;
        data-parallel-1gpu) CUDA_VISIBLE_DEVICES=0,0 python3 -m services.cli bench data-parallel --model llama-3-8b \
                      "${SERVED[@]}" --data-parallel-size 2 --num-blocks 12000 --workload w256 --num-prompts 256 \
                      --result-json "$OUT/data-parallel-1gpu.json" --server-logs "$OUT/data-parallel-1gpu-serve" \
                      > "$OUT/data-parallel-1gpu.log" 2>&1
                  grep -v " INFO \|WARN" "$OUT/data-parallel-1gpu.log" | tail -16 ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
