#!/usr/bin/env bash
# mDNS discovery smoke test in Linux network namespaces (needs root and iproute2).
#
# Builds a private LAN: one namespace holds a bridge `br0`; three node namespaces each
# have `eth0` (a veth into the bridge) with 10.77.0.1-3/24. Nothing touches the host's
# own network: every mDNS packet stays on that bridge.
#
#   node 1 meshA (restricted to eth0)  runs the longest
#   node 2 meshA (restricted to eth0)  stops early, so node 1 must see it leave
#   node 3 meshB (all interfaces)      must never be reported, and reports nobody
#
# The driver binary (DISCO_BIN, default /tmp/disco/target/debug/disco) takes
#   PEER_ID FINGERPRINT PORT INTERFACE|- SECONDS
# starts medmesh's `mesh::discovery::Discovery`, prints `FOUND <peer> <addr,...>` and
# `LOST <peer>` lines to stdout, and `DONE` after a clean shutdown.
set -euo pipefail

BIN=${DISCO_BIN:-/tmp/disco/target/debug/disco}
OUT=${OUT_DIR:-$(mktemp -d /tmp/mdns-smoke.XXXXXX)}
TAG="mmdisco$$"
BR_NS="$TAG-br"
NODES=(1 2 3)
PIDS=()

[[ $(id -u) == 0 ]] || { echo "run as root (network namespaces)" >&2; exit 2; }
command -v ip >/dev/null || { echo "install iproute2 (apt-get install -y iproute2)" >&2; exit 2; }
[[ -x $BIN ]] || { echo "no driver binary at $BIN; build it first" >&2; exit 2; }

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for i in "${NODES[@]}"; do
        ip netns del "$TAG-n$i" 2>/dev/null || true
    done
    ip netns del "$BR_NS" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# 52 characters, like an Ed25519 libp2p peer id.
peer() { printf '12D3KooWNode%s%040d' "$1" 0 | cut -c1-52; }
P1=$(peer One); P2=$(peer Two); P3=$(peer Three)

ip netns add "$BR_NS"
ip -n "$BR_NS" link add br0 type bridge
ip -n "$BR_NS" link set br0 type bridge mcast_snooping 0
ip -n "$BR_NS" link set lo up
ip -n "$BR_NS" link set br0 up
for i in "${NODES[@]}"; do
    ns="$TAG-n$i"
    ip netns add "$ns"
    ip -n "$BR_NS" link add "veth$i" type veth peer name eth0 netns "$ns"
    ip -n "$BR_NS" link set "veth$i" master br0 multicast on up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 multicast on up
done

run() { # node peer mesh iface seconds
    ip netns exec "$TAG-n$1" "$BIN" "$2" "$3" 4001 "$4" "$5" \
        >"$OUT/n$1.out" 2>"$OUT/n$1.err" &
    PIDS+=($!)
}
run 1 "$P1" meshA eth0 14
run 2 "$P2" meshA eth0 8
run 3 "$P3" meshB - 14

for pid in "${PIDS[@]}"; do
    wait "$pid" || { echo "a node exited with an error (pid $pid)"; }
done
PIDS=()

fail=0
check() { # description, then a command
    local what=$1; shift
    if "$@"; then echo "ok   - $what"; else echo "FAIL - $what"; fail=1; fi
}
has() { grep -q -- "$2" "$OUT/$1.out"; }
hasnt() { ! grep -q -- "$2" "$OUT/$1.out"; }

for i in "${NODES[@]}"; do
    echo "--- node $i stdout"; cat "$OUT/n$i.out"
done
echo "---"
check "node 1 found node 2 at 10.77.0.2:4001" has n1 "^FOUND $P2 .*10.77.0.2:4001"
check "node 2 found node 1 at 10.77.0.1:4001" has n2 "^FOUND $P1 .*10.77.0.1:4001"
check "node 1 saw node 2 leave"               has n1 "^LOST $P2\$"
check "node 1 never reported meshB node 3"    hasnt n1 "$P3"
check "node 2 never reported meshB node 3"    hasnt n2 "$P3"
check "nobody reported itself"                bash -c "! grep -q '$P1' '$OUT/n1.out' && ! grep -q '$P2' '$OUT/n2.out'"
check "meshB node 3 reported nobody"          hasnt n3 "^\(FOUND\|LOST\)"
for i in "${NODES[@]}"; do
    check "node $i shut down cleanly"         has "n$i" "^DONE\$"
    check "node $i logged no warnings/errors" bash -c "! grep -E -q ' (WARN|ERROR) ' '$OUT/n$i.err'"
done
echo "logs in $OUT"
exit "$fail"
