#!/usr/bin/env bash
# Every CUDA number of docs/BENCHMARKS.md (issue 8's targets), for a session with a GPU, in stages that
# each fit a 10-minute command on one H100:
#   tests       the CUDA tests, matching + loss, models (about 3 minutes)
#   throughput  training and distillation images/s and phase split, JPEG files and the decoded cache (~6 min)
#   compile     torch.compile, CUDA graphs with and without fixed GT slots (compilation dominates, ~8 min)
#   eval        end-to-end evaluation at VOC07-test size, and DDP: two processes sharing the GPU (~3 min)
#   all         all four in a row (the default)
#   bash scripts/benchmark_cuda.sh [stage] [loader workers, default: CPU cores - 1] 2>&1 | tee benchmark_cuda.log
set -u
stage=${1:-all}
workers=${2:-$(($(nproc) - 1))}
bench="python scripts/benchmark.py"
train="--batch 64 --workers $workers"
case $stage in tests | throughput | compile | eval | all) ;; *)
    echo "unknown stage $stage: tests, throughput, compile, eval or all" >&2
    exit 2
    ;;
esac
run() { [ "$stage" = all ] || [ "$stage" = "$1" ]; }
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"
if run tests; then
    python -m pytest -q -m cuda tests
    $bench loss --device cuda --iters 30 --warmup 3
    $bench models --device cuda --batches 1 64
fi
if run throughput; then
    $bench train $train
    $bench train $train --cache
    $bench train $train --cache --model vgg16_ssd300
    $bench distill $train --cache --teacher-model vgg16_lite300
    $bench distill $train --cache --teacher-model vgg16_lite300 --methods fgd crosskd
    $bench distill $train --cache --teacher-model vgg16_ssd300 --methods fgd
fi
if run compile; then
    $bench train $train --cache --compile
    $bench train $train --cache --compile --compile-mode reduce-overhead
    $bench train $train --cache --compile --compile-mode reduce-overhead --gt-padding batch
fi
if run eval; then
    $bench eval --model mobilenetv2_ssdlite300 --images 4952 --batch 64 --workers "$workers"
    torchrun --nproc_per_node=2 scripts/benchmark.py train --batch 32 --workers 4 --iters 20 --warmup 5
fi
