#!/usr/bin/env bash
# Installs the optional pre-trained style encoder gmi-mnv2-style: nsfwjs' MobileNetV2 (npm,
# MIT), rebuilt in PyTorch and saved as TorchScript with its encoder card
# (schemas/encoder-card.md), plus @tensorflow/tfjs for the parity test
# (tests/reference/test_mobilenet_parity.py).
#
#   scripts/install-encoders.sh [--dir DIR] [--force]
#
# DIR: $GMI_ENCODER_DIR, else ${XDG_DATA_HOME:-$HOME/.local/share}/gmi/encoders. Writes
#   DIR/gmi-mnv2-style/{card.json,mobilenet_v2_style.pt}  the encoder
#   DIR/gmi-style-mnv2/card.json                        the composite default (config/encoders/)
#   DIR/npm/                                            @tensorflow/tfjs (pure-JS CPU backend)
#   DIR/nsfwjs/package/                                 the unpacked nsfwjs tarball (the reference)
# Idempotent: an installed encoder whose files verify against its card is left alone (--force
# rebuilds it). Works offline afterwards. Without npm, or with the npm registry unreachable, it
# says so and exits 0: the built-in encoder stays the default (likewise without python3-torch).
# Exit 1 when the conversion fails, 2 on bad arguments.
set -euo pipefail

NSFWJS_VERSION=4.4.0
TFJS_VERSION=4.22.0
NAME=gmi-mnv2-style
PY=/usr/bin/python3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "install-encoders: $*" >&2; }
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

dir="${GMI_ENCODER_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/gmi/encoders}"
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) [ $# -ge 2 ] || { usage; exit 2; }; dir="$2"; shift 2 ;;
    --dir=*) dir="${1#--dir=}"; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) log "unknown argument: $1"; usage; exit 2 ;;
  esac
done
[ -n "$dir" ] || { log "empty --dir"; exit 2; }

