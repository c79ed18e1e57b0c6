//! Framing of the migration wire protocol: cutting a byte stream into typed, checked frames.
//!
//! Every message of the protocol travels as one frame: a fixed 20-byte header followed by the
//! payload. All integers are little-endian (both ends are x86 hosts, and it is the order the
//! payloads of page batches and vCPU state use too).
//!
//! ```text
//! offset  size  field
//!      0     4  magic "HVMG" (bytes 48 56 4D 47)
//!      4     2  protocol version (PROTOCOL_VERSION)
//!      6     2  frame kind (FrameKind code)
//!      8     4  payload length in bytes (at most MAX_PAYLOAD)
//!     12     8  XXH64 (seed 0) of bytes 0..12 followed by the payload
//!     20     n  payload
//! ```
//!
//! Why each field:
//! - The magic makes a connection to the wrong port, or a stream that lost its framing, fail on
//!   the first bytes instead of being read as a huge frame.
//! - The version is in every frame, not only in the hello, so that a decoder never misreads a
//!   frame of another version; negotiation itself belongs to the protocol layer above.
//! - The length limit bounds the memory one frame can make the receiver allocate.
//! - The checksum covers the header too, so a corrupted kind or length cannot pass as valid. TCP's
//!   own checksum is weak (16-bit ones' complement) and does not see corruption in NIC offload,
//!   bridges or memory; guest memory corrupted in transit would be silent data loss in the VM.
//! - XXH64, not CRC-32C (protocol versions 1 and 2): both catch the random corruption this guards
//!   against (a 64-bit hash misses it with probability 2^-64, a 32-bit CRC with 2^-32), but the
//!   CRC's table lookups made it the most expensive step per byte on a node under emulation:
//!   measured under QEMU's TCG, slicing-by-8 CRC-32C ran at 590 MB/s, about seven times slower
//!   than a multiply-and-rotate hash over the same bytes, and every page is checked on both
//!   sides. (Hardware CRC32 instructions do not help there: TCG computes them bit by bit.)
//!
//! Nothing in this layer can resynchronise a broken stream: after the first error the
//! [`FrameDecoder`] keeps returning it, and the protocol above aborts the migration.

use alloc::vec::Vec;
use core::fmt;

use xxhash_rust::xxh64::Xxh64;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"HVMG";

/// The version of the migration protocol this build speaks. 2: the VM configuration names its
/// shared disk with its size, and a disk moves by reservation handoff. 3: frames are checked with
/// a 64-bit XXH64 instead of CRC-32C.
pub const PROTOCOL_VERSION: u16 = 3;

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 20;

/// Largest payload a frame may carry: 16 MiB, a few thousand pages per page batch, and a bound on
/// what a peer can make us allocate.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Length of the part of the header the checksum covers (everything before the checksum).
const CHECKED_HEADER_LEN: usize = 12;

/// The kinds of frames, in the order a migration uses them.
///
/// Code 0 is not assigned, so that a zeroed buffer never decodes as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Opens a connection: versions, capabilities, identity.
    Hello = 1,
    /// The VM's configuration, for the destination to reserve memory and set up devices.
    VmConfig = 2,
    /// A batch of guest pages.
    PageBatch = 3,
    /// End of one pre-copy round, with its dirty page count.
    RoundMarker = 4,
    /// The source paused the VM; the final state follows.
    Switchover = 5,
    /// The architectural state of one vCPU.
    VcpuState = 6,
    /// The state of one device model.
    DeviceState = 7,
    /// The source asks the destination to take over the VM.
    Commit = 8,
    /// The destination runs the VM now.
    CommitAck = 9,
    /// Either side gives up; the VM stays on the source.
    Abort = 10,
    /// The destination's answer to [`FrameKind::VmConfig`]: accept, or refuse with a reason.
    /// Added after the first ten; codes are append-only so existing ones never change meaning.
    VmConfigReply = 11,
    /// After a lost commit acknowledgement, on a connection of its own: does the peer run a VM?
    OwnerQuery = 12,
    /// The answer to [`FrameKind::OwnerQuery`].
    OwnerReply = 13,
}

