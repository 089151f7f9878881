#!/usr/bin/env bash
# The first GPU run in one command (issue 26): it proves the CUDA path, measures speed, and trains on real
# photos, within a time budget (default 540 s: a GPU is lent for ~15 minutes, a command runs at most 10), writing
# each result into OUTDIR as it goes, so that a command cut short still leaves what finished:
#   gpu_check.log       environment, wheel install, one line per command and stage, the digest of the numbers
#   1_tests.log         stage 1: pytest -m cuda (the CUDA tests, the CUDA cases of resume, AMP, prefetch, no-sync)
#   2_throughput.log    stage 2: images/s, GPU busy share and phase times of VGG16-SSD300 teacher training,
#                       MobileNetV2-SSDLite student training, distillation from the lite VGG teacher (~40-60 s
#                       each on an H200), the student's evaluation of 4,952 images; torch.compile while time allows
#   3_real_photos.log   stage 3: a teacher, the student alone, the student distilled on voc5_real_mini (real VOC
#                       photos), sized to the seconds left; its report: compare.md, compare.png, detections.jpg
#   summary.json        every number above, the goals met or missed
# (8 files at most: what the GPU tool brings back.) The GPU machine lacks albumentations, pycocotools and their
# dependencies: they are installed from .whl/ (scripts/fetch_gpu_wheels.sh) where they are missing.
#
#   bash scripts/gpu_check.sh [options] OUTDIR [section.key=value ...]
#     --budget S     seconds for everything (default 540); each stage gets what the later ones leave it
#     --stages LIST  the stages to run, e.g. 2 or 23 (default 123): a rerun of a failed part
#     --work DIR     benchmark data, the wheels' install folder, the runs (default runs/gpu_check)
#     --dry-run      on the CPU at tiny sizes (small models stand in for VGG16): every step but the GPU (and
#                    the teacher's throughput, whose stand-in would repeat the student's command)
#     --print        print the commands of the stages (the GPU's unless --dry-run) and run none of them
#     section.key=value   overrides for stage 3's runs (the dry run's stand-in data)
set -uo pipefail # not -e: a failed stage or command is recorded and the next one runs

{ # In braces: bash reads all of it before it starts, so an edit of this file cannot derail a run.

usage() { sed -n '/^#   bash scripts\/gpu_check.sh/,/^#     section.key/s/^# \{0,1\}//p' "$0"; }
needs_value() { [ "$1" -ge 2 ] || { echo "gpu_check.sh: $2 needs a value" >&2 && exit 2; }; }
budget=540 stages=123 work=runs/gpu_check dry=0 print=0 out="" overrides=()
while (($#)); do
    case $1 in
    --budget) needs_value $# "$1" && budget=$2 && shift 2 ;;
    --stages) needs_value $# "$1" && stages=$2 && shift 2 ;;
    --work) needs_value $# "$1" && work=$2 && shift 2 ;;
    --dry-run) dry=1 && shift ;;
    --print) print=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2 && usage >&2 && exit 2 ;;
    *=*) overrides+=("$1") && shift ;;
    *)
        [ -z "$out" ] || { echo "gpu_check.sh: one OUTDIR, got $out and $1" >&2 && exit 2; }
        out=$1 && shift
        ;;
    esac
done
[ -n "$out" ] || { echo "gpu_check.sh: OUTDIR is missing" >&2 && usage >&2 && exit 2; }
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget takes seconds, got $budget" >&2 && exit 2; }
[[ $stages =~ ^[123]+$ ]] || { echo "gpu_check.sh: --stages takes digits 1-3, got $stages" >&2 && exit 2; }

mkdir -p "$out" "$work" && out=$(cd "$out" && pwd) && work=$(cd "$work" && pwd)
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log=$out/gpu_check.log
experiment=configs/compare_voc5_real.yaml # stage 3's runs, and (its distilled arm) the method stage 2 measures
real_data=data/voc5_real_mini

say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$log"; }
want() { [[ $stages == *$1* ]]; }
left() { echo $((budget - SECONDS)); }
min() { echo $(($1 < $2 ? $1 : $2)); }

# Seconds the stages after stage $1 need at the least: stage 2's four commands, stage 3's three short runs.
reserve() {
    local need=15 # the summary
    if [ "$1" -lt 2 ] && want 2; then need=$((need + 150)); fi
    if [ "$1" -lt 3 ] && want 3; then need=$((need + 200)); fi
    echo $need
}

