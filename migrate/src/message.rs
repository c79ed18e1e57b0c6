//! The messages of the migration protocol and their payload encoding, one message per frame kind.
//!
//! [`Message::encode`] appends a complete frame (via [`crate::frame::encode`]);
//! [`Message::decode`] turns a [`Frame`] back into a message. All integers are little-endian, like
//! the frame header. Strings travel as a `u16` byte length followed by UTF-8 bytes, byte strings
//! as a `u32` length followed by the bytes.
//!
//! Decoding is strict, because the receiver acts on what it decodes (it reserves memory, writes
//! guest pages, loads vCPU registers): every length is checked against the bytes present and
//! against a per-field limit, enum tags outside the known set are refused, and bytes left over
//! after the last field are an error. A stream that fails any check aborts the migration; nothing
//! is guessed or skipped.
//!
//! Payload layouts (after the 16-byte frame header):
//!
//! ```text
//! Hello          min_version u16 | max_version u16 | node name str | capabilities u32 |
//!                cpu vendor u8 (0 Intel, 1 AMD) | cpu features u64
//! VmConfig       name str | mem_bytes u64 | vcpus u32 | dirty_rate u64 | hot_pages u64 |
//!                mac [u8; 6] |
//!                has disk u8 (0/1) | [disk id str]
//! VmConfigReply  0 Accept | 1 Refuse, reason u8: 0 NameExists, 1 NotEnoughMemory free u64,
//!                2 IncompatibleCpu detail str, 3 Busy, 4 Other text str
//! PageBatch      round u32 | count u32 | count x (page u64 | encoding u8: 0 Raw 4096 bytes,
//!                1 Zero, 2 Compressed len u32 + bytes)
//! RoundMarker    round u32 | pages_sent u64 | dirty_remaining u64
//! Switchover     (empty)
//! VcpuState      vcpu index u32 | state bytes (u32 length + bytes, vmx VcpuState::encode)
//! DeviceState    device id u32 | state bytes (u32 length + bytes)
//! Commit         (empty)
//! CommitAck      (empty)
//! Abort          reason u8 | text str
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::frame::{self, Frame, FrameError, FrameKind};

/// Size of a guest page: the unit of the dirty log and of page batches.
pub const PAGE_SIZE: usize = 4096;

/// Longest node or VM name, in bytes. Names appear on consoles and in status lines; a bound keeps
/// a hostile peer from making us store long strings.
pub const MAX_NAME_LEN: usize = 64;

/// Longest free text (refusal details, abort explanations, disk ids), in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// Largest vCPU count a VM configuration may ask for. The first version runs all vCPUs on one
/// core; the bound stops a configuration from making the destination allocate absurd state.
pub const MAX_VCPUS: u32 = 256;

/// Largest encoded vCPU state accepted: the fixed sections are under 1.5 KiB and the XSAVE area
/// is at most 64 KiB in the vmx encoding, so 128 KiB leaves room without being unbounded.
pub const MAX_VCPU_STATE_LEN: usize = 128 * 1024;

/// Largest device state blob (a device model's registers and queues, never guest RAM).
pub const MAX_DEVICE_STATE_LEN: usize = 1024 * 1024;

/// The first bytes of an encoded vmx `VcpuState` and the length of its header. `migrate` does not
/// depend on `vmx` (see the crate docs), so it checks the envelope only: the magic and that the
/// body length in that header matches the bytes present. The full decode happens in vmx.
const VCPU_STATE_MAGIC: [u8; 4] = *b"VCPU";
const VCPU_STATE_HEADER_LEN: usize = 12;

/// Capability bits announced in [`Hello`]. Each side sends what it supports; both use only the
/// intersection ([`Capabilities::common`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// Zero pages may be sent as [`PageEncoding::Zero`] markers.
    pub const ZERO_PAGES: Capabilities = Capabilities(1 << 0);
    /// Pages may be sent as [`PageEncoding::Compressed`].
    pub const COMPRESSED: Capabilities = Capabilities(1 << 1);
    /// Rounds are driven by hardware dirty bits (informational: the destination may size its
    /// expectations of round counts on it).
    pub const DIRTY_BITS: Capabilities = Capabilities(1 << 2);
    /// Every bit this build knows.
    pub const KNOWN: Capabilities = Capabilities(0b111);

    /// True if every bit of `other` is set here.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// The capabilities both sides may use: the intersection, restricted to the bits this build
    /// knows. Unknown bits are accepted on the wire (a newer peer may announce more) but never
    /// used, which is why they are not a decode error.
    pub const fn common(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0 & Self::KNOWN.0)
    }

    /// The union of two sets.
    pub const fn with(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }
}

/// The CPU vendor of a node. Migration between vendors is a goal of the design (vendor-neutral
/// vCPU state), so this is information for the compatibility check, not a hard barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuVendor {
    Intel,
    Amd,
}

/// Opens a connection in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version this node speaks.
    pub min_version: u16,
    /// Highest protocol version this node speaks; at least `min_version`.
    pub max_version: u16,
    /// The node's cluster name, for logs and status lines.
    pub node_name: String,
    pub capabilities: Capabilities,
    pub cpu_vendor: CpuVendor,
    /// A summary of the guest-visible CPU features the node can offer (a bitset defined by the
    /// cluster layer, e.g. from CPUID leaves 1 and 7). The destination refuses a VM whose source
    /// features it does not have all of.
    pub cpu_features: u64,
}

/// The configuration of the VM being moved; the destination creates the VM from it before any
/// page is sent (seed step 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    /// Guest RAM in bytes, a non-zero multiple of [`PAGE_SIZE`].
    pub mem_bytes: u64,
    /// Number of vCPUs, `1..=MAX_VCPUS`.
    pub vcpus: u32,
    /// The guest's configured dirtying workload in pages per second (the test guest's knob); 0
    /// for an ordinary guest. Carried so the VM keeps its behaviour on the new node.
    pub dirty_rate: u64,
    /// The pages that workload rewrites (the test guest's `hot=`; 0: all of them).
    pub hot_pages: u64,
    /// The MAC of the VM's NIC, announced by the destination after the move (seed step 8).
    pub mac: [u8; 6],
    /// The shared disk the VM uses, if any: handed over at the switchover, never copied.
    pub disk: Option<SharedDisk>,
}

/// A VM's disk on shared storage, as both nodes name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDisk {
    /// Where it lives, in the nodes' own spelling (an iSCSI `<target iqn>/<lun>`).
    pub id: String,
    /// Its size in 512-byte sectors: the destination builds the same virtio-blk device before
    /// the device state arrives.
    pub sectors: u64,
}

/// Why the destination refuses a VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefuseReason {
    /// A VM of that name already exists on the destination.
    NameExists,
    /// The destination lacks the memory; `free_bytes` is what it has.
    NotEnoughMemory { free_bytes: u64 },
    /// The destination's CPU cannot run the VM as configured.
    IncompatibleCpu { detail: String },
    /// The destination is already receiving a migration.
    Busy,
    /// Any other reason, as text.
    Other(String),
}

/// The destination's answer to a [`VmConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigReply {
    Accept,
    Refuse(RefuseReason),
}

/// How one page travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageEncoding {
    /// The page's bytes as they are.
    Raw(alloc::boxed::Box<[u8; PAGE_SIZE]>),
    /// The page is all zeros: a marker only.
    Zero,
    /// The page run-length encoded by [`compress_page`]; always decodes to exactly one page.
    Compressed(Vec<u8>),
}

