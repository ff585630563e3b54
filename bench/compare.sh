#!/usr/bin/env bash
# Runs the same benchmark scenarios against chatd, ejabberd and Prosody on
# this machine and writes a Markdown table, JSON and a PNG chart.
#
#   bench/compare.sh                 # full run, 10,000 sessions
#   bench/compare.sh --quick         # 200 sessions (or BENCH_QUICK=1)
#   bench/compare.sh --smoke --servers chatd   # a few sessions, seconds
#
# See bench/README.md for every option and what the figures mean.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<EOF
usage: bench/compare.sh [options] [-- extra 'chatd-bench run' options]

  --quick             200 sessions, short steps (env BENCH_QUICK=1)
  --smoke             a few sessions for a few seconds (env BENCH_SMOKE=1)
  --sessions N        concurrent sessions (default 10000; env BENCH_SESSIONS)
  --servers LIST      comma-separated subset of chatd,ejabberd,prosody,reference
                      (env BENCH_SERVERS; default chatd,ejabberd,prosody;
                      "reference" is chatd-bench's own minimal in-memory router,
                      the floor set by the generator and the kernel)
  --out DIR           results directory (default bench/results; env BENCH_OUT)
  --target-dir DIR    cargo target directory for the release builds
                      (default: the repository's target/; env BENCH_TARGET_DIR)
  --no-build          use the binaries already in the target directory
  --keep              keep the servers' temporary data and logs
  --serve NAME        only set up NAME (config and accounts) and run it in the
                      foreground on its benchmark port until interrupted
  -h, --help          this text
EOF
}

MODE=full
[[ "${BENCH_QUICK:-0}" == 1 ]] && MODE=quick
[[ "${BENCH_SMOKE:-0}" == 1 ]] && MODE=smoke
SESSIONS="${BENCH_SESSIONS:-}"
SERVERS="${BENCH_SERVERS:-chatd,ejabberd,prosody}"
OUT="${BENCH_OUT:-$ROOT/bench/results}"
TARGET_DIR="${BENCH_TARGET_DIR:-$ROOT/target}"
BUILD=1
KEEP=0
SERVE=""
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) MODE=quick; shift ;;
        --smoke) MODE=smoke; shift ;;
        --sessions) SESSIONS="$2"; shift 2 ;;
        --servers) SERVERS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --target-dir) TARGET_DIR="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --serve) SERVE="$2"; SERVERS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Ports below the ephemeral range (32768+): the generator's own client
# sockets can hold any port in that range.
port_free() { [[ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }
free_port() {  # the first port from $1 on that nothing listens on
    local p=$1
    while ! port_free "$p"; do p=$((p + 1)); done
    echo "$p"
}
CHATD_PORT=$(free_port "${BENCH_CHATD_PORT:-15222}")
EJABBERD_PORT=$(free_port "${BENCH_EJABBERD_PORT:-15322}")
PROSODY_PORT=$(free_port "${BENCH_PROSODY_PORT:-15422}")
REFERENCE_PORT=$(free_port "${BENCH_REFERENCE_PORT:-15522}")
DOMAIN=localhost
PASSWORD=bench-secret
NOFILE="${BENCH_NOFILE:-20000}"

# Scenario sizes per mode.
case "$MODE" in
    full)
        SESSIONS="${SESSIONS:-10000}"
        RUN_ARGS=(--offline-users 1000 --offline-messages 20000 --offline-senders 100)
        ;;
    quick)
        SESSIONS="${SESSIONS:-200}"
        RUN_ARGS=(--offline-users 50 --offline-messages 1000 --offline-senders 20
                  --rates 500,1000,2000,5000,10000,20000 --step-secs 3 --drain-secs 3
                  --warmup-secs 1 --settle 2)
        ;;
    smoke)
        SESSIONS="${SESSIONS:-6}"
        RUN_ARGS=(--smoke)
        QUIET_WAIT="${BENCH_QUIET_WAIT:-0}"
        ;;
esac
case "$MODE" in
    full) OFFLINE_USERS=1000 ;;
    quick) OFFLINE_USERS=50 ;;
    smoke) OFFLINE_USERS=3 ;;
esac
ACCOUNTS=$((SESSIONS + OFFLINE_USERS))

