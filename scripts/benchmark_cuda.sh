#!/usr/bin/env bash
# Every CUDA number of docs/BENCHMARKS.md in one run (issue 8's targets), for a session with a GPU:
# the CUDA tests, matching + loss, models, training and distillation throughput (JPEG files, the decoded
# cache, torch.compile) and end-to-end evaluation at VOC07-test size. About 10 minutes on one H100.
#   bash scripts/benchmark_cuda.sh [loader workers, default: CPU cores - 1] 2>&1 | tee benchmark_cuda.log
set -u
workers=${1:-$(($(nproc) - 1))}
bench="python scripts/benchmark.py"
train="--batch 64 --workers $workers"
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"
python -m pytest -q -m cuda tests
$bench loss --device cuda --iters 30 --warmup 3
$bench models --device cuda --batches 1 64
$bench train $train
$bench train $train --cache
$bench train $train --cache --compile
$bench train $train --cache --compile --compile-mode reduce-overhead
$bench train $train --cache --compile --compile-mode reduce-overhead --gt-padding batch
$bench train $train --cache --model vgg16_ssd300
$bench distill $train --cache --teacher-model vgg16_lite300
$bench distill $train --cache --teacher-model vgg16_lite300 --methods fgd crosskd
$bench distill $train --cache --teacher-model vgg16_ssd300 --methods fgd
$bench eval --model mobilenetv2_ssdlite300 --images 4952 --batch 64 --workers "$workers"
