#!/usr/bin/env bash
# The GPU figures of issues 5 and 6, in four `device` calls of under 10 minutes each, for a
# session with a 30-minute device budget. No GPU session has run it yet: the time limits below
# are planned, not measured.
#
# Once, here, in the repo root (both folders are ignored and never committed; JSRT/SCR must not
# enter the repository):
#   bash ../shared/tools/device-wheels.sh .whl
#   python3 -m pip download -q --no-deps -d .whl hydra-joblib-launcher==1.2.0 joblib   # parallel sweeps
#   mkdir -p .jsrt && cp -r ../shared/data/jsrt_scr .jsrt/
#   printf '/.whl/\n/.jsrt/\n' >> .git/info/exclude
# Then four device runs, each right after the last (the machine keeps artifacts/ and logs/
# only while it stays warm, about 30 s after a call), each with carry [".whl", ".jsrt"]:
#   bash experiments/gpu_session.sh fit        # diffusion fit (6 min cap) + mask IoU per step
#   bash experiments/gpu_session.sh generate   # 692 pairs, re-masked per chain, capture/refine benches
#   bash experiments/gpu_session.sh table      # the results table, UNet + TransUNet, 3 seeds
#   bash experiments/gpu_session.sh ablation   # refinement ablation: synthetic only per mask chain
# Each step copies its metrics, logs and reports to $OUT.
#
# SMOKE=1 bash experiments/gpu_session.sh <step> runs the same wiring tiny, on a CPU, in
# minutes (tests/cli/test_gpu_session.py does): it checks the commands, not the figures.
set -euo pipefail
STEP=${1:?usage: gpu_session.sh fit|generate|table|ablation}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_session_out}
mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .jsrt/jsrt_scr ] && export DIFFMASK_JSRT_DIR=$PWD/.jsrt/jsrt_scr
PY=${PY:-python3}
ART=${ART:-artifacts}
LOGS=${LOGS:-logs}
NAME=gpu128
P="paths.artifact_dir=$ART paths.log_dir=$LOGS"

if [ -n "${SMOKE:-}" ]; then
  # tiny everything, on the CPU
  D="data=auto data.size=32 data.num_workers=0 trainer=cpu trainer.enable_progress_bar=false"
  FIT="diffusion.components.block_out_channels=[16,32] diffusion.components.only_cross_attention=true
       diffusion.components.layers_per_block=1 diffusion.components.attention_heads=2
       diffusion.components.cross_attention_dim=32 diffusion.components.norm_num_groups=8
       diffusion.components.text_hidden_size=32 diffusion.components.text_layers=1
       diffusion.components.text_intermediate_size=64 data.batch_size=4 trainer.max_steps=4
       trainer.check_val_every_n_epoch=100 +trainer.max_time=00:00:05:00"
  # a 4-step generator's attention masks miss classes: train on them anyway (the wiring is what is tested)
  DT="$D data.synthetic_min_class_presence=null"; NS=4; STEPS=2; GB=4; EPOCHS="trainer.max_epochs=1"; EPOCHS10="trainer.max_epochs=1"
  NETS="segmentation=unet"; SEEDS=0; JOBS=""
  UNET_SMALL="segmentation.net.channels=[8,16,32] segmentation.net.strides=[2,2]"
  AFF="synthesis.affinity.train_steps=2 synthesis.affinity.refiner.backbone.channels=[8,16] synthesis.affinity.refiner.radius=3 synthesis.affinity.refiner.t=4"
  EV="model.affinity_steps=2"; AFF_T=8
  BENCH=""
else
  D="data=jsrt data.size=128 data.num_workers=8 trainer=gpu trainer.enable_progress_bar=false"
  DT="data=jsrt data.size=128 data.num_workers=2 trainer=gpu trainer.enable_progress_bar=false"  # 6 jobs share 16 cores
  FIT="diffusion.align.label_fraction=0.1 data.batch_size=32 trainer.max_steps=20000 +trainer.max_time=00:00:06:00"
  NS=692; STEPS=50; GB=64; EPOCHS="trainer.max_epochs=100"; EPOCHS10="trainer.max_epochs=400 trainer.check_val_every_n_epoch=10"
  NETS="segmentation=unet,transunet"; SEEDS=0,1,2; JOBS="hydra/launcher=joblib hydra.launcher.n_jobs=6"
  UNET_SMALL=""
  AFF=""
  EV=""; AFF_T=8,32,256
  BENCH=1
fi

case "$STEP" in
fit)
  # diffusion fit with attention alignment on 10 % labels (capped at 6 min), then mask IoU on the
  # 37 real test images per refinement step (raw / threshold / +CRF / +affinity), two noise levels
  $PY -m diffmask.cli.fit_diffusion $P $D name=$NAME $FIT 2>&1 | tail -n 25
  $PY -m diffmask.cli.evaluate_masks $P $D input_dir=$ART/diffusion/$NAME $EV 2>&1 | grep -E " = |took" || true
  cp "$ART/diffusion/$NAME/stage.json" "$OUT/fit_stage.json"
  find "$LOGS/evaluate_masks" -name metrics.json | tail -n 1 | xargs -I{} cp {} "$OUT/mask_iou.json"
  # AffinityNet's walk length, chosen on the validation images (at 64 px fewer steps were better)
  $PY -m diffmask.cli.evaluate_masks -m $P $D input_dir=$ART/diffusion/$NAME $EV +data.test_split=val \
    model.affinity.t=$AFF_T 2>&1 | grep -E "#[0-9]+ :|affinity/miou =|threshold/miou =" | tee "$OUT/affinity_t_val.txt" || true
  ;;
