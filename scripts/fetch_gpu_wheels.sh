#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels of the packages odkd needs that the GPU machine lacks, for its
# Python 3.12 on manylinux x86_64: that machine has no internet, so scripts/gpu_check.sh installs them from
# there (`carry: [".whl", ...]`). It already has numpy, scipy, PyYAML, OpenCV, torch and matplotlib.
#   bash scripts/fetch_gpu_wheels.sh [folder, default .whl]
# One pinned version each (the ones the development venv runs), dependencies listed by hand: with --no-deps pip
# would not notice a missing one, so check `unzip -p FILE '*/METADATA' | grep ^Requires-Dist` after a change.
set -euo pipefail
folder=${1:-.whl}
# albumentations -> albucore (-> stringzilla, simsimd), pydantic (-> pydantic-core, annotated-types,
# typing-inspection, typing-extensions >= 4.16, newer than the machine's may be); pycocotools for COCO AP.
packages=(
    albumentations==2.0.8
    albucore==0.0.24
    stringzilla==5.3.2
    simsimd==6.5.16
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    pycocotools==2.0.11
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
platforms+=(--platform any) # the pure-Python wheels
mkdir -p "$folder"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest "$folder" "${packages[@]}"
ls -l "$folder"
du -sh --apparent-size "$folder"
