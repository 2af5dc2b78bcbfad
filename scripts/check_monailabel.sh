#!/usr/bin/env bash
# End-to-end check of the MONAI Label app (monai_ext/label_app) on a real `monailabel start_server`.
#
#   scripts/check_monailabel.sh            # prints progress, ends with "PASS: ..." (exit 0) or "FAIL: ..." (exit 1)
#
# What it does, in a temporary folder (removed at the end):
#   1. builds a side virtual environment with `python -m venv --system-site-packages`, so the torch (CPU or
#      CUDA, whichever is installed) of the calling Python is reused; torch, numpy and monai are pinned to the
#      calling Python's versions, so nothing replaces them; the calling environment is never changed;
#   2. installs monailabel there with --no-deps plus an explicit list of the runtime dependencies the server
#      needs (no torchvision, no sam2: its source build pulls a CUDA torch), with the upper pins monailabel
#      0.8.5 needs against today's releases (pydicom<3, dicomweb-client<0.60, pynetdicom<2.1) and pydicom-seg
#      without its stale numpy<2 / jsonschema<4 pins (only its import is needed);
#   3. installs this package (a copy of the repository's package sources, not editable) into it;
#   4. writes a study (one brain image) and an atlas (another brain image and its label map): the two held-out
#      brains the package embeds (monai_ext/demo_data, 2 mm, LIA storage), T1-like contrast synthesised as
#      in the demo;
#   5. starts `monailabel start_server` on 127.0.0.1 (a free port) with the app, the study folder and the
#      bundle bundles/sitreg_brain (shipped weights) as the registration model on its own model grid (the
#      `shape` and `spacing` of its inference.json: 88x104x88 voxels of 2 mm, world space), waits for GET /info/;
#   6. sends POST /infer/atlas_propagation for the study and saves the returned label map;
#   7. computes the same propagation directly in Python (monai_ext.label_app.atlas.propagate_atlas, same
#      weights, same thread count) and compares: the returned label map must have the study image's shape,
#      its affine within 1e-4 mm, and exactly the same label in every voxel (tolerance: 0 differing voxels);
#   8. stops the server (always, also on failure or Ctrl-C) and prints PASS or FAIL (exit status 0 / 1).
#   It also prints, for information only, the mean Dice of the returned label map with the study's own label map
#   and that of the unregistered atlas labels.
#
# Environment:
#   PYTHON               the Python whose torch is reused (default: python3, else python)
#   MONAILABEL_VENV      keep the side environment at this path and reuse it on the next run (default: temporary)
#   MONAILABEL_VERSION   monailabel release to install (default 0.8.5, the one this check was written against)
#   MONAILABEL_BUNDLE    registration bundle serving the app (default: <repo>/bundles/sitreg_brain)
#   MONAILABEL_SPATIAL_SIZE, MONAILABEL_PIXDIM
#                        the app's --conf spatial_size / pixdim (default: the bundle's `shape` / `spacing`;
#                        MONAILABEL_PIXDIM= (empty) for the array-resize preprocessing)
#   MONAILABEL_TIMEOUT   seconds to wait for the server to start and for the inference (default 600 each)
#   OMP_NUM_THREADS      torch threads of the server and of the direct computation (default 1; they must match
#                        for voxel-exact equality)
#
# Heavy (packages from PyPI into a side environment of about 400 MB, mostly SimpleITK; a server; two
# registrations on CPU; about 3 minutes on 2 cores with the downloads): not part of the default tests or CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
MONAILABEL_VERSION="${MONAILABEL_VERSION:-0.8.5}"
BUNDLE="${MONAILABEL_BUNDLE:-$ROOT/bundles/sitreg_brain}"
TIMEOUT="${MONAILABEL_TIMEOUT:-600}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
MODEL=atlas_propagation
STUDY=brain

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check_monailabel.XXXXXX")"
VENV="${MONAILABEL_VENV:-$WORK/venv}"
SERVER_PID=""
cd "$WORK"  # so that no Python below imports monai_ext from the current folder instead of the side environment