/// One page of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEntry {
    /// Guest-physical page number (address / [`PAGE_SIZE`]).
    pub page: u64,
    pub encoding: PageEncoding,
}

/// A batch of guest pages sent in one round. Page numbers are strictly increasing within a batch:
/// the sender walks the dirty log in order anyway, and the rule makes duplicates impossible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    pub round: u32,
    pub entries: Vec<PageEntry>,
}

/// Bytes of a batch entry before its body: the page number and the encoding's tag.
const ENTRY_HEADER_LEN: usize = 9;

/// Bytes of a batch entry holding a raw page.
pub const RAW_ENTRY_LEN: usize = ENTRY_HEADER_LEN + PAGE_SIZE;

/// One page of a received batch, borrowed from the frame it arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    Raw(&'a [u8; PAGE_SIZE]),
    Zero,
    /// Checked to decode to exactly one page.
    Compressed(&'a [u8]),
}

/// A page batch read where it lies in the received frame, so that its pages go into guest memory
/// with no copy and no allocation on the way (decoding into a [`PageBatch`] costs a page-sized
/// allocation and copy per page, which under emulation was a large share of the receiver's time
/// per byte). [`PageBatchView::parse`] checks the whole payload first, exactly as
/// [`Message::decode_payload`] does, so a malformed batch is refused before any page is used.
#[derive(Debug, Clone, Copy)]
pub struct PageBatchView<'a> {
    pub round: u32,
    count: usize,
    /// The entries, after the round and the count.
    entries: &'a [u8],
}

impl<'a> PageBatchView<'a> {
    /// Checks a page batch payload whole: every entry complete, page numbers strictly
    /// increasing, known encodings, compressed pages that decode to one page, no trailing bytes.
    pub fn parse(payload: &'a [u8]) -> Result<Self, MessageError> {
        let mut r = Reader::new(payload);
        let round = r.u32("batch round")?;
        let count = r.u32("batch count")? as usize;
        let entries = &payload[r.pos..];
        let mut entry_reader = Reader::new(entries);
        let mut previous = None;
        for _ in 0..count {
            next_page(&mut entry_reader, &mut previous)?;
        }
        entry_reader.finish()?;
        Ok(Self {
            round,
            count,
            entries,
        })
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pages, in order, each with its page number.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageData<'a>)> + 'a {
        let mut r = Reader::new(self.entries);
        let mut previous = None;
        // `parse` checked every entry, so reading them again cannot fail; the iterator would
        // end at the first error if it did.
        (0..self.count).map_while(move |_| next_page(&mut r, &mut previous).ok())
    }

    /// The batch as an owned message.
    pub fn to_batch(&self) -> PageBatch {
        let entries = self
            .pages()
            .map(|(page, data)| PageEntry {
                page,
                encoding: data.to_encoding(),
            })
            .collect();
        PageBatch {
            round: self.round,
            entries,
        }
    }
}

/// Reads one batch entry, checking that its page number follows `previous`.
fn next_page<'a>(
    r: &mut Reader<'a>,
    previous: &mut Option<u64>,
) -> Result<(u64, PageData<'a>), MessageError> {
    let page = r.u64("page number")?;
    if previous.is_some_and(|p| page <= p) {
        return Err(MessageError::InvalidValue {
            field: "page number order",
            value: page,
        });
    }
    *previous = Some(page);
    let data = match r.u8("page encoding")? {
        0 => {
            let bytes = r.take(PAGE_SIZE, "raw page")?;
            PageData::Raw(
                bytes
                    .try_into()
                    .map_err(|_| MessageError::Truncated { field: "raw page" })?,
            )
        }
        1 => PageData::Zero,
        2 => {
            let len = r.u32("compressed page")? as usize;
            if len > PAGE_SIZE {
                return Err(MessageError::TooLong {
                    field: "compressed page",
                    len,
                    max: PAGE_SIZE,
                });
            }
            let bytes = r.take(len, "compressed page")?;
            check_compressed_page(bytes)?;
            PageData::Compressed(bytes)
        }
        v => {
            return Err(MessageError::UnknownValue {
                field: "page encoding",
                value: u64::from(v),
            })
        }
    };
    Ok((page, data))
}

/// Where an encoder appends its bytes: a growing `Vec`, or a [`SliceSink`] over space of a size
/// known beforehand (a pipe's own buffer).
pub(crate) trait ByteSink {
    fn put(&mut self, bytes: &[u8]);
}

impl ByteSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Fills a slice from its start. Bytes past its end are not written but remembered, so that
/// [`SliceSink::finish`] reports a size computed wrongly instead of the encoder panicking.
pub(crate) struct SliceSink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceSink<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Ok once exactly the whole slice was written.
    pub(crate) fn finish(self) -> Result<(), MessageError> {
        if self.len == self.buf.len() {
            Ok(())
        } else {
            Err(MessageError::InvalidValue {
                field: "encoded length",
                value: self.len as u64,
            })
        }
    }
}

impl ByteSink for SliceSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if let Some(space) = self.buf.get_mut(self.len..end) {
            space.copy_from_slice(bytes);
        }
        self.len = end;
    }
}

/// Writes the payload of a page batch of `count` pages (the [`Message::PageBatch`] layout), the
/// pages taken from wherever they lie: a message's entries, or guest memory
/// ([`crate::pending::PendingBatch`]). `pages` must yield exactly `count` items.
pub(crate) fn encode_page_batch<'a>(
    out: &mut impl ByteSink,
    round: u32,
    count: usize,
    pages: impl Iterator<Item = (u64, PageData<'a>)>,
) -> Result<(), MessageError> {
    out.put(&round.to_le_bytes());
    let count_field = u32::try_from(count).map_err(|_| MessageError::TooLong {
        field: "page batch",
        len: count,
        max: u32::MAX as usize,
    })?;
    out.put(&count_field.to_le_bytes());
    let mut previous: Option<u64> = None;
    let mut written = 0;
    for (page, data) in pages {
        if previous.is_some_and(|p| page <= p) {
            return Err(MessageError::InvalidValue {
                field: "page number order",
                value: page,
            });
        }
        previous = Some(page);
        out.put(&page.to_le_bytes());
        match data {
            PageData::Raw(bytes) => {
                out.put(&[0]);
                out.put(&bytes[..]);
            }
            PageData::Zero => out.put(&[1]),
            PageData::Compressed(data) => {
                check_compressed_page(data)?;
                out.put(&[2]);
                put_blob(out, data, "compressed page", PAGE_SIZE)?;
            }
        }
        written += 1;
    }
    if written != count {
        return Err(MessageError::InvalidValue {
            field: "page batch count",
            value: written as u64,
        });
    }
    Ok(())
}

impl PageData<'_> {
    /// The page as an owned encoding (a raw page is copied into a box of its own).
    pub fn to_encoding(self) -> PageEncoding {
        match self {
            PageData::Raw(bytes) => PageEncoding::Raw(alloc::boxed::Box::new(*bytes)),
            PageData::Zero => PageEncoding::Zero,
            PageData::Compressed(bytes) => PageEncoding::Compressed(bytes.to_vec()),
        }
    }
}

impl PageEntry {
    /// The entry's page as borrowed data.
    pub fn data(&self) -> PageData<'_> {
        match &self.encoding {
            PageEncoding::Raw(bytes) => PageData::Raw(bytes),
            PageEncoding::Zero => PageData::Zero,
            PageEncoding::Compressed(bytes) => PageData::Compressed(bytes),
        }
    }
}

