#!/usr/bin/env bash
# Regenerates the example transcripts pasted into docs/commands/*.md.
#
#   bash docs/commands/examples.sh SCRATCH_DIR [DEMO_ARGS...]
#
# Runs in SCRATCH_DIR (created; must not exist): `rank1 demo --synthetic --out demo-out DEMO_ARGS...`, then every
# example of the command pages on demo-out/base and demo-out/run. Each example's transcript
# (the command, its stdout, its stderr, and its exit code when not 0; with a pipe,
# the first failing command's) goes to
# SCRATCH_DIR/transcripts/NAME.txt, ready to paste. Output goes to a file, so tables are as wide as
# their values and no line is wrapped (docs/cli.md, "Tables").
# `rank1` is taken from PATH (activate the venv first).
set -u
scratch=${1:?usage: examples.sh SCRATCH_DIR [DEMO_ARGS...]}
shift
mkdir "$scratch" || exit 1
cd "$scratch" || exit 1
mkdir transcripts

ex() {  # ex NAME COMMAND...: run COMMAND (a rank1 command line, shell syntax allowed) and record it
  local name=$1; shift
  local cmd="$*"
  {
    echo "\$ $cmd"
    bash -o pipefail -c "$cmd" 2>"transcripts/$name.err"
    local rc=$?
    cat "transcripts/$name.err"
    [ "$rc" -ne 0 ] && echo "\$ echo \$?" && echo "$rc"
  } > "transcripts/$name.txt"
  rm -f "transcripts/$name.err"
  echo "== $name"; cat "transcripts/$name.txt"
}

ex demo "rank1 demo --synthetic --out demo-out $*"

# inspect
ex inspect_base "rank1 inspect demo-out/base"
ex inspect_run "rank1 inspect demo-out/run"
mkdir -p broken-run/global_step_20/actor && cp -r demo-out/run/checkpoint-10 broken-run/ \
  && : > broken-run/global_step_20/actor/model_world_size_2_rank_0.pt  # a verl step not merged yet
ex inspect_broken "rank1 inspect broken-run"
ex inspect_json "rank1 inspect demo-out/run --steps 20:40 --json | jq -c '.checkpoints[] | {step, status, dtypes}'"

# decompose
ex decompose "rank1 decompose demo-out/base --run demo-out/run --out spectra --plots"
ex decompose_files "ls spectra spectra/plots && head -3 spectra/spectrum.csv | cut -d, -f1-12,20-25"
ex decompose_json "rank1 decompose demo-out/base --run demo-out/run --steps 40:50 --rank 2 --exact --out spectra-exact -q --json | jq -c '.summary.by_step'"

# reconstruct
ex reconstruct "rank1 reconstruct demo-out/base demo-out/run/checkpoint-50 --rank 1,4,1% --factors spectra --dtype float32 --out rank-k"
ex reconstruct_bf16 "rank1 reconstruct demo-out/base demo-out/run/checkpoint-50 --rank 1 --factors spectra --out rank1-bf16"
ex reconstruct_refused "rank1 reconstruct demo-out/base demo-out/run/checkpoint-50 --rank 1 --factors spectra --out rank1-bf16"

# fit-pls (the synthetic run has no metric: metrics.csv and noise.csv are written by hand)
printf 'step,accuracy\n10,0.31\n20,0.38\n30,0.44\n40,0.47\n50,0.52\n' > metrics.csv
printf 'step,accuracy\n10,0.40\n20,0.35\n30,0.45\n40,0.38\n50,0.42\n' > noise.csv
ex fit_step "rank1 fit-pls spectra --out fits-step"
ex fit_metric "rank1 fit-pls spectra --metrics metrics.csv --metric accuracy --out fits"
ex fit_noise "rank1 fit-pls spectra --metrics noise.csv --out fits-noise --no-plots --fail-below 0.5"
ex fit_files "ls fits && head -3 fits/fits.csv"

# linearity
ex linearity "rank1 linearity demo-out/base --run demo-out/run --steps 10:40 --out lin"
ex linearity_gate "rank1 linearity demo-out/base --run demo-out/run --steps 10:40 --out lin-gate --no-plots -q --json --fail-below 0.5 | jq -c '.summary.headline | {share: .[\"frac_r2_above_0.7\"], static_fraction}'"
ex linearity_rank2 "rank1 linearity demo-out/base --run demo-out/run --rank 2 --sample 1000 --seed 7 --out lin-r2 --no-plots -q && head -3 lin-r2/linearity.csv"

# extrapolate
ex relex "rank1 extrapolate demo-out/base --run demo-out/run --method relex --history-until 40 --target-step 50,100 --dtype float32 --out relex"
ex linear "rank1 extrapolate demo-out/base --run demo-out/run --method linear --history-until 40 --target-step 50 --dtype float32 --out lstsq-50"
ex two_point "rank1 extrapolate demo-out/base --run demo-out/run --method linear --mode two-point --from 0 --to 40 --history-until 40 --target-step 80 --out jump-80"
ex alpharl "rank1 extrapolate demo-out/base --method alpharl --fits fits --target-metric 0.52,0.6 --dtype float32 --out ar"
ex alpharl_step "rank1 extrapolate demo-out/base --method alpharl --fits fits-step --target-step 100 --dtype float32 --out alpharl-step"
ex alpharl_last "rank1 extrapolate demo-out/base --method alpharl --fits fits --target-metric 0.6 --container last --min-r2 0.98 --out alpharl-last"
ex relex_report "jq -c '{method, target_step, history_steps, norm_ratio_limit, flagged, copied}' relex/step-100/rank1tools-extrapolation.json && jq '.tensors[0]' relex/step-100/rank1tools-extrapolation.json"

# usage errors
ex bad_steps "rank1 linearity demo-out/base --run demo-out/run --steps 10,,40 --out x"
