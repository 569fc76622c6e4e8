# Sourced by train.sbatch and predict.sbatch after their knobs, as "$FSCT_ROOT/launch/slurm/common.sh"
# (SLURM runs a spooled copy of the batch script, so it cannot be found beside "$0"): the job's environment
# and how each node starts `accelerate launch`. Sets NNODES, PROCS_PER_NODE, ACCELERATE_CONFIG, MAIN_HOST,
# launch_args (for accelerate launch) and cpus (for srun).
# shellcheck shell=bash disable=SC2034  # the variables are for the sourcing script

cd "$FSCT_ROOT"
set +u  # activation scripts (conda's above all) read unset variables
eval "$ENV_SETUP"
set -u

NNODES=${SLURM_NNODES:-1}
if [ "$FSCT_CPU" = 1 ]; then
  PROCS_PER_NODE=$CPU_PROCS_PER_NODE
  export ACCELERATE_USE_CPU=1  # without it each launched process would run the whole job alone
  threads=$(( ${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE} / PROCS_PER_NODE ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
  default_config=launch/accelerate/cpu_2proc.yaml
else
  PROCS_PER_NODE=$GPUS_PER_NODE
  if [ "$PROCS_PER_NODE" -gt 1 ]; then default_config=launch/accelerate/gpu_8.yaml
  else default_config=launch/accelerate/gpu_1.yaml
  fi
fi
# Several nodes, GPU or CPU: multinode.yaml's c10d rendezvous at the first node's MAIN_HOST:MAIN_PORT (the
# nodes' launchers may start in any order). tests/test_multinode.py runs two machine ranks on localhost with
# the launch_args this file builds for SLURM_NNODES=2.
if [ "$NNODES" -gt 1 ]; then default_config=launch/accelerate/multinode.yaml; fi
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$default_config}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
launch_args=(--config_file "$ACCELERATE_CONFIG"
             --num_machines "$NNODES" --num_processes $((NNODES * PROCS_PER_NODE))
             --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT")
if [ "$NNODES" -gt 1 ]; then
  launch_args+=(--rdzv_backend c10d)  # multinode.yaml's, kept when ACCELERATE_CONFIG names another file
fi
if [ "$FSCT_CPU" = 1 ]; then
  launch_args+=(--mixed_precision no)  # fp32 on CPUs (multinode.yaml's bf16 is for GPUs)
fi
# srun starts one task per node; it gets the job's cores per task only when asked.
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then  # (an if: a false `[ ] &&` as the last line would fail `source`)
  cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
