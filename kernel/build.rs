//! Builds the test guest (tests/guest) and hands its ELF to the kernel, which embeds it so
//! every node can run it without a disk. The guest is a separate freestanding program, so it is
//! built by a nested cargo into its own target directory (no lock shared with this build).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("kernel/ sits in the workspace root");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "test-guest", "--target-dir"])
        .arg(&target_dir);
    // Settings meant for the outer build (clippy's wrapper, its flags) must not leak in.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(status.success(), "building the test guest failed: {status}");

    let elf = target_dir.join("x86_64-unknown-none/release/test-guest");
    std::fs::copy(&elf, out.join("test-guest.elf")).expect("copying the test guest ELF");
    for path in ["tests/guest", "tests/guest-abi"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
}
