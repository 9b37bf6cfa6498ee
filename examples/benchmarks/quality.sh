#!/usr/bin/env bash
# The shapes-world quality benchmark: the shapes defaults (a larger budget
# than the demo), then the paper's ablations in miniature. Results, with the
# run's date and commit: RESULTS.md, "The quality benchmark".
#
#   bash examples/benchmarks/quality.sh [DIR] [--set KEY=VALUE ...]   (default DIR: runs/quality)
#
# The --set overrides go to every stage after the budget's own (the alpha
# ablation's too, so they win over its smaller budget), e.g. another seed:
# --set project.seed=1 --set data.seed=1 --set sample.seed=1.
#
# Budget: the shapes defaults with 20,000 training images (not 5,000), a
# 6,000-step tokenizer (not 3,000: at 3,000 it got a third of the small stars
# right on the AMD machine, and the generator cannot draw better than its
# tokenizer), a denoiser twice as deep (8 layers x 128, not 4) trained 16,000
# steps (not 4,000: with 4 layers and 12,000 steps the run got 84.6% over all
# samples, with 8 and 16,000 it got 96.1%); the denoiser stages
# (train-diffusion, finetune-cfg, eval) in bf16 where the CPU computes it
# natively, as the demo does (fp32 elsewhere, about 1.5x slower on the same
# CPU). On the 2-core AMD EPYC Zen 5 machine (RESULTS.md, from a fresh clone):
# 1 h 51 min in all: tokenizer 8.3 min, tokenize 14 s, diffusion 61 min
# (4.4 steps/s), fine-tune 1.6 min, then the evals 23 min and the alpha
# ablation 16.5 min. On the 2-core Intel Xeon with AMX (2026-12-04): 1 h 12
# min (tokenizer 5.7 min, diffusion 42.6 min at 6.3 steps/s, the evals 11
# min, the alpha ablation 11 min; 1 h 21-24 min at seeds 1 and 2, on a machine
# 9-16 % slower).
# On the Zen 4 machine (2026-12-06) the training took about 1 h 33 min
# (diffusion at 3.0-3.3 steps/s) and the run up to the guidance x truncation
# sweep 2 h 2 min; it was stopped there (RESULTS.md). Not run whole on the AVX2
# machine (fp32 there: 3.4x slower in the demo's denoiser); its tokenizer stages and
# alpha ablation alone took 62 min on the Zen 3 (2026-12-08).
#
# Writes DIR/base (the main run) and DIR/alpha-* (the noise ablation); every
# number lands in DIR/*/eval/*.json and *.md, a plot per ablation in
# DIR/base/eval/*-sweep.png (each with reranking off and on), DIR/alpha.png
# and DIR/reranking.png.
set -euo pipefail
DIR=${1:-runs/quality}
EXTRA=("${@:2}")  # the caller's --set overrides, after the budget's
BUDGET=(--set data.count=20000 --set train_vq.steps=6000 --set transformer.layers=8 --set train_diffusion.steps=16000 --set finetune_cfg.steps=400 "${EXTRA[@]}")
# bf16 for the denoiser where the CPU has it natively (the demo's rule), else fp32
PREC=$(python -c "from clipvqd.stages.common import native_cpu_bf16; print('bf16' if native_cpu_bf16() else 'no')")
EVAL=(--protocol shapes --set eval.fid=false --set eval.inception_score=false)
mkdir -p "$DIR"
[ -f "$DIR/base/clipvqd.toml" ] || clipvqd init "$DIR/base" --example shapes
V=(-p "$DIR/base/clipvqd.toml" "${BUDGET[@]}")  # the tokenizer stages, fp32
P=("${V[@]}" --set project.mixed_precision=$PREC)  # the denoiser stages
clipvqd train-vq "${V[@]}"
python examples/benchmarks/vq_quality.py "$DIR/base" --count 500 > "$DIR/base/vq_quality.json"
clipvqd tokenize "${V[@]}"
clipvqd train-diffusion "${P[@]}"
clipvqd finetune-cfg "${P[@]}"
# headline: 24 prompts of each set, 16 candidates each (all samples and best of 16
# by CLIP: reranking on and off), 100 sampling steps, FID and IS too
clipvqd eval "${P[@]}" --protocol shapes --set eval.max_prompts=24 --name headline
# sampling steps: 100, 50, 25, 10
clipvqd eval "${P[@]}" "${EVAL[@]}" --set eval.max_prompts=24 --sweep steps=100,50,25,10 --name steps
# guidance x truncation (the paper's Table 2), 25 sampling steps
clipvqd eval "${P[@]}" "${EVAL[@]}" --set eval.max_prompts=12 --set sample.steps=25 \
  --sweep guidance=1,3,5 --sweep truncation=0.7,0.8,0.9 --name table2
# noise alpha (the paper's Fig. 7): the same tokens, diffusion retrained per alpha
# at a smaller budget (the shapes default denoiser, 4 layers, 1,500 steps each,
# alpha 0.5 included, so the four compare)
for a in 0 0.25 0.5 1.0; do
  D="$DIR/alpha-$a"
  if [ ! -f "$D/clipvqd.toml" ]; then
    mkdir -p "$D" && cp "$DIR/base/clipvqd.toml" "$D/" && cp -r "$DIR/base/vq" "$DIR/base/tokens" "$D/"
  fi
  A=(-p "$D/clipvqd.toml" --set project.mixed_precision=$PREC --set data.count=20000 --set train_vq.steps=6000 --set train_diffusion.steps=1500 --set finetune_cfg.steps=150 --set train_diffusion.alpha=$a "${EXTRA[@]}")
  clipvqd train-diffusion "${A[@]}"
  clipvqd finetune-cfg "${A[@]}"
  clipvqd eval "${A[@]}" "${EVAL[@]}" --set eval.max_prompts=12 --set sample.steps=25 --name alpha
done
python - "$DIR" <<'PY'
import json, sys
from pathlib import Path
from clipvqd.plot import line_chart
root = Path(sys.argv[1])
series = {}
for name in ("judge in-distribution, all samples: all named", "judge held-out, all samples: all named"):
    series[name] = [(float(a), json.loads((root / f"alpha-{a}" / "eval" / "alpha.json").read_text())["metrics"][name])
                    for a in ("0", "0.25", "0.5", "1.0")]
line_chart(series, title="pseudo-text noise alpha (paper Fig. 7)", x_label="alpha",
           y_label="judged all named", y_range=(0.0, 1.0)).save(root / "alpha.png")
print(json.dumps(series, indent=2))
PY
# reranking off and on (the paper's Section 5.6) against the sampling steps
python examples/benchmarks/reranking_plot.py "$DIR/base/eval/steps-sweep.json" "$DIR/reranking.png"
