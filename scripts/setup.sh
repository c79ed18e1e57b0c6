#!/usr/bin/env bash
# Fresh-machine setup for building and running the hypervisor nodes.
#
# Idempotent and quiet when everything is present (then it takes well under a second and does
# not touch the network): installs the Debian packages the launcher and the tests use (only the
# missing ones, `apt-get update` once before installing), the Rust toolchain pinned in
# rust-toolchain.toml (`rustup toolchain install`: RUSTUP_AUTO_INSTALL=0 on these machines) and,
# when missing, the Linux kernel of the network baseline (tests/tests/baseline.rs) in
# target/linux-baseline/.
#
# Usage: scripts/setup.sh [-v|--verbose]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERBOSE=0
case "${1:-}" in
    -v | --verbose) VERBOSE=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
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
#   util-linux           setpriv --pdeathsig: emulators die with the launcher, whatever kills it
#   iproute2             ss: finding free loopback ports
#   busybox-static cpio  the Linux baseline's initramfs (tests/tests/baseline.rs)
#   tgt                  tgtd, the iSCSI target of the shared storage (qemu-run.sh, storage tests)
#   libiscsi-bin         iscsi-ls, iscsi-inq...: host-side checks of the shared LUN
PACKAGES=(qemu-system-x86 ovmf bochs bochsbios vgabios bochs-term socat util-linux iproute2
    busybox-static cpio tgt libiscsi-bin)

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

# The Linux kernel of the network baseline (tests/tests/baseline.rs): Debian's generic kernel
# (the cloud kernel has no e1000 driver), one exact package, `dpkg -x`ed; only vmlinuz, the
# e1000 module and the package's name are kept, in target/linux-baseline/ (CARGO_TARGET_DIR).
# Preferred package; when the archive has moved on, the newest 6.1 generic kernel it offers.
LINUX_PREFERRED=linux-image-6.1.0-56-amd64
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
LINUX_DIR="$TARGET_DIR/linux-baseline"
fetch_linux_baseline() {
    local tmp ko LINUX_PKG
    tmp="$(mktemp -d)"
    chmod 755 "$tmp" # apt's download sandbox user writes there
    # `apt-get update` first only when the package is unknown (a fresh machine's empty lists).
    if ! apt-cache show "$LINUX_PREFERRED" >/dev/null 2>&1; then
        apt-get update -q >"$tmp/log" 2>&1 || true
    fi
    LINUX_PKG="$LINUX_PREFERRED"
    if ! apt-cache show "$LINUX_PKG" >/dev/null 2>&1; then
        LINUX_PKG="$(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
            grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -t- -k4,4n | tail -n 1)"
        [[ -n "$LINUX_PKG" ]] || LINUX_PKG="$LINUX_PREFERRED"
    fi
    say "fetching $LINUX_PKG for the Linux baseline into $LINUX_DIR"
    if ! (cd "$tmp" && apt-get download -q "$LINUX_PKG") >>"$tmp/log" 2>&1 ||
        ! dpkg -x "$tmp"/"$LINUX_PKG"_*.deb "$tmp/x" >>"$tmp/log" 2>&1; then
        cat "$tmp/log" >&2
        rm -rf "$tmp"
        say "could not fetch $LINUX_PKG"
        return 1
    fi
    ko="$(find "$tmp/x/lib/modules" -name e1000.ko -path '*/intel/e1000/*' | head -n 1)"
    if [[ -z "$ko" || ! -s "$tmp/x/boot/vmlinuz-${LINUX_PKG#linux-image-}" ]]; then
        rm -rf "$tmp"
        say "$LINUX_PKG has no vmlinuz or e1000.ko"
        return 1
    fi
    # (set -e does not apply inside `fetch_linux_baseline || ...`: every step is checked.)
    rm -rf "$LINUX_DIR" && mkdir -p "$LINUX_DIR" &&
        cp "$tmp/x/boot/vmlinuz-${LINUX_PKG#linux-image-}" "$LINUX_DIR/vmlinuz" &&
        cp "$ko" "$LINUX_DIR/e1000.ko" &&
        echo "$LINUX_PKG" >"$LINUX_DIR/package" # last: marks the directory complete
    local rc=$?
    rm -rf "$tmp"
    return "$rc"
}
# Not fatal: without it only the baseline test fails (and says to run this script).
if [[ ! -s "$LINUX_DIR/vmlinuz" || ! -s "$LINUX_DIR/e1000.ko" || ! -s "$LINUX_DIR/package" ]]; then
    fetch_linux_baseline || say "warning: no Linux baseline kernel; tests/tests/baseline.rs will fail"
fi

if ! command -v rustup >/dev/null 2>&1; then
    say "rustup not found: install rustup first"
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
