#!/usr/bin/env bash
# DreamTeacher's in-domain claim on CamVid, end to end (issue 14; docs/segmentation.md):
#   1. train a DDPM teacher (diffusers UNet2DModel, 6.1M params, 64 px) on CamVid's train + val frames (no masks)
#   2. dense linear probe of the teacher's own features (frozen; BN + one 1x1 conv), t=50 (P_TIMESTEPS="50 150")
#   3. distill a ResNet-18 from it (recipes/camvid-resnet18.yaml)        4. export it in timm format
#   5. segmentation fine-tunes on the 233 test images: 10% and 100% of the train masks x distilled / scratch
#      (timm:resnet18 --like the export) x seeds 0 and 1: the same steps, subsets, batches and augmentation draws
#   6. report: summary.json / summary.md (the table), mIoU vs fraction plot, prediction grids, wall times
#
# Usage (repository root):  CAMVID=<dir with train/ trainannot/ val/ valannot/ test/ testannot/> OUT=<new dir> \
#                           bash bench/camvid_experiment.sh
#   PROFILE=cpu  budgets for a 2-core CPU (the default without a GPU; docs/segmentation.md's table)
#   TEACHER=DIR  reuse a teacher trained before (tools/train_teacher.py output): step 1 is skipped
#   SMOKE=1   toy scale (a few steps, small images), for a CPU: checks the whole chain in minutes; give it a few
#             images per split: python bench/camvid_jpeg.py CAMVID /tmp/camvid-small --max-per-split 12
#   PY=...    the Python (default: python3); MP=bf16|no (default: bf16 on a GPU, no on a CPU)
#   SLIM=1    (default) delete the teacher's resume state and the distillation checkpoints at the end; SLIM=2 also
#             the student's weights (OUT is then ~15 MB); SLIM=0 keeps all
#   every budget below can be overridden from the environment (T_STEPS=..., SEG_STEPS=..., ...).
# Budgets are steps (reproducible numbers); the GPU defaults were sized for one H200 to finish in under 8 minutes.
# The images may be .jpg or .png; masks are .png with the image's stem.
set -euo pipefail
: "${CAMVID:?set CAMVID to the CamVid 240x180 folder}" "${OUT:?set OUT to a new output folder}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "OUT=$OUT exists and is not empty; choose a new folder (nothing is overwritten)" >&2; exit 2
fi
# preflight: every module the chain imports, so a missing one fails here and not after minutes of training
$PY -c "import yaml, PIL, numpy, matplotlib, tqdm, torch, timm, diffusers, accelerate, kornia, torchmetrics, safetensors" \
  || { echo "missing Python packages (above); install them first (pip install -e . installs all)" >&2; exit 2; }
mkdir -p "$OUT"
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "${SMOKE:-0}" = 1 ]; then
  : "${T_STEPS:=4}" "${T_BS:=4}" "${T_RES:=32}" "${P_STEPS:=3}" "${D_STEPS:=3}" "${D_BS:=4}" "${D_WORKERS:=0}"
  : "${SEG_STEPS:=3}" "${SEG_BS:=2}" "${SEG_SIZE:=48}" "${SEG_WORKERS:=0}" "${T_LIMIT:=600}"
elif [ "${PROFILE:-}" = cpu ] || { [ -z "${PROFILE:-}" ] && [ "$GPU" = 0 ]; }; then
  # a 2-core CPU in about 2.5 hours: a 4.4M-parameter teacher at 32 px (1.8 s a step of 32 here), the student at
  # 64 px, segmentation at 120x90 (--size 90)
  : "${T_STEPS:=2200}" "${T_BS:=32}" "${T_RES:=32}" "${T_CONFIG:=tools/unet_cifar10_small.json}" "${T_LIMIT:=3600}"
  : "${P_STEPS:=150}" "${D_STEPS:=800}" "${D_BS:=32}" "${D_SIZE:=64}" "${D_WORKERS:=1}"
  : "${SEG_STEPS:=300}" "${SEG_BS:=8}" "${SEG_SIZE:=90}" "${SEG_WORKERS:=1}"
else
  : "${T_STEPS:=2500}" "${T_BS:=128}" "${T_RES:=64}" "${P_STEPS:=200}" "${D_STEPS:=1200}" "${D_BS:=64}" "${D_WORKERS:=8}"
  : "${SEG_STEPS:=400}" "${SEG_BS:=16}" "${SEG_SIZE:=}" "${SEG_WORKERS:=0}" "${T_LIMIT:=180}"
