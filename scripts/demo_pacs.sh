#!/usr/bin/env bash
# make demo-pacs: medtl with a real PACS as source and destination, on this machine.
#
#  1. starts a local Orthanc (DICOMweb + DIMSE, basic auth, loopback) with its storage in data/pacs-demo/;
#  2. loads the synthetic cohort into it over STOW-RS (as a modality would send it);
#  3. in a project clone of its own (data/pacs-demo/project: your params.yaml and DVC state stay as they are),
#     sets data.source: dicomweb and runs the retrain flow, which pulls the studies from Orthanc, ingests,
#     trains, evaluates and promotes;
#  4. predict --pacs: scores the studies in the PACS with the new champion and stores one DICOM SR into each;
#  5. leaves Orthanc running so you can open the results in its web UI (URL and login printed at the end);
#     `python -m pipeline.sources.orthanc stop data/pacs-demo/orthanc` stops it.
#
# Data pulled from a PACS is real data to medtl: it is pseudonymised with a site key (created here, in
# data/pacs-demo/pseudonym.key), never with the public demo key.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
demo=data/pacs-demo
mkdir -p "$demo"
python - <<'PY'
from pipeline.sources import orthanc
why = orthanc.missing()
if why:
    raise SystemExit(f"demo-pacs: {why}")
PY

[ -f data/raw/synth/medtl_synth.json ] || medtl synth --out data/raw/synth
if [ -f "$demo/orthanc/server.json" ] && python -c "import sys; from pipeline.sources import orthanc; sys.exit(0 if orthanc.running('$demo/orthanc').alive() else 1)"; then
  echo "demo-pacs: Orthanc already running"
else
  python -m pipeline.sources.orthanc start "$demo/orthanc"
  python -m pipeline.sources.orthanc load "$demo/orthanc" data/raw/synth
fi
eval "$(python -m pipeline.sources.orthanc env "$demo/orthanc")"
url="$(python -c "from pipeline.sources import orthanc; print(orthanc.running('$demo/orthanc').dicomweb_url)")"

[ -f "$demo/pseudonym.key" ] || medtl keygen --path "$demo/pseudonym.key"
export MEDTL_PSEUDONYM_KEY_FILE="$PWD/$demo/pseudonym.key"

project="$demo/project"
if [ ! -d "$project/.git" ]; then
  git clone -q . "$project"
fi
cp data/raw/synth/labels.csv "$project/labels.csv"   # labels as a RIS exports them: by StudyInstanceUID
cp data/raw/synth/lesions.csv "$project/lesions.csv"
cd "$project"
medtl retrain --no-push -S data.source=dicomweb -S data.raw_dir=data/raw/pacs -S data.labels=labels.csv \
  -S data.lesions=lesions.csv -S "pacs.url=$url"
echo
medtl predict --pacs
echo
medtl summary
cd - >/dev/null
python - "$demo/orthanc" <<'PY'
import sys
from pipeline.sources import orthanc
s = orthanc.running(sys.argv[1])
print(f"\ndemo-pacs: Orthanc Explorer at {s.url}/app/explorer.html (user {s.user}, password in {sys.argv[1]}/server.json);"
      f"\neach study now holds an SR series 'medtl model output - not for diagnostic use unless validated'."
      f"\nStop it with: python -m pipeline.sources.orthanc stop {sys.argv[1]}")
PY
