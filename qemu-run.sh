#!/usr/bin/env bash
# Boot a cluster of hypervisor nodes under QEMU (AMD SVM + NPT) or Bochs (Intel VMX + EPT).
#
# Usage: ./qemu-run.sh [options]
#
#   --nodes N          number of nodes (default 2)
#   --uefi             boot the UEFI image with OVMF (default: the BIOS image)
#   --bochs            run the nodes under Bochs with an Intel VMX+EPT model (BIOS only)
#   --bochs-cpu MODEL  Bochs CPU model (default corei7_skylake_x: EPT with A/D bits, PML)
#   --mem MiB          memory per node (default 512)
#   --nic MODEL        QEMU NIC model for the node links: e1000 (default) or virtio-net-pci
#   --no-storage       no shared iSCSI target (by default, with two or more nodes, a tgtd on
#                      127.0.0.1 serves one shared LUN to every node's storage network)
#   --lun-mib N        size of the shared LUN in MiB (default 64)
#   --capture          QEMU: record each node's cluster-link frames (first 256 bytes of each) in
#                      DIR/nodeK.cluster.pcap (-object filter-dump)
#   --set KEY=VALUE    add (or replace) a line in every node's configuration file; repeatable
#                      (defaults: name = nodeK, log_level = info, on_panic = halt,
#                      cluster_addr = 10.10.0.K/24, peer.nodeJ = 10.10.0.J for every other node J;
#                      2 or more nodes: storage_addr = 10.0.2.15/24)
#   --headless DIR     no terminal: node K's serial console is the unix socket DIR/nodeK.sock and
#                      its complete serial output DIR/nodeK.log; prints the line READY on stdout
#                      once every node printed "console ready", then runs until SIGINT/SIGTERM,
#                      stops everything it started and exits 0
#   --timeout SECONDS  how long to wait for every node's console (default 180)
#   --no-build         skip set-up and build: use the kernel and tools already in the target dir
#   --kernel ELF       boot this kernel ELF instead of the one built from kernel/
#   --build-only       set up and build (kernel, image tool, console relay), then exit
#   -h, --help         this text
#
# Without --headless the run directory is run/<date>-<pid>/ and the terminal is attached to node
# 1's console (Ctrl-] leaves and stops every node); the line printed before attaching tells how to
# reach the other nodes' consoles from another terminal. Logs stay in the run directory.
#
# Links: QEMU nodes' cluster NICs connect to frame-hub's learning switch on the unix socket
# DIR/link.sock (-netdev stream, the node is the client). Each node has its own port with a
# bounded queue, so a node that stops reading (frozen, its link cut) loses frames and never
# blocks the others: QEMU 7.2 linked NIC to NIC (-netdev stream) blocks the sending vCPU once
# the peer stops reading; -netdev socket (TCP) held small frames for up to ~40 ms (Nagle against
# delayed ACKs); dgram and vde_switch dropped frames under a 512 KiB TCP window.
# The NIC MACs are 52:54:00:00:01:0K (K = node number).
# The cluster network on those links is 10.10.0.0/24, node K at 10.10.0.K: addresses that exist
# only inside the emulated links (frames travel between the emulators over loopback).
# The storage network (QEMU, two or more nodes): a second NIC per node on its own QEMU user-mode
# network (-netdev user: the node is 10.0.2.15/24, the host's 127.0.0.1 is reachable as
# 10.0.2.2), MAC 52:54:00:00:02:0K, at PCI slot 4 (the cluster NIC is at slot 3: the kernel
# takes the first NIC for the cluster network, the second for the storage network).
# Under Bochs, two or more nodes get two e1000s each: the cluster link (ethmod=socket: frames in
# UDP datagrams, linked through frame-hub on 127.0.0.1, a hub: every frame to every other node)
# and the storage network on Bochs's user-mode network (ethmod=slirp, same addresses as QEMU's).
#
# Shared storage (two or more nodes, unless --no-storage): a tgtd iSCSI target listens on a free
# 127.0.0.1 port (the nodes reach it as 10.0.2.2:PORT on their storage network) with target
# iqn.2026-11.test.hv:cluster and LUN 1, a sparse file DIR/lun1.img of --lun-mib MiB. Every node's
# configuration gets `iscsi_portal = 10.0.2.2:PORT`; DIR/storage.portal holds the host-side
# address (127.0.0.1:PORT), DIR/storage.iqn the target name, DIR/storage.control tgtd's
# control socket number (tgtadm -C N) and DIR/tgtd.pid its pid, for host tools and tests. tgtd ignores SIGTERM: it is
# taken offline and deleted through tgtadm when the run ends.
#
# Every QEMU node has a QMP socket, DIR/nodeK.qmp (tests use it to cut a node's link with
# set_link), and each emulator's pid is in DIR/nodeK.pid (tests kill a node with it).
#
# A node's emulator that exits on its own is reported on stderr ("node2: emulator exited with
# status S") and its status written to DIR/nodeK.status; the other nodes keep running. QEMU exits
# with status (v << 1) | 1 when the kernel writes v to the isa-debug-exit port 0xf4 (on_panic =
# exit); Bochs exits with status 1 on ACPI soft-off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OVMF=/usr/share/ovmf/OVMF.fd
BOCHS_SHARE=/usr/share/bochs

