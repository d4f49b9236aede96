#!/usr/bin/env bash
# Set up ./.venv with medtl and its dependencies. Safe to rerun (it only adds what is missing).
#
#   scripts/setup.sh          runtime only
#   scripts/setup.sh dev      + test dependencies
#
# torch: a GPU machine (nvidia-smi works) gets PyPI's default CUDA build; a machine without one gets
# torch==2.13.0 (on the medtl build machines a CPU build on local disk; elsewhere PyPI's build, which
# also runs on CPU). Override with MEDTL_TORCH_SPEC (e.g. "torch==2.5.1") and MEDTL_TORCH_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cpu for a CPU-only workstation).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PYTHON="${PYTHON:-python3}"
venv=.venv

if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "medtl needs Python >= 3.11"'
  "$PYTHON" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip setuptools wheel

if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  if [ -n "${MEDTL_TORCH_SPEC:-}" ]; then
    spec="$MEDTL_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.4"
  else
    spec="torch==2.13.0"
  fi
  echo "setup: installing $spec"
  if [ -n "${MEDTL_TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install -q "$spec" --index-url "$MEDTL_TORCH_INDEX_URL"
  else
    "${pip[@]}" install -q "$spec"
  fi
fi

target="."
[ "$extra" = "dev" ] && target=".[dev]"
"${pip[@]}" install -q -e "$target"

# The Prefect UI check (tests/flows/test_ui.py) drives Debian's chromium: install it for the test
# setup where this machine can (root + apt); elsewhere that test skips and says why.
if [ "$extra" = "dev" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's chromium for the browser check"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "setup: could not install chromium; the browser check will be skipped"
fi
# David Clunie's dciodvfy (Debian's dicom3tools) validates the DICOM SRs predict writes
# (tests/pipeline/test_predict.py); without it that check skips and says why.
if [ "$extra" = "dev" ] && ! command -v dciodvfy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's dicom3tools for the DICOM validator"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools >/dev/null 2>&1 \
    || echo "setup: could not install dicom3tools; the DICOM validator check will be skipped"
fi

# A real PACS for the pull/store tests and `make demo-pacs`: Debian's Orthanc with its DICOMweb plugin
# (pipeline/sources/orthanc.py starts it on free ports; apt's own service is not used). Without it those
# tests skip and say why.
if [ "$extra" = "dev" ] || [ "${MEDTL_WITH_ORTHANC:-}" = 1 ]; then
  if [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v apt-get >/dev/null 2>&1 \
     && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's orthanc and orthanc-dicomweb for the PACS tests"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1; }; } \
      || echo "setup: could not install orthanc; the PACS tests will be skipped"
    # the package starts its own service on 4242/8042 where an init system runs: medtl does not use it
    { command -v service >/dev/null 2>&1 && service orthanc stop >/dev/null 2>&1; } || true
  fi
fi

# DVC: no analytics; the repo is initialised in git already (.dvc/ is committed).
"$venv/bin/dvc" config --local core.analytics false >/dev/null 2>&1 || true
"$venv/bin/python" - <<'PY'
import torch, monai, pydicom, prefect, dvc.version
cuda = f"CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}" if torch.version.cuda else "CPU build"
print(f"setup: torch {torch.__version__} ({cuda}), monai {monai.__version__}, pydicom {pydicom.__version__}, "
      f"prefect {prefect.__version__}, dvc {dvc.version.__version__}")
PY