QUIET_WAIT="${QUIET_WAIT:-${BENCH_QUIET_WAIT:-120}}"   # seconds to wait for other load to end
QUIET_BUSY="${BENCH_QUIET_BUSY:-25}"    # machine busy % (of all cores) counted as quiet

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- limits ---
# Servers and generator inherit a higher scheduling priority, so other
# people's builds on the same machine disturb the figures less.
NICE="${BENCH_NICE:--10}"
if [[ "$NICE" != 0 ]]; then renice -n "$NICE" -p $$ >/dev/null 2>&1 || log "cannot renice to $NICE"; fi
hard=$(ulimit -Hn)
if [[ "$hard" != unlimited && "$hard" -lt "$NOFILE" ]]; then NOFILE="$hard"; fi
ulimit -n "$NOFILE" || die "cannot set the open-files limit to $NOFILE"
log "open-files limit for servers and generator: $(ulimit -n)"

# ----------------------------------------------------------------- build ---
BENCH="$TARGET_DIR/release/chatd-bench"
CHATD="$TARGET_DIR/release/chatd"
if [[ "$BUILD" == 1 ]]; then
    log "building chatd and chatd-bench (release, target dir $TARGET_DIR)"
    if [[ ",$SERVERS," == *,chatd,* ]]; then
        (cd "$ROOT" && cargo build --release -p chatd --target-dir "$TARGET_DIR")
    fi
    (cd "$ROOT" && cargo build --release -p chatd-bench --target-dir "$TARGET_DIR")
fi
[[ -x "$BENCH" ]] || die "$BENCH not found (build it or drop --no-build)"