NODES=2
FIRMWARE=bios
EMULATOR=qemu
BOCHS_CPU=corei7_skylake_x
MEM=512
NIC=e1000
HEADLESS=""
TIMEOUT=180
BUILD=1
BUILD_ONLY=0
CAPTURE=0
STORAGE=1
LUN_MIB=64
SETS=()
KERNEL_ARG=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
    echo "qemu-run: $*" >&2
    exit 2
}
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes)
            need_arg "$@"
            NODES="$2"
            shift 2
            ;;
        --uefi)
            FIRMWARE=uefi
            shift
            ;;
        --bios)
            FIRMWARE=bios
            shift
            ;;
        --bochs)
            EMULATOR=bochs
            shift
            ;;
        --bochs-cpu)
            need_arg "$@"
            BOCHS_CPU="$2"
            shift 2
            ;;
        --mem)
            need_arg "$@"
            MEM="$2"
            shift 2
            ;;
        --nic)
            need_arg "$@"
            NIC="$2"
            shift 2
            ;;
        --set)
            need_arg "$@"
            SETS+=("$2")
            shift 2
            ;;
        --headless)
            need_arg "$@"
            HEADLESS="$2"
            shift 2
            ;;
        --timeout)
            need_arg "$@"
            TIMEOUT="$2"
            shift 2
            ;;
        --no-build)
            BUILD=0
            shift
            ;;
        --capture)
            CAPTURE=1
            shift
            ;;
        --no-storage)
            STORAGE=0
            shift
            ;;
        --lun-mib)
            need_arg "$@"
            LUN_MIB="$2"
            shift 2
            ;;
        --kernel)
            need_arg "$@"
            KERNEL_ARG="$2"
            shift 2
            ;;
        --build-only)
            BUILD_ONLY=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes wants a number from 1 to 99, not '$NODES'"
[[ "$MEM" =~ ^[1-9][0-9]*$ && "$MEM" -ge 32 ]] || die "--mem wants MiB (at least 32), not '$MEM'"
[[ "$LUN_MIB" =~ ^[1-9][0-9]*$ ]] || die "--lun-mib wants MiB (at least 1), not '$LUN_MIB'"
# The shared LUN is on the storage network, which only clusters of two or more nodes have.
((NODES >= 2)) || STORAGE=0
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, not '$TIMEOUT'"
[[ "$NIC" =~ ^(e1000|virtio-net-pci|virtio|rtl8139)$ ]] || die "--nic: e1000, virtio-net-pci or rtl8139"
[[ "$NIC" == virtio ]] && NIC=virtio-net-pci
if [[ "$EMULATOR" == bochs && "$FIRMWARE" == uefi ]]; then
    die "--bochs boots the BIOS image only (there is no UEFI firmware for Bochs here)"
fi
[[ "$BOCHS_CPU" =~ ^[a-z0-9_]+$ ]] || die "--bochs-cpu: bad model name '$BOCHS_CPU'"