say() { printf '[check_monailabel] %s\n' "$*"; }

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        say "stopping the server (pid $SERVER_PID)"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_server
    if [ "$status" -ne 0 ] && [ -f "$WORK/server.log" ]; then
        say "last lines of the server log:"
        tail -n 40 "$WORK/server.log" | sed 's/^/    /'
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; echo "FAIL: interrupted"; exit 130' INT
trap 'say "terminated"; echo "FAIL: terminated"; exit 143' TERM

fail() {
    say "$*"
    echo "FAIL: $*"
    exit 1
}

# pip in the side environment, its output in $WORK/pip.log (shown on failure). pip's resolver warnings about
# monailabel's skipped requirements (sam2, ninja, numpymaxflow, torchvision) and pydicom-seg's numpy<2 pin are
# expected: those parts of monailabel are not used.
venv_pip() {
    "$VENV/bin/python" -m pip install -c "$PINS" "$@" >> "$WORK/pip.log" 2>&1 || {
        tail -n 30 "$WORK/pip.log" | sed 's/^/    /'
        fail "pip install $* failed"
    }
}

[ -f "$BUNDLE/configs/inference.json" ] || fail "no bundle at $BUNDLE"
[ -f "$BUNDLE/models/model.pt" ] || fail "the bundle $BUNDLE has no weights (models/model.pt)"
"$PYTHON" -c "import torch, numpy, monai" 2>/dev/null || fail "$PYTHON cannot import torch, numpy and monai"

# 1. the side environment
PINS="$WORK/constraints.txt"
"$PYTHON" - "$PINS" <<'EOF'
import sys
from importlib.metadata import version

with open(sys.argv[1], "w") as f:
    for name in ("torch", "numpy", "monai"):
        f.write(f"{name}=={version(name)}\n")
EOF
say "calling Python: $PYTHON (pinned in the venv: $(tr '\n' ' ' < "$PINS"))"
READY="$VENV/.check_monailabel_ready"  # written once monailabel and its dependencies are in
if [ -f "$READY" ]; then
    say "reusing the side environment $VENV"
else
    say "creating the side environment $VENV (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # 2. monailabel without its declared dependencies, then the ones the server imports
    say "installing monailabel $MONAILABEL_VERSION (--no-deps) and its runtime dependencies"
    venv_pip --no-deps "monailabel==$MONAILABEL_VERSION" "pydicom-seg>=0.4.1"
    venv_pip \
        "pydicom>=2.4.4,<3" "dicomweb-client[gcp]>=0.59.1,<0.60" "pynetdicom>=2.0.2,<2.1" SimpleITK \
        "uvicorn>=0.29" "fastapi>=0.110.2" "pydantic>=2.7" "pydantic-settings>=2.2.1" "python-dotenv>=1.0.1" \
        "python-multipart>=0.0.9" "httpx>=0.27" "requests>=2.31" "requests-toolbelt>=1.0" "urllib3>=2.2.1" \
        "schedule>=1.2.1" "timeloop>=1.0.2" "expiringdict>=1.2.2" "expiring_dict>=1.1.0" "cachetools>=5.3.3" \
        "watchdog>=4.0" "pynrrd>=1.0" "pyyaml>=6.0.1" "filelock>=3.11" "passlib>=1.7.4" "pyjwt>=2.8" \
        "bcrypt>=4.1.2" "google-auth>=2.29" "girder-client>=3.2.3" "shapely>=2.0.4" "einops>=0.7" psutil \
        scipy scikit-learn nibabel itk
    touch "$READY"
fi

# 3. this package, from a copy of its sources (a build must not write into the repository)
say "installing monai_ext from $ROOT into the side environment"
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/monai_ext" "$WORK/src/"
[ -f "$ROOT/LICENSE" ] && cp "$ROOT/LICENSE" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
venv_pip --no-deps --force-reinstall "$WORK/src"

APP="$("$VENV/bin/python" - "$VENV" <<'EOF'
import os
import sys

import torch

import monai_ext.label_app as app
import monailabel

venv = os.path.realpath(sys.argv[1])
here = os.path.realpath(app.__file__)
if not here.startswith(venv + os.sep):
    sys.exit(f"monai_ext.label_app comes from {here}, not from the side environment {venv}")