# -------------------------------------------------------------- packages ---
need_pkgs=()
[[ ",$SERVERS," == *,ejabberd,* ]] && ! command -v ejabberdctl >/dev/null && need_pkgs+=(ejabberd)
[[ ",$SERVERS," == *,prosody,* ]] && ! command -v prosody >/dev/null && need_pkgs+=(prosody)
[[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need_pkgs+=(fonts-dejavu-core)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing ${need_pkgs[*]}"
    [[ $(id -u) == 0 ]] || die "installing packages needs root"
    # Keep the packages' own services from starting: this script runs the
    # servers itself, on other ports, with its own configuration.
    guard=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null; }
    [[ "$guard" == 1 ]] && rm -f /usr/sbin/policy-rc.d
    # If a service started anyway (a policy-rc.d that allows it), stop it.
    for svc in ejabberd prosody; do
        [[ " ${need_pkgs[*]} " == *" $svc "* ]] || continue
        if [[ -d /run/systemd/system ]]; then
            systemctl stop "$svc" >/dev/null 2>&1 || true
        else
            service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
fi

# ---------------------------------------------------------------- servers ---
WORK="$(mktemp -d /tmp/chatd-bench.XXXXXX)"
SERVER_PID=""      # the process measured (and stopped)
WRAPPER_PID=""     # the process started by this script, if different
EPMD_STARTED=0
cleanup() {
    stop_server || true
    if [[ "$EPMD_STARTED" == 1 ]]; then epmd -kill >/dev/null 2>&1 || true; fi
    if [[ "$KEEP" == 1 ]]; then log "server data and logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listener_pid() {  # PID of the process listening on 127.0.0.1:$1
    ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n1
}

wait_listening() {  # port timeout-seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [[ -n "$(listener_pid "$1")" ]] && return 0
        if [[ -n "$WRAPPER_PID" ]] && ! kill -0 "$WRAPPER_PID" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

stop_server() {
    local pid
    for pid in $SERVER_PID $WRAPPER_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $SERVER_PID $WRAPPER_PID; do
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PID=""
    WRAPPER_PID=""
}

check_limit() {  # name
    local lim
    lim=$(awk '/^Max open files/ {print $4}' "/proc/$SERVER_PID/limits")
    log "$1 running as pid $SERVER_PID, open-files limit $lim"
    [[ "$lim" == "$(ulimit -n)" ]] || log "warning: $1 has open-files limit $lim, not $(ulimit -n)"
}

# chatd ---------------------------------------------------------------------
prepare_chatd() {
    local d="$WORK/chatd"
    rm -rf "$d"; mkdir -p "$d/data"
    # The generator is one client address driving 10,000 accounts at full
    # speed: lift the limits that exist against strangers (unauthenticated
    # connections per address, each account's send rate), as the other
    # servers run without their shapers. Everything else stays at its
    # default.
    cat >"$d/chatd.toml" <<'TOML'
[auth]
max_unauthenticated_per_ip = 0

[delivery]
messages_per_sec = 1000000.0
messages_burst = 1000000.0
TOML
    "$BENCH" accounts --mode import --count "$ACCOUNTS" --prefix 1555 --password "$PASSWORD" \
        --chatd-bin "$CHATD" --data-dir "$d/data" --csv "$d/accounts.csv"
}
start_chatd() {
    local d="$WORK/chatd"
    "$CHATD" serve --config "$d/chatd.toml" --data-dir "$d/data" --domain "$DOMAIN" --c2s "127.0.0.1:$CHATD_PORT" \
        --c2s-tls 127.0.0.1:0 --allow-plaintext >>"$d/chatd.log" 2>&1 &
    WRAPPER_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        grep -q "listening c2s 127.0.0.1:$CHATD_PORT" "$d/chatd.log" 2>/dev/null && break
        kill -0 "$WRAPPER_PID" 2>/dev/null || { tail -n 20 "$d/chatd.log" >&2; log "chatd exited"; stop_server; return 1; }
        sleep 0.1
    done
    wait_listening "$CHATD_PORT" 10 || { tail -n 20 "$d/chatd.log" >&2; log "chatd does not listen on $CHATD_PORT"; stop_server; return 1; }
    SERVER_PID=$(listener_pid "$CHATD_PORT")
    [[ "$SERVER_PID" == "$WRAPPER_PID" ]] && WRAPPER_PID=""
    check_limit chatd
}

# ejabberd ------------------------------------------------------------------
prepare_ejabberd() {
    local d="$WORK/ejabberd"
    rm -rf "$d"; mkdir -p "$d/logs" "$d/spool"
    if [[ -f /etc/ejabberd/inetrc ]]; then cp /etc/ejabberd/inetrc "$d/inetrc"; else echo '{lookup,["file","native"]}.' >"$d/inetrc"; fi
    cat >"$d/ejabberd.yml" <<EOF
hosts:
  - $DOMAIN
loglevel: warning
log_rotate_count: 0
certfiles: []
listen:
  -
    port: $EJABBERD_PORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: c2s
    starttls: false
    starttls_required: false
    backlog: 4096
auth_method: internal
auth_password_format: scram
auth_scram_hash: sha256
registration_timeout: infinity
max_fsm_queue: 1000000
acl:
  local:
    user_regexp: ""
  loopback:
    ip:
      - 127.0.0.0/8
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  register:
    allow: all
  trusted_network:
    allow: loopback
shaper_rules:
  max_user_sessions: 10
  max_user_offline_messages: 1000000
  c2s_shaper: none
  s2s_shaper: none
modules:
  mod_disco: {}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_ping: {}
  mod_register:
    access: register
    ip_access: all
    password_strength: 0
  mod_roster: {}
  mod_stream_mgmt:
    resend_on_timeout: if_offline
EOF
    # ejabberdctl would switch to the ejabberd user through su, which drops
    # the open-files limit to 1024: run the node as the current user instead.
    cat >"$d/ejabberdctl.cfg" <<EOF
EXEC_CMD=as_current_user
ERLANG_NODE=chatdbench@localhost
INET_DIST_INTERFACE=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
ERL_MAX_PORTS=65536
ERL_PROCESSES=1000000
EJABBERD_PID_PATH=$d/ejabberd.pid
EOF
}
start_ejabberd() {
    local d="$WORK/ejabberd"
    if ! epmd -names >/dev/null 2>&1; then EPMD_STARTED=1; fi
    HOME="$d" ejabberdctl --config-dir "$d" --config "$d/ejabberd.yml" --ctl-config "$d/ejabberdctl.cfg" \
        --logs "$d/logs" --spool "$d/spool" foreground >>"$d/console.log" 2>&1 &
    WRAPPER_PID=$!
    wait_listening "$EJABBERD_PORT" 120 || { tail -n 30 "$d/console.log" "$d/logs/"*.log >&2 || true; log "ejabberd did not start"; stop_server; return 1; }
    SERVER_PID=$(listener_pid "$EJABBERD_PORT")
    check_limit ejabberd
}

# reference (chatd-bench refserver) -----------------------------------------
prepare_reference() { rm -rf "$WORK/reference"; mkdir -p "$WORK/reference"; }
start_reference() {
    local d="$WORK/reference"
    "$BENCH" refserver --port "$REFERENCE_PORT" --domain "$DOMAIN" --timeout 7200 >>"$d/log" 2>&1 &
    WRAPPER_PID=$!
    wait_listening "$REFERENCE_PORT" 10 || { cat "$d/log" >&2; log "refserver did not start"; stop_server; return 1; }
    SERVER_PID=$(listener_pid "$REFERENCE_PORT")
    [[ "$SERVER_PID" == "$WRAPPER_PID" ]] && WRAPPER_PID=""
    check_limit reference
}

# Prosody -------------------------------------------------------------------
prepare_prosody() {
    local d="$WORK/prosody"
    rm -rf "$d"; mkdir -p "$d/data" "$d/certs"
    cat >"$d/prosody.cfg.lua" <<EOF
pidfile = "$d/prosody.pid"
certificates = "$d/certs"
data_path = "$d/data"
run_as_root = true
log = { { levels = { min = "warn" }, to = "file", filename = "$d/prosody.log" } }
network_backend = "epoll"
network_settings = { tcp_backlog = 4096, nagle = false }
interfaces = { "127.0.0.1" }
c2s_ports = { $PROSODY_PORT }
c2s_direct_tls_ports = { }
s2s_ports = { }
http_ports = { }
https_ports = { }
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_stanza_size_limit = 256 * 1024
authentication = "internal_hashed"
default_iteration_count = 4096
storage = "internal"
allow_registration = true
min_seconds_between_registrations = 0
registration_throttle_max = 1000000
smacks_max_queue_size = 5000
modules_enabled = { "roster", "saslauth", "disco", "ping", "register", "offline", "smacks" }
modules_disabled = { "s2s" }
VirtualHost "$DOMAIN"
EOF
}
start_prosody() {
    local d="$WORK/prosody"
    prosody -F --config "$d/prosody.cfg.lua" >>"$d/console.log" 2>&1 &
    WRAPPER_PID=$!
    wait_listening "$PROSODY_PORT" 30 || { tail -n 30 "$d/console.log" "$d/prosody.log" >&2 || true; log "prosody did not start"; stop_server; return 1; }
    SERVER_PID=$(listener_pid "$PROSODY_PORT")
    [[ "$SERVER_PID" == "$WRAPPER_PID" ]] && WRAPPER_PID=""
    check_limit prosody
}

busy_pct() {  # machine CPU busy over three seconds, in % of all cores
    local a b
    read -r -a a < <(head -n1 /proc/stat)
    sleep 3
    read -r -a b < <(head -n1 /proc/stat)
    local ta=0 tb=0 i
    for i in 1 2 3 4 5 6 7 8; do ta=$((ta + a[i])); tb=$((tb + b[i])); done
    local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=$((tb - ta))
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

wait_quiet() {  # other processes share the cores: wait (bounded) until they are done
    local start busy
    start=$(date +%s)
    while :; do
        busy=$(busy_pct)
        [[ "$busy" -le "$QUIET_BUSY" ]] && return 0
        if (( $(date +%s) - start >= QUIET_WAIT )); then
            log "warning: machine still ${busy}% busy with other processes; measuring anyway"
            return 0
        fi
        log "machine ${busy}% busy with other processes; waiting (up to ${QUIET_WAIT}s, BENCH_QUIET_WAIT)"
        sleep 2
    done
}

ensure_port() {  # server: move to a free port if another program took ours
    local p; p=$(port_of "$1")
    port_free "$p" && return 0
    local n; n=$(free_port "$p")
    log "port $p is in use by another program; $1 moves to $n"
    case "$1" in
        chatd) CHATD_PORT=$n ;;
        ejabberd) EJABBERD_PORT=$n ;;
        prosody) PROSODY_PORT=$n ;;
        reference) REFERENCE_PORT=$n ;;
    esac
}

