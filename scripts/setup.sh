#!/usr/bin/env bash
# Fresh-machine setup for building and running the hypervisor nodes.
#
# Idempotent and quiet when everything is present (then it takes well under a second and does
# not touch the network): installs the Debian packages the launcher and the tests use (only the
# missing ones, `apt-get update` once before installing) and the Rust toolchain pinned in
# rust-toolchain.toml (`rustup toolchain install`: RUSTUP_AUTO_INSTALL=0 on these machines).
#
# Usage: scripts/setup.sh [-v|--verbose]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERBOSE=0
case "${1:-}" in
    -v | --verbose) VERBOSE=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "setup.sh: unknown option $1" >&2
        exit 2
        ;;
esac

say() { echo "setup: $*" >&2; }

# Debian packages, and why:
#   qemu-system-x86      QEMU TCG nodes (AMD SVM + NPT with -cpu EPYC)
#   ovmf                 UEFI firmware for QEMU (/usr/share/ovmf/OVMF.fd)
#   bochs bochsbios vgabios bochs-term
#                        Bochs nodes (Intel VMX + EPT), BIOS only, terminal display library
#   socat                attaches a terminal to a node's console socket
#   vde2                 vde_switch: the link between three or more QEMU nodes
#   util-linux           setpriv --pdeathsig: emulators die with the launcher, whatever kills it
#   iproute2             ss: finding free loopback ports
PACKAGES=(qemu-system-x86 ovmf bochs bochsbios vgabios bochs-term socat vde2 util-linux iproute2)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            say "missing packages (${missing[*]}) and not root: install them and re-run"
            exit 1
        fi
    else
        SUDO=()
    fi
    say "installing Debian packages: ${missing[*]}"
    log="$(mktemp)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { "${SUDO[@]}" apt-get update -q && "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        say "apt-get failed"
        exit 1
    fi
    ((VERBOSE)) && cat "$log" >&2
    rm -f "$log"
fi

if ! command -v rustup >/dev/null 2>&1; then
    say "rustup not found: install rustup (https://rustup.rs) first"
    exit 1
fi

# Reads rust-toolchain.toml (channel, components, targets). A no-op taking ~0.1 s when installed.
log="$(mktemp)"
if ! (cd "$ROOT" && rustup toolchain install) >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    say "rustup toolchain install failed"
    exit 1
fi
if ((VERBOSE)) || grep -q -i -E 'downloading|installing component' "$log"; then
    grep -v '^$' "$log" >&2 || true
fi
rm -f "$log"