impl FrameKind {
    /// Every kind, in code order.
    pub const ALL: [FrameKind; 13] = [
        FrameKind::Hello,
        FrameKind::VmConfig,
        FrameKind::PageBatch,
        FrameKind::RoundMarker,
        FrameKind::Switchover,
        FrameKind::VcpuState,
        FrameKind::DeviceState,
        FrameKind::Commit,
        FrameKind::CommitAck,
        FrameKind::Abort,
        FrameKind::VmConfigReply,
        FrameKind::OwnerQuery,
        FrameKind::OwnerReply,
    ];

    /// The code of this kind on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The kind with wire code `code`, or [`FrameError::UnknownKind`].
    pub fn from_code(code: u16) -> Result<Self, FrameError> {
        match code {
            1 => Ok(FrameKind::Hello),
            2 => Ok(FrameKind::VmConfig),
            3 => Ok(FrameKind::PageBatch),
            4 => Ok(FrameKind::RoundMarker),
            5 => Ok(FrameKind::Switchover),
            6 => Ok(FrameKind::VcpuState),
            7 => Ok(FrameKind::DeviceState),
            8 => Ok(FrameKind::Commit),
            9 => Ok(FrameKind::CommitAck),
            10 => Ok(FrameKind::Abort),
            11 => Ok(FrameKind::VmConfigReply),
            12 => Ok(FrameKind::OwnerQuery),
            13 => Ok(FrameKind::OwnerReply),
            _ => Err(FrameError::UnknownKind { code }),
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with [`MAGIC`]: not a migration stream, or framing was lost.
    BadMagic { found: [u8; 4] },
    /// The frame is of a protocol version this build does not speak.
    UnsupportedVersion { found: u16 },
    /// The frame kind code is not one of [`FrameKind`].
    UnknownKind { code: u16 },
    /// The payload is longer than [`MAX_PAYLOAD`] (when encoding, or as announced by a header).
    TooLarge { len: u64 },
    /// The checksum in the header does not match the frame's contents.
    BadChecksum { expected: u64, computed: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic { found } => write!(
                f,
                "not a migration frame (magic {:02x} {:02x} {:02x} {:02x})",
                found[0], found[1], found[2], found[3]
            ),
            FrameError::UnsupportedVersion { found } => write!(
                f,
                "unsupported migration protocol version {found} (this node speaks {PROTOCOL_VERSION})"
            ),
            FrameError::UnknownKind { code } => write!(f, "unknown frame kind {code}"),
            FrameError::TooLarge { len } => write!(
                f,
                "frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes"
            ),
            FrameError::BadChecksum { expected, computed } => write!(
                f,
                "frame checksum mismatch (header says {expected:#018x}, contents give {computed:#018x})"
            ),
        }
    }
}

impl core::error::Error for FrameError {}

/// Appends one frame of `kind` carrying `payload` to `out`.
///
/// Refuses payloads above [`MAX_PAYLOAD`] with [`FrameError::TooLarge`], leaving `out` untouched.
pub fn encode(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: payload.len() as u64,
        });
    }
    out.reserve(HEADER_LEN + payload.len());
    encode_with(kind, out, |out| {
        out.extend_from_slice(payload);
        Ok::<(), FrameError>(())
    })
}

/// Appends one frame of `kind` to `out`, its payload written in place by `write_payload`, which
/// may only append to the vector it is given: the header is reserved first and filled in (length
/// and checksum over the header fields and the payload where it lies) once the payload is there.
/// This spares the payload a buffer of its own and a second copy.
///
/// If `write_payload` fails, or writes more than [`MAX_PAYLOAD`] bytes (then the error is
/// [`FrameError::TooLarge`]), `out` is truncated back to its length before the call, so it never
/// holds half a frame.
pub fn encode_with<E: From<FrameError>>(
    kind: FrameKind,
    out: &mut Vec<u8>,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(error) = write_payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let payload_start = start + HEADER_LEN;
    assert!(
        out.len() >= payload_start,
        "a payload writer removed bytes it did not write"
    );
    let payload_len = out.len() - payload_start;
    if payload_len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: payload_len as u64,
        }
        .into());
    }
    let (header, payload) = out[start..]
        .split_first_chunk_mut::<HEADER_LEN>()
        .expect("the header's space was appended above");
    write_header(kind, header, payload);
    Ok(())
}