/// The end of one pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundMarker {
    pub round: u32,
    /// Pages sent in this round.
    pub pages_sent: u64,
    /// Pages dirtied during the round, still to be sent.
    pub dirty_remaining: u64,
}

/// The architectural state of one vCPU, as encoded by vmx's `VcpuState::encode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStateMsg {
    pub vcpu: u32,
    pub bytes: Vec<u8>,
}

/// The state of one device model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateMsg {
    /// Which device (assigned by the device layer; opaque here).
    pub device: u32,
    pub bytes: Vec<u8>,
}

/// Why a migration was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// An operator ran `migrate cancel`.
    Cancelled,
    /// A wait ran past its deadline.
    Timeout,
    /// The destination refused the VM.
    Refused,
    /// The peer sent something malformed or out of order.
    ProtocolError,
    /// The connection failed.
    TransportError,
    /// A local failure (out of memory, device save/restore failed, ...).
    LocalFailure,
}

/// Either side gives up; the VM stays on (or goes back to running on) the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub reason: AbortReason,
    pub text: String,
}

/// Where a VM stands on the node asked by an [`Message::OwnerQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The VM runs (or is paused) here: this node committed it.
    Runs,
    /// A migration of it is still arriving here, not committed yet: ask again later.
    Receiving,
    /// No such VM here, and none arriving: this node did not commit it, and never will
    /// (a destination that failed ignores everything after).
    Absent,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    VmConfig(VmConfig),
    VmConfigReply(ConfigReply),
    PageBatch(PageBatch),
    RoundMarker(RoundMarker),
    /// The source paused the VM; final pages and state follow.
    Switchover,
    VcpuState(VcpuStateMsg),
    DeviceState(DeviceStateMsg),
    /// The source asks the destination to take over.
    Commit,
    /// The destination runs the VM now; the source may destroy its copy.
    CommitAck,
    Abort(Abort),
    /// Asks where the named VM stands on the peer (see [`Ownership`]).
    OwnerQuery {
        vm: String,
    },
    /// The answer to [`Message::OwnerQuery`].
    OwnerReply {
        vm: String,
        ownership: Ownership,
    },
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The frame layer refused the bytes or the payload.
    Frame(FrameError),
    /// The payload ends inside `field`.
    Truncated { field: &'static str },
    /// `count` bytes follow the last field.
    TrailingBytes { count: usize },
    /// An enum tag this build does not know.
    UnknownValue { field: &'static str, value: u64 },
    /// A length above the field's limit.
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A string that is not UTF-8.
    InvalidUtf8 { field: &'static str },
    /// A value outside the field's valid range.
    InvalidValue { field: &'static str, value: u64 },
    /// A compressed page that does not decode to exactly one page.
    BadCompressedPage,
}

impl From<FrameError> for MessageError {
    fn from(error: FrameError) -> Self {
        MessageError::Frame(error)
    }
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::Frame(e) => write!(f, "{e}"),
            MessageError::Truncated { field } => write!(f, "message truncated in {field}"),
            MessageError::TrailingBytes { count } => {
                write!(f, "{count} unexpected bytes after the message")
            }
            MessageError::UnknownValue { field, value } => {
                write!(f, "unknown value {value} for {field}")
            }
            MessageError::TooLong { field, len, max } => {
                write!(f, "{field} of {len} bytes exceeds the limit of {max}")
            }
            MessageError::InvalidUtf8 { field } => write!(f, "{field} is not UTF-8"),
            MessageError::InvalidValue { field, value } => {
                write!(f, "invalid value {value} for {field}")
            }
            MessageError::BadCompressedPage => {
                write!(f, "compressed page does not decode to exactly one page")
            }
        }
    }
}

impl core::error::Error for MessageError {}

// ---------------------------------------------------------------------------------------------
// Page compression

/// Compresses one page with a byte-oriented run-length code, or returns `None` when that would
/// not make it smaller (the sender then sends it raw).
///
/// Why run-length coding: the pages that compress well in a guest are mostly runs (partly used
/// heap and stack pages, page tables with a few entries, buffers filled with one byte); RLE
/// catches those in one linear pass with no tables, and its decoder cannot be made to produce
/// more than one page, so a hostile stream cannot blow up memory. Text and code pages would need
/// an LZ-style coder; that can come later behind its own capability bit.
///
/// Format: a sequence of tokens. A control byte `c < 0x80` is followed by `c + 1` literal bytes;
/// `c >= 0x80` is followed by one byte repeated `c - 0x80 + 3` times (3..=130). The tokens must
/// produce exactly [`PAGE_SIZE`] bytes.
pub fn compress_page(page: &[u8; PAGE_SIZE]) -> Option<Vec<u8>> {
    if !worth_compressing(page) {
        return None;
    }
    const MAX_LITERAL: usize = 128;
    const MIN_RUN: usize = 3;
    const MAX_RUN: usize = 130;

    let mut out = Vec::new();
    let mut literal_start = 0;
    let mut i = 0;
    // Flushes page[start..end] as literal tokens of at most MAX_LITERAL bytes.
    let flush = |out: &mut Vec<u8>, start: usize, end: usize| {
        let mut s = start;
        while s < end {
            let n = (end - s).min(MAX_LITERAL);
            out.push((n - 1) as u8);
            out.extend_from_slice(&page[s..s + n]);
            s += n;
        }
    };
    while i < PAGE_SIZE {
        let byte = page[i];
        let mut run = 1;
        while i + run < PAGE_SIZE && run < MAX_RUN && page[i + run] == byte {
            run += 1;
        }
        if run >= MIN_RUN {
            flush(&mut out, literal_start, i);
            out.push((0x80 + run - MIN_RUN) as u8);
            out.push(byte);
            i += run;
            literal_start = i;
        } else {
            i += run;
        }
        if out.len() >= PAGE_SIZE {
            return None;
        }
    }
    flush(&mut out, literal_start, PAGE_SIZE);
    if out.len() >= PAGE_SIZE {
        None
    } else {
        Some(out)
    }
}

/// A cheap pre-check before [`compress_page`]'s byte loop: run-length coding only pays off on
/// pages with long runs, and a run of 15 bytes or more covers at least one aligned 8-byte word
/// of identical bytes. Pages with fewer than about 1/16 of their words like that (most data
/// pages) are sent raw without the full scan, which costs far more per page than the copy
/// itself. Only every fourth word is looked at: the check runs on every page sent, so its cost
/// is paid per page, and a run of 39 bytes or more covers four aligned words wherever it
/// starts, one of which is looked at.
fn worth_compressing(page: &[u8; PAGE_SIZE]) -> bool {
    const STRIDE: usize = 4;
    const MIN_RUN_WORDS: usize = PAGE_SIZE / 8 / 16 / STRIDE;
    let mut run_words = 0;
    for word in page.as_chunks::<8>().0.iter().step_by(STRIDE) {
        let w = u64::from_le_bytes(*word);
        // All eight bytes are equal exactly when rotating by one byte changes nothing.
        if w == w.rotate_left(8) {
            run_words += 1;
            if run_words >= MIN_RUN_WORDS {
                return true;
            }
        }
    }
    false
}

/// Decodes a page produced by [`compress_page`]. Refuses any stream that does not produce exactly
/// one page.
pub fn decompress_page(data: &[u8]) -> Result<alloc::boxed::Box<[u8; PAGE_SIZE]>, MessageError> {
    let mut page = alloc::boxed::Box::new([0u8; PAGE_SIZE]);
    decompress_page_into(data, &mut page)?;
    Ok(page)
}

/// Like [`decompress_page`], into a caller's buffer. On error `page` holds some of the output.
pub fn decompress_page_into(data: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), MessageError> {
    run_tokens(data, Some(page))
}

/// Checks that `data` decodes to exactly one page, as [`decompress_page`] would, without writing
/// the page anywhere.
pub fn check_compressed_page(data: &[u8]) -> Result<(), MessageError> {
    run_tokens(data, None)
}

/// Walks the tokens of a compressed page, writing the output into `page` if there is one.
fn run_tokens(data: &[u8], mut page: Option<&mut [u8; PAGE_SIZE]>) -> Result<(), MessageError> {
    let mut out = 0usize;
    let mut i = 0usize;
    while i < data.len() {
        let control = data[i] as usize;
        i += 1;
        let literal = control < 0x80;
        let n = if literal {
            control + 1
        } else {
            control - 0x80 + 3
        };
        if out + n > PAGE_SIZE {
            return Err(MessageError::BadCompressedPage);
        }
        if literal {
            let src = data.get(i..i + n).ok_or(MessageError::BadCompressedPage)?;
            if let Some(page) = page.as_deref_mut() {
                page[out..out + n].copy_from_slice(src);
            }
            i += n;
        } else {
            let byte = *data.get(i).ok_or(MessageError::BadCompressedPage)?;
            if let Some(page) = page.as_deref_mut() {
                page[out..out + n].fill(byte);
            }
            i += 1;
        }
        out += n;
    }
    if out != PAGE_SIZE {
        return Err(MessageError::BadCompressedPage);
    }
    Ok(())
}

/// An all-zero page, for writing [`PageEncoding::Zero`] entries without allocating one.
pub static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// True if every byte of `page` is zero. Word-wise, a cache line at a time, so it stays cheap
/// without SIMD (the kernel target has none) and stops at the first non-zero line.
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    page.as_chunks::<64>().0.iter().all(|line| {
        line.as_chunks::<8>()
            .0
            .iter()
            .fold(0u64, |acc, word| acc | u64::from_le_bytes(*word))
            == 0
    })
}

