#!/usr/bin/env bash
# Unpack what scripts/device_train.sh brought back into runs/ (refusing to overwrite an earlier stage's runs),
# then print the commands that measure it.  Usage: bash scripts/device_unpack.sh FOLDER_WITH_runs.tar.part-*
set -euo pipefail
src=${1:?usage: scripts/device_unpack.sh FOLDER (the folder holding runs.tar.part-aa ...)}
cd "$(dirname "$0")/.."
ls "$src"/runs.tar.part-* >/dev/null 2>&1 || { echo "no runs.tar.part-* in $src" >&2; exit 1; }
for d in runs/device-vae runs/device-dit; do
  if [ -e "$d" ]; then echo "$d exists: move it away first (nothing is overwritten)" >&2; exit 1; fi
done
mkdir -p runs
cat "$src"/runs.tar.part-* | tar -C runs -xf -
ls runs/device-*/
cat <<'MSG'
Measure it here (CPU):
  .venv/bin/kinema eval --ckpt_dir runs/device-dit/model     # the whole model, its new VAE included
then, if it beats the shipped model: train the orange LoRA on it (configs/builtin-lora-orange-*.json with
base = runs/device-dit/model), eval with --lora, and copy runs/device-dit/model to kinema/builtin/model.
MSG