/// Encodes one frame of `kind` in place, in space of exactly the frame's length (a pipe's own
/// buffer) split as its `header` and `payload`: `write_payload` fills all of `payload`, then the
/// header is written. Like [`encode_with`] without the vector, for a payload whose length is
/// known beforehand.
///
/// Fails with [`FrameError::TooLarge`], before `write_payload` runs, if `payload` is longer than
/// [`MAX_PAYLOAD`]. On any error the contents of both are undefined and must not be sent.
pub fn encode_into<E: From<FrameError>>(
    kind: FrameKind,
    header: &mut [u8; HEADER_LEN],
    payload: &mut [u8],
    write_payload: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: payload.len() as u64,
        }
        .into());
    }
    write_payload(payload)?;
    write_header(kind, header, payload);
    Ok(())
}

/// Fills in the header of a frame whose payload (at most [`MAX_PAYLOAD`] bytes) is written:
/// its fields and the checksum over them and the payload.
fn write_header(kind: FrameKind, header: &mut [u8; HEADER_LEN], payload: &[u8]) {
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&kind.code().to_le_bytes());
    // Cannot truncate: MAX_PAYLOAD fits in a u32.
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let sum = checksum(&header[..CHECKED_HEADER_LEN], payload);
    header[CHECKED_HEADER_LEN..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
}

/// The frame checksum: XXH64 of the checked header fields followed by the payload.
pub fn checksum(checked_header: &[u8], payload: &[u8]) -> u64 {
    let mut hash = Xxh64::new(0);
    hash.update(checked_header);
    hash.update(payload);
    hash.digest()
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

/// Turns a byte stream, pushed in pieces of any size, back into frames.
///
/// Header fields are checked as soon as their bytes arrive, so a wrong stream fails on its first
/// bytes and an oversized length is refused before anything waits for (or buffers) the payload.
/// Once an error is returned, the decoder is failed for good: it returns the same error on every
/// later call and drops further input, since the frame boundaries are lost.
///
/// Bytes can be received straight into the decoder's buffer ([`push_with`](Self::push_with)) and
/// payloads read where they lie ([`next_payload`](Self::next_payload)), so a page travelling
/// through it is copied once, by the pipe.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Received bytes in `consumed..filled`; those before `consumed` were already returned as
    /// frames, those from `filled` on are room for the next bytes (initialised already, so
    /// receiving into it costs no zeroing).
    buffer: Vec<u8>,
    /// Frames are taken by advancing this offset rather than by shifting the buffer, so that a
    /// push holding many frames costs linear, not quadratic, time. The unreturned tail moves to
    /// the front only when room runs out, and only if that moves no more than was consumed.
    consumed: usize,
    filled: usize,
    failure: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub const fn new() -> Self {
        Self {
            buffer: Vec::new(),
            consumed: 0,
            filled: 0,
            failure: None,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        self.make_room(bytes.len());
        self.buffer[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Receives up to `max` bytes straight into the buffer: `fill` gets room for `max` bytes and
    /// returns how many it wrote at its start (counts above `max` are taken as `max`). Returns
    /// that count, or `fill`'s error (bytes written before an error are not kept: report them
    /// first). Like [`push`](Self::push), a failed decoder drops what `fill` writes.
    pub fn push_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.make_room(max);
        let got = fill(&mut self.buffer[self.filled..self.filled + max])?.min(max);
        if self.failure.is_none() {
            self.filled += got;
        }
        Ok(got)
    }

    /// Makes sure at least `want` bytes of room follow `filled`.
    fn make_room(&mut self, want: usize) {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        }
        if self.buffer.len() - self.filled >= want {
            return;
        }
        let pending = self.filled - self.consumed;
        if self.consumed >= pending {
            self.buffer.copy_within(self.consumed..self.filled, 0);
            self.consumed = 0;
            self.filled = pending;
        }
        if self.buffer.len() - self.filled < want {
            self.buffer.resize(self.filled + want, 0);
        }
    }

    /// The next complete frame: `Ok(None)` if more bytes are needed, `Err` if the stream is bad.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.next_payload()?.map(|(kind, payload)| Frame {
            kind,
            payload: payload.to_vec(),
        }))
    }

    /// Like [`next_frame`](Self::next_frame), with the payload borrowed from the decoder's buffer
    /// instead of copied out of it.
    pub fn next_payload(&mut self) -> Result<Option<(FrameKind, &[u8])>, FrameError> {
        if let Some(error) = self.failure {
            return Err(error);
        }
        match self.take_frame() {
            Err(error) => {
                self.failure = Some(error);
                self.buffer = Vec::new();
                self.consumed = 0;
                self.filled = 0;
                Err(error)
            }
            Ok(None) => Ok(None),
            Ok(Some((kind, start, end))) => Ok(Some((kind, &self.buffer[start..end]))),
        }
    }

    /// Number of bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.filled - self.consumed
    }

    /// Checks and takes the next complete frame: its kind and where its payload lies.
    fn take_frame(&mut self) -> Result<Option<(FrameKind, usize, usize)>, FrameError> {
        match front(&self.buffer[self.consumed..self.filled])? {
            Front::Partial { .. } => Ok(None),
            Front::Frame { kind, len, .. } => {
                let start = self.consumed + HEADER_LEN;
                self.consumed += len;
                Ok(Some((kind, start, self.consumed)))
            }
        }
    }

    /// Bytes still to receive before the frame at the front is whole (or, while its header is
    /// incomplete, before the header is): 0 when a whole frame waits, or the decoder failed.
    /// Receiving no more than this leaves the decoder empty at the frame's end.
    pub fn wanted(&self) -> usize {
        if self.failure.is_some() {
            return 0;
        }
        // The header alone says how long the frame is: no checksum is computed here.
        let buffered = self.buffered_len();
        match check_header(&self.buffer[self.consumed..self.filled]) {
            Ok(Some(payload_len)) => (HEADER_LEN + payload_len).saturating_sub(buffered),
            Ok(None) => HEADER_LEN - buffered,
            Err(_) => 0,
        }
    }
}