print(os.path.dirname(here))
print(f"torch {torch.__version__}, monailabel {monailabel.__version__}", file=sys.stderr)
EOF
)" || fail "the side environment does not import monai_ext / monailabel / torch"
say "app folder: $APP"

# 4. study and atlas
say "writing the study and the atlas (embedded held-out brains, synthetic T1-like contrast)"
STUDIES="$WORK/studies"
DATA="$WORK/data"
GRID="$("$VENV/bin/python" - "$DATA" "$STUDIES" "$STUDY" "$BUNDLE" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

from monai_ext.demo import write_demo_pair

data, studies, study, bundle = (Path(p) for p in sys.argv[1:5])
paths = write_demo_pair(data)
studies.mkdir(parents=True)
shutil.copy(paths["fixed_image"], studies / f"{study}.nii.gz")
config = json.loads((bundle / "configs" / "inference.json").read_text())
print(",".join(str(int(s)) for s in config.get("shape", [])), config.get("spacing", ""))
EOF
)" || fail "could not write the study and the atlas"
read -r SPATIAL PIXDIM <<< "$GRID"
SPATIAL="${MONAILABEL_SPATIAL_SIZE:-$SPATIAL}"
PIXDIM="${MONAILABEL_PIXDIM-$PIXDIM}"
[ -n "$SPATIAL" ] || fail "no model grid: the bundle's inference.json has no 'shape'; set MONAILABEL_SPATIAL_SIZE"
GRID_CONF=(--conf spatial_size "$SPATIAL")
[ -n "$PIXDIM" ] && GRID_CONF+=(--conf pixdim "$PIXDIM")
say "study $STUDIES/$STUDY.nii.gz; atlas $DATA/moving.nii.gz + moving_label.nii.gz; model grid $SPATIAL" \
    "$([ -n "$PIXDIM" ] && echo "of $PIXDIM mm voxels, world space" || echo "(array resize)")"

# 5. the server
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
say "starting monailabel start_server on 127.0.0.1:$PORT (log: $WORK/server.log)"
SETSID=""
command -v setsid > /dev/null && SETSID=setsid  # own process group: stopping it stops any worker it started
# `monailabel start_server ...`: the `monailabel` launcher is a shell script running `python -m monailabel.main` with
# whatever `python` is first on PATH and unquoted arguments, so the side environment's Python runs it directly
$SETSID "$VENV/bin/python" -m monailabel.main start_server --app "$APP" --studies "$STUDIES" --host 127.0.0.1 --port "$PORT" \
    --conf bundle "$BUNDLE" "${GRID_CONF[@]}" \
    --conf atlas_image "$DATA/moving.nii.gz" --conf atlas_label "$DATA/moving_label.nii.gz" \
    > "$WORK/server.log" 2>&1 < /dev/null &
SERVER_PID=$!

say "waiting for GET /info/ (at most ${TIMEOUT} s)"
"$VENV/bin/python" - "$PORT" "$TIMEOUT" "$SERVER_PID" "$MODEL" <<'EOF' || fail "the server did not come up (its log follows)"
import json
import os
import sys
import time
import urllib.request

port, timeout, pid, model = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server process exited")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=10) as response:
            info = json.load(response)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("timed out")
        time.sleep(2)
models = info.get("models", {})
if model not in models:
    sys.exit(f"/info/ lists the models {sorted(models)}, not {model}")
print(f"[check_monailabel] /info/: app {info.get('name')!r}, model {model!r} ({models[model].get('type')}), "
      f"{len(models[model].get('labels', {}))} labels")
EOF

# 6. one inference request
say "POST /infer/$MODEL?image=$STUDY (at most ${TIMEOUT} s)"
"$VENV/bin/python" - "$PORT" "$TIMEOUT" "$MODEL" "$STUDY" "$WORK/returned.nii.gz" <<'EOF' || fail "POST /infer/$MODEL failed"
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

