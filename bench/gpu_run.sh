#!/usr/bin/env bash
# The GPU machine's side of docs/gpu.md ("Benchmarking on a GPU"). Run from the repository root.
#
#   bash bench/gpu_run.sh collect           keep the parts carried in .gpu/ by this call (every call)
#   bash bench/gpu_run.sh bench OUT_DIR [FLAGS]   collect, join, check, install the wheels, then
#                                           python -m bench.gpu [FLAGS] (e.g. --dry-run to rehearse on a CPU)
#   bash bench/gpu_run.sh base OUT_DIR      python -m bench.gpu_base (the base preset's build) on .gpu-base/
#
# Parts are kept in $TEXTGEN_GPU_DIR (default /tmp/textgen-gpu), which lasts as long as the machine.
# The wheels go to $TEXTGEN_GPU_DIR/site, put first on PYTHONPATH: its onnxruntime-gpu shadows any
# other onnxruntime the machine's Python has, without touching that Python's own packages.
set -euo pipefail

DIR=${TEXTGEN_GPU_DIR:-/tmp/textgen-gpu}
PY=${PYTHON:-python3}
ARCHIVE=textgen-gpu.tar

collect() {
    mkdir -p "$DIR/parts"
    if compgen -G ".gpu/$ARCHIVE.part-*" >/dev/null; then cp .gpu/$ARCHIVE.part-* "$DIR/parts/"; fi
    if [ -f .gpu/SHA256 ]; then cp .gpu/SHA256 "$DIR/"; fi
    echo "parts kept in $DIR/parts:"
    ls -l "$DIR/parts"
}

# Folders of the CUDA libraries that pip's nvidia-* packages put next to PyTorch (cuBLAS, cuDNN, ...).
nvidia_libs() {
    "$PY" - <<'EOF'
import glob, os, site
dirs = {os.path.dirname(f) for sp in site.getsitepackages()
        for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
}

environment() {
    export PYTHONPATH="$DIR/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    local libs
    libs=$(nvidia_libs)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONUNBUFFERED=1
}

install() {
    collect
    [ -f "$DIR/SHA256" ] || { echo "error: no SHA256 carried (it comes with the parts: .gpu/SHA256)"; exit 2; }
    cat "$DIR"/parts/$ARCHIVE.part-* >"$DIR/$ARCHIVE"
    (cd "$DIR" && sha256sum -c SHA256) || { echo "error: the joined archive is incomplete or damaged"; exit 2; }
    rm -rf "$DIR/payload" "$DIR/site"
    mkdir -p "$DIR/payload"
    tar -xf "$DIR/$ARCHIVE" -C "$DIR/payload"
    rm "$DIR/$ARCHIVE"
    if compgen -G "$DIR/payload/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DIR/site" \
            "$DIR"/payload/wheels/*.whl
    fi
}

case "${1:-}" in
collect)
    collect
    ;;
bench)
    out=${2:?usage: bench/gpu_run.sh bench OUT_DIR [FLAGS]}
    shift 2
    install
    environment
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
    status=0
    "$PY" -m bench.gpu --bundle "$DIR/payload/small" --fp16-bundle "$DIR/payload/small-fp16" \
        --checkpoint "$DIR/payload/small.pt" --out "$out" "$@" || status=$?
    # What comes back from the machine is a few files: the logs travel as one archive.
    (cd "$out" && tar -czf logs.tgz ./*.log && rm -f ./*.log) || true
    ls -l "$out"
    exit $status
    ;;
base)
    out=${2:?usage: bench/gpu_run.sh base OUT_DIR}
    environment
    "$PY" -m bench.gpu_base --data-dir .gpu-base/data --out "$out"
    ;;
*)
    echo "usage: bash bench/gpu_run.sh collect | bench OUT_DIR [FLAGS] | base OUT_DIR" >&2
    exit 2
    ;;
esac
