#!/usr/bin/env bash
# Check a steinpix image as a user runs it: `docker run -u UID:GID -v DATA:/data IMAGE classify
# ilastik run --engine ENGINE` on tests/data/reference/ilastik_img with the example's project
# must give the reference probabilities pixel for pixel, owned by the caller; the built-in engine
# must not compile at start-up (its kernels are cached in the image).
#
#   .github/check-image.sh IMAGE --engine builtin [--engine ilastik ...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
image="$1"
shift
engines=()
while [ "$#" -gt 0 ]; do
    [ "$1" = "--engine" ] && engines+=("$2") && shift
    shift
done
docker image inspect --format "$image: {{.Os}}/{{.Architecture}}, {{.Size}} bytes" "$image"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$repo/tests/data/reference/ilastik_img" "$work/"
cp "$repo/examples/imc-mock/pretrained.ilp" "$work/"
platform="$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$image")"
for engine in "${engines[@]}"; do
    start=$SECONDS
    docker run --rm --platform "$platform" --network none -u "$(id -u):$(id -g)" \
        -v "$work:/data" "$image" classify ilastik run --engine "$engine" \
        --ilp pretrained.ilp -o "${engine}_probabilities" -v INFO 2>&1 | tee "$work/$engine.log"
    echo "$engine: $((SECONDS - start)) s"
    if [ "$engine" = builtin ] && grep -q "Compiling the built-in engine" "$work/$engine.log"; then
        echo "the built-in engine compiled at start-up: the image's numba cache was not used" >&2
        exit 1
    fi
done
REFERENCE="$repo/tests/data/reference/ilastik_probabilities" WORK="$work" python - "${engines[@]}" <<'PY'
import os
import sys
from pathlib import Path

import numpy as np
import tifffile

reference, work = Path(os.environ["REFERENCE"]), Path(os.environ["WORK"])
for engine in sys.argv[1:]:
    for ref in sorted(reference.glob("*.tiff")):
        out = work / f"{engine}_probabilities" / ref.name
        np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(ref), str(out))
        assert out.stat().st_uid == os.getuid(), f"{out} is not owned by the caller"
        print(out.relative_to(work), "matches the reference")
PY