# run NAME SECONDS LOGFILE COMMAND...: one command under a time limit, its output in LOGFILE between a
# "### NAME: command" header and a "--- NAME: exit RC after S s" footer (exit 124: out of time).
run() {
    local name=$1 limit=$2 file=$3 start=$SECONDS rc
    shift 3
    if [ $print = 1 ]; then
        echo "$name (limit $limit s): $*" && return 0
    elif [ "$limit" -lt 5 ]; then
        say "$name: not run, $limit s left" && return 124
    fi
    echo "### $name: $*" >>"$file"
    timeout -k 10 "$limit" "$@" >>"$file" 2>&1
    rc=$?
    echo "--- $name: exit $rc after $((SECONDS - start)) s" >>"$file"
    say "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    return $rc
}

# The machine and the packages: nvidia-smi, the wheels where packages are missing.
setup() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >>"$log" 2>&1
    else
        say "nvidia-smi: not found"
    fi
    # Looked up, not imported: importing albumentations takes seconds.
    if "$py" -c "import importlib.util as u, sys
sys.exit(not all(map(u.find_spec, sys.argv[1:])))" albumentations albucore pydantic pydantic_core annotated_types \
        typing_inspection stringzilla simsimd pycocotools; then
        say "albumentations, pycocotools and their dependencies are installed: no wheels to install"
    elif [ -d .whl ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
            .whl/*.whl >>"$log" 2>&1
        say "installed the wheels of .whl/ ($(cd .whl && echo *.whl)) into $work/site: exit $?"
        export PYTHONPATH=$work/site:$PYTHONPATH
    else
        say "no .whl/ folder: wheel install skipped (albumentations or pycocotools missing: stages will fail)"
    fi
}

echo "gpu_check.sh$([ $dry = 1 ] && echo ' dry run'): budget $budget s, stages $stages" >"$log"
say "started: $(date -Is)"
changes=$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$changes"
[ $print = 1 ] || setup

cpus=$(nproc)
workers=$((cpus > 5 ? cpus - 4 : 1)) # the trainer's process, its pinning thread and the GPU busy sampler need cores
if [ $dry = 1 ]; then
    # Tiny sizes on the CPU; MobileNetV2 stands in for the VGG16 models (one VGG16 step takes ~20 s on 2 cores), so
    # the teacher's throughput would be the student's command again: not run.
    device=(--device cpu) workers=0 train_images=4 eval_images=4 iters=(--iters 1 --warmup 1) batch=2
    distill_teacher=mobilenetv2_ssdlite300 student_model=(--model mobilenetv2_ssdlite300 --width 0.5)
    student_iters=() distill_iters=()
    real_sizes=(data.batch_size=2 eval.batch_size=4 train.log_every=1) plan_iters=(--iters 2) picture=(--no-picture)
else
    # Timed iterations for ~15-20 s of loop at issue 8's goals (1,500 / 3,000 / 2,000 images/s at batch 64),
    # then as many again for the phase breakdown: ~40-60 s per command with start-up.
    device=() train_images=512 eval_images=4952 iters=(--warmup 20) batch=64
    teacher_model=(--model vgg16_ssd300) distill_teacher=vgg16_lite300
    student_model=(--model mobilenetv2_ssdlite300)
    teacher_iters=(--iters 300) student_iters=(--iters 600) distill_iters=(--iters 400)
    real_sizes=() plan_iters=() picture=()
fi
say "$cpus CPUs: $workers loader workers"

# torch's view of the GPU, then stage 2's synthetic JPEGs (~10-15 ms each: a minute for the 4,952 of the evaluation),
# from one Python process in the background while the tests run: its imports (seconds) hold up no stage. benchmark.py
# finds the images made with its arguments and uses them.
if [ $print = 0 ]; then
    images=() && want 2 && images=("$work/bench_train" "$train_images" "$work/bench_eval" "$eval_images")
    "$py" -c "import os, sys, torch, torchvision
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else 'no CUDA device'
bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
print(f'device: {name}, torch {torch.__version__}, torchvision {torchvision.__version__}, '
      f'CUDA {torch.version.cuda}, bf16 {bf16}, {os.cpu_count()} CPUs', flush=True)
if sys.argv[1:]:
    from odkd.bench.synthetic import write_benchmark_images
    write_benchmark_images(sys.argv[1], 'trainval', int(sys.argv[2]))
    write_benchmark_images(sys.argv[3], 'test', int(sys.argv[4]))" "${images[@]}" 2>&1 | tee -a "$log" &
fi

status=0 # the script's exit status: 1 if a stage failed
if want 1; then
    start=$SECONDS
    run tests "$(min 180 $(($(left) - $(reserve 1))))" "$out/1_tests.log" \
        "$py" -m pytest -q -m cuda -n 0 -p no:cacheprovider --durations=15 tests # -n 0: one process, one GPU
    rc=$?
    say "stage 1 (CUDA tests): exit $rc after $((SECONDS - start)) s" && [ $rc = 0 ] || status=1
fi

if want 2; then
    start=$SECONDS rc=0
    [ $print = 1 ] || { say "waiting for the benchmark images" && wait; }
    # The distilled arm's method(s), from the line of the experiment that names the best-measured method.
    line=$(grep -o 'distill.methods=\[[^]]*\]' $experiment | head -1)
    read -ra methods <<<"$(echo "$line" | sed 's/.*\[\(.*\)\]/\1/; s/,/ /g')"
    [ ${#methods[@]} -gt 0 ] || say "no distill.methods=[...] found in $experiment"
    bench=("$py" scripts/benchmark.py)
    train=(--batch "$batch" --workers "$workers" --images "$train_images" --root "$work/bench_train" --cache
        "${iters[@]}" "${device[@]}")
    measure() { # NAME ESTIMATE COMMAND...: run it if the time left, less stage 3's, holds ESTIMATE seconds
        local name=$1 estimate=$2 limit
        shift 2
        limit=$(min 150 $(($(left) - $(reserve 2))))
        if [ "$limit" -lt "$estimate" ]; then
            say "$name: skipped, $limit s left for an estimated $estimate s" && return 0
        fi
        run "$name" "$limit" "$out/2_throughput.log" "$@" || rc=$?
    }
    if [ $dry = 0 ]; then
        measure teacher 30 "${bench[@]}" train "${teacher_model[@]}" "${train[@]}" "${teacher_iters[@]}"
    else
        say "teacher: not run in the dry run (its stand-in is the student's command)"
    fi
    measure student 30 "${bench[@]}" train "${student_model[@]}" "${train[@]}" "${student_iters[@]}"
    measure distill 30 "${bench[@]}" distill "${student_model[@]}" --teacher-model $distill_teacher \
        --methods "${methods[@]}" "${train[@]}" "${distill_iters[@]}"
    measure eval 30 "${bench[@]}" eval --model mobilenetv2_ssdlite300 --images $eval_images --batch $batch \
        --workers $workers --root "$work/bench_eval" "${device[@]}"
    if [ $dry = 0 ]; then # compiling takes minutes of CPU: only where time allows, never in the CPU dry run
        measure student_compile 120 "${bench[@]}" train "${student_model[@]}" "${train[@]}" "${student_iters[@]}" \
            --compile
        measure distill_compile 120 "${bench[@]}" distill "${student_model[@]}" --teacher-model $distill_teacher \
            --methods "${methods[@]}" "${train[@]}" "${distill_iters[@]}" --compile
        measure teacher_compile 120 "${bench[@]}" train "${teacher_model[@]}" "${train[@]}" "${teacher_iters[@]}" \
            --compile
    fi
    say "stage 2 (throughput): exit $rc after $((SECONDS - start)) s" && [ $rc = 0 ] || status=1
fi

if want 3; then
    start=$SECONDS
    file=$out/3_real_photos.log
    if [ -f $real_data/VOC5/ImageSets/Main/test.txt ] || [[ " ${overrides[*]} " == *" data.voc_root="* ]] ||
        [ $print = 1 ]; then
        rm -f "$work/voc5_real/"{compare.md,compare.json,compare.png,detections.jpg} # an earlier run's report
        # The plan's own few seconds come off the comparison's.
        run plan 60 "$file" "$py" scripts/gpu_check.py plan $experiment --seconds $(($(left) - $(reserve 3) - 5)) \
            --throughput-log "$out/2_throughput.log" --write "$work/voc5_real.yaml" --output-dir "$work/voc5_real" \
            "${plan_iters[@]}" data.num_workers=$workers "data.cache_dir=$work/cache" "${real_sizes[@]}" \
            "${overrides[@]}" &&
            run compare $(($(left) - $(reserve 3))) "$file" \
                "$py" scripts/compare.py "$work/voc5_real.yaml" "${device[@]}" "${picture[@]}"
        rc=$?
        for report in compare.md compare.png detections.jpg; do
            [ ! -f "$work/voc5_real/$report" ] || cp "$work/voc5_real/$report" "$out/"
        done
        say "stage 3 (real photos): exit $rc after $((SECONDS - start)) s" && [ $rc = 0 ] || status=1
    else
        say "stage 3 (real photos): skipped, no $real_data (copy ../shared/data/voc5_real_mini there and carry it)"
    fi
fi

real_report=() && want 3 && real_report=(--compare "$work/voc5_real/compare.json")
wait # the device line (stage 2 waited for it; --stages without 2 did not)
[ $print = 1 ] || "$py" scripts/gpu_check.py summary "$out" "${real_report[@]}" 2>&1 | tee -a "$log"
say "done in $SECONDS s"
exit $status
}
