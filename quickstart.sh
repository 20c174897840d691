#!/usr/bin/env bash
# The main job, from a fresh clone: install, train a small German -> English Transformer on
# Multi30k, translate a few sentences and draw their attention maps, score the test set
# (under 6 minutes on 2 CPU cores, install included).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
echo "--- installed in ${SECONDS} s"
if [ -z "${VIRTUAL_ENV:-}" ]; then  # install.sh installed into the active virtualenv if there is one
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
DATA=../shared/data/multi30k
aligna train configs/quickstart.yaml --overwrite
echo "--- translating (German -> English):"
SENTENCES=("ein mann fährt fahrrad auf einer straße ." "zwei hunde spielen im schnee ." "eine frau liest ein buch .")
printf '  %s\n' "${SENTENCES[@]}"   # not `tee /dev/stderr`: that reopens a redirected log and truncates it
printf '%s\n' "${SENTENCES[@]}" | aligna translate runs/quickstart --attention runs/quickstart/attention --attention-maps summary
echo "--- attention map of the first sentence: runs/quickstart/attention/0001.png"
echo "--- test_2016_flickr:"
aligna evaluate runs/quickstart --src $DATA/test_2016_flickr.lc.norm.tok.de.gz \
  --ref $DATA/test_2016_flickr.lc.norm.tok.en.gz
echo "--- quickstart done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