/// The best encoding for a page given the capabilities in use: a zero marker, a compressed form
/// that is smaller, or the raw bytes.
pub fn encode_page(page: &[u8; PAGE_SIZE], caps: Capabilities) -> PageEncoding {
    compact_encoding(page, caps).unwrap_or_else(|| PageEncoding::Raw(alloc::boxed::Box::new(*page)))
}

/// The encoding [`encode_page`] picks when it is not [`PageEncoding::Raw`]; `None` when the page
/// goes raw, so a caller holding the page in a box can move the box into the entry instead of
/// copying it.
pub fn compact_encoding(page: &[u8; PAGE_SIZE], caps: Capabilities) -> Option<PageEncoding> {
    if caps.contains(Capabilities::ZERO_PAGES) && is_zero_page(page) {
        return Some(PageEncoding::Zero);
    }
    if caps.contains(Capabilities::COMPRESSED) {
        if let Some(data) = compress_page(page) {
            return Some(PageEncoding::Compressed(data));
        }
    }
    None
}

impl PageEncoding {
    /// The page's contents.
    pub fn to_page(&self) -> Result<alloc::boxed::Box<[u8; PAGE_SIZE]>, MessageError> {
        match self {
            PageEncoding::Raw(bytes) => Ok(bytes.clone()),
            PageEncoding::Zero => Ok(alloc::boxed::Box::new([0u8; PAGE_SIZE])),
            PageEncoding::Compressed(data) => decompress_page(data),
        }
    }

    /// Bytes this entry adds to a batch payload (page number, tag and body).
    pub fn wire_len(&self) -> usize {
        match self {
            PageEncoding::Raw(_) => RAW_ENTRY_LEN,
            PageEncoding::Zero => ENTRY_HEADER_LEN,
            PageEncoding::Compressed(data) => ENTRY_HEADER_LEN + 4 + data.len(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Payload writing and reading

fn put_str(
    out: &mut Vec<u8>,
    s: &str,
    field: &'static str,
    max: usize,
) -> Result<(), MessageError> {
    if s.len() > max {
        return Err(MessageError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    // Cannot truncate: max is below u16::MAX for every field.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_blob(
    out: &mut impl ByteSink,
    bytes: &[u8],
    field: &'static str,
    max: usize,
) -> Result<(), MessageError> {
    if bytes.len() > max {
        return Err(MessageError::TooLong {
            field,
            len: bytes.len(),
            max,
        });
    }
    out.put(&(bytes.len() as u32).to_le_bytes());
    out.put(bytes);
    Ok(())
}

/// A cursor over a payload; every read names its field so errors say where the payload broke.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(MessageError::Truncated { field })?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(MessageError::Truncated { field })?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MessageError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn str(&mut self, field: &'static str, max: usize) -> Result<String, MessageError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(MessageError::TooLong { field, len, max });
        }
        let bytes = self.take(len, field)?;
        core::str::from_utf8(bytes)
            .map(String::from)
            .map_err(|_| MessageError::InvalidUtf8 { field })
    }

    fn blob(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, MessageError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(MessageError::TooLong { field, len, max });
        }
        Ok(self.take(len, field)?.to_vec())
    }

    fn finish(self) -> Result<(), MessageError> {
        let count = self.bytes.len() - self.pos;
        if count != 0 {
            return Err(MessageError::TrailingBytes { count });
        }
        Ok(())
    }
}

fn check_vcpu_state(bytes: &[u8]) -> Result<(), MessageError> {
    const FIELD: &str = "vcpu state";
    if bytes.len() < VCPU_STATE_HEADER_LEN {
        return Err(MessageError::Truncated { field: FIELD });
    }
    if bytes[0..4] != VCPU_STATE_MAGIC {
        return Err(MessageError::InvalidValue {
            field: "vcpu state magic",
            value: u64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        });
    }
    let body = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if body != bytes.len() - VCPU_STATE_HEADER_LEN {
        return Err(MessageError::InvalidValue {
            field: "vcpu state body length",
            value: body as u64,
        });
    }
    Ok(())
}

impl Message {
    /// The frame kind this message travels in.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::VmConfig(_) => FrameKind::VmConfig,
            Message::VmConfigReply(_) => FrameKind::VmConfigReply,
            Message::PageBatch(_) => FrameKind::PageBatch,
            Message::RoundMarker(_) => FrameKind::RoundMarker,
            Message::Switchover => FrameKind::Switchover,
            Message::VcpuState(_) => FrameKind::VcpuState,
            Message::DeviceState(_) => FrameKind::DeviceState,
            Message::Commit => FrameKind::Commit,
            Message::CommitAck => FrameKind::CommitAck,
            Message::Abort(_) => FrameKind::Abort,
            Message::OwnerQuery { .. } => FrameKind::OwnerQuery,
            Message::OwnerReply { .. } => FrameKind::OwnerReply,
        }
    }

