#!/usr/bin/env bash
# The collapse check, the GPU check's sibling: what the curvature meter costs at full size and
# what it and the stopping rules see on a short search in RobustDARTS's S3 space.
#
#   launch/collapse_check.sh [OUT_DIR] [--tiny]     # OUT_DIR defaults to collapse_check
#
# 1. `pcp_jax.bench --what=search,curvature` on PC-DARTS in S3 at batch 64 (RobustDARTS's) and
#    256 (the paper's), one meter estimate (20 products on 64 images) and its share of the
#    search at RobustDARTS's cadence (every 2 epochs): OUT_DIR/bench.json, bench.log.
# 2. A short S3 search (pcp_jax.main, configs/pc_darts.py:space=s3, 8 cells, batch 64, no
#    warm-up, 20 epochs on the shipped CIFAR-10 subset, no download) with the meter every epoch
#    and DARTS+'s skip rule in `warn` mode: OUT_DIR/s3/.
# 3. OUT_DIR/collapse.md: per epoch the curvature, how far Lanczos still moved, the skip
#    connections and the alpha entropies, and what `darts_es` and `skip_count` decide on them.
# `--tiny` is the CPU form: the `:tiny` config at batch 8, 3 epochs. PYTHON (default python)
# runs the Python steps. Exit status: that of the first step that failed, else 0.
set -u -o pipefail

OUT=collapse_check
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "Error: unknown option $arg (usage: $0 [OUT_DIR] [--tiny])" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
rm -rf "$OUT/s3" "$OUT/bench.json" "$OUT/collapse.md"

if (( TINY )); then
  CONFIG=configs/pc_darts.py:space=s3,tiny BATCHES=8 EPOCHS=3
  SEARCH=(--config.search.batch_size=8)
else
  CONFIG=configs/pc_darts.py:space=s3 BATCHES=64,256 EPOCHS=20
  SEARCH=(--config.data.source=subset --config.data.max_train=0 --config.search.batch_size=64
          --config.search.eval_batch_size=250)
fi
STAGE=--config.search.stages[0]
status=0

echo "[collapse_check] bench: $CONFIG at batch $BATCHES" >&2
"$PY" -m pcp_jax.bench --config="$CONFIG" --what=search,curvature --batch_size="$BATCHES" \
  --steps=3 --warmup=1 --out="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=$?

echo "[collapse_check] search: $CONFIG, $EPOCHS epochs, the meter every epoch" >&2
"$PY" -m pcp_jax.main --config="$CONFIG" "${SEARCH[@]}" "$STAGE.epochs=$EPOCHS" \
  "$STAGE.warmup_epochs=0" --config.search.curvature_every=1 \
  --config.search.early_stop=skip_count --config.search.early_stop_action=warn \
  --workdir="$OUT/s3" > "$OUT/s3.log" 2>&1 || { (( status )) || status=$?; }

"$PY" - "$OUT" <<'EOF' || { (( status )) || status=$?; }
import json, os, sys
from pcp_jax import collapse, runs
out = sys.argv[1]
rows = runs.Rows(os.path.join(out, 's3', runs.SEARCH_METRICS)).read()
bench = json.load(open(os.path.join(out, 'bench.json'))) if os.path.isfile(
    os.path.join(out, 'bench.json')) else {}
lines = ['# Collapse check', '', f"device: {bench.get('device_kind', '?')}", '']
for c in bench.get('curvature_costs', []):
  lines.append(f"- batch {c['batch_size']}: one estimate ({c['products']} products) = "
               f"{c['estimate_in_steps']:.1f} search steps = {100 * c['share']:.2f} % of the "
               f"search every {c['every_epochs']} epochs; within 1e-3 after "
               f"{c['products_to_1e3']} products")
lines += ['', collapse.trajectory(rows) if rows else 'The search wrote no rows.']
with open(os.path.join(out, 'collapse.md'), 'w') as f:
  f.write('\n'.join(lines) + '\n')
print('\n'.join(lines))
EOF
echo "[collapse_check] done (exit $status): $OUT/collapse.md" >&2
exit $status
