#!/usr/bin/env bash
# Periodic re-grounding between training segments, for trainers ReGroundCallback cannot run in
# (verl, OpenRLHF, DeepSpeed, FSDP, several processes; docs/reground.md): train M steps from the
# current model, jump N steps ahead with `rank1 extrapolate --method linear --mode two-point --from 0`
# (the RLVR-linearity reference's rule: θ₀ + (M + N)/M · (θ_M − θ₀), norm weights from θ_M),
# train the next M steps from the jumped model, and so on.
#
# usage: reground_between_segments.sh BASE OUT M N ROUNDS -- TRAIN_COMMAND [ARG...]
#
# TRAIN_COMMAND runs once per round with three variables in its environment: MODEL (the Hugging
# Face folder to start from), STEPS (M) and RUN (an empty folder). It must train M steps from MODEL
# with a fresh optimizer and leave Hugging Face folders RUN/checkpoint-STEP, at least two of them
# (e.g. every M/2 steps; for verl, merge global_step_N/actor into RUN/checkpoint-N in the command).
# Round R writes OUT/round-R/run (the segment), OUT/round-R/jump (the jumped model) and
# OUT/round-R/jump.json (extrapolate's --json: flagged tensors, rounding); the trainer's output goes
# to stderr and the last jump's folder is printed on stdout. RANK1 (default `rank1`) and DTYPE (default float32: a bf16
# output rounds small updates away) can be set in the environment.
set -euo pipefail

if [ $# -lt 7 ] || [ "$6" != "--" ]; then
  echo "usage: $0 BASE OUT M N ROUNDS -- TRAIN_COMMAND [ARG...]" >&2
  exit 2
fi
CUR=$1 OUT=$2 M=$3 N=$4 ROUNDS=$5
shift 6
read -r -a RANK1_CMD <<< "${RANK1:-rank1}"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  DIR="$OUT/round-$ROUND"
  mkdir -p "$DIR/run"
  MODEL="$CUR" STEPS="$M" RUN="$DIR/run" "$@" >&2
  "${RANK1_CMD[@]}" extrapolate "$CUR" --run "$DIR/run" --method linear --mode two-point \
    --from 0 --to "$M" --target-step $((M + N)) --dtype "${DTYPE:-float32}" --out "$DIR/jump" --quiet --json > "$DIR/jump.json"
  CUR="$DIR/jump"
done
echo "$CUR"