start_server() {  # server; a second try on another port if another program took ours
    local try
    for try in 1 2 3; do
        ensure_port "$1"
        case "$1" in
            ejabberd) sed -i "s/^    port: [0-9]*/    port: $EJABBERD_PORT/" "$WORK/ejabberd/ejabberd.yml" ;;
            prosody) sed -i "s/^c2s_ports = .*/c2s_ports = { $PROSODY_PORT }/" "$WORK/prosody/prosody.cfg.lua" ;;
        esac
        "start_$1" && return 0
        port_free "$(port_of "$1")" && die "$1 did not start (logs in $WORK/$1; --keep keeps them)"
        log "port $(port_of "$1") was taken meanwhile; trying again"
    done
    die "$1 did not start"
}

port_of() {
    case "$1" in
        chatd) echo "$CHATD_PORT" ;;
        ejabberd) echo "$EJABBERD_PORT" ;;
        prosody) echo "$PROSODY_PORT" ;;
        reference) echo "$REFERENCE_PORT" ;;
    esac
}

run_bench() {  # server scenario phases
    local port; port=$(port_of "$1")
    "$BENCH" run --port "$port" --domain "$DOMAIN" --password "$PASSWORD" --server-pid "$SERVER_PID" \
        --server-name "$1" --scenario "$2" --phases "$3" --sessions "$SESSIONS" \
        "${RUN_ARGS[@]}" "${EXTRA[@]}" --out "$OUT/$1-$2.json" ||
        { log "warning: $1 $2 scenario reported an error"; FAILED=$((FAILED + 1)); }
}

