# Sourced by benches/web and benches/compression: one measured h2load run against a fresh greeter.
# Needs BIN (the greeter binary), PORT and N (calls per run) from the caller.

# measure [NAME=VALUE...] -- H2LOAD_ARGS...: starts `greeter serve` on 127.0.0.1:$PORT pinned to
# CPU 0, with metrics off, logs at warn and the given environment; waits until it is SERVING;
# drives $N calls with h2load (4 connections x 16 streams) pinned to CPU 1; stops the server.
# Prints "calls/s<TAB>server CPU µs/call<TAB>DATA bytes/call" (CPU: utime+stime from /proc; DATA:
# what h2load received in DATA frames). Fails, showing h2load's output, unless every call succeeded.
measure() {
    local environment=()
    while [ "$1" != "--" ]; do
        environment+=("$1")
        shift
    done
    shift
    env GREETER__METRICS__LISTEN= GREETER__LOG__FILTER=warn "${environment[@]}" \
        taskset -c 0 "$BIN" serve --listen "127.0.0.1:$PORT" </dev/null >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 50); do
        "$BIN" health --addr "127.0.0.1:$PORT" --timeout 1s >/dev/null 2>&1 && break
        sleep 0.1
    done
    local before after out ok rps data
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$(taskset -c 1 h2load -n "$N" -c 4 -m 16 "$@" 2>&1)
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    ok=$(grep -o '[0-9]* succeeded' <<<"$out" | cut -d' ' -f1)
    if [ "$ok" != "$N" ]; then
        echo "${0##*/}: ${environment[*]} $*: ${ok:-0} of $N succeeded" >&2
        echo "$out" >&2
        return 1
    fi
    rps=$(grep -o '[0-9.]* req/s' <<<"$out" | head -1 | cut -d' ' -f1)
    # "traffic: 4.41MB (4625934) total, 1.26MB (1325000) headers (space savings 90.33%), 1.91MB (2000000) data"
    data=$(grep '^traffic:' <<<"$out" | grep -o '([0-9]*) data' | tr -dc 0-9)
    awk -v r="$rps" -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$N" -v d="$data" \
        'BEGIN { printf "%.0f\t%.2f\t%.1f\n", r, t / hz * 1e6 / n, d / n }'
}