fi
MP=${MP:-$([ "$GPU" = 1 ] && echo bf16 || echo no)}
T_CONFIG=${T_CONFIG:-tools/unet_camvid_64.json}
D_SIZE_SET=${D_SIZE:+"student_size=$D_SIZE"}
if [ -n "${TEACHER:-}" ]; then T_DESC="(not used: TEACHER=$TEACHER)"; else T_DESC=$T_CONFIG; fi
SIZE_ARG=${SEG_SIZE:+--size $SEG_SIZE}
T0=$(date +%s)
stage() {  # stage NAME CMD...: run, time, log
  local name=$1; shift; local s; s=$(date +%s)
  echo "=== [$(date +%T)] $name: $*"
  "$@" 2>&1 | tee "$OUT/logs/$name.log"
  echo "$name $(( $(date +%s) - s ))" >> "$OUT/wall_times.txt"
  echo "=== $name done in $(( $(date +%s) - s )) s (total $(( $(date +%s) - T0 )) s)"
}
mkdir -p "$OUT/logs" "$OUT/frames"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'threads', torch.get_num_threads())" | tee "$OUT/machine.txt"
echo "budgets: T_CONFIG=$T_DESC D_SIZE=${D_SIZE:-recipe} P_TIMESTEPS=${P_TIMESTEPS:-50} T_LIMIT=$T_LIMIT T_STEPS=$T_STEPS T_BS=$T_BS T_RES=$T_RES P_STEPS=$P_STEPS D_STEPS=$D_STEPS D_BS=$D_BS SEG_STEPS=$SEG_STEPS SEG_BS=$SEG_BS SEG_SIZE=${SEG_SIZE:-native} MP=$MP" | tee -a "$OUT/machine.txt"
# the unlabelled frames the teacher and the distillation see: train + val images (links; masks never read)
for s in train val; do for f in "$CAMVID/$s"/*; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$OUT/frames/${s}_$(basename "$f")"; done; done

# 1. the teacher (TEACHER=DIR: one trained before with the command in DIR/training.json, linked and not retrained)
if [ -n "${TEACHER:-}" ]; then
  ln -s "$(cd "$TEACHER" && pwd)" "$OUT/teacher"
  [ -f "$TEACHER.loss.csv" ] && cp "$TEACHER.loss.csv" "$OUT/teacher.loss.csv"
  echo "teacher: $TEACHER (trained before; its command and time are in its training.json)" | tee -a "$OUT/machine.txt"
else
stage teacher $PY tools/train_teacher.py --dataset image-folder --data-root "$CAMVID/train" "$CAMVID/val" \
  --resolution "$T_RES" --unet-config "$T_CONFIG" --out "$OUT/teacher" --steps "$T_STEPS" \
  --batch-size "$T_BS" --lr 5e-4 --warmup $(( T_STEPS / 20 + 1 )) --ema --hflip --preload --save-dtype float16 \
  --mixed-precision "$MP" --save-every "$T_STEPS" --time-limit "$T_LIMIT"
fi
# 2. dense linear probe of the teacher's own features (frozen), two timesteps
for t in ${P_TIMESTEPS:-50}; do
  stage "teacher_probe_t$t" $PY -m distill.cli finetune "teacher:$OUT/teacher" --task segmentation --decoder linear \
    --blocks up_blocks.0 up_blocks.1 up_blocks.2 --timesteps $t --data-root "$CAMVID" --fraction 1.0 --seed 0 \
    --steps "$P_STEPS" --batch-size "$SEG_BS" --lr 1e-3 --weight-decay 0 --augment flip $SIZE_ARG \
    --mixed-precision "$MP" --label "teacher dense linear probe t=$t" --grid-images 2 \
    -o "$OUT/teacher_probe/t$t" --no-progress
done
# 3. distillation, 4. export
stage distill $PY -m distill.cli train recipes/camvid-resnet18.yaml -o "$OUT/distill" --no-progress --set \
  "data_root=$OUT/frames" "teacher=$OUT/teacher" "steps=$D_STEPS" "batch_size=$D_BS" "num_workers=$D_WORKERS" \
  "mixed_precision='$MP'" "checkpoint_every=$D_STEPS" "log_every=$(( D_STEPS / 30 + 1 ))" $D_SIZE_SET
stage export $PY -m distill.cli export "$OUT/distill" -o "$OUT/student"
# 5. segmentation: distilled vs scratch, 10% and 100% of the masks, seeds 0 and 1
COMMON=(--task segmentation --data-root "$CAMVID" --fractions 0.1 1.0 --seeds 0 1 --steps "$SEG_STEPS"
        --batch-size "$SEG_BS" --lr 1e-3 --warmup-steps $(( SEG_STEPS / 10 )) --num-workers "$SEG_WORKERS"
        --mixed-precision "$MP" --no-progress)
stage seg_distilled $PY -m distill.cli finetune "$OUT/student" -o "$OUT/seg/distilled" "${COMMON[@]}" $SIZE_ARG \
  --label "ResNet-18 distilled (CamVid DDPM)"
stage seg_scratch $PY -m distill.cli finetune timm:resnet18 --like "$OUT/student" -o "$OUT/seg/scratch" \
  "${COMMON[@]}" $SIZE_ARG --label "ResNet-18 scratch"
# 6. report
stage report $PY -m distill.cli report "$OUT/seg" "$OUT/teacher_probe" "$OUT/distill" -o "$OUT/report" \
  --title "CamVid: distilled vs scratch"
echo "total $(( $(date +%s) - T0 ))" >> "$OUT/wall_times.txt"
$PY bench/camvid_summary.py "$OUT"
# what this script wrote and the results do not need (OUT was empty when it started): SLIM=1 (default) removes the
# teacher's resume state (~75 MB) and the distillation checkpoints (the export holds the student); SLIM=2 also the
# student's weights (45 MB), to keep OUT under a transfer limit; SLIM=0 keeps everything. The teacher (12 MB) stays.
if [ "${SLIM:-1}" -ge 1 ]; then rm -rf "$OUT/distill"/checkpoint-* "$OUT/frames"; [ -L "$OUT/teacher" ] || rm -rf "$OUT/teacher.state"; fi
if [ "${SLIM:-1}" -ge 2 ]; then rm -f "$OUT/student/model.safetensors"; fi
du -sh "$OUT"
echo "=== all done in $(( $(date +%s) - T0 )) s; read $OUT/summary.md"
