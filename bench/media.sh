#!/usr/bin/env bash
# Media throughput: chatd's XEP-0363 media service against nginx (Debian's
# nginx-light, WebDAV PUT and static GET) on this machine, same certificate,
# same files, same client (wrk), one after the other.
#
#   bench/media.sh                 # HTTPS, 100 KB images and 20 MB videos
#   SCHEME=http bench/media.sh     # plain HTTP on loopback instead
#   DUR=10 CONNS=16 bench/media.sh # seconds per run, concurrent connections
#
# Uploads: every request carries distinct content (a counter after the
# file's magic bytes), to a fresh signed slot for chatd (requested over
# XMPP beforehand) and to a fresh path for nginx. chatd hashes, sniffs and
# fsyncs each upload and fsyncs its index; nginx does neither.
# Downloads: the same stored file again and again; nginx serves chatd's
# tier directory directly.
#
# Results go to stdout and to bench/media-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SCHEME=${SCHEME:-https}
DUR=${DUR:-8}
CONNS=${CONNS:-16}
THREADS=${THREADS:-2}
IMG_BYTES=${IMG_BYTES:-102400}
VID_BYTES=${VID_BYTES:-20971520}
OUT=${OUT:-$ROOT/bench/media-results.md}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
    echo "== installing nginx-light and wrk"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi

echo "== building chatd (release)"
cargo build --release -q -p chatd
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/chatd

# MEDIA_BENCH_DIR=/dev/shm measures without disk flushes (tmpfs).
W=$(mktemp -d "${MEDIA_BENCH_DIR:-/tmp}/chatd-media-bench.XXXXXX")
CHATD_PID=""
NGINX_PID=""
cleanup() {
    [ -n "$CHATD_PID" ] && kill "$CHATD_PID" 2>/dev/null || true
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- chatd ------------------------------------------------------------------
cat >"$W/chatd.toml" <<EOF
[media]
quota_bytes = 1000000000000000
slot_ttl_secs = 3600
EOF
"$BIN" user add +15550000001 --password pw --config "$W/chatd.toml" --data-dir "$W/data" >/dev/null
"$BIN" serve --config "$W/chatd.toml" --data-dir "$W/data" --domain localhost \
    --c2s 127.0.0.1:0 --c2s-tls "" --http 127.0.0.1:0 --allow-plaintext \
    >"$W/chatd.out" 2>"$W/chatd.err" &
CHATD_PID=$!
for _ in $(seq 100); do
    grep -q "listening http" "$W/chatd.out" 2>/dev/null && break
    sleep 0.1
done
C2S=$(awk '/listening c2s /{split($3,a,":"); print a[2]}' "$W/chatd.out")
HTTP=$(awk '/listening http /{split($3,a,":"); print a[2]}' "$W/chatd.out")
[ -n "$HTTP" ] || { cat "$W/chatd.err"; echo "chatd did not start"; exit 1; }

# Requests N upload slots over XMPP (PLAIN on loopback), prints PUT paths.
slots() { # name size content-type count
    python3 - "$C2S" "$@" <<'PY'
import base64, re, socket, sys
port, name, size, ctype, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
s = socket.create_connection(("127.0.0.1", port))
buf = b""
def until(pat):
    global buf
    while not re.search(pat, buf):
        d = s.recv(1 << 16)
        if not d:
            raise SystemExit("stream closed")
        buf += d
hdr = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
s.sendall(hdr); until(rb"</stream:features>"); buf = b""
cred = base64.b64encode(b"\x0015550000001\x00pw")
s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + cred + b"</auth>")
until(rb"<success"); buf = b""
s.sendall(hdr); until(rb"</stream:features>"); buf = b""
s.sendall(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
until(rb"</iq>"); buf = b""
got = []
batch = 500
for start in range(0, n, batch):
    k = min(batch, n - start)
    s.sendall(b"".join(
        f"<iq type='get' id='s{start + i}' to='localhost'><request xmlns='urn:xmpp:http:upload:0' filename='{name}' size='{size}' content-type='{ctype}'/></iq>".encode()
        for i in range(k)))
    while len(re.findall(rb"<put url=", buf)) + len(re.findall(rb"type=.error", buf)) < k:
        d = s.recv(1 << 20)
        if not d:
            raise SystemExit("stream closed")
        buf += d
    got += re.findall(rb"<put url=[\"']([^\"']*)", buf)
    buf = b""
for u in got:
    u = u.decode().replace("&amp;", "&")
    print("/" + u.split("://", 1)[1].split("/", 1)[1])
PY
}

# ---- nginx ------------------------------------------------------------------
NGINX_PORT=$(free_port)
mkdir -p "$W/nginx/tmp" "$W/nginx/up"
TLS_LISTEN="listen 127.0.0.1:$NGINX_PORT ssl http2; ssl_certificate $W/data/tls/cert.pem; ssl_certificate_key $W/data/tls/key.pem;"
[ "$SCHEME" = http ] && TLS_LISTEN="listen 127.0.0.1:$NGINX_PORT;"
cat >"$W/nginx/nginx.conf" <<EOF
user root;
worker_processes auto;
daemon off;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path $W/nginx/tmp;
    client_max_body_size 200m;
    default_type application/octet-stream;
    server {
        $TLS_LISTEN
        location /up/ { root $W/nginx; dav_methods PUT; create_full_put_path on; }
        location /fast/ { alias $W/data/media/fast/; }
        location /bulk/ { alias $W/data/media/bulk/; }
    }
}
EOF
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" &
NGINX_PID=$!
sleep 0.5
kill -0 "$NGINX_PID" || { cat "$W/nginx/error.log"; exit 1; }