# card.json present and every file it lists matches its sha256 (and the tfjs reference is there)
verify() {
  local d="$1"
  [ -f "$d/$NAME/card.json" ] || return 1
  [ -f "$d/npm/node_modules/@tensorflow/tfjs/package.json" ] || return 1
  [ -f "$d/nsfwjs/package/dist/models/mobilenet_v2/model.min.js" ] || return 1
  "$PY" - "$d/$NAME" <<'EOF' || return 1
import hashlib, json, os, sys
d = sys.argv[1]
try:
    card = json.load(open(os.path.join(d, "card.json")))
    files = card["files"]
    assert files
    for f in files:
        h = hashlib.sha256()
        with open(os.path.join(d, f["path"]), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        assert h.hexdigest() == f["sha256"], f["path"]
except Exception:
    sys.exit(1)
EOF
}

# The composite encoder (built-in descriptor + this network's statistics) that `auto` picks:
# a card without files of its own, kept in config/encoders/ and copied next to its part.
COMPOSITE=gmi-style-mnv2
install_composite() {
  local src="$HERE/../config/encoders/$COMPOSITE/card.json"
  mkdir -p "$dir/$COMPOSITE"
  if ! cmp -s "$src" "$dir/$COMPOSITE/card.json"; then
    cp "$src" "$dir/$COMPOSITE/.card.json.tmp" && mv "$dir/$COMPOSITE/.card.json.tmp" "$dir/$COMPOSITE/card.json"
    log "installed $dir/$COMPOSITE/card.json (the default encoder)"
  fi
}

if [ "$force" -eq 0 ] && verify "$dir"; then
  log "already installed: $dir/$NAME (files verify against card.json; --force rebuilds)"
  install_composite
  exit 0
fi

unreachable() {
  log "$1"
  log "npm registry unreachable: the built-in encoder stays the default"
  exit 0
}

# 1. npm
if ! command -v npm >/dev/null 2>&1; then
  if dpkg -s nodejs >/dev/null 2>&1; then
    # a nodejs from elsewhere (nodesource) without npm: Debian's npm would conflict with it
    unreachable "nodejs is installed but npm is not (not installing Debian's npm over it)"
  fi
  log "step 1/5: npm not found; installing Debian's nodejs + npm"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      unreachable "npm not found and no root to install it"
    fi
  fi
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs npm >&2; then
    unreachable "apt-get install nodejs npm failed"
  fi
  command -v npm >/dev/null 2>&1 || unreachable "npm still not found after apt-get"
else
  log "step 1/5: using $(command -v npm) $(npm --version 2>/dev/null || echo '?'), node $(node --version 2>/dev/null || echo '?')"
fi
# the converter needs Debian's python3-torch; without it the encoder is skipped like without npm
if [ ! -x "$PY" ] || ! "$PY" -c 'import torch, numpy' 2>/dev/null; then
  log "$PY cannot import torch/numpy (apt-get install python3-torch python3-numpy):" \
      "the built-in encoder stays the default"
  exit 0
fi

created_dir=0
[ -d "$dir" ] || created_dir=1
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
work="$(mktemp -d "$dir/.install.XXXXXX")"
# on any exit: drop the temp folder (and DIR itself if this run made it and left it empty)
trap 'rm -rf "$work"; if [ "$created_dir" -eq 1 ]; then rmdir "$dir" 2>/dev/null || true; fi' EXIT
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
# fail fast when the registry cannot be reached (npm's defaults retry for minutes)
export npm_config_fetch_retries="${npm_config_fetch_retries:-1}"
export npm_config_fetch_timeout="${npm_config_fetch_timeout:-30000}"
export npm_config_fetch_retry_maxtimeout="${npm_config_fetch_retry_maxtimeout:-10000}"

# 2. nsfwjs tarball (data only: never installed, never run)
log "step 2/5: npm pack nsfwjs@$NSFWJS_VERSION"
if ! (cd "$work" && npm pack --loglevel=error "nsfwjs@$NSFWJS_VERSION" >pack.out 2>pack.err); then
  grep -m 3 -E "npm (error|ERR!) (code|errno|FetchError|request|network|404)|npm error [A-Z]" "$work/pack.err" | sed 's/^/  /' >&2 || true
  unreachable "npm pack nsfwjs@$NSFWJS_VERSION failed"
fi
tgz="$work/nsfwjs-$NSFWJS_VERSION.tgz"
[ -f "$tgz" ] || { log "npm pack did not produce $tgz"; exit 1; }
mkdir -p "$work/nsfwjs"
tar -xzf "$tgz" -C "$work/nsfwjs" package/package.json package/LICENSE \
  package/dist/models/mobilenet_v2 2>/dev/null \
  || tar -xzf "$tgz" -C "$work/nsfwjs" package/package.json package/dist/models/mobilenet_v2
rm -f "$tgz"

# 3. @tensorflow/tfjs (pure JS; only the parity test uses it)
log "step 3/5: npm install --prefix $dir/npm @tensorflow/tfjs@$TFJS_VERSION"
mkdir -p "$work/npm"
echo '{"name":"gmi-encoder-reference","private":true}' >"$work/npm/package.json"
if ! npm install --prefix "$work/npm" --no-save --ignore-scripts --no-package-lock --loglevel=error \
     "@tensorflow/tfjs@$TFJS_VERSION" >"$work/npm.log" 2>&1; then
  grep -m 3 -E "npm (error|ERR!) (code|errno|FetchError|request|network|404)|npm error [A-Z]" "$work/npm.log" | sed 's/^/  /' >&2 || true
  unreachable "npm install @tensorflow/tfjs@$TFJS_VERSION failed"
fi

# 4. convert
log "step 4/5: converting the TF.js model to TorchScript"
t0=$(date +%s)
if ! "$PY" "$HERE/tfjs_to_torchscript.py" --package "$work/nsfwjs/package" --out "$work/enc" --quiet; then
  log "conversion failed (see above); nothing installed"
  exit 1
fi
log "step 4/5: converted in $(( $(date +%s) - t0 )) s"

# 5. move into place (each folder by rename: a reader never sees a half-written one)
log "step 5/5: installing into $dir"
for sub in npm nsfwjs "$NAME"; do
  src="$work/$sub"
  [ "$sub" = "$NAME" ] && src="$work/enc/$NAME"
  if [ -e "$dir/$sub" ]; then mv "$dir/$sub" "$work/old-$sub"; fi
  mv "$src" "$dir/$sub"
done
verify "$dir" || { log "installed files do not verify"; exit 1; }
install_composite
log "installed $dir/$NAME/card.json ($(du -h "$dir/$NAME/mobilenet_v2_style.pt" | cut -f1) module)"
