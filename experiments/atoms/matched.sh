#!/usr/bin/env bash
# The matched-reproduction runs of docs/atoms.md ("Matched reproduction"): MiniLM, 200k cached
# tokens, three splits; (A) the fixed 600-step recipe on layers 1 and 4, (B) the same recipe
# trained to the plateau of its training loss (cap 3000 steps) on layer 1, (C) the |M| × |D|
# grid on layer 1 with in-sample and held-out R². After the cache step the three run in
# parallel (nice -n 5);
# logs and outputs under results/atoms/r3/. Usage: bash experiments/atoms/matched.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/atoms/r3
PY=${PY:-.venv/bin/python}
mkdir -p $R
{ date; uptime; git rev-parse HEAD; git status --porcelain --untracked-files=no; } > $R/launch.txt
# cache once, before the parallel runs (two runs opening the cache at once: CacheLockedError)
$PY -c "from experiments.atoms.pipeline import AtomsConfig, cache; cache(AtomsConfig(
    model='minilm', max_tokens=200_000), '$R/cache')" > $R/cache.log 2>&1
COMMON="--model minilm --cache-dir $R/cache --layers 0,1,2,3,4,5 --max-tokens 200000 \
  --batch-size 256 --lams 1,3,10 --splice-texts 16"
nohup nice -n 5 $PY -m experiments.atoms.run $COMMON --analyze-layers 1,4 --steps 600 \
  --out $R/fixed600 > $R/fixed600.log 2>&1 &
nohup nice -n 5 $PY -m experiments.atoms.run $COMMON --analyze-layers 1 --steps 3000 \
  --lam-warmup-steps 600 --plateau-window 200 --plateau-tol 2e-3 \
  --out $R/plateau > $R/plateau.log 2>&1 &
nohup nice -n 5 $PY -m experiments.atoms.scaling --cache-dir $R/cache --layer 1 \
  --M 500,2000,8000,32000 --D-mult 1,2,4,8,16 --steps 600 --batch-size 256 \
  --max-tokens 200000 --out $R/scaling > $R/scaling.log 2>&1 &
wait
{ date; uptime; } >> $R/launch.txt
