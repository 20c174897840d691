#!/usr/bin/env bash
# The main job, from a fresh clone: install, train a small German -> English model on
# Multi30k (about 5 minutes on 2 CPU cores), translate a few sentences, score the test set.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
DATA=../shared/data/multi30k
aligna train configs/quickstart.yaml --overwrite
echo "--- translating (German -> English):"
SENTENCES=("ein mann fährt fahrrad auf einer straße ." "zwei hunde spielen im schnee ." "eine frau liest ein buch .")
printf '  %s\n' "${SENTENCES[@]}"   # not `tee /dev/stderr`: that reopens a redirected log and truncates it
printf '%s\n' "${SENTENCES[@]}" | aligna translate runs/quickstart
echo "--- test_2016_flickr:"
aligna evaluate runs/quickstart --src $DATA/test_2016_flickr.lc.norm.tok.de.gz \
  --ref $DATA/test_2016_flickr.lc.norm.tok.en.gz
