#!/usr/bin/env bash
# The shapes-world quality benchmark: a larger budget than the demo, then the
# paper's ablations in miniature. Budget: about 2 hours on a 2-core CPU.
#
#   bash examples/benchmarks/quality.sh [DIR]      (default: runs/quality)
#
# Writes DIR/base (the main run) and DIR/alpha-* (noise ablation); every
# number lands in DIR/*/eval/*.json and *.md, plots in *-sweep.png.
set -euo pipefail
DIR=${1:-runs/quality}
BUDGET=(
  --set data.count=10000
  --set train_vq.steps=6000
  --set train_diffusion.steps=12000
  --set finetune_cfg.steps=2000
)
mkdir -p "$DIR"
[ -f "$DIR/base/clipvqd.toml" ] || clipvqd init "$DIR/base" --example shapes
P=(-p "$DIR/base/clipvqd.toml" "${BUDGET[@]}")
clipvqd train-vq "${P[@]}"
python examples/benchmarks/vq_quality.py "$DIR/base" --count 500 > "$DIR/base/vq_quality.json"
clipvqd tokenize "${P[@]}"
clipvqd train-diffusion "${P[@]}"
clipvqd finetune-cfg "${P[@]}"
# headline: both prompt sets, 16 candidates each, best of 16 by CLIP
clipvqd eval "${P[@]}" --protocol shapes --name headline
# sampling steps: 100, 50, 25, 10
for s in 100 50 25 10; do clipvqd eval "${P[@]}" --protocol shapes --set sample.steps=$s --name steps-$s; done
# guidance x truncation (the paper's Table 2)
clipvqd eval "${P[@]}" --protocol shapes --sweep guidance=1,1.5,2,3,5 --sweep truncation=0.75,0.8,0.85,0.9 --name table2
# noise alpha (the paper's Fig. 7): same VQ and tokens, diffusion retrained per alpha
for a in 0 0.25 0.5 1.0; do
  D="$DIR/alpha-$a"
  if [ ! -f "$D/clipvqd.toml" ]; then
    mkdir -p "$D" && cp "$DIR/base/clipvqd.toml" "$D/" && cp -r "$DIR/base/vq" "$DIR/base/tokens" "$D/"
  fi
  clipvqd train-diffusion -p "$D/clipvqd.toml" "${BUDGET[@]}" --set train_diffusion.alpha=$a
  clipvqd finetune-cfg -p "$D/clipvqd.toml" "${BUDGET[@]}" --set train_diffusion.alpha=$a
  clipvqd eval -p "$D/clipvqd.toml" "${BUDGET[@]}" --protocol shapes --name alpha-$a
done
