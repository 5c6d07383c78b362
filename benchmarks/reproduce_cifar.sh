#!/usr/bin/env bash
# The CIFAR tables LPL is compared on, with lpa-train's recipes (python/recipes.py):
#   long tail, 100:1, ResNet-32 (option A), LPL's long-tail recipe (--recipe la-resnet32: split direction,
#   budget radius), rows la, la+lpl, la+lpa, la+lpa+lpl, on CIFAR-10-LT and CIFAR-100-LT;
#   balanced CIFAR-100, WRN-28-10 (--recipe lpl-wrn28-10), rows erm, lpl, lpa, lpa+lpl.
# LPL's published error for reference: CIFAR-100-LT LA 56.11 / LPL 55.75 / LA+LPL 53.89;
# CIFAR-10-LT LA 22.33 / LPL 22.05 / LA+LPL 21.46.
#
# GPU time per row (one seed), ESTIMATED, not measured (no CIFAR run has been timed on a GPU yet):
#   CIFAR-10-LT, 1240 epochs x 97 steps of ResNet-32: ~0.5 h la, ~1 h with LPA (T = 3), LPL adds little;
#   CIFAR-100-LT, 1240 epochs x 85 steps: about the same; balanced CIFAR-100, 240 epochs x 390 steps of
#   WRN-28-10 in bf16: ~2 h erm / lpl, ~3 h with LPA at the penultimate layer (fused head path).
#
# usage: benchmarks/reproduce_cifar.sh DATA_DIR OUT_DIR [extra lpa-train options, e.g. --seeds 0 1 2]
#        benchmarks/reproduce_cifar.sh --smoke OUT_DIR    (CPU: two epochs on a generated CIFAR-format
#                                                          folder, ResNet-32 for every row; 5-9 min on 2 CPU cores)
# DATA_DIR holds cifar-10-batches-py and cifar-100-python. Each table row writes OUT_DIR/<table>.json;
# the tables are then written to OUT_DIR/tables.md by python -m lpa_bench.cifar_table.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,20p' "$0"; exit 2
fi
smoke=0
if [[ $1 == --smoke ]]; then smoke=1; fi
mkdir -p "$2"
out=$(cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the fake-CIFAR writer lives in tests/
data=$1
shift 2
extra=("$@")

if (( smoke )); then
    data=$(mktemp -d)
    trap 'rm -rf "$data"' EXIT
    python - "$data" <<'PY'
import sys
from pathlib import Path
from tests.programs.fake_cifar import write_cifar
write_cifar(Path(sys.argv[1]), 10, per_class_per_file=2)
write_cifar(Path(sys.argv[1]), 100, per_class_per_file=2)
PY
    # two epochs, one milestone, ResNet-32 instead of WRN-28-10, no warm-up, CPU
    extra=(--epochs 2 --milestones 1 --model resnet32a --seeds 0 --batch-size 32 --device cpu --quiet "${extra[@]}")
    imbalance=(--imbalance 2)
else
    imbalance=(--imbalance 100)
fi

# LPL's long-tail logit budgets: CIFAR-10 6 / 10 steps of 0.15, CIFAR-100 10 / 50 steps of 0.2 (the radius
# of the largest budget is steps x step); balanced: ~81 steps of 0.01 (train_lpl.py), confidence radius.
run() {  # table dataset recipe methods... -- options...
    local table=$1 dataset=$2 recipe=$3; shift 3
    local methods=() ; while [[ $1 != -- ]]; do methods+=("$1"); shift; done; shift
    echo "== $table: ${methods[*]}"
    lpa-train --recipe "$recipe" --dataset "$dataset" --data-dir "$data" --method "${methods[@]}" \
        --json "$out/$table.json" "$@" "${extra[@]}"
}
lt_methods=(la la+lpl la+lpa la+lpa+lpl)
run cifar10-lt cifar10-lt la-resnet32 "${lt_methods[@]}" -- "${imbalance[@]}" --lpl-eps 1.5 --head-budget 6 --tail-budget 10
run cifar100-lt cifar100-lt la-resnet32 "${lt_methods[@]}" -- "${imbalance[@]}" --lpl-eps 10 --head-budget 10 --tail-budget 50
run cifar100 cifar100 lpl-wrn28-10 erm lpl lpa lpa+lpl -- --direction confidence --radius confidence --lpl-eps 0.8
python -m lpa_bench.cifar_table "$out"/cifar10-lt.json "$out"/cifar100-lt.json "$out"/cifar100.json > "$out/tables.md"
cat "$out/tables.md"
