#!/usr/bin/env bash
# Submit the whole chain as three SLURM jobs: shard -> train -> predict, each starting only when the
# previous one succeeded (--dependency=afterok); a failed job cancels the ones after it. It returns at
# once and prints the job ids. Relative paths in the knobs below are relative to the repo root.
#
#   launch/slurm/pipeline.sh DATA [key=value ...]      # DATA: X_train/, Y_train.csv, X_test/ (challenge layout)
#
# key=value arguments are settings for `fsct train` (e.g. train.max_steps=20000). Environment knobs:
#   CONFIG        fsct settings file for training            (configs/demo.yaml)
#   SHARDS        shard folder for the labelled slices        (shards/<name of DATA>)
#   TEST_SHARDS   shard folder for the test slices            ($SHARDS-test)
#   OUTPUT_DIR    training output dir                         (outputs/pipeline-<date>-<time>)
#   SUBMISSION    the CSV predict writes                      ($OUTPUT_DIR/submission.csv)
#   SBATCH_ARGS   extra sbatch options for all three jobs     (e.g. "--partition=gpu --account=me")
#   SHARD_SBATCH_ARGS / TRAIN_SBATCH_ARGS / PREDICT_SBATCH_ARGS   extra options for one job (e.g. "--nodes=4")
#   LOG_DIR       where the jobs' logs go                     (logs)
#   FSCT_CPU=1    CPU-only nodes (add --gpus-per-node=0 to SBATCH_ARGS), as for train.sbatch
set -euo pipefail

die() { echo "pipeline.sh: $*" >&2; exit 1; }
[ $# -ge 1 ] || die "usage: launch/slurm/pipeline.sh DATA [key=value ...]"
[ -d "$1" ] || die "$1: not a folder"
DATA=$(cd "$1" && pwd)
shift
[ -f "$DATA/Y_train.csv" ] || [ -f "$DATA/Y_train.csv.gz" ] || die "$DATA: no Y_train.csv(.gz)"
labels=$DATA/Y_train.csv
[ -f "$labels" ] || labels=$DATA/Y_train.csv.gz

export FSCT_ROOT=${FSCT_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$FSCT_ROOT"
export ENV_SETUP=${ENV_SETUP:-if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi}
export CONFIG=${CONFIG:-configs/demo.yaml}
SHARDS=${SHARDS:-shards/$(basename "$DATA")}
TEST_SHARDS=${TEST_SHARDS:-$SHARDS-test}
export OUTPUT_DIR=${OUTPUT_DIR:-outputs/pipeline-$(date +%Y%m%d-%H%M%S)}
SUBMISSION=${SUBMISSION:-$OUTPUT_DIR/submission.csv}
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
read -r -a user_common <<<"${SBATCH_ARGS:-}"
common=(--output="$LOG_DIR/%x-%j.out" "${user_common[@]}")
read -r -a shard_extra <<<"${SHARD_SBATCH_ARGS:-}"
read -r -a train_extra <<<"${TRAIN_SBATCH_ARGS:-}"
read -r -a predict_extra <<<"${PREDICT_SBATCH_ARGS:-}"

# The shard job's script goes in on stdin; sbatch keeps a copy, so later edits here do not affect it.
shard_job=$(sbatch --parsable --job-name=fsct-shard --nodes=1 --ntasks=1 --cpus-per-task=8 --time=01:00:00 \
  "${common[@]}" "${shard_extra[@]}" <<EOF
#!/usr/bin/env bash
set -euo pipefail
cd "\$FSCT_ROOT"
set +u; eval "\$ENV_SETUP"; set -u
python -m fsct shard --images $(printf %q "$DATA/X_train") --labels $(printf %q "$labels") \
  --out $(printf %q "$SHARDS") --workers "\${SLURM_CPUS_PER_TASK:-1}" --overwrite
python -m fsct shard --images $(printf %q "$DATA/X_test") --split test --out $(printf %q "$TEST_SHARDS") \
  --workers "\${SLURM_CPUS_PER_TASK:-1}" --overwrite
EOF
)
shard_job=${shard_job%%;*}  # "id;cluster" on multi-cluster setups

train_job=$(sbatch --parsable --dependency="afterok:$shard_job" --kill-on-invalid-dep=yes \
  "${common[@]}" "${train_extra[@]}" launch/slurm/train.sbatch "data.shards=$SHARDS" "$@")
train_job=${train_job%%;*}

predict_job=$(CHECKPOINT=$OUTPUT_DIR SUPPORT=$SHARDS IMAGES=$TEST_SHARDS OUT=$SUBMISSION \
  sbatch --parsable --dependency="afterok:$train_job" --kill-on-invalid-dep=yes \
  "${common[@]}" "${predict_extra[@]}" launch/slurm/predict.sbatch)
predict_job=${predict_job%%;*}

echo "shard   job $shard_job -> $SHARDS, $TEST_SHARDS"
echo "train   job $train_job -> $OUTPUT_DIR (after $shard_job)"
echo "predict job $predict_job -> $SUBMISSION (after $train_job)"
echo "follow: squeue -j $shard_job,$train_job,$predict_job; tail -f $LOG_DIR/fsct-*-{$shard_job,$train_job,$predict_job}.out"
