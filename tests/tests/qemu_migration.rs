//! A reference for our live-migration figures: QEMU's own live migration of a plain Linux guest
//! between two QEMU TCG processes on loopback, throttled (`max-bandwidth`) to the stream
//! throughput our hypervisor measured (HV_MIGRATION_BANDWIDTH_MBPS, MB/s, default 20), so both
//! migrations move memory over the same link speed. Scenarios: an idle guest, and a guest that
//! rewrites pages of a tmpfs file at 20000 pages/s (80 MB/s, far beyond the link), once with
//! QEMU's defaults (bounded: it is cancelled when it does not converge) and once with the
//! `auto-converge` capability. The figures go to target/bench/qemu-migration.txt.
//!
//! The guest is the Linux kernel of the network baseline (target/linux-baseline/vmlinuz, put
//! there by scripts/setup.sh) with a busybox initramfs built here (`tests::linux_guest`, as for
//! baseline.rs, without the e1000 module: no NIC). It fails only when QEMU does not start or the
//! idle migration does not complete: a dirty run that does not converge is a figure.
//! By hand: `cargo test -p tests --test qemu_migration -- --include-ignored`.

use std::cell::Cell;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::linux_guest::{build_initramfs, free_port, linux_dir, linux_package, Guest};

const COMMAND: &str = "cargo test -p tests --test qemu_migration -- --include-ignored";

/// The dirtying scenario's rate: 80 MB/s, four times the default link.
const DIRTY_PAGES_PER_S: u64 = 20_000;

/// How long a migration without auto-converge may run before it counts as not converging
/// (an idle one at 20 MB/s takes ~3.5 s: the guest has ~70 MB of non-zero memory).
const NO_CONVERGE_BOUND: Duration = Duration::from_secs(30);

/// Bound for a migration expected to complete (idle, auto-converge).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(60);

/// Boot to the workload marker takes ~2 s under TCG here.
const BOOT_DEADLINE: Duration = Duration::from_secs(40);

/// QEMU 7.2's default `downtime-limit` (ms), which most rows keep: it decides when QEMU stops
/// the guest for the final copy. One row uses ours instead ([`tests::BENCH_DOWNTIME_MS`]).
const DOWNTIME_LIMIT_MS: u64 = 300;

/// The guests' /init (after `linux_guest::INIT_START`). `qmig.workload=idle|dirty=<pages/s>`
/// and `qmig.pages=<file pages>` come from the kernel command line. A heartbeat line every
/// second shows, on the destination's serial, that the migrated guest runs on (its count
/// continues the source's). The dirtier writes non-zero data (QEMU sends a zero page as a flag
/// only, so rewriting zeros would cost the migration nothing), one dd of `batch` pages at a
/// time, paced by /proc/uptime (centiseconds; "1$frac - 100" keeps "08" from reading as octal),
/// forgetting any backlog over one second (a throttled vCPU falls behind, and catching up in a
/// burst is not the workload).
const INIT: &str = r#"work=idle
pages=2048
for w in $(cat /proc/cmdline); do
    case "$w" in
        qmig.workload=*) work="${w#qmig.workload=}" ;;
        qmig.pages=*) pages="${w#qmig.pages=}" ;;
    esac
