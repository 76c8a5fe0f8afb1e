#!/usr/bin/env bash
# Regenerates agent/corrald-hot.ld, the linker script that puts the functions corrald runs
# (at start and in steady state) side by side at the front of its code, in an output section
# `.text.hot` (see agent/build.rs for why).
#
#   sudo packaging/hot-code.sh        # root: loop device, cgroups, /proc/PID/pagemap
#
# Run it after a change of toolchain, of a dependency's version or of the hot paths (spawn,
# supervision, probes, List/Status, rollouts, metrics): a function missing from the list
# still works, it only lies among the cold code.
#
# How: corrald is linked with every function aligned to its own 4 KiB page and run from a
# file system on a loop device without readahead, on a cold page cache, so that a page is
# resident only if the agent executed code on it. After a workload of 200 limited instances
# (the shape of `corral-bench memory`), probed services, a rolling restart, logs, events, the
# metrics endpoint and List/Status calls, the resident pages of its code name the functions
# it ran. The script lists them in address order by their v0 names with the crates' hashes
# left open, then once more without the crate that instantiated them (see hot-code.py), so
# that the list matches the same functions in a build in another directory, or after a
# dependency's version changed its hash.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

for tool in losetup mkfs.ext4 blockdev readelf python3; do
  command -v "$tool" >/dev/null || { echo "hot-code.sh: $tool is missing" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "hot-code.sh: run as root (loop device, cgroups, pagemap)" >&2; exit 1; }

target="$repo/target/hot-code"
# The README's build (so the symbol names are that build's), then corrald linked again with
# each function on a page of its own and a link map that names each function's section. The
# extra flags go to corrald's link only: fat LTO generates all the code there.
CARGO_TARGET_DIR="$target" CORRAL_HOT_CODE=off cargo build --release --locked
CARGO_TARGET_DIR="$target" CORRAL_HOT_CODE=off cargo rustc --release --locked -p corral-agent \
  --bin corrald -- -C llvm-args=-align-all-functions=12 -C "link-arg=-Wl,-Map,$target/corrald.map"