# Node configuration: ordered keys, --set replaces a default or appends a new key.
CFG_KEYS=(name log_level on_panic)
declare -A CFG=([name]="" [log_level]=info [on_panic]=halt)
for kv in "${SETS[@]}"; do
    [[ "$kv" =~ ^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$ ]] || die "--set wants KEY=VALUE, not '$kv'"
    key="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    [[ "$value" != *$'\n'* ]] || die "--set $key: the value must be one line"
    [[ -v "CFG[$key]" ]] || CFG_KEYS+=("$key")
    CFG[$key]="$value"
done

# ---------------------------------------------------------------------------------------------
# Set-up and build
# ---------------------------------------------------------------------------------------------
KERNEL="$TARGET_DIR/x86_64-unknown-none/release/kernel"
XTASK="$TARGET_DIR/release/xtask"
RELAY="$TARGET_DIR/debug/console-relay"
HUB="$TARGET_DIR/debug/frame-hub"

if ((BUILD)); then
    "$ROOT/scripts/setup.sh"
    echo "qemu-run: building the kernel and the image tool (the first build takes 2-3 minutes)" >&2
    built="$(cd "$ROOT" && cargo xtask build)" || die "cargo xtask build failed"
    built="$(printf '%s\n' "$built" | tail -n 1)"
    [[ -f "$built" ]] && KERNEL="$built"
    (cd "$ROOT" && cargo build -q -p tests --bin console-relay --bin frame-hub) ||
        die "building console-relay and frame-hub (tests crate) failed"
fi
((BUILD_ONLY)) && exit 0
if [[ -n "$KERNEL_ARG" ]]; then
    KERNEL="$(cd "$(dirname "$KERNEL_ARG")" && pwd)/$(basename "$KERNEL_ARG")"
fi

[[ -f "$KERNEL" ]] || die "kernel ELF $KERNEL not found (run without --no-build)"
[[ -x "$XTASK" ]] || die "image tool $XTASK not found (run without --no-build)"
[[ -x "$RELAY" ]] || die "console relay $RELAY not found (run without --no-build)"
if [[ "$EMULATOR" == bochs ]]; then
    [[ -x "$HUB" ]] || die "frame hub $HUB not found (run without --no-build)"
fi

# ---------------------------------------------------------------------------------------------
# Run directory, process bookkeeping, clean-up
# ---------------------------------------------------------------------------------------------
if [[ -n "$HEADLESS" ]]; then
    RUN_DIR="$HEADLESS"
else
    RUN_DIR="$ROOT/run/$(date +%Y%m%d-%H%M%S)-$$"
