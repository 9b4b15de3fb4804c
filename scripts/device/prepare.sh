#!/usr/bin/env bash
# Run HERE (not on the device) before a GPU training session: puts what the lent GPU machine lacks
# into git-ignored folders that the device tool can carry:
#   .whl/           gguf and our transformers version, as wheels for the device's Python 3.12
#   .device/gguf-N/ the default model's GGUF in parts, one per call
# A call carries at most 64 MiB, the working tree included (the committed generator checkpoint is
# about 22 MB of it), so the GGUF (98 MB) travels in three calls; the last one carries .whl too
# and runs scripts/device/train.sh, which joins the parts. See docs/gpu-training.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PART_BYTES=${PART_BYTES:-36000000}
CALL_LIMIT=$((64 * 1024 * 1024))

gguf=$("$PY" -c 'from adapter_core.base_model import default_gguf_path; print(default_gguf_path())')
sha=$("$PY" -c 'from adapter_core.base_model import DEFAULT_GGUF_SHA256; print(DEFAULT_GGUF_SHA256)')
echo "$sha  $gguf" | sha256sum -c --quiet

rm -rf .device .whl
mkdir -p .device .whl
split -b "$PART_BYTES" "$gguf" .device/part-
n=0
for part in .device/part-*; do
  n=$((n + 1)); mkdir -p ".device/gguf-$n"; mv "$part" ".device/gguf-$n/"
done

# Versions from requirements.txt; the device's own torch, accelerate, safetensors and tokenizers serve.
versions=$(grep -E '^(gguf|transformers)==' requirements.txt)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $versions

# What each call carries: the working tree (tracked and untracked-not-ignored files) plus its folders.
tree=$( (git ls-files; git ls-files --others --exclude-standard) | while read -r f; do [ -f "$f" ] && stat -c %s "$f"; done \
        | awk '{s += $1} END {print s}')
wheels=$(du -sb .whl | cut -f1)
for i in $(seq 1 "$n"); do
  size=$(( tree + $(du -sb ".device/gguf-$i" | cut -f1) ))
  carry=".device/gguf-$i"
  if [ "$i" -eq "$n" ]; then size=$((size + wheels)); carry="$carry .whl"; fi
  echo "call $i of $n carries $carry: $((size / 1000000)) MB of $((CALL_LIMIT / 1000000)) MB"
  [ "$size" -lt "$CALL_LIMIT" ] || { echo "call $i is over the limit: lower PART_BYTES" >&2; exit 1; }
done
