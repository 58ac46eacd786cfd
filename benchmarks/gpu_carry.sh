#!/usr/bin/env bash
# Prepare what bench_gpu_runner.py needs on a lent GPU machine (torch, onnxruntime, numpy, scipy, scikit-image,
# tifffile, Pillow and PyYAML are there; nothing can be downloaded there), within the 64 MiB that travel:
#
#   .gpusite/  the slide stack unpacked for Python 3.12 (openslide-python + openslide-bin, simplejpeg, pydantic,
#              and imagecodecs cut down to its JPEG codec, 6 of its 80 MB), put on PYTHONPATH there;
#   .gpudata/  make_lymph_node_slide.py's slide (benchmarks/results/lymph_node.tiff, 11 MB).
#
# The repository's tracked files (188 MB: every registered version's weights) do not fit beside them, so the run
# goes from a checkout holding only zoo/ (without zoo/data), benchmarks/*.py, registry.yaml, .gitignore and the
# three networks it runs (models/tissue-multires/1.0.0/tissue-multires.onnx,
# models/tumour-tiles/1.2.0/tumour-tiles.onnx, models/tumour-h2g/1.0.0/refine.onnx): 29 MB. Then, there:
#
#   export PYTHONPATH=$PWD/.gpusite PYTHONUNBUFFERED=1
#   python3 benchmarks/bench_gpu_runner.py --lymph .gpudata/lymph_node.tiff --out $OUT/bench_gpu_runner.json \
#       --deadline-s 330
#
# with .gpusite and .gpudata carried (about 6 minutes on an H100 with the default grid; see the script).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
for pkg in openslide-python openslide-bin simplejpeg imagecodecs pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions; do
    v=$("$py" -c "import importlib.metadata as m; print(m.version('$pkg'))")
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$wheels" "$pkg==$v"
done
rm -rf .gpusite .gpudata
mkdir -p .gpusite .gpudata
for w in "$wheels"/*.whl; do unzip -q -o "$w" -d .gpusite; done
# imagecodecs: keep the JPEG codec (tifffile writes the mosaics with it) and what it loads
keep=" _shared.abi3.so _shared_cython.abi3.so _imcd.abi3.so _jpeg8.abi3.so _zlib.abi3.so "
for f in .gpusite/imagecodecs/*.so; do [[ $keep == *" $(basename "$f") "* ]] || rm "$f"; done
for f in .gpusite/imagecodecs.libs/*; do [[ $(basename "$f") == libjpeg-* ]] || rm "$f"; done
rm -rf .gpusite/imagecodecs/licenses .gpusite/imagecodecs/numcodecs.py
cp benchmarks/results/lymph_node.tiff .gpudata/
grep -qx '/.gpusite/' .git/info/exclude 2>/dev/null || printf '/.gpusite/\n/.gpudata/\n' >>.git/info/exclude
du -sh .gpusite .gpudata
