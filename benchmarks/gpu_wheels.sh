#!/usr/bin/env bash
# Downloads, here, the wheels that the GPU machines' image lacks into .whl/ at the repository root (git-ignored), for
# Python 3.12 on manylinux x86-64: the machine reaches no package index, so they travel with the working tree
# (benchmarks/README.md, "GPU suite", gives the one command that installs them there and runs the suite).
#
#   bash benchmarks/gpu_wheels.sh          # prints every wheel, the total, and fails above the size limit
#
# What the image lacks (its package list: jax/jaxlib 0.11.2 with the CUDA 13 plugin, flax, optax, orbax-checkpoint,
# chex, absl-py, pyyaml, numpy, scipy, tqdm, requests, matplotlib, pillow, torch 2.11, torchvision — never replaced):
#   ml-collections  arreg_jax's configs (its own needs, absl-py and PyYAML, are in the image)
#   torchattacks    the PGD baseline of part 1, with --no-deps: its metadata pins torchvision and requests~=2.25.1,
#                   which it does not need at those versions (it imports torch, numpy, scipy, tqdm: all in the image)
# tensorflow-datasets and tensorboardX are optional and unused by the suite; jax, jaxlib, flax and torch stay the
# image's (the script refuses to fetch them).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-64}  # what one device call carries: the working tree and every carried path together
WHEELS=(ml-collections==1.1.0 torchattacks==3.5.1)

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" 2>&1 \
  | { grep -v '^WARNING: Location' || true; }

for w in "$DEST"/*.whl; do
  case "$(basename "$w")" in
    jax-*|jaxlib-*|jax_cuda*|flax-*|torch-*|torchvision-*)
      echo "error: $(basename "$w") must stay the image's; remove it from WHEELS" >&2; exit 1;;
  esac
done

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
extra=0
if [ -d .autoattack ]; then extra=$(du -sb .autoattack | cut -f1); fi
total=$((wheels + tree + extra))
ls -l "$DEST"
awk -v w="$wheels" -v t="$tree" -v e="$extra" -v l="$LIMIT_MIB" 'BEGIN { m = 1048576;
  printf "wheels %.2f MiB; with the working tree (%.2f MiB) and .autoattack (%.2f MiB): %.2f MiB of %d MiB\n",
         w / m, t / m, e / m, (w + t + e) / m, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: over the ${LIMIT_MIB} MiB a device call carries" >&2
  exit 1
fi