/// What the start of a byte stream holds, as [`front`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front<'a> {
    /// A whole frame of `len` bytes, checked: its kind and payload.
    Frame {
        kind: FrameKind,
        payload: &'a [u8],
        len: usize,
    },
    /// The start of a frame (possibly nothing): `len`, the whole frame's length, once its header
    /// is there. The header fields that are there were checked.
    Partial { len: Option<usize> },
}

/// Reads the frame at the start of `bytes` where it lies, checking header fields as soon as
/// they are there (see [`FrameDecoder`]) and the checksum once the frame is whole.
pub fn front(bytes: &[u8]) -> Result<Front<'_>, FrameError> {
    let Some(payload_len) = check_header(bytes)? else {
        return Ok(Front::Partial { len: None });
    };
    let len = HEADER_LEN + payload_len;
    if bytes.len() < len {
        return Ok(Front::Partial { len: Some(len) });
    }
    let expected = u64_at(bytes, CHECKED_HEADER_LEN);
    let computed = checksum(&bytes[..CHECKED_HEADER_LEN], &bytes[HEADER_LEN..len]);
    if computed != expected {
        return Err(FrameError::BadChecksum { expected, computed });
    }
    // check_header accepted the kind already.
    let kind = FrameKind::from_code(u16_at(bytes, 6))?;
    Ok(Front::Frame {
        kind,
        payload: &bytes[HEADER_LEN..len],
        len,
    })
}