generate)
  # one sampling run with capture + threshold masks (class maps kept), then the other chains
  # re-made offline from the saved maps; throughput is in stage.json (images_per_s)
  $PY -m diffmask.cli.generate $P $D name=$NAME input_dir=$ART/diffusion/$NAME num_samples=$NS steps=$STEPS \
    batch_size=$GB synthesis=attention_masks 'synthesis.refine=[threshold]' 2>&1 | grep -E "samples in|Error" || true
  for chain in raw threshold,densecrf threshold,densecrf,affinity; do
    $PY -m diffmask.cli.remask $P input_dir=$ART/synthesis/$NAME name=${NAME}_${chain//,/_} \
      "synthesis.refine=[$chain]" synthesis.mask_maker.num_workers=$([ -n "${SMOKE:-}" ] && echo 0 || echo 8) \
      $([[ $chain == *affinity* ]] && echo "$AFF") 2>&1 | grep -E "re-masked|Error" || true
  done
  for s in "$ART"/synthesis/${NAME}*/stage.json; do cp "$s" "$OUT/$(basename "$(dirname "$s")")_stage.json"; done
  if [ -n "$BENCH" ]; then
    $PY experiments/masks/bench_capture.py --steps 50 --size 64 --batch 32 --device cuda | tee "$OUT/bench_capture.txt"
    $PY experiments/masks/bench_refine.py --n 16 --size 256 --workers 8 --device cuda | tee "$OUT/bench_refine.txt"
  fi
  ;;
table)
  # the results table: real 100 % / real 10 % / synthetic only / real 10 % + synthetic (real_share
  # 0.5) / synthetic pre-training + real 10 % fine-tuning; every model is also scored on shifted
  # copies of the JSRT test split (another hospital, by proxy: experiments/robustness)
  JS=${DIFFMASK_JSRT_DIR:-../shared/data/jsrt_scr}
  SH=""
  if [ -f "$JS/metadata.csv" ]; then
    $PY experiments/robustness/make_shifted_sets.py "$JS" "$ART/shifted" > /dev/null
    SH="data.test_sets={window:$ART/shifted/window,fov:$ART/shifted/fov,detector:$ART/shifted/detector,mixed:$ART/shifted/mixed}"
  fi
  A="experiment=ablation $P $DT synthetic_name=$NAME data.seed=0 $UNET_SMALL $SH"
  $PY -m diffmask.cli.train -m $A $JOBS $NETS seed=$SEEDS data.real_fraction=1.0 data.synthetic_count=0 $EPOCHS
  $PY -m diffmask.cli.train -m $A $JOBS $NETS seed=$SEEDS data.real_fraction=0.1 data.synthetic_count=0 $EPOCHS10
  $PY -m diffmask.cli.train -m $A $JOBS $NETS seed=$SEEDS data.real_fraction=0.1 data.synthetic_count=$NS \
    data.real_share=0.5 $EPOCHS
  # synthetic only: one multirun per backbone, so job k is seed k for the fine-tuning below
  for net in ${NETS#segmentation=}; do
    net=${net//,/ }
    for b in $net; do
      $PY -m diffmask.cli.train -m $A $JOBS segmentation=$b seed=$SEEDS data.real_fraction=0 \
        data.synthetic_count=$NS $EPOCHS hydra.sweep.dir=$LOGS/ablation/multiruns/synth_$b
      $PY -m diffmask.cli.train -m $A $JOBS segmentation=$b seed=$SEEDS data.real_fraction=0.1 \
        data.synthetic_count=0 $EPOCHS10 "segmentation.init_weights=$LOGS/ablation/multiruns/synth_$b/\${seed}"
    done
  done
  $PY -m diffmask.cli.report $LOGS/ablation --out "$OUT"
  ;;
ablation)
  # the refinement ablation: synthetic only, UNet, on each re-masked copy of the set
  A="experiment=ablation $P $DT data.seed=0 $UNET_SMALL"
  $PY -m diffmask.cli.train -m $A $JOBS segmentation=unet seed=$SEEDS data.real_fraction=0 data.synthetic_count=$NS \
    $EPOCHS synthetic_name=${NAME}_raw,${NAME}_threshold_densecrf,${NAME}_threshold_densecrf_affinity
  $PY -m diffmask.cli.report $LOGS/ablation --out "$OUT"
  ;;
*)
  echo "unknown step $STEP: expected fit, generate, table or ablation" >&2
  exit 2
  ;;
esac
ls "$OUT"
