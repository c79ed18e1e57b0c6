//! Plain Linux guests under QEMU TCG, for the reference runs our figures are compared with
//! (tests/tests/baseline.rs: network throughput; tests/tests/qemu_migration.rs: QEMU's own live
//! migration).
//!
//! The kernel is Debian's, which scripts/setup.sh puts in target/linux-baseline/ ([`linux_dir`]);
//! the initramfs (busybox, an /init script, any extra files) is built per test by
//! [`build_initramfs`]. A [`Guest`] is one QEMU process booting them, its serial port and
//! stderr in log files; it is stopped (by PID) when dropped, and dies with the thread that
//! started it, whatever kills that.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// target/linux-baseline/: vmlinuz, e1000.ko and `package` (the Debian package they came from).
pub fn linux_dir() -> PathBuf {
    crate::target_dir().join("linux-baseline")
}

/// The Debian package the kernel came from (target/linux-baseline/package); panics, saying to
/// run scripts/setup.sh, when it is not there.
pub fn linux_package() -> String {
    let path = linux_dir().join("package");
    let package = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/setup.sh (it fetches the baseline's Linux kernel)",
            path.display()
        )
    });
    package.trim().to_string()
}

/// How every guest's /init starts: busybox's applets installed and on the PATH, /proc, /sys
/// and /dev mounted.
pub const INIT_START: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
"#;

/// Builds DIR/initramfs.cpio (newc): busybox, /init ([`INIT_START`] then `init`), and each
/// `(file, name)` of `files` copied to /name.
pub fn build_initramfs(dir: &Path, init: &str, files: &[(&Path, &str)]) -> Result<(), String> {
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or("no busybox: run scripts/setup.sh (Debian busybox-static)")?;
    let root = dir.join("initramfs");
    for sub in ["bin", "dev", "proc", "sys"] {
        fs::create_dir_all(root.join(sub)).map_err(|e| format!("{}: {e}", root.display()))?;
    }
    let copy = |from: &Path, to: &str| {
        fs::copy(from, root.join(to)).map_err(|e| format!("copying {}: {e}", from.display()))
    };
    copy(busybox, "bin/busybox")?;
    for (from, to) in files {
        copy(from, to)?;
    }
    fs::write(root.join("init"), format!("{INIT_START}{init}"))
        .map_err(|e| format!("writing init: {e}"))?;
    let out = Command::new("sh")
        .arg("-c")
        .arg("chmod 755 init bin/busybox && find . | cpio -o -H newc --quiet > ../initramfs.cpio")
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running cpio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the initramfs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A free loopback port (a small race with other processes: acceptable for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Whether something listens on 127.0.0.1:`port` (TCP, /proc/net/tcp state 0A).
pub fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle))
}

/// One QEMU process booting the Linux kernel with DIR/initramfs.cpio, stopped (by PID) when
/// dropped.
pub struct Guest {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Guest {
    /// Starts `qemu-system-x86_64 -accel tcg -smp 1 -no-reboot` with the kernel, the initramfs
    /// of `dir`, the kernel command line `append` and the arguments `args`; the serial port
    /// goes to DIR/NAME.serial.log, QEMU's stderr to DIR/NAME.qemu.log.
    pub fn start(dir: &Path, name: &str, append: &str, args: &[&str]) -> io::Result<Guest> {
        let serial = dir.join(format!("{name}.serial.log"));
        let stderr = dir.join(format!("{name}.qemu.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "1", "-no-reboot"])
            .args(args)
            .arg("-kernel")
            .arg(linux_dir().join("vmlinuz"))
            .arg("-initrd")
            .arg(dir.join("initramfs.cpio"))
            .arg("-append")
            .arg(append)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&stderr)?));
        // SAFETY: only an async-signal-safe libc call between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The emulator dies with this thread, whatever kills it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(Guest {
            child,
            serial,
            stderr,
        })
    }

    /// QEMU's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the guest wrote to its serial port so far.
    pub fn serial(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The ends of the serial log and of QEMU's stderr, for a failure message.
    pub fn diagnostics(&self) -> String {
        let tail = |p: &Path| crate::tail_of_file(p, 3000);
        format!(
            "--- {}:\n{}\n--- {}:\n{}",
            self.serial.display(),
            tail(&self.serial),
            self.stderr.display(),
            tail(&self.stderr)
        )
    }

    /// Waits until something listens on 127.0.0.1:`port` (QEMU itself, for `-netdev socket`
    /// listen or `-incoming`), while QEMU runs, at most `timeout`.
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        while !listening(port) {
            if start.elapsed() > timeout || !self.running() {
                return Err(format!(
                    "QEMU does not listen on 127.0.0.1:{port}\n{}",
                    self.diagnostics()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