done
( i=0; while :; do echo "QMIG-HEARTBEAT $i"; i=$((i + 1)); sleep 1; done ) &
case "$work" in
dirty=*)
    rate="${work#dirty=}"
    batch=$((rate / 20))
    [ "$batch" -lt 1 ] && batch=1
    pages=$(((pages + batch - 1) / batch * batch))
    mkdir -p /shm
    mount -t tmpfs -o size=$(((pages + batch) * 4 + 1024))k tmpfs /shm
    yes qmig-dirty | head -c $((batch * 4096)) > /shm/batch
    off=0
    while [ $off -lt $pages ]; do
        dd if=/shm/batch of=/shm/file bs=4096 count=$batch seek=$off conv=notrunc 2>/dev/null
        off=$((off + batch))
    done
    off=0
    read up _ < /proc/uptime
    t0=$((${up%.*} * 100 + 1${up#*.} - 100))
    tr=$t0
    sent=0
    wr=0
    echo "QMIG-WORKLOAD dirty rate=$rate file_pages=$pages batch=$batch"
    while :; do
        read up _ < /proc/uptime
        t=$((${up%.*} * 100 + 1${up#*.} - 100))
        due=$(((t - t0) * rate / 100))
        [ $((due - sent)) -gt "$rate" ] && sent=$((due - rate))
        if [ $sent -lt $due ]; then
            dd if=/shm/batch of=/shm/file bs=4096 count=$batch seek=$off conv=notrunc 2>/dev/null
            sent=$((sent + batch))
            wr=$((wr + batch))
            off=$(((off + batch) % pages))
        else
            usleep 10000
        fi
        if [ $((t - tr)) -ge 200 ]; then
            echo "QMIG-RATE pages_per_s=$((wr * 100 / (t - tr)))"
            tr=$t
            wr=0
        fi
    done
    ;;
*)
    echo "QMIG-WORKLOAD idle"
    wait
    ;;
esac
"#;

/// One QEMU guest with a QMP socket (removed when dropped).
struct Vm {
    guest: Guest,
    qmp: PathBuf,
}

impl Vm {
    /// `incoming`: the port of `-incoming tcp:127.0.0.1:PORT` (a destination).
    fn start(setup: &Setup, name: &str, append: &str, incoming: Option<u16>) -> io::Result<Vm> {
        let qmp = setup.sockets.join(format!("{name}.qmp"));
        let mem_mib = setup.mem_mib.to_string();
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
        let incoming = incoming.map(|port| format!("tcp:127.0.0.1:{port}"));
        // -nodefaults: no VGA (its 16 MiB of VRAM would migrate too), no NIC, no monitor; the
        // destination must be the same machine, so both get exactly these arguments.
        let mut args = vec![
            "-m",
            &mem_mib,
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            &qmp_arg,
        ];
        if let Some(uri) = &incoming {
            args.extend(["-incoming", uri]);
        }
        let guest = Guest::start(setup.dir, name, append, &args)?;
        Ok(Vm { guest, qmp })
    }

    fn serial(&self) -> String {
        self.guest.serial()
    }

    fn running(&mut self) -> bool {
        self.guest.running()
    }

    fn diagnostics(&self) -> String {
        self.guest.diagnostics()
    }

    /// Connects to the QMP socket, which appears shortly after QEMU starts.
    fn qmp(&mut self) -> Result<Qmp, String> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(&self.qmp) {
                Ok(stream) => return Qmp::handshake(stream),
                Err(e) if start.elapsed() > Duration::from_secs(15) || !self.running() => {
                    return Err(format!(
                        "no QMP on {}: {e}\n{}",
                        self.qmp.display(),
                        self.diagnostics()
                    ))
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits until the serial log has a line starting with `marker`; returns that line.
    fn wait_line(&mut self, marker: &str, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.serial().lines().find(|l| l.starts_with(marker)) {
                return Ok(l.to_string());
            }
            if start.elapsed() > timeout || !self.running() {
                return Err(format!(
                    "no '{marker}' line within {timeout:?}\n{}",
                    self.diagnostics()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The highest heartbeat count in the serial log.
    fn last_heartbeat(&self) -> Option<u64> {
        self.serial()
            .lines()
            .filter_map(|l| l.strip_prefix("QMIG-HEARTBEAT ")?.trim().parse().ok())
            .max()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // QEMU itself stops when `guest` is dropped, right after this.
        let _ = fs::remove_file(&self.qmp);
    }
}

/// A QMP connection: one command at a time, asynchronous events skipped.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn handshake(stream: UnixStream) -> Result<Qmp, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            writer,
            reader: BufReader::new(stream),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {}", greeting.text()));
        }
        qmp.execute("qmp_capabilities", "{}")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Json, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => parse_json(&line),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Runs `command` with `arguments` (a JSON object); its `return` value, or its error.
    fn execute(&mut self, command: &str, arguments: &str) -> Result<Json, String> {
        let request = format!("{{\"execute\":\"{command}\",\"arguments\":{arguments}}}\n");
        self.writer
            .write_all(request.as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(format!("QMP {command} {arguments}: {}", err.text()));
            }
        }
    }
}

/// Just enough JSON for QMP's replies.
#[derive(Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn at(&self, path: &[&str]) -> Option<&Json> {
        path.iter().try_fold(self, |v, k| v.get(k))
    }

    fn num(&self, path: &[&str]) -> Option<u64> {
        match self.at(path)? {
            Json::Num(n) if *n >= 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    /// Back to JSON text, for messages.
    fn text(&self) -> String {
        let list = |items: Vec<String>| items.join(",");
        match self {
            Json::Null => "null".into(),
            Json::Bool(b) => b.to_string(),
            Json::Num(n) => n.to_string(),
            Json::Str(s) => format!("{s:?}"),
            Json::Arr(items) => format!("[{}]", list(items.iter().map(Json::text).collect())),
            Json::Obj(fields) => format!(
                "{{{}}}",
                list(
                    fields
                        .iter()
                        .map(|(k, v)| format!("{k:?}:{}", v.text()))
                        .collect()
                )
            ),
        }
    }

    fn str(&self, path: &[&str]) -> Option<&str> {
        match self.at(path)? {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = JsonParser {
        b: text.as_bytes(),
        i: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.b.len() {
        return Err(format!("trailing data in JSON: {text}"));
    }
    Ok(v)
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("JSON: expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        let rest = &self.b[self.i..];
        for (word, v) in [
            (&b"null"[..], Json::Null),
            (b"true", Json::Bool(true)),
            (b"false", Json::Bool(false)),
        ] {
            if rest.starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        match rest.first() {
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    if self.b.get(self.i) == Some(&b',') {
                        self.i += 1;
                    } else {
                        self.eat(b']')?;
                        return Ok(Json::Arr(items));
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    fields.push((key, self.value()?));
                    self.ws();
                    if self.b.get(self.i) == Some(&b',') {
                        self.i += 1;
                    } else {
                        self.eat(b'}')?;
                        return Ok(Json::Obj(fields));
                    }
                }
            }
            _ => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                std::str::from_utf8(&self.b[start..self.i])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(Json::Num)
                    .ok_or_else(|| format!("JSON: bad value at byte {start}"))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let c = *self.b.get(self.i).ok_or("JSON: unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.b.get(self.i).ok_or("JSON: unterminated escape")?;
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4).ok_or("JSON: short \\u")?;
                            self.i += 4;
                            std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .and_then(char::from_u32)
                                .unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

/// Guest RAM: 64 MiB (our VMs' size) when the kernel fits, else the smallest multiple of
/// 16 MiB that boots it. Debian's generic kernel decompresses to its preferred address (16 MiB)
/// and needs `init_size` (~64 MiB) above it, so it cannot start in 64 MiB at all; 80 MiB gets it
/// past decompression but it then runs out of memory (~58 MiB stays reserved), hence extra
/// room: 32 MiB, because the dirtying workload keeps up to 16 MiB in tmpfs (its file and its
/// batch) and 16 MiB of room left the guest killed by the OOM killer in one CI run. Read from
/// the bzImage header (boot protocol 2.10+) so a newer kernel adjusts itself.
fn guest_mib(vmlinuz: &Path) -> Result<u64, String> {
    let img = fs::read(vmlinuz).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    let u32_at = |o: usize| {
        img.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        img.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let version = img
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    if img.get(0x202..0x206) != Some(b"HdrS") || version < Some(0x020a) {
        return Err(format!(
            "{}: not a bzImage of boot protocol 2.10+",
            vmlinuz.display()
        ));
    }
    let need = u64_at(0x258).unwrap_or(0) + u64::from(u32_at(0x260).unwrap_or(0));
    let mib = (need >> 20) + 1 + 32;
    Ok(mib.div_ceil(16).max(4) * 16)
}

/// The guest's own dirtying rates (pages/s) reported in `serial`.
fn guest_rates(serial: &str) -> Vec<u64> {
    serial
        .lines()
        .filter_map(|l| {
            l.strip_prefix("QMIG-RATE pages_per_s=")?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// One migration's figures: a row of the table.
struct Row {
    scenario: String,
    auto_converge: bool,
    downtime_limit_ms: u64,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    transferred: Option<u64>,
    rounds: Option<u64>,
    /// The highest `cpu-throttle-percentage` seen while polling (auto-converge only).
    throttle: Option<u64>,
    /// The guest's own dirtying rates (pages/s, 2 s windows) while it migrated: the median
    /// and the last (auto-converge's throttle bites only at the end).
    guest_rate: Option<(u64, u64)>,
    status: String,
    completed: bool,
}

/// Everything a scenario's migrations share.
struct Setup<'a> {
    /// Logs and the initramfs.
    dir: &'a Path,
    /// QMP sockets: a short path (a unix socket's path has at most 107 bytes, and
    /// CARGO_TARGET_DIR may be long).
    sockets: &'a Path,
    mem_mib: u64,
    bandwidth: u64,
    /// The most other emulators seen running during a migration.
    contention: Cell<usize>,
}

/// A source guest running its workload, and its QMP connection.
struct Source {
    vm: Vm,
    qmp: Qmp,
    append: String,
}

/// The source for the next dirty run after `last`: `src` again when the run left it running
/// (a cancelled migration), else a freshly booted `name` (a completed migration leaves the
/// source stopped).
fn next_source(
    setup: &Setup,
    mut src: Source,
    last: &Row,
    name: &str,
    append: &str,
) -> Result<Source, String> {
    if last.completed || !src.vm.running() {
        drop(src);
        boot_source(setup, name, append.to_string(), true)
    } else {
        Ok(src)
    }
}

/// Boots a source guest (kernel command line `append`) and waits until its workload runs.
fn boot_source(setup: &Setup, name: &str, append: String, dirty: bool) -> Result<Source, String> {
    let mut vm =
        Vm::start(setup, name, &append, None).map_err(|e| format!("starting QEMU: {e}"))?;
    let qmp = vm.qmp()?;
    vm.wait_line("QMIG-WORKLOAD", BOOT_DEADLINE)?;
    if dirty {
        // The first rate line: the dirtier has run at its pace for a while before migrating.
        vm.wait_line("QMIG-RATE", Duration::from_secs(15))?;
    }
    Ok(Source { vm, qmp, append })
}

/// Migrates `src` to a fresh destination QEMU (`dest_name`) and returns the figures. Past
/// `bound` a migration still running is cancelled and reported as not converging; the source
/// then runs on and can serve another migration. The destination is checked and stopped here.
fn migrate(
    setup: &Setup,
    src: &mut Source,
    dest_name: &str,
    scenario: &str,
    auto_converge: bool,
    downtime_limit_ms: u64,
    bound: Duration,
) -> Result<Row, String> {
    let port = free_port();
    let mut dest = Vm::start(setup, dest_name, &src.append, Some(port))
        .map_err(|e| format!("starting the destination QEMU: {e}"))?;
    let mut dest_qmp = dest.qmp()?;
    dest.guest
        .wait_listening(port, Duration::from_secs(15))
        .map_err(|e| format!("the destination: {e}"))?;

    let qmp = &mut src.qmp;
    qmp.execute(
        "migrate-set-parameters",
        &format!(
            "{{\"max-bandwidth\":{},\"downtime-limit\":{downtime_limit_ms}}}",
            setup.bandwidth
        ),
    )?;
    qmp.execute(
        "migrate-set-capabilities",
        &format!(
            "{{\"capabilities\":[{{\"capability\":\"auto-converge\",\"state\":{auto_converge}}}]}}"
        ),
    )?;
    let rates_before = guest_rates(&src.vm.serial()).len();
    qmp.execute("migrate", &format!("{{\"uri\":\"tcp:127.0.0.1:{port}\"}}"))?;
    let started = Instant::now();
    let mut throttle = None;
    let ours = [src.vm.guest.id(), dest.guest.id()];
    let mut polls = 0;
    let info = loop {
        thread::sleep(Duration::from_millis(100));
        if polls % 10 == 0 {
            let others = other_emulators(&ours);
            setup.contention.set(setup.contention.get().max(others));
        }
        polls += 1;
        let info = qmp.execute("query-migrate", "{}")?;
        if let Some(t) = info.num(&["cpu-throttle-percentage"]) {
            throttle = throttle.max(Some(t));
        }
        match info.str(&["status"]) {
            Some("completed" | "failed" | "cancelled") => break info,
            _ if started.elapsed() > bound => break info,
            _ => {}
        }
    };
    let status = info.str(&["status"]).unwrap_or("?").to_string();
    let mut row = Row {
        scenario: scenario.to_string(),
        auto_converge,
        downtime_limit_ms,
        total_ms: info.num(&["total-time"]),
        downtime_ms: info.num(&["downtime"]),
        transferred: info.num(&["ram", "transferred"]),
        rounds: info.num(&["ram", "dirty-sync-count"]),
        throttle,
        guest_rate: {
            let rates = guest_rates(&src.vm.serial());
            let during = rates.get(rates_before..).unwrap_or(&[]);
            median(during).zip(during.last().copied())
        },
        completed: status == "completed",
        status,
    };
    match row.status.as_str() {
        "completed" => {}
        "failed" | "cancelled" => {
            row.status = format!(
                "{}: {}",
                row.status,
                info.str(&["error-desc"]).unwrap_or("?")
            );
            eprintln!(
                "{scenario}: migration {}\n{}",
                row.status,
                dest.diagnostics()
            );
            return Ok(row);
        }
        _ => {
            row.status = format!("did not converge in {} s", bound.as_secs());
            qmp.execute("migrate_cancel", "{}")?;
            let t = Instant::now();
            loop {
                let s = qmp.execute("query-migrate", "{}")?;
                match s.str(&["status"]) {
                    Some("cancelled" | "failed" | "completed") => break,
                    _ if t.elapsed() > Duration::from_secs(20) => {
                        return Err("migrate_cancel did not finish within 20 s".into())
                    }
                    _ => thread::sleep(Duration::from_millis(100)),
                }
            }
            return Ok(row);
        }
    }

    // The migrated guest must run on: QEMU says so, and its heartbeat continues the source's
    // count (a rebooted guest would start again at 0).
    let last = src.vm.last_heartbeat().unwrap_or(0);
    let alive = Instant::now();
    loop {
        let state = dest_qmp.execute("query-status", "{}")?;
        if state.str(&["status"]) == Some("running")
            && dest.last_heartbeat().is_some_and(|h| h > last)
        {
            return Ok(row);
        }
        // Generous: other tests' emulators may share the cores.
        if alive.elapsed() > Duration::from_secs(30) || !dest.running() {
            row.status = format!("completed, destination silent after heartbeat {last}");
            row.completed = false;
            eprintln!("{scenario}: {}\n{}", row.status, dest.diagnostics());
            return Ok(row);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn table(rows: &[Row], bandwidth_mbs: f64) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let header = [
        "scenario",
        "auto-converge",
        "downtime-limit",
        "max-bandwidth",
        "total ms",
        "downtime ms",
        "MB transferred",
        "rounds",
        "max throttle %",
        "guest pages/s (median, last)",
        "status",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scenario.clone(),
                if r.auto_converge { "on" } else { "off" }.to_string(),
                format!("{} ms", r.downtime_limit_ms),
                format!("{bandwidth_mbs} MB/s"),
                opt(r.total_ms),
                if r.completed {
                    opt(r.downtime_ms)
                } else {
                    "-".into()
                },
                r.transferred
                    .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6)),
                opt(r.rounds),
                opt(r.throttle),
                r.guest_rate
                    .map_or("-".into(), |(med, last)| format!("{med}, {last}")),
                r.status.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<String>| {
        let mut l = String::from(" ");
        for (i, (c, w)) in cols.iter().zip(&widths).enumerate() {
            // Text left, numbers right.
            if (2..10).contains(&i) {
                let _ = write!(l, " {c:>w$} ");
            } else {
                let _ = write!(l, " {c:<w$} ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in cells {
        line(row);
    }
    out
}

#[test]
#[ignore = "end-to-end: boots QEMU guests; run ./run-tests.sh"]
fn qemu_migration_baseline() {
    let started = Instant::now();
    let package = linux_package();
    let bandwidth_mbs: f64 = match std::env::var("HV_MIGRATION_BANDWIDTH_MBPS") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|b: &f64| b.is_finite() && *b > 0.0)
            .unwrap_or_else(|| panic!("HV_MIGRATION_BANDWIDTH_MBPS={v}: not a positive number")),
        Err(_) => 20.0,
    };
    let bandwidth = (bandwidth_mbs * 1e6) as u64;
    let mem_mib = guest_mib(&linux_dir().join("vmlinuz")).unwrap_or_else(|e| panic!("{e}"));
    // The dirtied file is the hot set our benchmark's test guest rewrites (12 MiB: the guest has
    // ~38 MiB free, and the dirtier also keeps a 4 MiB batch of data), so both run one workload.
    // When it is no larger than what QEMU may copy with the guest stopped (bandwidth x
    // downtime-limit), QEMU converges at any rate: the report says so.
    let switchover = bandwidth * DOWNTIME_LIMIT_MS / 1000;
    let file_pages = tests::BENCH_DIRTY_HOT_PAGES;

    let dir = tests::target_dir()
        .join("e2e")
        .join(format!("qemu_migration-{}", std::process::id()));
    let sockets = std::env::temp_dir().join(format!("qmig-{}", std::process::id()));
    for d in [&dir, &sockets] {
        let _ = fs::remove_dir_all(d);
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    // Unlike the logs, the sockets' folder is of no use after a failure.
    let _sockets = RemoveOnDrop(sockets.clone());
    let setup = Setup {
        dir: &dir,
        sockets: &sockets,
        mem_mib,
        bandwidth,
        contention: Cell::new(0),
    };
    // A failed step's message, and where its logs stay.
    macro_rules! ok {
        ($step:expr) => {
            $step.unwrap_or_else(|e| panic!("{e}\n(logs kept in {})", dir.display()))
        };
    }
    ok!(build_initramfs(&dir, INIT, &[]));
    let append = |work: &str| {
        format!("console=ttyS0 quiet panic=1 qmig.workload={work} qmig.pages={file_pages}")
    };
    let mut rows = Vec::new();

    let mut src = ok!(boot_source(&setup, "idle-src", append("idle"), false));
    let row = ok!(migrate(
        &setup,
        &mut src,
        "idle-dst",
        "idle",
        false,
        DOWNTIME_LIMIT_MS,
        MIGRATION_DEADLINE,
    ));
    assert!(
        row.completed,
        "the idle migration did not complete: {} (logs kept in {})\n{}",
        row.status,
        dir.display(),
        src.vm.diagnostics()
    );
    rows.push(row);
    drop(src);

    // QEMU's defaults first, then auto-converge, then auto-converge at our downtime target; each
    // run's source serves the next if the run left it running (see `next_source`).
    let scenario = format!("dirty {DIRTY_PAGES_PER_S} pages/s");
    let dirty = append(&format!("dirty={DIRTY_PAGES_PER_S}"));
    let mut src = ok!(boot_source(&setup, "dirty-src", dirty.clone(), true));
    let plain = ok!(migrate(
        &setup,
        &mut src,
        "dirty-dst",
        &scenario,
        false,
        DOWNTIME_LIMIT_MS,
        NO_CONVERGE_BOUND,
    ));
    src = ok!(next_source(&setup, src, &plain, "dirty2-src", &dirty));
    rows.push(plain);
    let ac = ok!(migrate(
        &setup,
        &mut src,
        "dirty-ac-dst",
        &scenario,
        true,
        DOWNTIME_LIMIT_MS,
        MIGRATION_DEADLINE,
    ));
    src = ok!(next_source(&setup, src, &ac, "dirty3-src", &dirty));
    rows.push(ac);
    // Like for like with ours: the same downtime target, so what QEMU sends to get there
    // compares with our bytes on the wire.
    let tight = migrate(
        &setup,
        &mut src,
        "dirty-tight-dst",
        &scenario,
        true,
        tests::BENCH_DOWNTIME_MS,
        MIGRATION_DEADLINE,
    );
    // QEMU's own migration can fail here: one CI run's destination guest panicked after a
    // migration with this limit (stack-protector, a corrupted kernel stack). A row says so;
    // the reference is not ours to fail.
    rows.push(tight.unwrap_or_else(|e| Row {
        scenario: scenario.clone(),
        auto_converge: true,
        downtime_limit_ms: tests::BENCH_DOWNTIME_MS,
        total_ms: None,
        downtime_ms: None,
        transferred: None,
        rounds: None,
        throttle: None,
        guest_rate: None,
        status: format!("failed: {e}"),
        completed: false,
    }));
    drop(src);

    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let mut report = String::new();
    writeln!(
        report,
        "QEMU's own live migration (reference for ours; one run; command: {COMMAND}):\n\
         \x20 {qemu}, TCG, -m {mem_mib}{}, source and destination on 127.0.0.1\n\
         \x20 guest: Debian {}, busybox initramfs; dirty = dd of non-zero 4 KiB pages over a \
         {:.1} MiB tmpfs file, paced at {DIRTY_PAGES_PER_S} pages/s (guest pages/s: the \
         guest's own count in 2 s windows while migrating)\n\
         \x20 QEMU lifts max-bandwidth for the final copy with the guest stopped, so its downtime \
         is at loopback speed, not at the link's\n\
         \x20 host: {} cores, {}; wall time {:.0} s",
        if mem_mib > 64 {
            " (64 MiB cannot boot this kernel)"
        } else {
            ""
        },
        package,
        file_pages as f64 / 256.0,
        thread::available_parallelism().map_or(0, |n| n.get()),
        match setup.contention.get() {
            0 => "no other emulator ran during the migrations".to_string(),
            n => format!("CONTENDED: up to {n} other QEMU/Bochs processes ran during the migrations"),
        },
        started.elapsed().as_secs_f64(),
    )
    .unwrap();
    if file_pages * 4096 <= switchover {
        writeln!(
            report,
            "  (the dirtied file is no larger than bandwidth x QEMU's default downtime-limit: \
             its defaults converge at any rate)"
        )
        .unwrap();
    }
    report.push_str(&table(&rows, bandwidth_mbs));
    print!("{report}");
    let bench = tests::target_dir().join("bench");
    fs::create_dir_all(&bench).unwrap();
    fs::write(bench.join("qemu-migration.txt"), &report).unwrap();
    let _ = fs::remove_dir_all(&dir);
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How many QEMU or Bochs processes run besides `ours`: figures taken while other tests'
/// emulators compete for the two cores are not comparable, so the report says so.
fn other_emulators(ours: &[u32]) -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system") || c.starts_with("bochs"))
        })
        .count()
}

fn median(values: &[u64]) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}
