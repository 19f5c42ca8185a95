#!/usr/bin/env bash
# Install the `mm` extra (mmengine, mmcv 2.1.0 with its CPU ops, mmdet 3.3.0, mmsegmentation 1.2.2)
# into the environment of the given Python. mmcv is built from source against the installed torch;
# pip caches the built wheel, so a machine pays for the build (10-30 minutes on 2 cores) once.
#
#   tools/install_mm.sh .venv/bin/python
#
# GPU users can instead install a prebuilt mmcv 2.1.0 wheel for their torch/CUDA from OpenMMLab.
set -euo pipefail
PY=${1:-python3}
if "$PY" -c "import mmcv._ext, mmdet, mmseg" 2>/dev/null; then
    exit 0
fi
# mmcv's setup.py and mmengine import pkg_resources, which setuptools 81+ no longer ships
"$PY" -m pip install --quiet "setuptools>=77.0.3,<81" wheel ninja numpy mmengine==0.10.7
# torch >= 2.10 headers need C++20, while mmcv 2.1.0's setup.py appends -std=c++17 after torch's
# own flag; a compiler wrapper lifts the standard instead of patching mmcv
wrapper_dir=$(mktemp -d)
trap 'rm -rf "$wrapper_dir"' EXIT
cat > "$wrapper_dir/c++" <<'WRAPPER'
#!/bin/sh
for arg in "$@"; do
    case "$arg" in -std=c++14|-std=c++17) arg=-std=c++20 ;; esac
    set -- "$@" "$arg"; shift
done
exec c++ "$@"
WRAPPER
chmod +x "$wrapper_dir/c++"
# without --no-build-isolation the build fails or silently produces a wheel without mmcv._ext
CXX="$wrapper_dir/c++" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" -m pip install --no-build-isolation mmcv==2.1.0
"$PY" -m pip install --quiet mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex
"$PY" -c "import mmcv._ext, mmdet, mmseg; print('mm extra ready: mmcv', __import__('mmcv').__version__)"
