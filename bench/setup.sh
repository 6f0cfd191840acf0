#!/bin/sh
# Builds the bench suite's load generators on a fresh Debian bookworm machine,
# and does nothing when they are already built:
#
#   bench/.build/bin/benchmark          etcd's own tools/benchmark (W1-W3), built
#                                       from Debian's source package of etcd
#   bench/.build/bin/etcdbench-driver   bench/driver/main.go (W4-W7, compaction)
#
# Both are built offline in GOPATH mode (GO111MODULE=off) against the Go
# libraries of Debian's golang-*-dev packages under /usr/share/gocode.
# Installs with apt-get what is missing (needs root then): golang-go,
# golang-etcd-server-dev, dpkg-dev, etcd-server, etcd-client; adds a deb-src
# entry for bookworm main when apt has none.
set -eu
cd "$(dirname "$0")"
BENCH=$(pwd)
BUILD=$BENCH/.build
BIN=$BUILD/bin
mkdir -p "$BIN"

export GO111MODULE=off
export GOFLAGS=
export GOCACHE="$BUILD/gocache"
export GOTOOLCHAIN=local
SYS_GOPATH=/usr/share/gocode

log() { echo "bench/setup: $*" >&2; }

apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then
        apt-get update -q >&2
        apt_updated=1
    fi
}

need_root() {
    [ "$(id -u)" = 0 ] || { log "need root to $*"; exit 1; }
}

# -- Debian packages ---------------------------------------------------------
missing=""
command -v go >/dev/null 2>&1 || missing="$missing golang-go"
[ -d "$SYS_GOPATH/src/go.etcd.io/etcd/clientv3" ] || missing="$missing golang-etcd-server-dev"
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v etcdctl >/dev/null 2>&1 || missing="$missing etcd-client"
if [ ! -x "$BIN/benchmark" ]; then
    command -v dpkg-source >/dev/null 2>&1 || missing="$missing dpkg-dev"
fi
if [ -n "$missing" ]; then
    need_root "apt-get install$missing"
    log "installing$missing"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >&2
fi

# -- etcd's tools/benchmark, from Debian's source package ----------------------
if [ ! -x "$BIN/benchmark" ]; then
    # the source version that matches the installed Go sources
    ver=$(dpkg-query -W -f='${Version}' golang-etcd-server-dev 2>/dev/null || true)
    [ -n "$ver" ] || ver=$(dpkg-query -W -f='${Version}' etcd-server | sed 's/+b[0-9]*$//')
    upver=${ver%-*}
    srcdir="$BUILD/src/etcd-$ver"
    if [ ! -d "$srcdir/tools/benchmark" ]; then
        mkdir -p "$BUILD/src"
        cd "$BUILD/src"
        if ! apt-get source --print-uris "etcd=$ver" 2>/dev/null | grep -q "'http"; then
            need_root "add a deb-src entry for bookworm main"
            log "adding deb-src for bookworm main (/etc/apt/sources.list.d/etcdproxy-bench-src.sources)"
            cat > /etc/apt/sources.list.d/etcdproxy-bench-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            apt_updated=""
            apt_update
        fi
        log "fetching source package etcd=$ver"
        rm -rf "$srcdir"
        apt-get source --download-only "etcd=$ver" >&2
        dpkg-source -x "etcd_$ver.dsc" "$srcdir.tmp" >&2
        mv "$srcdir.tmp" "$srcdir"
        cd "$BENCH"
    fi
    # tools/ is not in golang-etcd-server-dev (DH_GOLANG_EXCLUDES=tools): copy
    # it into a GOPATH of our own, in front of Debian's.
    gp="$BUILD/gopath"
    rm -rf "$gp/src/go.etcd.io/etcd/tools"
    mkdir -p "$gp/src/go.etcd.io/etcd/tools"
    cp -r "$srcdir/tools/benchmark" "$gp/src/go.etcd.io/etcd/tools/"
    log "building tools/benchmark (etcd $upver) with $(go version)"
    (cd "$gp/src/go.etcd.io/etcd/tools/benchmark" && \
        GOPATH="$gp:$SYS_GOPATH" go build -o "$BIN/benchmark.tmp" .)
    mv "$BIN/benchmark.tmp" "$BIN/benchmark"
fi

# -- our driver ----------------------------------------------------------------
drv="$BIN/etcdbench-driver"
if [ ! -x "$drv" ] || [ "$BENCH/driver/main.go" -nt "$drv" ]; then
    log "building etcdbench-driver"
    (cd "$BENCH/driver" && GOPATH="$SYS_GOPATH" go build -o "$drv.tmp" .)
    mv "$drv.tmp" "$drv"
fi

"$BIN/benchmark" --help >/dev/null
log "ready: $BIN/benchmark $drv"
