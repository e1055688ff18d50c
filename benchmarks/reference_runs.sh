#!/usr/bin/env bash
# The runs behind the reference curves of docs/<script>.md, and the curves drawn from them:
#
#     bash benchmarks/reference_runs.sh            # every script: 2 healthy runs, 1 failing run
#     bash benchmarks/reference_runs.sh wgan_gp    # one script
#
# Healthy: the script's defaults on Fashion-MNIST, seeds 1 and 2, side by side on cores 0 and 1,
# one thread each, for HEALTHY (15 minutes) or to the last step; resnet_sn_wgan_gp for LONG (30
# minutes), since its step takes seconds on one core. Failing: the flags of FAILING,
# seed 1, for FAILED (10 minutes), two scripts side by side. timeout's SIGTERM saves and logs the
# step as Ctrl-C does. Writes runs/curves/, assets/curves-<script>.png and
# assets/failing-<script>.png (the failing run's real_vs_fake.png).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
HEALTHY=${HEALTHY:-15m} LONG=${LONG:-30m} FAILED=${FAILED:-10m}
declare -A FAILING=(
    [wgan_gp]="--lambda-gp 0"
    [cond_wgan_gp]="--lambda-gp 0"
    [dcgan]="--lr-g 2e-6"
    [resnet_sn_wgan_gp]="--lr-g 0.02 --lr-d 0.02"
)
scripts=("${@:-wgan_gp cond_wgan_gp dcgan resnet_sn_wgan_gp}")
read -r -a scripts <<< "${scripts[*]}"
export OMP_NUM_THREADS=1
run() {  # core, time, script, name, flags...
    local core=$1 time=$2 script=$3 name=$4
    shift 4
    rm -rf "runs/curves/$name"
    taskset -c "$core" timeout -s TERM "$time" "$python" "$script.py" --run-name "curves/$name" \
        "$@" > "runs/curves/$name.log" 2>&1 || true
}
mkdir -p runs/curves
for script in "${scripts[@]}"; do
    time=$HEALTHY
    [[ $script == resnet_sn_wgan_gp ]] && time=$LONG
    run 0 "$time" "$script" "$script-seed1" --seed 1 &
    run 1 "$time" "$script" "$script-seed2" --seed 2 &
    wait
done
for ((i = 0; i < ${#scripts[@]}; i += 2)); do
    for j in 0 1; do
        script=${scripts[i + j]:-}
        if [[ -n $script ]]; then
            # shellcheck disable=SC2086  # the failing flags are separate words
            run "$j" "$FAILED" "$script" "$script-failing" --seed 1 ${FAILING[$script]} &
        fi
    done
    wait
done
for script in "${scripts[@]}"; do
    "$python" benchmarks/curves.py --healthy "runs/curves/$script-seed1" \
        "runs/curves/$script-seed2" --failing "runs/curves/$script-failing" \
        --out "assets/curves-$script.png" \
        --title "$script.py: seeds 1 and 2 at the defaults; failing: ${FAILING[$script]}"
    cp "runs/curves/$script-failing/real_vs_fake.png" "assets/failing-$script.png"
done