work=$(mktemp -d "$target/run.XXXXXX")
mnt="$work/mnt"
state="$work/state"
parent="corral-hot-$$"
loop=""
agent=""
cleanup() {
  set +e
  if [ -n "$agent" ]; then
    for s in many-0 many-1 many-2 many-3 web ticker waiting crashing; do
      "$mnt/bin/corral" --addr "unix://$state/api.sock" delete "$s" >/dev/null 2>&1 || true
    done
    kill "$agent" 2>/dev/null || true
    wait "$agent" 2>/dev/null || true
  fi
  # The relative --cgroup-parent, beneath this shell's cgroup (v1: in each hierarchy).
  find /sys/fs/cgroup -maxdepth 8 -type d -name "$parent" 2>/dev/null | while read -r c; do
    find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$loop" ] && losetup -d "$loop"
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$mnt" "$state"
truncate -s 1G "$work/fs.img"
loop=$(losetup -f --show "$work/fs.img")
mkfs.ext4 -q -b 4096 "$loop"
blockdev --setra 0 "$loop"
mount "$loop" "$mnt"
mkdir "$mnt/bin"
cp "$target/release/corrald" "$target/release/corral-init" "$target/release/corral" "$mnt/bin/"
umount "$mnt"
mount "$loop" "$mnt" # a cold page cache for the copies

metrics=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# As a service manager starts it: no backtraces captured for errors.
start_agent() {
  env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE RUST_LOG=info "$mnt/bin/corrald" --state-dir "$state" \
    --socket "$state/api.sock" --cgroup-parent "$parent" --overcommit cpu=100 \
    --metrics "$metrics" >>"$work/agent.log" 2>&1 &
  agent=$!
  for _ in $(seq 300); do corral ls >/dev/null 2>&1 && return; sleep 0.05; done
  echo "hot-code.sh: the agent did not start; its log:" >&2
  cat "$work/agent.log" >&2
  exit 1
}
corral() { "$mnt/bin/corral" --addr "unix://$state/api.sock" "$@"; }
running() { corral ls -o json | python3 -c 'import json, sys; print(sum(s["running"] for s in json.load(sys.stdin)))'; }
wait_running() {
  for _ in $(seq 300); do [ "$(running 2>/dev/null)" = "$1" ] && return; sleep 0.1; done
  echo "hot-code.sh: $(running) instances running, not $1" >&2
  exit 1
}
# The PID of one of a service's processes.
service_pid() {
  corral status "$1" -o json | python3 -c 'import json, sys
def pids(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "pid" and isinstance(x, int) and x > 0: yield x
            else: yield from pids(x)
    elif isinstance(v, list):
        for x in v: yield from pids(x)
print(next(pids(json.load(sys.stdin))))'
}

start_agent
for s in 0 1 2 3; do
  printf '%s\n' "name = \"many-$s\"" 'command = ["/bin/sleep", "1000000"]' 'replicas = 50' \
    '[resources]' 'cpu = 0.5' 'memory = "64MiB"' 'pids = 64' '[restart]' 'backoff = "0s"' \
    '[stop]' 'grace = "5s"' >"$work/many-$s.toml"
  corral apply -f "$work/many-$s.toml" >/dev/null
done
py_server='import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): print(*a, flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT_HTTP"])), H).serve_forever()'
cat >"$work/web.toml" <<EOF
name = "web"
command = ["/usr/bin/python3", "-c", '''$py_server''']
replicas = 2
[ports]
http = "auto"
[health]
http = "http://127.0.0.1:{port.http}/"
interval = "500ms"
[resources]
cpu = 0.5
memory = "64MiB"
EOF
cat >"$work/ticker.toml" <<'EOF'
name = "ticker"
command = ["/bin/sh", "-c", "while :; do echo tick; echo tock >&2; sleep 0.05; done"]
[health]
exec = ["/bin/true"]
interval = "1s"
EOF
cat >"$work/waiting.toml" <<'EOF'
name = "waiting"
command = ["/bin/sleep", "1000000"]
[health]
tcp = "127.0.0.1:1"
start_period = "60s"
EOF
# Exits of every kind (a failure, a signal, a clean exit), restarted after a backoff.
cat >"$work/crashing.toml" <<'EOF'
name = "crashing"
command = ["/bin/sh", "-c", "sleep 0.2; case $(( $$ % 3 )) in 0) exit 3;; 1) kill -9 $$;; *) exit 0;; esac"]
replicas = 2
[restart]
backoff = "100ms"
backoff_max = "200ms"
EOF
for s in web ticker waiting; do corral apply -f "$work/$s.toml" >/dev/null; done
wait_running 204
corral apply -f "$work/crashing.toml" >/dev/null
timeout 60 "$mnt/bin/corral" --addr "unix://$state/api.sock" restart web --wait >/dev/null
for _ in $(seq 10); do # kill -9 -> replacement
  kill -9 "$(service_pid many-0)"
  sleep 0.05
done
corral scale many-1 40 >/dev/null
corral scale many-1 50 >/dev/null
for _ in $(seq 50); do corral ls >/dev/null; done
corral status many-0 >/dev/null
corral logs ticker --tail 20 >/dev/null
corral events --last 100 >/dev/null
corral node >/dev/null
python3 -c "import urllib.request as u; u.urlopen('http://$metrics/metrics').read()"
corral delete many-3 >/dev/null
sleep 3 # probes, exits, the sampler
python3 packaging/hot-code.py pages "$agent" "$work/pages-1"

# The agent stopped and started again: it takes its instances over.
kill "$agent"
wait "$agent" || true
start_agent
for _ in $(seq 5); do
  kill -9 "$(service_pid many-0)"
  sleep 0.05
done
for _ in $(seq 20); do corral ls >/dev/null; done
corral status many-1 >/dev/null
corral delete many-2 >/dev/null
sleep 3
python3 packaging/hot-code.py pages "$agent" "$work/pages-2"

python3 packaging/hot-code.py script "$target/release/corrald" "$target/corrald.map" \
  agent/corrald-hot.ld "$work/pages-1" "$work/pages-2"