/// Checks the header fields of the frame starting `pending` that have arrived. Returns the
/// payload length once the whole header is there, `None` while it is incomplete.
fn check_header(pending: &[u8]) -> Result<Option<usize>, FrameError> {
    let header = &pending[..pending.len().min(HEADER_LEN)];
    if header.len() >= 4 && header[0..4] != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(&header[0..4]);
        return Err(FrameError::BadMagic { found });
    }
    if header.len() >= 6 {
        let version = u16_at(header, 4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
    }
    if header.len() >= 8 {
        FrameKind::from_code(u16_at(header, 6))?;
    }
    if header.len() >= CHECKED_HEADER_LEN {
        let len = u32_at(header, 8);
        if len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
            });
        }
    }
    if header.len() < HEADER_LEN {
        return Ok(None);
    }
    Ok(Some(u32_at(header, 8) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use xxhash_rust::xxh64::xxh64;

    fn encoded(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, payload, &mut out).expect("payload within limit");
        out
    }

    /// Feeds `bytes` in one piece and collects every frame, or the first error.
    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    /// A header with arbitrary fields and a correct checksum over it and `payload`.
    fn raw_frame(magic: [u8; 4], version: u16, code: u16, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic);
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&code.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        let mut covered = bytes.clone();
        covered.extend_from_slice(payload);
        bytes.extend_from_slice(&xxh64(&covered, 0).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// xorshift64*: a tiny deterministic generator, enough to make varied test inputs.
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

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }
    }

    #[test]
    fn checksum_is_xxh64_with_seed_zero() {
        // Published XXH64 test vectors (seed 0), so the sum is the standard one on both ends.
        assert_eq!(checksum(b"", b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(checksum(b"a", b"bc"), 0x44BC_2CF5_AD77_0999);
        // Split anywhere, the same sum: the header and payload are one stream.
        let bytes: Vec<u8> = (0..100u8).collect();
        for split in 0..=bytes.len() {
            assert_eq!(checksum(&bytes[..split], &bytes[split..]), xxh64(&bytes, 0));
        }
    }

    #[test]
    fn header_layout_is_byte_exact() {
        let bytes = encoded(FrameKind::PageBatch, b"abc");
        #[rustfmt::skip]
        let checked_header = [
            b'H', b'V', b'M', b'G', // magic
            0x03, 0x00,             // version 3
            0x03, 0x00,             // PageBatch
            0x03, 0x00, 0x00, 0x00, // 3 payload bytes
        ];
        assert_eq!(bytes[..12], checked_header);
        let mut covered = checked_header.to_vec();
        covered.extend_from_slice(b"abc");
        assert_eq!(bytes[12..20], xxh64(&covered, 0).to_le_bytes());
        assert_eq!(&bytes[20..], b"abc");
        assert_eq!(bytes.len(), HEADER_LEN + 3);
    }

    #[test]
    fn in_place_encoding_gives_the_same_bytes_and_rolls_back_on_error() {
        let mut out = b"queued".to_vec();
        encode_with(FrameKind::VmConfig, &mut out, |o| {
            o.extend_from_slice(b"payload");
            Ok::<(), FrameError>(())
        })
        .unwrap();
        // Built by hand, not by `encode` (which writes in place too).
        let mut covered = b"HVMG\x03\x00\x02\x00\x07\x00\x00\x00".to_vec();
        covered.extend_from_slice(b"payload");
        let mut expected = b"queued".to_vec();
        expected.extend_from_slice(&covered[..CHECKED_HEADER_LEN]);
        expected.extend_from_slice(&xxh64(&covered, 0).to_le_bytes());
        expected.extend_from_slice(b"payload");
        assert_eq!(out, expected);

        let before = out.clone();
        let refused = FrameError::UnknownKind { code: 0 };
        assert_eq!(
            encode_with(FrameKind::Commit, &mut out, |o| {
                o.extend_from_slice(b"half");
                Err(refused)
            }),
            Err(refused)
        );
        assert_eq!(out, before);
        assert_eq!(
            encode_with(FrameKind::PageBatch, &mut out, |o| {
                o.resize(o.len() + MAX_PAYLOAD + 1, 0);
                Ok::<(), FrameError>(())
            }),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        assert_eq!(out, before);

        // Into space of the frame's length: the same bytes as appended to a vector.
        let mut header = [0u8; HEADER_LEN];
        let mut payload = [0u8; 7];
        encode_into(FrameKind::VmConfig, &mut header, &mut payload, |p| {
            p.copy_from_slice(b"payload");
            Ok::<(), FrameError>(())
        })
        .unwrap();
        assert_eq!([&header[..], &payload[..]].concat(), expected[6..]);
        assert_eq!(
            encode_into(FrameKind::Commit, &mut header, &mut payload, |_| Err(
                refused
            )),
            Err(refused)
        );
        let mut huge = vec![0u8; MAX_PAYLOAD + 1];
        let mut called = false;
        assert_eq!(
            encode_into(FrameKind::PageBatch, &mut header, &mut huge, |_| {
                called = true;
                Ok::<(), FrameError>(())
            }),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        assert!(
            !called,
            "a payload over the limit is refused before it is written"
        );
    }

    #[test]
    fn receiving_in_place_and_borrowed_payloads() {
        let payloads: Vec<Vec<u8>> = (0..60usize).map(|i| vec![i as u8; i * 53]).collect();
        let mut stream = Vec::new();
        for p in &payloads {
            encode(FrameKind::PageBatch, p, &mut stream).unwrap();
        }
        // Pieces of changing sizes with frames taken in between, so the buffer compacts and grows.
        let mut decoder = FrameDecoder::new();
        let mut pos = 0;
        let mut got = Vec::new();
        let mut piece = 1;
        while pos < stream.len() {
            let n = decoder
                .push_with(piece, |room| {
                    let n = room.len().min(stream.len() - pos);
                    room[..n].copy_from_slice(&stream[pos..pos + n]);
                    Ok::<usize, ()>(n)
                })
                .unwrap();
            pos += n;
            piece = piece * 3 % 997 + 1;
            while let Some((kind, payload)) = decoder.next_payload().unwrap() {
                assert_eq!(kind, FrameKind::PageBatch);
                got.push(payload.to_vec());
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(decoder.buffered_len(), 0);

        // A filler claiming more than the room counts as filling the room; an error keeps nothing.
        let mut decoder = FrameDecoder::new();
        assert_eq!(decoder.push_with(4, |_| Ok::<usize, ()>(usize::MAX)), Ok(4));
        assert_eq!(decoder.buffered_len(), 4);
        assert_eq!(
            decoder.push_with(4, |_| Err::<usize, _>("closed")),
            Err("closed")
        );
        assert_eq!(decoder.buffered_len(), 4);
        // The four zero bytes are a bad magic; a failed decoder drops what it receives.
        assert!(matches!(
            decoder.next_payload(),
            Err(FrameError::BadMagic { .. })
        ));
        assert_eq!(
            decoder.push_with(8, |room| Ok::<usize, ()>(room.len())),
            Ok(8)
        );
        assert_eq!(decoder.buffered_len(), 0);
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn kind_codes_are_stable() {
        let codes: Vec<u16> = FrameKind::ALL.iter().map(|kind| kind.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_code(kind.code()), Ok(kind));
        }
        for code in [0, 14, 0x8000, u16::MAX] {
            assert_eq!(
                FrameKind::from_code(code),
                Err(FrameError::UnknownKind { code })
            );
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in FrameKind::ALL {
            let payload = vec![kind.code() as u8; kind.code() as usize * 3];
            assert_eq!(
                decode_all(&encoded(kind, &payload)),
                Ok(vec![Frame { kind, payload }])
            );
        }
    }

    #[test]
    fn empty_payload_round_trips() {
        let bytes = encoded(FrameKind::Commit, &[]);
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(
            decode_all(&bytes),
            Ok(vec![Frame {
                kind: FrameKind::Commit,
                payload: Vec::new()
            }])
        );
    }

    #[test]
    fn largest_payload_round_trips_and_one_more_byte_is_refused() {
        let payload = vec![0xA5; MAX_PAYLOAD];
        let bytes = encoded(FrameKind::PageBatch, &payload);
        let frames = decode_all(&bytes).expect("valid frame");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].payload, payload);

        let mut out = vec![1, 2, 3];
        let too_long = vec![0; MAX_PAYLOAD + 1];
        assert_eq!(
            encode(FrameKind::PageBatch, &too_long, &mut out),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        assert_eq!(out, [1, 2, 3], "a refused frame leaves the output alone");
    }

    #[test]
    fn consecutive_frames_in_one_push() {
        let mut stream = Vec::new();
        encode(FrameKind::Hello, b"hello", &mut stream).unwrap();
        encode(FrameKind::RoundMarker, &[], &mut stream).unwrap();
        encode(FrameKind::Abort, b"bye", &mut stream).unwrap();
        let frames = decode_all(&stream).unwrap();
        let kinds: Vec<FrameKind> = frames.iter().map(|frame| frame.kind).collect();
        assert_eq!(
            kinds,
            [FrameKind::Hello, FrameKind::RoundMarker, FrameKind::Abort]
        );
        assert_eq!(frames[2].payload, b"bye");
    }

    #[test]
    fn many_frames_in_one_push_then_a_partial_one() {
        let mut stream = Vec::new();
        for i in 0..1000u32 {
            encode(FrameKind::PageBatch, &i.to_le_bytes(), &mut stream).unwrap();
        }
        let partial = encoded(FrameKind::RoundMarker, b"1000 dirty");
        stream.extend_from_slice(&partial[..10]);
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        for i in 0..1000u32 {
            let frame = decoder.next_frame().unwrap().expect("complete frame");
            assert_eq!(frame.payload, i.to_le_bytes());
        }
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered_len(), 10);
        decoder.push(&partial[10..]);
        assert_eq!(decoder.buffered_len(), partial.len());
        assert_eq!(
            decoder.next_frame().unwrap().map(|frame| frame.kind),
            Some(FrameKind::RoundMarker)
        );
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn truncated_input_needs_more() {
        let bytes = encoded(FrameKind::VcpuState, b"registers");
        for cut in 0..bytes.len() {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes[..cut]);
            assert_eq!(decoder.next_frame(), Ok(None), "cut at {cut}");
            assert_eq!(decoder.buffered_len(), cut);
        }
    }

    #[test]
    fn split_at_every_byte() {
        let mut stream = Vec::new();
        encode(FrameKind::VmConfig, b"memory=64M vcpus=1", &mut stream).unwrap();
        encode(FrameKind::DeviceState, &[0, 1, 2, 3, 4], &mut stream).unwrap();
        let expected = decode_all(&stream).unwrap();
        for split in 0..=stream.len() {
            let mut decoder = FrameDecoder::new();
            let mut frames = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    frames.push(frame);
                }
            }
            assert_eq!(frames, expected, "split at {split}");
            assert_eq!(decoder.buffered_len(), 0);
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let bytes = encoded(FrameKind::CommitAck, b"ok");
        let mut decoder = FrameDecoder::new();
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(decoder.next_frame(), Ok(None), "before byte {i}");
            decoder.push(&[*byte]);
        }
        assert_eq!(
            decoder.next_frame(),
            Ok(Some(Frame {
                kind: FrameKind::CommitAck,
                payload: b"ok".to_vec()
            }))
        );
        assert_eq!(decoder.next_frame(), Ok(None));
    }

    #[test]
    fn bad_magic_is_reported_after_four_bytes() {
        let mut decoder = FrameDecoder::new();
        decoder.push(b"GET ");
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::BadMagic { found: *b"GET " })
        );
    }

    #[test]
    fn unsupported_version() {
        let bytes = raw_frame(MAGIC, 1, FrameKind::Hello.code(), 0, &[]);
        assert_eq!(
            decode_all(&bytes),
            Err(FrameError::UnsupportedVersion { found: 1 })
        );
        // Reported from the first six bytes, without waiting for the rest of the header.
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes[..6]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::UnsupportedVersion { found: 1 })
        );
    }

    #[test]
    fn unknown_kind() {
        for code in [0, 14, 0xFFFF] {
            let bytes = raw_frame(MAGIC, PROTOCOL_VERSION, code, 0, &[]);
            assert_eq!(decode_all(&bytes), Err(FrameError::UnknownKind { code }));
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let len = MAX_PAYLOAD as u32 + 1;
        let bytes = raw_frame(
            MAGIC,
            PROTOCOL_VERSION,
            FrameKind::PageBatch.code(),
            len,
            &[],
        );
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes[..12]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge {
                len: u64::from(len)
            })
        );
        let bytes = raw_frame(MAGIC, PROTOCOL_VERSION, 1, u32::MAX, &[]);
        assert_eq!(
            decode_all(&bytes),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX)
            })
        );
    }

    #[test]
    fn corrupted_payload_fails_the_checksum() {
        let mut bytes = encoded(FrameKind::PageBatch, b"guest page contents");
        let expected = u64_at(&bytes, 12);
        bytes[HEADER_LEN + 4] ^= 0x01;
        match decode_all(&bytes) {
            Err(FrameError::BadChecksum {
                expected: in_header,
                computed,
            }) => {
                assert_eq!(in_header, expected);
                assert_ne!(computed, expected);
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
    }

    #[test]
    fn corrupted_checksum_field_fails_the_checksum() {
        let mut bytes = encoded(FrameKind::Hello, b"hi");
        bytes[HEADER_LEN - 1] ^= 0x80;
        assert!(matches!(
            decode_all(&bytes),
            Err(FrameError::BadChecksum { .. })
        ));
    }

    #[test]
    fn checksum_covers_the_header() {
        // Same payload, kind changed from Commit to Abort without fixing the checksum.
        let mut bytes = encoded(FrameKind::Commit, b"x");
        bytes[6..8].copy_from_slice(&FrameKind::Abort.code().to_le_bytes());
        assert!(matches!(
            decode_all(&bytes),
            Err(FrameError::BadChecksum { .. })
        ));
    }

    #[test]
    fn decoder_stays_failed_after_an_error() {
        let mut decoder = FrameDecoder::new();
        decoder.push(b"XXXX");
        let error = decoder.next_frame().unwrap_err();
        decoder.push(&encoded(FrameKind::Hello, b"valid"));
        assert_eq!(decoder.next_frame(), Err(error));
        assert_eq!(
            decoder.buffered_len(),
            0,
            "input after a failure is dropped"
        );
    }

    #[test]
    fn errors_display_as_sentences() {
        use alloc::string::ToString;
        assert_eq!(
            FrameError::BadMagic { found: *b"GET " }.to_string(),
            "not a migration frame (magic 47 45 54 20)"
        );
        assert_eq!(
            FrameError::BadChecksum {
                expected: 1,
                computed: 0xdead_beef
            }
            .to_string(),
            "frame checksum mismatch (header says 0x0000000000000001, contents give 0x00000000deadbeef)"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = TestRng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..2000 {
            let len = rng.below(64);
            let mut bytes = rng.bytes(len);
            // Make half of the inputs start like a real header, to get past the first checks.
            if rng.below(2) == 0 && bytes.len() >= 8 {
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                bytes[6..8]
                    .copy_from_slice(&(1 + rng.below(FrameKind::ALL.len()) as u16).to_le_bytes());
            }
            let mut decoder = FrameDecoder::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let take = 1 + rng.below(rest.len());
                decoder.push(&rest[..take]);
                rest = &rest[take..];
                // Any outcome is fine, as long as it is not a panic and errors stick.
                if let Err(error) = decoder.next_frame() {
                    assert_eq!(decoder.next_frame(), Err(error));
                }
            }
        }
    }

    #[test]
    fn random_streams_round_trip_in_random_pieces() {
        let mut rng = TestRng(0x0123_4567_89AB_CDEF);
        for _ in 0..200 {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..1 + rng.below(6) {
                let kind = FrameKind::ALL[rng.below(FrameKind::ALL.len())];
                let len = rng.below(300);
                let payload = rng.bytes(len);
                encode(kind, &payload, &mut stream).unwrap();
                expected.push(Frame { kind, payload });
            }
            let mut decoder = FrameDecoder::new();
            let mut frames = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let take = 1 + rng.below(rest.len().min(40));
                decoder.push(&rest[..take]);
                rest = &rest[take..];
                while let Some(frame) = decoder.next_frame().unwrap() {
                    frames.push(frame);
                }
            }
            assert_eq!(frames, expected);
        }
    }

    #[test]
    fn random_bit_flips_never_yield_a_frame() {
        let mut rng = TestRng(0xDEAD_BEEF_CAFE_F00D);
        for _ in 0..2000 {
            let kind = FrameKind::ALL[rng.below(FrameKind::ALL.len())];
            let len = rng.below(100);
            let payload = rng.bytes(len);
            let mut bytes = encoded(kind, &payload);
            let bit = rng.below(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            // A flip is either caught, or (in the length field) makes the decoder wait for bytes
            // that never come; it never produces a frame.
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            assert!(
                !matches!(decoder.next_frame(), Ok(Some(_))),
                "flip of bit {bit} went unnoticed"
            );
        }
    }
}
