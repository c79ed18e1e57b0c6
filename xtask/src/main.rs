//! Host-side build tasks for the hypervisor.
//!
//! `build` compiles the kernel for `x86_64-unknown-none`; `image` wraps a kernel ELF and a node
//! configuration file (handed to the kernel as the bootloader's ramdisk) into BIOS and/or UEFI
//! disk images. It never depends on the kernel's code, only on its ELF file.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use bootloader::{BiosBoot, BootConfig, UefiBoot};

const USAGE: &str = "usage:
  xtask build [--debug]
      compile the kernel (release by default) and print the path of its ELF file
  xtask image --kernel <elf> [--config <node.cfg>] [--bios <out.img>] [--uefi <out.img>]
      write disk images; the node configuration becomes the bootloader ramdisk";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build(&args[1..]),
        Some("image") => image(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("missing or unknown task\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn build(args: &[String]) -> Result<(), String> {
    let release = match args {
        [] => true,
        [flag] if flag == "--debug" => false,
        _ => return Err(format!("unexpected arguments {args:?}\n{USAGE}")),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "-q",
        "-p",
        "kernel",
        "--target",
        "x86_64-unknown-none",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("kernel build failed ({status})"));
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let profile = if release { "release" } else { "debug" };
    let elf = target_dir
        .join("x86_64-unknown-none")
        .join(profile)
        .join("kernel");
    println!("{}", elf.display());
    Ok(())
}

fn image(args: &[String]) -> Result<(), String> {
    let mut kernel = None;
    let mut config = None;
    let mut bios = None;
    let mut uefi = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--kernel" => &mut kernel,
            "--config" => &mut config,
            "--bios" => &mut bios,
            "--uefi" => &mut uefi,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        };
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        *slot = Some(PathBuf::from(value));
    }
    let kernel = kernel.ok_or_else(|| format!("--kernel is required\n{USAGE}"))?;
    if bios.is_none() && uefi.is_none() {
        return Err(format!("give --bios and/or --uefi\n{USAGE}"));
    }
    if !kernel.is_file() {
        return Err(format!("kernel ELF {} not found", kernel.display()));
    }
    if let Some(cfg) = &config {
        if !cfg.is_file() {
            return Err(format!("config file {} not found", cfg.display()));
        }
    }

    // The kernel owns the serial port: keep the bootloader quiet on it and on the screen.
    let mut boot_config = BootConfig::default();
    boot_config.serial_logging = false;
    boot_config.frame_buffer_logging = false;

    if let Some(out) = bios {
        let mut builder = BiosBoot::new(&kernel);
        builder.set_boot_config(&boot_config);
        if let Some(cfg) = &config {
            builder.set_ramdisk(cfg);
        }
        builder
            .create_disk_image(&out)
            .map_err(|e| format!("BIOS image {}: {e:#}", out.display()))?;
    }
    if let Some(out) = uefi {
        let mut builder = UefiBoot::new(&kernel);
        builder.set_boot_config(&boot_config);
        if let Some(cfg) = &config {
            builder.set_ramdisk(cfg);
        }
        builder
            .create_disk_image(&out)
            .map_err(|e| format!("UEFI image {}: {e:#}", out.display()))?;
    }
    Ok(())
}