# ---- wrk scripts ------------------------------------------------------------
cat >"$W/put.lua" <<'LUA'
-- PUT with distinct bodies. Globals set per thread by setup(): tid,
-- nthreads, paths_file (chatd slot paths) or prefix (nginx), size, magic,
-- ctype.
local n = 0
local threads = {}
function setup(thread)
    table.insert(threads, thread)
    thread:set("tid", #threads - 1)
end
local paths = {}
local filler
function init(args)
    local i = 0
    if paths_file ~= "" then
        for line in io.lines(paths_file) do
            if i % nthreads == tid then table.insert(paths, line) end
            i = i + 1
        end
    end
    filler = string.rep("x", size - #magic - 24)
end
function request()
    n = n + 1
    local path
    if #paths > 0 then
        path = paths[n]
        if path == nil then path = paths[#paths] end
    else
        path = prefix .. tid .. "-" .. n .. ".bin"
    end
    local body = magic .. string.format("%12d%12d", tid, n) .. filler
    return wrk.format("PUT", path, {["Content-Type"] = ctype, ["Content-Length"] = tostring(#body)}, body)
end
LUA

wrk_put() { # url paths_file prefix size magic ctype conns
    local url=$1 pf=$2 prefix=$3 size=$4 magic=$5 ctype=$6 conns=$7
    cat >"$W/put-vars.lua" <<EOF
paths_file = "$pf"; prefix = "$prefix"; size = $size; nthreads = $THREADS; ctype = "$ctype"
magic = $(lua_bytes "$magic")
EOF
    cat "$W/put-vars.lua" "$W/put.lua" >"$W/put-run.lua"
    wrk -t"$THREADS" -c"$conns" -d"${DUR}s" -s "$W/put-run.lua" "$url" 2>&1
}

rps() { awk '/Requests\/sec:/{print $2}'; }
errors() { awk '/Non-2xx/{print $5} END{}' | head -1; }

# File signatures (hex) the content sniffing recognises.
JPEG_MAGIC=ffd8ffe000104a46494600010100000100010000
MP4_MAGIC=00000018667479706d703432000000006d70343269736f6d0000000866726565
lua_bytes() { python3 -c 'import sys; print("\"" + "".join("\\%d" % b for b in bytes.fromhex(sys.argv[1])) + "\"")' "$1"; }
BASE_C="$SCHEME://localhost:$HTTP"
BASE_N="$SCHEME://localhost:$NGINX_PORT"

declare -A R
run_case() { # label size magic ctype name vid_conns
    local label=$1 size=$2 magic=$3 ctype=$4 name=$5 conns=$6
    # Enough slots for a generous upper bound of uploads in DUR seconds.
    local nslots=$(( size > 1000000 ? 60 * DUR * conns / 4 + 200 : 3000 * DUR ))
    slots "$name" "$size" "$ctype" "$nslots" >"$W/paths-$label"
    echo "== $label upload, chatd ($(wc -l <"$W/paths-$label") slots)"
    local out
    out=$(wrk_put "$BASE_C" "$W/paths-$label" "" "$size" "$magic" "$ctype" "$conns")
    echo "$out" | grep -E "Requests/sec|Non-2xx|Socket errors" || true
    R[$label-up-chatd]=$(echo "$out" | rps)
    echo "== $label upload, nginx"
    out=$(wrk_put "$BASE_N" "" "/up/$label/" "$size" "$magic" "$ctype" "$conns")
    echo "$out" | grep -E "Requests/sec|Non-2xx|Socket errors" || true
    R[$label-up-nginx]=$(echo "$out" | rps)
    rm -rf "$W/nginx/up/$label" 2>/dev/null || true

    # One stored file, downloaded over and over.
    local get
    get=$(slots "$name" "$size" "$ctype" 1)
    local f="$W/one-$label"
    python3 -c "import sys; m=bytes.fromhex(sys.argv[1]); open(sys.argv[2],'wb').write(m + b'0'*($size-len(m)))" "$magic" "$f"
    curl -sk --http1.1 -o /dev/null -X PUT -H "Content-Type: $ctype" --data-binary @"$f" "$BASE_C$get"
    local sha; sha=$(sha256sum "$f" | cut -d' ' -f1)
    local tier=bulk; [[ $ctype == image/* ]] && tier=fast
    local dl_c="$BASE_C${get%%\?*}" dl_n="$BASE_N/$tier/${sha:0:2}/${sha:2:2}/$sha"
    curl -skf -o /dev/null "$dl_c" && curl -skf -o /dev/null "$dl_n"
    echo "== $label download, chatd"
    out=$(wrk -t"$THREADS" -c"$conns" -d"${DUR}s" "$dl_c" 2>&1)
    echo "$out" | grep -E "Requests/sec|Transfer/sec|Non-2xx" || true
    R[$label-down-chatd]=$(echo "$out" | rps)
    echo "== $label download, nginx"
    out=$(wrk -t"$THREADS" -c"$conns" -d"${DUR}s" "$dl_n" 2>&1)
    echo "$out" | grep -E "Requests/sec|Transfer/sec|Non-2xx" || true
    R[$label-down-nginx]=$(echo "$out" | rps)
}

run_case image "$IMG_BYTES" "$JPEG_MAGIC" image/jpeg photo.jpg "$CONNS"
run_case video "$VID_BYTES" "$MP4_MAGIC" video/mp4 clip.mp4 "$(( CONNS < 4 ? CONNS : 4 ))"

mbps() { awk -v r="$1" -v s="$2" 'BEGIN{printf "%.0f", r*s/1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "n/a"}'; }
{
    echo
    echo "## $(date -u +%Y-%m-%dT%H:%MZ) — $SCHEME, files in $(df --output=fstype "$W" | tail -1), ${DUR}s per run, $CONNS connections (videos: $(( CONNS < 4 ? CONNS : 4 ))), $(nproc) cores"
    echo
    echo "| case | chatd req/s | chatd MiB/s | nginx req/s | nginx MiB/s | chatd/nginx |"
    echo "|---|---:|---:|---:|---:|---:|"
    for c in image-up image-down video-up video-down; do
        size=$IMG_BYTES; [[ $c == video* ]] && size=$VID_BYTES
        a=${R[$c-chatd]:-0}; b=${R[$c-nginx]:-0}
        echo "| $c | $a | $(mbps "$a" "$size") | $b | $(mbps "$b" "$size") | $(ratio "$a" "$b") |"
    done
} | tee -a "$OUT"
