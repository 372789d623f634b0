#!/usr/bin/env bash
# One time-boxed training stage of the built-in model on a lent GPU, in one command of the device tool:
#
#   here:   make device-wheels            # ftfy + wcwidth wheels into .whl/ (the GPU image lacks them)
#   device: run(command="bash scripts/device_train.sh", carry=[".whl"], timeout_s=600)
#   here:   bash scripts/device_unpack.sh /work/.device/...   # the folder the files came back to
#
# It trains a new VAE (configs/device-vae.json) for VAE_MINUTES, then fine-tunes the shipped DiT, umT5 and
# CLIP on that VAE's latents (configs/device-dit.json) for DIT_MINUTES. `budget_minutes` fits each run's step
# count to its time, so both anneal and export on time. Both runs (exported models, metrics CSVs, the log)
# are packed into $OUT as parts of one tar (the device tool returns at most 8 files of 16 MiB).
# Extra `--set` overrides: VAE_SET / DIT_SET (e.g. DIT_SET="--set batch_size=32"); a CPU dry run:
#   PYTHON=.venv/bin/python OUT=/tmp/out VAE_MINUTES=0.5 DIT_MINUTES=0.5 VAE_SET="--set pool_size=64 --set batch_size=2" \
#     DIT_SET="--set pool_size=32 --set batch_size=8" bash scripts/device_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VAE_MINUTES=${VAE_MINUTES:-3.5}
DIT_MINUTES=${DIT_MINUTES:-3}
OUT=${OUT:-runs/device-out}
PY=${PYTHON:-python3}  # the device image's python3 holds PyTorch; here: PYTHON=.venv/bin/python
mkdir -p "$OUT"

pack() {  # whatever exists, even after a failure: a finished VAE alone is worth bringing back
  local items=()
  for p in device-vae/model device-vae/metrics.csv device-vae/samples device-dit/model device-dit/metrics.csv; do
    [ -e "runs/$p" ] && items+=("$p")
  done
  if [ ${#items[@]} -gt 0 ]; then
    tar -C runs -cf - "${items[@]}" | split -b 15m - "$OUT/runs.tar.part-"
    ls -l "$OUT"
  fi
}
trap pack EXIT

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" - <<'PY' 2>&1 | tee "$OUT/train.log"
import os, torch, ftfy  # noqa: F401  (ftfy: the tokenizer's text cleaning; missing means no .whl was carried)
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "| cores", os.cpu_count())
PY
# shellcheck disable=SC2086  # VAE_SET / DIT_SET are lists of words
"$PY" -m kinema.cli.main train vae configs/device-vae.json --set budget_minutes="$VAE_MINUTES" ${VAE_SET:-} \
  --no_progress 2>&1 | tee -a "$OUT/train.log"
# shellcheck disable=SC2086
"$PY" -m kinema.cli.main train dit configs/device-dit.json --set budget_minutes="$DIT_MINUTES" ${DIT_SET:-} \
  --no_progress 2>&1 | tee -a "$OUT/train.log"