    /// Appends this message as one complete frame to `out`. On error `out` is left as it was.
    ///
    /// The payload is written in place after a reserved header (see [`frame::encode_with`]), with
    /// room reserved for it first, so a page is copied once, from its entry into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        out.reserve(frame::HEADER_LEN + self.payload_len_hint().min(frame::MAX_PAYLOAD));
        frame::encode_with(self.kind(), out, |out| self.encode_payload(out))
    }

    /// About how many bytes [`encode_payload`](Self::encode_payload) writes: exact for the large
    /// messages, a small guess for the rest.
    fn payload_len_hint(&self) -> usize {
        match self {
            Message::PageBatch(batch) => batch.entries.iter().fold(8, |sum, entry| {
                sum.saturating_add(entry.encoding.wire_len())
            }),
            Message::VcpuState(v) => 8 + v.bytes.len(),
            Message::DeviceState(d) => 8 + d.bytes.len(),
            _ => 64,
        }
    }

    /// Writes the payload only (the frame layer adds the header). Applies the same limits the
    /// decoder enforces, so this side never sends what the peer must refuse.
    pub fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        match self {
            Message::Hello(h) => {
                if h.min_version > h.max_version {
                    return Err(MessageError::InvalidValue {
                        field: "hello version range",
                        value: u64::from(h.min_version),
                    });
                }
                out.extend_from_slice(&h.min_version.to_le_bytes());
                out.extend_from_slice(&h.max_version.to_le_bytes());
                put_str(out, &h.node_name, "node name", MAX_NAME_LEN)?;
                out.extend_from_slice(&h.capabilities.0.to_le_bytes());
                out.push(match h.cpu_vendor {
                    CpuVendor::Intel => 0,
                    CpuVendor::Amd => 1,
                });
                out.extend_from_slice(&h.cpu_features.to_le_bytes());
            }
            Message::VmConfig(c) => {
                validate_config(c)?;
                put_str(out, &c.name, "vm name", MAX_NAME_LEN)?;
                out.extend_from_slice(&c.mem_bytes.to_le_bytes());
                out.extend_from_slice(&c.vcpus.to_le_bytes());
                out.extend_from_slice(&c.dirty_rate.to_le_bytes());
                out.extend_from_slice(&c.hot_pages.to_le_bytes());
                out.extend_from_slice(&c.mac);
                match &c.disk {
                    None => out.push(0),
                    Some(disk) => {
                        out.push(1);
                        put_str(out, &disk.id, "disk id", MAX_TEXT_LEN)?;
                        out.extend_from_slice(&disk.sectors.to_le_bytes());
                    }
                }
            }
            Message::VmConfigReply(reply) => match reply {
                ConfigReply::Accept => out.push(0),
                ConfigReply::Refuse(reason) => {
                    out.push(1);
                    match reason {
                        RefuseReason::NameExists => out.push(0),
                        RefuseReason::NotEnoughMemory { free_bytes } => {
                            out.push(1);
                            out.extend_from_slice(&free_bytes.to_le_bytes());
                        }
                        RefuseReason::IncompatibleCpu { detail } => {
                            out.push(2);
                            put_str(out, detail, "refusal detail", MAX_TEXT_LEN)?;
                        }
                        RefuseReason::Busy => out.push(3),
                        RefuseReason::Other(text) => {
                            out.push(4);
                            put_str(out, text, "refusal detail", MAX_TEXT_LEN)?;
                        }
                    }
                }
            },
            Message::PageBatch(batch) => encode_page_batch(
                out,
                batch.round,
                batch.entries.len(),
                batch.entries.iter().map(|entry| (entry.page, entry.data())),
            )?,
            Message::RoundMarker(m) => {
                out.extend_from_slice(&m.round.to_le_bytes());
                out.extend_from_slice(&m.pages_sent.to_le_bytes());
                out.extend_from_slice(&m.dirty_remaining.to_le_bytes());
            }
            Message::Switchover | Message::Commit | Message::CommitAck => {}
            Message::VcpuState(v) => {
                check_vcpu_state(&v.bytes)?;
                out.extend_from_slice(&v.vcpu.to_le_bytes());
                put_blob(out, &v.bytes, "vcpu state", MAX_VCPU_STATE_LEN)?;
            }
            Message::DeviceState(d) => {
                out.extend_from_slice(&d.device.to_le_bytes());
                put_blob(out, &d.bytes, "device state", MAX_DEVICE_STATE_LEN)?;
            }
            Message::Abort(a) => {
                out.push(match a.reason {
                    AbortReason::Cancelled => 0,
                    AbortReason::Timeout => 1,
                    AbortReason::Refused => 2,
                    AbortReason::ProtocolError => 3,
                    AbortReason::TransportError => 4,
                    AbortReason::LocalFailure => 5,
                });
                put_str(out, &a.text, "abort text", MAX_TEXT_LEN)?;
            }
            Message::OwnerQuery { vm } => put_str(out, vm, "vm name", MAX_NAME_LEN)?,
            Message::OwnerReply { vm, ownership } => {
                put_str(out, vm, "vm name", MAX_NAME_LEN)?;
                out.push(match ownership {
                    Ownership::Runs => 0,
                    Ownership::Receiving => 1,
                    Ownership::Absent => 2,
                });
            }
        }
        Ok(())
    }

    /// The message carried by `frame`.
    pub fn decode(frame: &Frame) -> Result<Message, MessageError> {
        Self::decode_payload(frame.kind, &frame.payload)
    }

    /// The message of kind `kind` with payload `payload`.
    pub fn decode_payload(kind: FrameKind, payload: &[u8]) -> Result<Message, MessageError> {
        let mut r = Reader::new(payload);
        let message = match kind {
            FrameKind::Hello => {
                let min_version = r.u16("hello min version")?;
                let max_version = r.u16("hello max version")?;
                if min_version > max_version {
                    return Err(MessageError::InvalidValue {
                        field: "hello version range",
                        value: u64::from(min_version),
                    });
                }
                let node_name = r.str("node name", MAX_NAME_LEN)?;
                let capabilities = Capabilities(r.u32("capabilities")?);
                let cpu_vendor = match r.u8("cpu vendor")? {
                    0 => CpuVendor::Intel,
                    1 => CpuVendor::Amd,
                    v => {
                        return Err(MessageError::UnknownValue {
                            field: "cpu vendor",
                            value: u64::from(v),
                        })
                    }
                };
                let cpu_features = r.u64("cpu features")?;
                Message::Hello(Hello {
                    min_version,
                    max_version,
                    node_name,
                    capabilities,
                    cpu_vendor,
                    cpu_features,
                })
            }
            FrameKind::VmConfig => {
                let name = r.str("vm name", MAX_NAME_LEN)?;
                let mem_bytes = r.u64("memory size")?;
                let vcpus = r.u32("vcpu count")?;
                let dirty_rate = r.u64("dirty rate")?;
                let hot_pages = r.u64("hot pages")?;
                let mac = r.array::<6>("mac")?;
                let disk = match r.u8("disk flag")? {
                    0 => None,
                    1 => Some(SharedDisk {
                        id: r.str("disk id", MAX_TEXT_LEN)?,
                        sectors: r.u64("disk sectors")?,
                    }),
                    v => {
                        return Err(MessageError::UnknownValue {
                            field: "disk flag",
                            value: u64::from(v),
                        })
                    }
                };
                let config = VmConfig {
                    name,
                    mem_bytes,
                    vcpus,
                    dirty_rate,
                    hot_pages,
                    mac,
                    disk,
                };
                validate_config(&config)?;
                Message::VmConfig(config)
            }
            FrameKind::VmConfigReply => match r.u8("config reply")? {
                0 => Message::VmConfigReply(ConfigReply::Accept),
                1 => {
                    let reason = match r.u8("refusal reason")? {
                        0 => RefuseReason::NameExists,
                        1 => RefuseReason::NotEnoughMemory {
                            free_bytes: r.u64("free memory")?,
                        },
                        2 => RefuseReason::IncompatibleCpu {
                            detail: r.str("refusal detail", MAX_TEXT_LEN)?,
                        },
                        3 => RefuseReason::Busy,
                        4 => RefuseReason::Other(r.str("refusal detail", MAX_TEXT_LEN)?),
                        v => {
                            return Err(MessageError::UnknownValue {
                                field: "refusal reason",
                                value: u64::from(v),
                            })
                        }
                    };
                    Message::VmConfigReply(ConfigReply::Refuse(reason))
                }
                v => {
                    return Err(MessageError::UnknownValue {
                        field: "config reply",
                        value: u64::from(v),
                    })
                }
            },
            FrameKind::PageBatch => {
                // The view checks the payload whole, trailing bytes included.
                return Ok(Message::PageBatch(
                    PageBatchView::parse(payload)?.to_batch(),
                ));
            }
            FrameKind::RoundMarker => Message::RoundMarker(RoundMarker {
                round: r.u32("marker round")?,
                pages_sent: r.u64("pages sent")?,
                dirty_remaining: r.u64("dirty remaining")?,
            }),
            FrameKind::Switchover => Message::Switchover,
            FrameKind::Commit => Message::Commit,
            FrameKind::CommitAck => Message::CommitAck,
            FrameKind::VcpuState => {
                let vcpu = r.u32("vcpu index")?;
                let bytes = r.blob("vcpu state", MAX_VCPU_STATE_LEN)?;
                check_vcpu_state(&bytes)?;
                Message::VcpuState(VcpuStateMsg { vcpu, bytes })
            }
            FrameKind::DeviceState => Message::DeviceState(DeviceStateMsg {
                device: r.u32("device id")?,
                bytes: r.blob("device state", MAX_DEVICE_STATE_LEN)?,
            }),
            FrameKind::Abort => {
                let reason = match r.u8("abort reason")? {
                    0 => AbortReason::Cancelled,
                    1 => AbortReason::Timeout,
                    2 => AbortReason::Refused,
                    3 => AbortReason::ProtocolError,
                    4 => AbortReason::TransportError,
                    5 => AbortReason::LocalFailure,
                    v => {
                        return Err(MessageError::UnknownValue {
                            field: "abort reason",
                            value: u64::from(v),
                        })
                    }
                };
                let text = r.str("abort text", MAX_TEXT_LEN)?;
                Message::Abort(Abort { reason, text })
            }
            FrameKind::OwnerQuery => Message::OwnerQuery {
                vm: r.str("vm name", MAX_NAME_LEN)?,
            },
            FrameKind::OwnerReply => {
                let vm = r.str("vm name", MAX_NAME_LEN)?;
                let ownership = match r.u8("ownership")? {
                    0 => Ownership::Runs,
                    1 => Ownership::Receiving,
                    2 => Ownership::Absent,
                    v => {
                        return Err(MessageError::UnknownValue {
                            field: "ownership",
                            value: u64::from(v),
                        })
                    }
                };
                Message::OwnerReply { vm, ownership }
            }
        };
        r.finish()?;
        Ok(message)
    }
}