port, timeout, model, study, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
body = urllib.parse.urlencode({"params": "{}"}).encode()
url = f"http://127.0.0.1:{port}/infer/{model}?image={urllib.parse.quote(study)}&output=image"
start = time.perf_counter()
try:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=timeout) as response:
        payload = response.read()
except urllib.error.HTTPError as error:
    sys.exit(f"HTTP {error.code}: {error.read()[:500]!r}")
with open(out, "wb") as f:
    f.write(payload)
print(f"[check_monailabel] HTTP 200, {len(payload)} bytes in {time.perf_counter() - start:.1f} s")
EOF
stop_server

# 7. the same propagation, directly
say "computing the same propagation directly in Python (monai_ext.label_app.atlas.propagate_atlas)"
"$VENV/bin/python" - "$BUNDLE" "$DATA" "$STUDIES/$STUDY.nii.gz" "$WORK/returned.nii.gz" "$SPATIAL" "$PIXDIM" <<'EOF'
import sys

import nibabel as nib
import numpy as np
import torch

from monai_ext.io.native import load_image
from monai_ext.label_app.atlas import bundle_network, bundle_refinement, load_atlas, propagate_atlas

bundle, data, study, returned_path = sys.argv[1:5]
spatial = [int(s) for s in sys.argv[5].split(",")]
pixdim = float(sys.argv[6]) if sys.argv[6] else None
atlas_image, atlas_label = load_atlas(f"{data}/moving.nii.gz", f"{data}/moving_label.nii.gz", spatial, pixdim)
native_label = load_image(f"{data}/moving_label.nii.gz", label=True)
expected = propagate_atlas(
    bundle_network(bundle), atlas_image, atlas_label, study, spatial, pixdim, native_label, **bundle_refinement(bundle)
)


class Identity(torch.nn.Module):
    """Zero displacement: the atlas labels carried over unregistered (for the information line only)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(x.shape[0], x.ndim - 2, *x.shape[2:], dtype=x.dtype)


unregistered = propagate_atlas(Identity(), atlas_image, atlas_label, study, spatial, pixdim)[0].numpy()
expected_labels = expected[0].numpy().astype(np.int64)
expected_affine = expected.affine.numpy()

study_image = nib.load(study)
returned = nib.load(returned_path)
got = np.asarray(returned.dataobj)
truth = np.asarray(nib.load(f"{data}/fixed_label.nii.gz").dataobj).astype(np.int64)


def mean_dice(a, b, labels):
    scores = [2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]
    return float(np.mean(scores))


problems = []
if got.shape != study_image.shape or expected_labels.shape != study_image.shape:
    problems.append(f"shapes: returned {got.shape}, direct {expected_labels.shape}, study image {study_image.shape}")
affine_error = float(np.abs(returned.affine - study_image.affine).max())
if affine_error > 1e-4 or not np.allclose(expected_affine, study_image.affine, atol=1e-4):
    problems.append(f"affine: returned differs from the study image's by {affine_error:.2e} mm")
if not problems:
    got = got.astype(np.int64)
    labels = [v for v in np.unique(np.concatenate([np.unique(got), np.unique(expected_labels)])) if v != 0]
    differing = int(np.sum(got != expected_labels))
    print(f"[check_monailabel] returned {got.shape} {returned.get_data_dtype()}, affine max error {affine_error:.1e} mm; "
          f"{differing} of {got.size} voxels differ from the direct propagation "
          f"(mean Dice over {len(labels)} labels {mean_dice(got, expected_labels, labels):.4f})")
    truth_labels = [v for v in np.unique(truth) if v != 0]
    print(f"[check_monailabel] (information) mean Dice with the study's own label map over {len(truth_labels)} "
          f"structures: {mean_dice(got, truth, truth_labels):.3f} (atlas labels unregistered: "
          f"{mean_dice(unregistered, truth, truth_labels):.3f})")
    if differing:
        problems.append(f"{differing} voxels differ from the direct propagation (tolerance 0)")
if problems:
    print("FAIL: " + "; ".join(problems))
    sys.exit(1)
print(f"PASS: POST /infer/atlas_propagation on a real monailabel server returned the label map of the direct "
      f"propagation, voxel for voxel, on the study image's grid {got.shape}")
EOF