fi
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
# Unix socket paths are limited to 107 bytes (the longest here: DIR/node99.serial).
if ((${#RUN_DIR} + 14 > 107)); then
    die "run directory path too long for unix sockets (${#RUN_DIR} chars): $RUN_DIR"
fi

declare -A PROC_NAME=() # pid -> what it is
EMU_PIDS=()             # index K-1 -> emulator pid of node K
DONE=()                 # index K-1 -> 1 once node K's exit was reported
READY_SEEN=0

log_tail() { [[ -f "$1" ]] && tail -n "${2:-15}" "$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/^/    | /' >&2 || true; }

# True if PID is still a running child of this script (never signal a recycled PID). Exited
# children that the shell has not reaped yet are zombies ("Z"): not running.
is_my_child() {
    local stat rest f
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    rest="${stat##*) }" # fields after "pid (comm) "
    read -r -a f <<<"$rest"
    [[ "${f[0]}" != Z && "${f[1]}" == "$$" ]]
}

# SIGTERM to the given PIDs (those still our running children), SIGKILL to whatever is left
# after a grace period of one second (Bochs ignores SIGTERM), then reap them.
stop_pids() {
    local pids=() pid i alive=()
    for pid in "$@"; do
        is_my_child "$pid" && pids+=("$pid")
    done
    ((${#pids[@]} > 0)) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 10; i++)); do
        alive=()
        for pid in "${pids[@]}"; do
            is_my_child "$pid" && alive+=("$pid")
        done
        ((${#alive[@]} == 0)) && break
        sleep 0.1
    done
    if ((${#alive[@]} > 0)); then
        kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    wait "${pids[@]}" 2>/dev/null || true
}

# tgtd ignores SIGTERM and keeps its control socket: take it down through tgtadm (bounded), so
# stop_pids then only reaps it (or SIGKILLs a tgtd that did not listen).
TGTD_PID=""
TGTD_CONTROL=""
stop_storage() {
    [[ -n "$TGTD_PID" ]] && is_my_child "$TGTD_PID" || return 0
    local t=(timeout -k 1 5 tgtadm -C "$TGTD_CONTROL")
    "${t[@]}" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    "${t[@]}" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    "${t[@]}" --op delete --mode system >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 20; i++)); do
        is_my_child "$TGTD_PID" || break
        sleep 0.1
    done
    # Its control socket files outlive it.
    is_my_child "$TGTD_PID" || rm -f "/var/run/tgtd/socket.$TGTD_CONTROL" "/var/run/tgtd/socket.$TGTD_CONTROL.lock"
}

cleanup() {
    local rc=$?
    trap '' INT TERM
    # Emulators (and links) first, console relays last: a relay exits by itself once its node
    # has gone, with the node's last bytes in the log.
    local first=() last=() pid
    stop_storage
    for pid in "${!PROC_NAME[@]}"; do
        if [[ "${PROC_NAME[$pid]}" == *relay* ]]; then
            last+=("$pid")
        else
            first+=("$pid")
        fi
    done
    stop_pids "${first[@]}"
    stop_pids "${last[@]}"
    rm -f "$RUN_DIR"/*.img "$RUN_DIR"/*.img.lock "$RUN_DIR"/*.sock "$RUN_DIR"/*.serial \
        "$RUN_DIR"/*.relay-ready "$RUN_DIR/switch.in" "$RUN_DIR/hub.ready"
    rm -rf "$RUN_DIR/switch"
    rm -f "$RUN_DIR/storage.portal" "$RUN_DIR/storage.iqn" "$RUN_DIR/storage.control" \
        "$RUN_DIR/tgtd.pid"
    if [[ -z "$HEADLESS" ]]; then
        echo "qemu-run: stopped; logs are in $RUN_DIR" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
on_signal() {
    if ((READY_SEEN)); then
        exit 0
    fi
    echo "qemu-run: interrupted before the nodes were ready" >&2
    exit 130
}
trap on_signal INT TERM

# Start a child that dies with this script however the script ends (parent-death signal).
# Usage: spawn NAME DEATHSIG OUTFILE cmd args...   -> sets SPAWNED_PID
spawn() {
    local name="$1" sig="$2" out="$3"
    shift 3
    setpriv --pdeathsig "$sig" "$@" </dev/null >>"$out" 2>&1 &
    SPAWNED_PID=$!
    PROC_NAME[$SPAWNED_PID]="$name"
}

now_ms() { echo $((${EPOCHREALTIME/[.,]/} / 1000)); }
elapsed_since() { # "2.35s" since a now_ms value
    local ms=$(($(now_ms) - $1))
    printf '%d.%02ds' $((ms / 1000)) $((ms % 1000 / 10))
}

# Wait (bounded) until a condition command succeeds while PID is alive.
wait_for() {
    local what="$1" pid="$2" limit="$3"
    shift 3
    local deadline=$(($(now_ms) + limit * 1000))
    until "$@"; do
        if ! is_my_child "$pid"; then
            echo "qemu-run: ${PROC_NAME[$pid]:-process $pid} exited while waiting for $what" >&2
            return 1
        fi
        if (($(now_ms) >= deadline)); then
            echo "qemu-run: timed out after ${limit}s waiting for $what" >&2
            return 1
        fi
        sleep 0.05
    done
}

# ---------------------------------------------------------------------------------------------
# Shared storage: tgtd on 127.0.0.1, the nodes' 10.0.2.2 (QEMU/Bochs user-mode network)
# ---------------------------------------------------------------------------------------------
STORAGE_IQN=iqn.2026-11.test.hv:cluster
free_loopback_port() { # a TCP port nothing listens on now (tgtd cannot be given port 0)
    local port i
    for ((i = 0; i < 50; i++)); do
        port=$((20000 + RANDOM % 40000))
        ss -Hltn "sport = :$port" 2>/dev/null | grep -q . || { echo "$port"; return 0; }
    done
    return 1
}
tgtadm_ok() { timeout -k 1 5 tgtadm -C "$TGTD_CONTROL" "$@" >>"$RUN_DIR/tgtd.out" 2>&1; }
start_storage() {
    command -v tgtd >/dev/null || die "tgtd not found (Debian package tgt; scripts/setup.sh installs it), or use --no-storage"
    local port attempt
    for ((attempt = 1; attempt <= 3; attempt++)); do
        port="$(free_loopback_port)" || die "no free loopback port for tgtd"
        # The control socket number (0..32767) only has to be unique among tgtds on this
        # machine: one whose socket file is not there.
        TGTD_CONTROL=$((1000 + RANDOM % 31000))
        [[ -e "/var/run/tgtd/socket.$TGTD_CONTROL" ]] && continue
        spawn "tgtd" KILL "$RUN_DIR/tgtd.out" tgtd -f --iscsi "portal=127.0.0.1:$port" -C "$TGTD_CONTROL"
        TGTD_PID=$SPAWNED_PID
        # A port taken meanwhile does not stop tgtd: it then listens on its default portals
        # (0.0.0.0:3260), which must not happen here. It must list exactly our portal.
        if wait_for "tgtd" "$TGTD_PID" 10 eval 'tgtadm_ok --op show --mode sys && ss -Hltn "sport = :$port" | grep -q .' &&
            [[ "$(timeout -k 1 5 tgtadm -C "$TGTD_CONTROL" --lld iscsi --op show --mode portal 2>/dev/null | awk '/^Portal:/ {print $2}')" == "127.0.0.1:$port,1" ]]; then
            break
        fi
        # Lost a race for the port (or tgtd failed): try another one.
        stop_pids "$TGTD_PID"
        TGTD_PID=""
    done
    [[ -n "$TGTD_PID" ]] || { log_tail "$RUN_DIR/tgtd.out"; die "tgtd did not start (as root? see $RUN_DIR/tgtd.out)"; }
    truncate -s "${LUN_MIB}M" "$RUN_DIR/lun1.img"
    tgtadm_ok --lld iscsi --op new --mode target --tid 1 -T "$STORAGE_IQN" &&
        tgtadm_ok --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$RUN_DIR/lun1.img" &&
        tgtadm_ok --lld iscsi --op bind --mode target --tid 1 -I ALL ||
        { log_tail "$RUN_DIR/tgtd.out"; die "setting up the iSCSI target failed"; }
    STORAGE_PORT="$port"
    echo "127.0.0.1:$port" >"$RUN_DIR/storage.portal"
    echo "$STORAGE_IQN" >"$RUN_DIR/storage.iqn"
    echo "$TGTD_CONTROL" >"$RUN_DIR/storage.control"
    echo "$TGTD_PID" >"$RUN_DIR/tgtd.pid"
}
STORAGE_PORT=""
((STORAGE)) && start_storage

# ---------------------------------------------------------------------------------------------
# Per-node configuration and images
# ---------------------------------------------------------------------------------------------
for ((k = 1; k <= NODES; k++)); do
    cfg="$RUN_DIR/node$k.cfg"
    {
        for key in "${CFG_KEYS[@]}"; do
            value="${CFG[$key]}"
            [[ "$key" == name && -z "$value" ]] && value="node$k"
            printf '%s = %s\n' "$key" "$value"
        done
        # The cluster network (unless --set gave these keys): node K is 10.10.0.K/24, and knows
        # every other node by its default name.
        [[ -v "CFG[cluster_addr]" ]] || printf 'cluster_addr = 10.10.0.%d/24\n' "$k"
        for ((j = 1; j <= NODES; j++)); do
            ((j == k)) && continue
            [[ -v "CFG[peer.node$j]" ]] || printf 'peer.node%d = 10.10.0.%d\n' "$j" "$j"
        done
        if [[ "$NODES" -ge 2 && ! -v "CFG[storage_addr]" ]]; then
            printf 'storage_addr = 10.0.2.15/24\n'
        fi
        if [[ -n "$STORAGE_PORT" && ! -v "CFG[iscsi_portal]" ]]; then
            printf 'iscsi_portal = 10.0.2.2:%d\n' "$STORAGE_PORT"
        fi
    } >"$cfg"
    img="$RUN_DIR/node$k.img"
    if [[ "$FIRMWARE" == uefi ]]; then
        "$XTASK" image --kernel "$KERNEL" --config "$cfg" --uefi "$img" >&2 || die "image for node$k failed"
    else
        "$XTASK" image --kernel "$KERNEL" --config "$cfg" --bios "$img" >&2 || die "image for node$k failed"
    fi
    rm -f "$RUN_DIR/node$k.log" "$RUN_DIR/node$k.status" "$RUN_DIR/node$k.sock"
done

# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------
if [[ "$EMULATOR" == qemu && "$NODES" -ge 2 ]]; then
    rm -f "$RUN_DIR/link.sock" "$RUN_DIR/link.ready"
    spawn "frame-hub" TERM "$RUN_DIR/link.out" "$HUB" --stream "$RUN_DIR/link.sock" --ready-file "$RUN_DIR/link.ready"
    wait_for "frame-hub's link socket" "$SPAWNED_PID" 20 test -s "$RUN_DIR/link.ready" || exit 1
fi

mac_of() { printf '52:54:00:00:01:%02x' "$1"; }
storage_mac_of() { printf '52:54:00:00:02:%02x' "$1"; }

# ---------------------------------------------------------------------------------------------
# Start the nodes
# ---------------------------------------------------------------------------------------------
# Node K's console: console-relay owns DIR/nodeK.sock (clients) and DIR/nodeK.log (every byte
# the node sends), and waits for the emulator's serial port to connect to it: on the unix socket
# DIR/nodeK.serial (QEMU), or on a 127.0.0.1 TCP port (Bochs), printed in DIR/nodeK.relay-ready.
start_relay() { # K unix|tcp
    local k="$1" node_side
    if [[ "$2" == unix ]]; then
        node_side=(--node-unix "$RUN_DIR/node$k.serial")
    else
        node_side=(--node-tcp 127.0.0.1:0)
    fi
    rm -f "$RUN_DIR/node$k.relay-ready"
    spawn "node$k (console relay)" TERM "$RUN_DIR/node$k.relay.out" "$RELAY" \
        --unix "$RUN_DIR/node$k.sock" --log "$RUN_DIR/node$k.log" \
        --ready-file "$RUN_DIR/node$k.relay-ready" "${node_side[@]}"
    wait_for "node$k's console relay" "$SPAWNED_PID" 20 test -s "$RUN_DIR/node$k.relay-ready" || exit 1
}

start_qemu() {
    local k="$1" net=()
    start_relay "$k" unix
    local args=(
        qemu-system-x86_64 -name "node$k" -accel tcg -cpu EPYC -smp 1 -m "$MEM"
        -display none -monitor none -parallel none
        -qmp "unix:$RUN_DIR/node$k.qmp,server=on,wait=off"
        -chardev "socket,id=con,path=$RUN_DIR/node$k.serial"
        -serial chardev:con
        -device isa-debug-exit,iobase=0xf4,iosize=0x04
        -drive "format=raw,file=$RUN_DIR/node$k.img"
    )
    [[ "$FIRMWARE" == uefi ]] && args+=(-bios "$OVMF")
    if ((NODES == 1)); then
        net=(-nic none)
    else
        net=(-netdev "stream,id=link,server=off,addr.type=unix,addr.path=$RUN_DIR/link.sock")
    fi
    if ((NODES >= 2)); then
        net+=(-device "$NIC,id=cluster,netdev=link,mac=$(mac_of "$k"),addr=0x3")
        if ((CAPTURE)); then
            net+=(-object "filter-dump,id=capture,netdev=link,file=$RUN_DIR/node$k.cluster.pcap,maxlen=256")
        fi
        # The storage network: user-mode networking, private to this node.
        net+=(-netdev "user,id=storage,ipv6=off" -device "$NIC,netdev=storage,mac=$(storage_mac_of "$k"),addr=0x4")
    fi
    spawn "node$k (qemu)" TERM "$RUN_DIR/node$k.emu.out" "${args[@]}" "${net[@]}"
    EMU_PIDS[k - 1]=$SPAWNED_PID
    echo "$SPAWNED_PID" >"$RUN_DIR/node$k.pid"
}

start_bochs() {
    local k="$1"
    start_relay "$k" tcp
    local port
    port="$(cat "$RUN_DIR/node$k.relay-ready")"
    local nic=""
    if [[ -n "$BOCHS_NET_BASE" ]]; then
        # Card 0 is the cluster link; card 1 the storage network on Bochs's own user-mode
        # network (slirp, like QEMU's -netdev user: the node is 10.0.2.15, the host 10.0.2.2).
        printf '# slirp defaults: 10.0.2.0/24, host 10.0.2.2\n' >"$RUN_DIR/slirp.conf"
        nic="pci: enabled=1, chipset=i440fx, slot1=e1000, slot2=e1000
e1000: card=0, enabled=1, mac=$(mac_of "$k"), ethmod=socket, ethdev=$((BOCHS_NET_BASE + 2 * (k - 1)))
e1000: card=1, enabled=1, mac=$(storage_mac_of "$k"), ethmod=slirp, script=$RUN_DIR/slirp.conf"
    fi
    # clock: sync=slowdown keeps the emulated clock from running ahead of real time, so an idle
    # node (HLT) costs ~3% of a core instead of 100% (sync=none), and uptimes and timeouts
    # measured in the guest are real ones; the price is a boot of ~3 s instead of ~1 s.
    cat >"$RUN_DIR/node$k.bxrc" <<EOF
display_library: term
romimage: file=$BOCHS_SHARE/BIOS-bochs-latest
vgaromimage: file=$BOCHS_SHARE/VGABIOS-lgpl-latest
vga: extension=vbe
cpu: model=$BOCHS_CPU, count=1, ips=50000000, reset_on_triple_fault=1
memory: guest=$MEM, host=$MEM
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=disk, path=$RUN_DIR/node$k.img, mode=flat
boot: disk
com1: enabled=1, mode=socket-client, dev=127.0.0.1:$port
clock: sync=slowdown, time0=local
log: $RUN_DIR/node$k.bochs.log
panic: action=fatal, term=report
error: action=report
info: action=report
debug: action=ignore
mouse: enabled=0
magic_break: enabled=0
$nic
EOF
    # Debian's Bochs has its debugger built in: it stops at its prompt before the first
    # instruction and again after every machine reset (the console's `reboot`). Continue through
    # up to 1000 resets, then quit.
    { for ((i = 0; i < 1000; i++)); do echo c; done; echo quit; } >"$RUN_DIR/bochs.rc"
    # term display library: needs TERM; it draws nothing useful (the node uses the serial port).
    local term="${TERM:-xterm}"
    [[ "$term" == dumb ]] && term=xterm
    spawn "node$k (bochs)" KILL "$RUN_DIR/node$k.emu.out" \
        env TERM="$term" bochs-bin -q -f "$RUN_DIR/node$k.bxrc" -rc "$RUN_DIR/bochs.rc"
    EMU_PIDS[k - 1]=$SPAWNED_PID
    echo "$SPAWNED_PID" >"$RUN_DIR/node$k.pid"
}

# Bochs links: node K's NIC listens on UDP BOCHS_NET_BASE + 2(K-1) and sends to the next port,
# where frame-hub listens. Bochs binds its own port, so pick a base where all are free.
BOCHS_NET_BASE=""
udp_ports_free() { # FIRST COUNT
    local used
    used="$(ss -Hlun 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }')"
    local p
    for ((p = $1; p < $1 + $2; p++)); do
        grep -qx "$p" <<<"$used" && return 1
    done
    return 0
}
if [[ "$EMULATOR" == bochs && "$NODES" -ge 2 ]]; then
    for ((try = 0; try < 50; try++)); do
        base=$((20000 + 2 * (RANDOM % 15000)))
        if udp_ports_free "$base" $((2 * NODES)); then
            BOCHS_NET_BASE=$base
            break
        fi
    done
    [[ -n "$BOCHS_NET_BASE" ]] || die "no free UDP ports for the Bochs links"
    hub_args=()
    for ((k = 1; k <= NODES; k++)); do
        p=$((BOCHS_NET_BASE + 2 * (k - 1)))
        hub_args+=(--link "$((p + 1)):$p")
    done
    rm -f "$RUN_DIR/hub.ready"
    spawn "frame-hub" TERM "$RUN_DIR/hub.out" "$HUB" "${hub_args[@]}" --ready-file "$RUN_DIR/hub.ready"
    wait_for "frame-hub" "$SPAWNED_PID" 20 test -s "$RUN_DIR/hub.ready" || exit 1
fi

for ((k = 1; k <= NODES; k++)); do
    DONE[k - 1]=0
    if [[ "$EMULATOR" == bochs ]]; then
        start_bochs "$k"
    else
        start_qemu "$k"
    fi
done

# Report (once) each node whose emulator has exited; returns the number of nodes still running.
check_nodes() {
    local k pid st running=0
    for ((k = 1; k <= NODES; k++)); do
        ((DONE[k - 1])) && continue
        pid="${EMU_PIDS[k - 1]}"
        if is_my_child "$pid"; then
            running=$((running + 1))
            continue
        fi
        st=0
        wait "$pid" 2>/dev/null || st=$?
        unset "PROC_NAME[$pid]"
        DONE[k - 1]=1
        echo "$st" >"$RUN_DIR/node$k.status"
        echo "qemu-run: node$k: emulator exited with status $st" >&2
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# Wait for every console
# ---------------------------------------------------------------------------------------------
started=$(now_ms)
deadline=$((started + TIMEOUT * 1000))
while :; do
    ready=0
    for ((k = 1; k <= NODES; k++)); do
        grep -q -a 'console ready' "$RUN_DIR/node$k.log" 2>/dev/null && ready=$((ready + 1))
    done
    ((ready == NODES)) && break
    check_nodes
    for ((k = 1; k <= NODES; k++)); do
        if ((DONE[k - 1])); then
            echo "qemu-run: node$k stopped before its console was ready; its serial log ends with:" >&2
            log_tail "$RUN_DIR/node$k.log"
            log_tail "$RUN_DIR/node$k.emu.out" 5
            exit 1
        fi
    done
    if (($(now_ms) >= deadline)); then
        echo "qemu-run: timed out after ${TIMEOUT}s: $ready of $NODES consoles ready" >&2
        for ((k = 1; k <= NODES; k++)); do
            if ! grep -q -a 'console ready' "$RUN_DIR/node$k.log" 2>/dev/null; then
                echo "qemu-run: node$k's serial log ($RUN_DIR/node$k.log) ends with:" >&2
                log_tail "$RUN_DIR/node$k.log"
            fi
        done
        exit 1
    fi
    sleep 0.1
done
READY_SEEN=1

if [[ -n "$HEADLESS" ]]; then
    echo "qemu-run: $NODES node(s) ready after $(elapsed_since "$started") in $RUN_DIR" >&2
    echo READY
    while :; do
        check_nodes
        sleep 0.25
    done
fi

# ---------------------------------------------------------------------------------------------
# Interactive: attach this terminal to node 1's console
# ---------------------------------------------------------------------------------------------
{
    echo
    echo "qemu-run: $NODES node(s) ready ($EMULATOR, $FIRMWARE) in $(elapsed_since "$started"); run directory $RUN_DIR"
    for ((k = 2; k <= NODES; k++)); do
        echo "  node$k's console, from another terminal:  socat -,raw,echo=0,escape=0x1d UNIX-CONNECT:$RUN_DIR/node$k.sock"
    done
    echo "  serial logs: $RUN_DIR/nodeK.log"
    echo "  this terminal is node1's console; Ctrl-] leaves and stops every node"
    echo
} >&2
# What node 1 printed before we attached (its boot log ends with the prompt).
tail -n 25 "$RUN_DIR/node1.log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' | tr -d '\r' >&2
if [[ -t 0 ]]; then
    socat -,raw,echo=0,escape=0x1d "UNIX-CONNECT:$RUN_DIR/node1.sock" || true
    stty sane 2>/dev/null || true
else
    socat - "UNIX-CONNECT:$RUN_DIR/node1.sock" || true
fi
echo >&2
check_nodes
exit 0