fn validate_config(c: &VmConfig) -> Result<(), MessageError> {
    if c.mem_bytes == 0 || !c.mem_bytes.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MessageError::InvalidValue {
            field: "memory size",
            value: c.mem_bytes,
        });
    }
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        return Err(MessageError::InvalidValue {
            field: "vcpu count",
            value: u64::from(c.vcpus),
        });
    }
    if let Some(disk) = &c.disk {
        if disk.sectors == 0 || disk.id.is_empty() {
            return Err(MessageError::InvalidValue {
                field: "disk",
                value: disk.sectors,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use alloc::vec;

    struct TestRng(u64);

    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next_u64() % bound as u64) as usize
        }
    }

    fn vcpu_blob(body: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"VCPU");
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&(body as u32).to_le_bytes());
        v.extend(core::iter::repeat_n(0xAB, body));
        v
    }

    fn patterned_page(seed: u8) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        p
    }

    fn sparse_page() -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        p[8..16].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        p[2000..2100].fill(0xFF);
        p
    }

    /// One example of every message, with every enum variant covered.
    fn samples() -> Vec<Message> {
        let compressed = compress_page(&sparse_page()).expect("sparse page compresses");
        let mut all = vec![
            Message::Hello(Hello {
                min_version: 1,
                max_version: 3,
                node_name: "node1".to_string(),
                capabilities: Capabilities::ZERO_PAGES.with(Capabilities::COMPRESSED),
                cpu_vendor: CpuVendor::Amd,
                cpu_features: 0xdead_beef_0000_0001,
            }),
            Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                node_name: String::new(),
                capabilities: Capabilities(0xffff_ffff),
                cpu_vendor: CpuVendor::Intel,
                cpu_features: 0,
            }),
            Message::VmConfig(VmConfig {
                name: "guest".to_string(),
                mem_bytes: 64 << 20,
                vcpus: 1,
                dirty_rate: 5000,
                hot_pages: 3072,
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                disk: Some(SharedDisk {
                    id: "iqn.2026-11.test.hv:cluster/1".to_string(),
                    sectors: 131_072,
                }),
            }),
            Message::VmConfig(VmConfig {
                name: "g".to_string(),
                mem_bytes: 4096,
                vcpus: MAX_VCPUS,
                dirty_rate: 0,
                hot_pages: 0,
                mac: [0; 6],
                disk: None,
            }),
            Message::VmConfigReply(ConfigReply::Accept),
            Message::PageBatch(PageBatch {
                round: 7,
                entries: vec![
                    PageEntry {
                        page: 0,
                        encoding: PageEncoding::Zero,
                    },
                    PageEntry {
                        page: 5,
                        encoding: PageEncoding::Raw(patterned_page(3)),
                    },
                    PageEntry {
                        page: u64::MAX,
                        encoding: PageEncoding::Compressed(compressed),
                    },
                ],
            }),
            Message::PageBatch(PageBatch {
                round: 0,
                entries: Vec::new(),
            }),
            Message::RoundMarker(RoundMarker {
                round: 2,
                pages_sent: 16384,
                dirty_remaining: 12,
            }),
            Message::Switchover,
            Message::VcpuState(VcpuStateMsg {
                vcpu: 0,
                bytes: vcpu_blob(700),
            }),
            Message::DeviceState(DeviceStateMsg {
                device: 3,
                bytes: vec![1, 2, 3],
            }),
            Message::DeviceState(DeviceStateMsg {
                device: 0,
                bytes: Vec::new(),
            }),
            Message::Commit,
            Message::CommitAck,
            Message::OwnerQuery {
                vm: "vm1".to_string(),
            },
        ];
        for ownership in [Ownership::Runs, Ownership::Receiving, Ownership::Absent] {
            all.push(Message::OwnerReply {
                vm: "vm1".to_string(),
                ownership,
            });
        }
        for reason in [
            RefuseReason::NameExists,
            RefuseReason::NotEnoughMemory {
                free_bytes: 1 << 30,
            },
            RefuseReason::IncompatibleCpu {
                detail: "no AVX2".to_string(),
            },
            RefuseReason::Busy,
            RefuseReason::Other("maintenance".to_string()),
        ] {
            all.push(Message::VmConfigReply(ConfigReply::Refuse(reason)));
        }
        for reason in [
            AbortReason::Cancelled,
            AbortReason::Timeout,
            AbortReason::Refused,
            AbortReason::ProtocolError,
            AbortReason::TransportError,
            AbortReason::LocalFailure,
        ] {
            all.push(Message::Abort(Abort {
                reason,
                text: "why".to_string(),
            }));
        }
        all
    }

    fn payload_of(m: &Message) -> Vec<u8> {
        let mut p = Vec::new();
        m.encode_payload(&mut p).expect("sample encodes");
        p
    }

    #[test]
    fn every_message_round_trips_through_frames() {
        let samples = samples();
        let mut stream = Vec::new();
        for m in &samples {
            m.encode(&mut stream).expect("sample encodes");
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        let mut decoded = Vec::new();
        while let Some(frame) = decoder.next_frame().expect("valid stream") {
            decoded.push(Message::decode(&frame).expect("valid message"));
        }
        assert_eq!(decoded, samples);
        // Every frame kind is used by some sample.
        for kind in FrameKind::ALL {
            assert!(samples.iter().any(|m| m.kind() == kind), "{kind:?}");
        }
    }

    /// A view of a batch yields the decoded entries' pages, raw pages pointing into the payload
    /// itself (no copy), for every batch among the samples and every random one below.
    #[test]
    fn page_batch_views_read_the_decoded_pages_in_place() {
        for m in samples() {
            let Message::PageBatch(batch) = &m else {
                continue;
            };
            let payload = payload_of(&m);
            let view = PageBatchView::parse(&payload).unwrap();
            assert_eq!(view.round, batch.round);
            assert_eq!(view.len(), batch.entries.len());
            assert_eq!(view.is_empty(), batch.entries.is_empty());
            let pages: Vec<(u64, PageData<'_>)> = view.pages().collect();
            let expected: Vec<(u64, PageData<'_>)> =
                batch.entries.iter().map(|e| (e.page, e.data())).collect();
            assert_eq!(pages, expected);
            for (_, data) in pages {
                if let PageData::Raw(bytes) = data {
                    let at = bytes.as_ptr() as usize;
                    let range = payload.as_ptr_range();
                    assert!((range.start as usize..range.end as usize).contains(&at));
                }
            }
            assert_eq!(view.to_batch(), *batch);
        }
    }

    #[test]
    fn every_truncation_point_errors() {
        let mut checked = 0;
        for m in samples() {
            let payload = payload_of(&m);
            for len in 0..payload.len() {
                let result = Message::decode_payload(m.kind(), &payload[..len]);
                assert!(result.is_err(), "{:?} cut at {len} decoded", m.kind());
                checked += 1;
            }
        }
        assert!(checked > 4096);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for m in samples() {
            let mut payload = payload_of(&m);
            payload.push(0);
            let result = Message::decode_payload(m.kind(), &payload);
            assert!(result.is_err(), "{:?}", m.kind());
        }
        assert_eq!(
            Message::decode_payload(FrameKind::Commit, &[0]),
            Err(MessageError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let cases: [(FrameKind, Vec<u8>, &str); 6] = [
            (FrameKind::VmConfigReply, vec![2], "config reply"),
            (FrameKind::VmConfigReply, vec![1, 5], "refusal reason"),
            (FrameKind::Abort, vec![6, 0, 0], "abort reason"),
            (
                FrameKind::PageBatch,
                [&[0u8; 4][..], &1u32.to_le_bytes(), &[0u8; 8], &[3]].concat(),
                "page encoding",
            ),
            (
                FrameKind::Hello,
                [&[1u8, 0, 1, 0, 0, 0][..], &[0u8; 4], &[2], &[0u8; 8]].concat(),
                "cpu vendor",
            ),
            (
                FrameKind::VmConfig,
                [
                    &[1u8, 0, b'a'][..],
                    &4096u64.to_le_bytes(),
                    &1u32.to_le_bytes(),
                    &[0u8; 8],
                    &[0u8; 8],
                    &[0u8; 6],
                    &[2],
                ]
                .concat(),
                "disk flag",
            ),
        ];
        for (kind, payload, field) in cases {
            match Message::decode_payload(kind, &payload) {
                Err(MessageError::UnknownValue { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{kind:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_values_are_refused_on_both_sides() {
        let bad_mem = Message::VmConfig(VmConfig {
            name: "x".to_string(),
            mem_bytes: 4097,
            vcpus: 1,
            dirty_rate: 0,
            hot_pages: 0,
            mac: [0; 6],
            disk: None,
        });
        assert!(bad_mem.encode(&mut Vec::new()).is_err());
        let bad_vcpus = Message::VmConfig(VmConfig {
            name: "x".to_string(),
            mem_bytes: 4096,
            vcpus: 0,
            dirty_rate: 0,
            hot_pages: 0,
            mac: [0; 6],
            disk: None,
        });
        assert!(bad_vcpus.encode(&mut Vec::new()).is_err());
        let long_name = Message::Abort(Abort {
            reason: AbortReason::Timeout,
            text: "x".repeat(MAX_TEXT_LEN + 1),
        });
        let mut out = vec![7];
        assert!(matches!(
            long_name.encode(&mut out),
            Err(MessageError::TooLong { .. })
        ));
        assert_eq!(out, [7], "a failed encode leaves the output untouched");
        let unordered = Message::PageBatch(PageBatch {
            round: 1,
            entries: vec![
                PageEntry {
                    page: 2,
                    encoding: PageEncoding::Zero,
                },
                PageEntry {
                    page: 2,
                    encoding: PageEncoding::Zero,
                },
            ],
        });
        assert!(unordered.encode(&mut Vec::new()).is_err());
        // The same batch forged on the wire is refused by the decoder.
        let mut forged = Vec::new();
        forged.extend_from_slice(&1u32.to_le_bytes());
        forged.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            forged.extend_from_slice(&2u64.to_le_bytes());
            forged.push(1);
        }
        assert!(Message::decode_payload(FrameKind::PageBatch, &forged).is_err());
        // A vCPU blob whose header length disagrees with its size.
        let mut blob = vcpu_blob(10);
        blob.push(0);
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        payload.extend_from_slice(&blob);
        assert!(Message::decode_payload(FrameKind::VcpuState, &payload).is_err());
        // Inverted version range, and invalid UTF-8 in a name.
        let hello = |min: u16, max: u16, name: &[u8]| {
            let mut p = Vec::new();
            p.extend_from_slice(&min.to_le_bytes());
            p.extend_from_slice(&max.to_le_bytes());
            p.extend_from_slice(&(name.len() as u16).to_le_bytes());
            p.extend_from_slice(name);
            p.extend_from_slice(&[0u8; 4]);
            p.push(0);
            p.extend_from_slice(&[0u8; 8]);
            p
        };
        assert!(Message::decode_payload(FrameKind::Hello, &hello(1, 1, b"ok")).is_ok());
        assert!(Message::decode_payload(FrameKind::Hello, &hello(2, 1, b"ok")).is_err());
        assert_eq!(
            Message::decode_payload(FrameKind::Hello, &hello(1, 1, &[0xff, 0xfe])),
            Err(MessageError::InvalidUtf8 { field: "node name" })
        );
    }

    #[test]
    fn forged_batch_count_is_refused_before_allocating() {
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode_payload(FrameKind::PageBatch, &payload),
            Err(MessageError::Truncated { .. })
        ));
    }

    #[test]
    fn compression_round_trips_and_picks_the_smallest_encoding() {
        let caps = Capabilities::KNOWN;
        let zero = Box::new([0u8; PAGE_SIZE]);
        assert_eq!(encode_page(&zero, caps), PageEncoding::Zero);
        // Without the zero-page capability a zero page still compresses (to 64 bytes).
        let e = encode_page(&zero, Capabilities::COMPRESSED);
        assert!(matches!(&e, PageEncoding::Compressed(d) if d.len() < 70));
        assert_eq!(e.to_page().unwrap(), zero);

        let same = Box::new([0x5Au8; PAGE_SIZE]);
        let e = encode_page(&same, caps);
        assert!(matches!(&e, PageEncoding::Compressed(d) if d.len() < 70));
        assert_eq!(e.to_page().unwrap(), same);

        let sparse = sparse_page();
        let e = encode_page(&sparse, caps);
        assert!(matches!(e, PageEncoding::Compressed(_)));
        assert_eq!(e.to_page().unwrap(), sparse);

        // Incompressible data goes raw.
        let noisy = patterned_page(1);
        assert!(compress_page(&noisy).is_none());
        assert!(matches!(encode_page(&noisy, caps), PageEncoding::Raw(_)));
        assert!(matches!(
            encode_page(&sparse, Capabilities::ZERO_PAGES),
            PageEncoding::Raw(_)
        ));

        // Random pages with runs of random lengths round trip.
        let mut rng = TestRng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..500 {
            let mut page = Box::new([0u8; PAGE_SIZE]);
            let mut i = 0;
            while i < PAGE_SIZE {
                let n = (1 + rng.below(200)).min(PAGE_SIZE - i);
                let byte = rng.next_u64() as u8;
                if rng.below(2) == 0 {
                    page[i..i + n].fill(byte);
                } else {
                    for b in &mut page[i..i + n] {
                        *b = rng.next_u64() as u8;
                    }
                }
                i += n;
            }
            if let Some(data) = compress_page(&page) {
                assert!(data.len() < PAGE_SIZE);
                assert_eq!(decompress_page(&data).unwrap(), page);
            }
        }
    }

    #[test]
    fn runs_of_40_bytes_are_found_wherever_they_start() {
        // Noise with 13 runs of 40 equal bytes (an eighth of the page), at every start offset
        // modulo 32: the pre-check samples one word in four and must still see them.
        for shift in 0..32 {
            let mut page = patterned_page(7);
            for run in 0..13 {
                let start = shift + run * 300;
                page[start..start + 40].fill(0xC3);
            }
            let e = encode_page(&page, Capabilities::KNOWN);
            assert!(
                matches!(&e, PageEncoding::Compressed(d) if d.len() < PAGE_SIZE - 300),
                "shift {shift}: {e:?}"
            );
            assert_eq!(e.to_page().unwrap(), page);
        }
    }

    #[test]
    fn bad_compressed_streams_are_refused() {
        // Too short, too long, a literal running off the end, a run with no byte.
        assert!(decompress_page(&[]).is_err());
        assert!(decompress_page(&[0xFF, 0]).is_err());
        let mut too_long = Vec::new();
        for _ in 0..32 {
            too_long.extend_from_slice(&[0xFF, 1]);
        }
        too_long.extend_from_slice(&[0x80, 1]);
        assert!(decompress_page(&too_long).is_err());
        assert!(decompress_page(&[5, 1, 2]).is_err());
        assert!(decompress_page(&[0x90]).is_err());
    }

    #[test]
    fn the_compressed_check_agrees_with_decompression() {
        let mut rng = TestRng(0x5EED_F0C0_C0DE);
        let mut valid = 0;
        for _ in 0..20_000 {
            // Mostly runs, so that many streams come close to one page.
            let len = rng.below(80);
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    let b = rng.next_u64() as u8;
                    if i % 2 == 0 {
                        b | 0x80
                    } else {
                        b
                    }
                })
                .collect();
            let decoded = decompress_page(&data);
            assert_eq!(
                check_compressed_page(&data),
                decoded.as_ref().map(|_| ()).map_err(Clone::clone)
            );
            valid += usize::from(decoded.is_ok());
        }
        for seed in 0..8 {
            let page = if seed % 2 == 0 {
                sparse_page()
            } else {
                patterned_page(seed)
            };
            if let Some(data) = compress_page(&page) {
                assert_eq!(check_compressed_page(&data), Ok(()));
                let mut into = [0xAAu8; PAGE_SIZE];
                decompress_page_into(&data, &mut into).unwrap();
                assert_eq!(into, *page);
                valid += 1;
            }
        }
        assert!(valid > 0);
    }

    #[test]
    fn zero_detection_and_compact_encoding_match_encode_page() {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        assert!(is_zero_page(&page));
        for i in [0, 7, 63, 64, 2048, PAGE_SIZE - 1] {
            page[i] = 1;
            assert!(!is_zero_page(&page), "byte {i}");
            page[i] = 0;
        }
        let pages = [
            Box::new([0u8; PAGE_SIZE]),
            sparse_page(),
            patterned_page(3),
            Box::new([0x42u8; PAGE_SIZE]),
        ];
        for caps in [
            Capabilities(0),
            Capabilities::ZERO_PAGES,
            Capabilities::COMPRESSED,
            Capabilities::KNOWN,
        ] {
            for page in &pages {
                let full = encode_page(page, caps);
                match compact_encoding(page, caps) {
                    Some(compact) => assert_eq!(compact, full),
                    None => assert_eq!(full, PageEncoding::Raw(page.clone())),
                }
            }
        }
    }

    /// Random payloads for every kind, half of them mutations of valid payloads (so the decoder
    /// gets past the first fields), must never panic. Counts its executions.
    #[test]
    fn random_payloads_never_panic() {
        const EXECUTIONS: usize = 300_000;
        let valid: Vec<(FrameKind, Vec<u8>)> = samples()
            .iter()
            .map(|m| (m.kind(), payload_of(m)))
            .collect();
        let mut rng = TestRng(0x0123_4567_89AB_CDEF);
        let mut runs = 0usize;
        let mut accepted = 0usize;
        for _ in 0..EXECUTIONS {
            let (kind, payload) = if rng.below(2) == 0 {
                let (kind, base) = &valid[rng.below(valid.len())];
                let mut p = base.clone();
                match rng.below(3) {
                    0 if !p.is_empty() => {
                        for _ in 0..1 + rng.below(4) {
                            let i = rng.below(p.len());
                            p[i] = rng.next_u64() as u8;
                        }
                    }
                    1 => p.truncate(rng.below(p.len() + 1)),
                    _ => p.push(rng.next_u64() as u8),
                }
                (*kind, p)
            } else {
                let kind = FrameKind::ALL[rng.below(FrameKind::ALL.len())];
                let len = rng.below(64);
                let p: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                (kind, p)
            };
            if kind == FrameKind::PageBatch {
                // The in-place view accepts exactly what the decoder accepts.
                assert_eq!(
                    PageBatchView::parse(&payload).map(|v| Message::PageBatch(v.to_batch())),
                    Message::decode_payload(kind, &payload)
                );
            }
            if let Ok(message) = Message::decode_payload(kind, &payload) {
                // Whatever is accepted re-encodes to the same bytes: there is one wire form.
                assert_eq!(payload_of(&message), payload);
                accepted += 1;
            }
            runs += 1;
        }
        assert_eq!(runs, EXECUTIONS);
        assert!(accepted > 0);
    }
}