mkdir -p "$OUT"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $MODE, sessions: $SESSIONS"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
    echo "chatd: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "ejabberd: $(dpkg-query -W -f='${Version}' ejabberd 2>/dev/null || echo none)"
    echo "prosody: $(dpkg-query -W -f='${Version}' prosody 2>/dev/null || echo none)"
} >"$OUT/versions.txt"

create_accounts() {  # server
    "prepare_$1"
    if [[ "$1" == ejabberd || "$1" == prosody ]]; then
        start_server "$1"
        "$BENCH" accounts --mode ibr --port "$(port_of "$1")" --domain "$DOMAIN" --password "$PASSWORD" \
            --count "$ACCOUNTS" --concurrency 64
        stop_server
    fi
}

if [[ -n "$SERVE" ]]; then
    create_accounts "$SERVE"
    start_server "$SERVE"
    log "$SERVE serving on 127.0.0.1:$(port_of "$SERVE") (pid $SERVER_PID), $ACCOUNTS accounts ${DOMAIN}, password $PASSWORD; data in $WORK"
    wait "${WRAPPER_PID:-$SERVER_PID}" || true
    exit 0
fi

START=$(date +%s)
FAILED=0
IFS=',' read -r -a server_list <<<"$SERVERS"
for srv in "${server_list[@]}"; do
    case "$srv" in chatd | ejabberd | prosody | reference) ;; *) die "unknown server $srv" ;; esac
    [[ "$srv" == chatd && ! -x "$CHATD" ]] && die "$CHATD not found"
    t0=$(date +%s)
    rm -f "$OUT/$srv-load.json" "$OUT/$srv-offline.json"
    log "== $srv: accounts ($ACCOUNTS)"
    create_accounts "$srv"
    log "== $srv: login, idle and steady load"
    wait_quiet
    start_server "$srv"
    run_bench "$srv" load login,idle,steady
    stop_server
    if [[ "$srv" != reference ]]; then  # the reference router stores nothing
        log "== $srv: offline burst (server restarted)"
        wait_quiet
        start_server "$srv"
        run_bench "$srv" offline offline
        stop_server
    fi
    log "== $srv done in $(( $(date +%s) - t0 ))s"
done

"$BENCH" report --dir "$OUT" --servers "$SERVERS"
log "all done in $(( $(date +%s) - START ))s; see $OUT/summary.md"
if [[ "$FAILED" -gt 0 ]]; then
    log "$FAILED scenario(s) reported errors (see the Errors section of summary.md)"
    exit 1
fi
