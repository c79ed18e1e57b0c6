//! Property tests for every decoder of this module: on any input they return a value or an error,
//! never panic, and what they return is consistent with the input's length.
//!
//! Inputs are random buffers (shaped so they often get past the first checks: plausible response
//! codes and length fields), every truncation of valid buffers, and every single-byte mutation of
//! valid buffers with each of their truncations. A small xorshift generator with fixed seeds keeps
//! the runs reproducible without external crates.

use alloc::string::ToString;
use alloc::vec::Vec;

use super::*;

/// xorshift64* (Vigna): good enough to spread bytes, and deterministic.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// The decoders, in the order of the bits of [`Outcome::accepted`].
const DECODERS: [&str; 8] = [
    "Sense::parse",
    "Sense::from_iscsi_segment",
    "RegisteredKeys::parse",
    "ReservationStatus::parse",
    "PrCapabilities::parse",
    "StandardInquiry::parse",
    "Capacity::parse",
    "parse_report_luns",
];

/// What [`run_all`] did with one input.
struct Outcome {
    /// How many decoder calls were made.
    calls: usize,
    /// Bit `i` set if decoder `DECODERS[i]` accepted the input (with a reservation held, or at
    /// least one LUN, for the last two lists), to show the inputs reach past the first checks.
    accepted: u8,
}

/// Runs every decoder on `bytes` and checks what they return.
fn run_all(bytes: &[u8]) -> Outcome {
    let mut calls = 0;
    let mut accepted = 0u8;

    for (bit, result) in [Sense::parse(bytes), Sense::from_iscsi_segment(bytes)]
        .into_iter()
        .enumerate()
    {
        calls += 1;
        match result {
            Ok(sense) => {
                accepted |= 1 << bit;
                let _ = sense.to_string();
                let _ = (
                    sense.is_unit_attention(),
                    sense.is_reservations_released(),
                    sense.is_reservations_preempted(),
                    sense.is_registrations_preempted(),
                    sense.is_not_ready(),
                );
                assert!(sense.key.code() <= 0x0F);
            }
            Err(error) => {
                let _ = error.to_string();
            }
        }
    }

    for status in [0x00, 0x02, 0x18, 0x30, 0x7F].map(Status::from_u8) {
        calls += 1;
        let error = CommandError::from_status(status, Some(bytes));
        assert_eq!(error.is_none(), status.is_success());
        if let Some(error) = error {
            assert_eq!(error.status(), status);
            let _ = error.to_string();
        }
    }

    calls += 1;
    match RegisteredKeys::parse(bytes) {
        Ok(keys) => {
            accepted |= 1 << 2;
            assert!(8 + 8 * keys.keys.len() <= bytes.len());
        }
        Err(error) => check_data_error(error, bytes),
    }

    calls += 1;
    match ReservationStatus::parse(bytes) {
        Ok(status) => {
            if status.holder.is_some() {
                accepted |= 1 << 3;
            }
            assert!(bytes.len() >= if status.holder.is_some() { 24 } else { 8 });
        }
        Err(error) => check_data_error(error, bytes),
    }

    calls += 1;
    match PrCapabilities::parse(bytes) {
        Ok(capabilities) => {
            accepted |= 1 << 4;
            for kind in ReservationType::ALL {
                let _ = capabilities.supports(kind);
            }
        }
        Err(error) => check_data_error(error, bytes),
    }

    calls += 1;
    match StandardInquiry::parse(bytes) {
        Ok(inquiry) => {
            accepted |= 1 << 5;
            assert!(bytes.len() >= StandardInquiry::LEN);
            assert!(inquiry.vendor.len() <= 8 && inquiry.product.len() <= 16);
            assert!(inquiry.revision.len() <= 4);
            assert!(inquiry.peripheral_qualifier <= 7 && inquiry.peripheral_device_type <= 0x1F);
        }
        Err(error) => check_data_error(error, bytes),
    }

    calls += 1;
    match Capacity::parse(bytes) {
        Ok(capacity) => {
            accepted |= 1 << 6;
            let exact = (u128::from(capacity.last_lba) + 1) * u128::from(capacity.block_len);
            assert_eq!(u128::from(capacity.bytes()), exact);
        }
        Err(error) => check_data_error(error, bytes),
    }

    calls += 1;
    match parse_report_luns(bytes) {
        Ok(luns) => {
            if !luns.is_empty() {
                accepted |= 1 << 7;
            }
            assert!(8 + 8 * luns.len() <= bytes.len());
            assert!(luns.iter().all(|&lun| lun <= 0x3FFF));
        }
        Err(error) => check_data_error(error, bytes),
    }

    Outcome { calls, accepted }
}

/// A truncation error must say more bytes are needed than were given.
fn check_data_error(error: DataError, bytes: &[u8]) {
    if let DataError::Truncated { needed, got } = error {
        assert_eq!(got, bytes.len());
        assert!(needed > got);
    }
    let _ = error.to_string();
}

/// Valid buffers of every kind the decoders read.
fn valid_buffers() -> Vec<Vec<u8>> {
    let mut inquiry = alloc::vec![0x00, 0x00, 0x05, 0x12, 0x3B, 0x00, 0x00, 0x02];
    inquiry.extend_from_slice(b"IET     VIRTUAL-DISK    0001");
    let mut capacity = alloc::vec![0u8; 32];
    capacity[4..8].copy_from_slice(&131_071u32.to_be_bytes());
    capacity[8..12].copy_from_slice(&512u32.to_be_bytes());
    let fixed_sense =
        alloc::vec![0xF0, 0, 0x06, 0, 0, 0, 9, 0x0A, 0, 0, 0, 0, 0x2A, 0x04, 0, 0x80, 0, 1,];
    let mut iscsi_sense = alloc::vec![0, 18];
    iscsi_sense.extend_from_slice(&fixed_sense);
    alloc::vec![
        fixed_sense,
        iscsi_sense,
        alloc::vec![
            0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0x14, 0x00, 0x0A, 0x80, 0x00, 1, 2, 3, 4, 5, 6, 7, 8,
            0x02, 0x06, 0x00, 0x00, 0xC0, 0x00, 0x02, 0x00,
        ],
        alloc::vec![0, 0, 0, 9, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0, 0x22],
        alloc::vec![0, 0, 0, 4, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 0, 5, 0, 0],
        alloc::vec![0x00, 0x08, 0x05, 0x80, 0xEA, 0x01, 0, 0],
        inquiry,
        capacity,
        alloc::vec![
            0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0,
            0, 0, 0, 0, 0,
        ],
    ]
}

#[test]
fn every_truncation_and_mutation_of_valid_buffers() {
    let mut rng = XorShift(0x5EED_0001);
    let mut calls = 0;
    let mut accepted = 0u8;
    for valid in valid_buffers() {
        let whole = run_all(&valid);
        assert_ne!(whole.accepted, 0, "no decoder accepts {valid:02x?}");
        for len in 0..=valid.len() {
            let outcome = run_all(&valid[..len]);
            calls += outcome.calls;
            accepted |= outcome.accepted;
        }
        for index in 0..valid.len() {
            for value in [0x00, 0xFF, 0x80, 0x7F, rng.byte(), rng.byte()] {
                let mut mutated = valid.clone();
                mutated[index] = value;
                for len in 0..=mutated.len() {
                    calls += run_all(&mutated[..len]).calls;
                }
            }
        }
    }
    assert_eq!(
        accepted, 0xFF,
        "every decoder accepts one of the valid buffers"
    );
    // 9 buffers of 8 to 36 bytes: 493 623 decoder calls.
    assert_eq!(calls, 493_623);
}

#[test]
fn random_buffers() {
    const INPUTS: usize = 200_000;
    let mut rng = XorShift(0x5EED_0002);
    let mut calls = 0;
    let mut accepted_by = [0usize; 8];
    let mut buffer = Vec::new();
    for _ in 0..INPUTS {
        random_input(&mut rng, &mut buffer);
        let outcome = run_all(&buffer);
        calls += outcome.calls;
        for (bit, count) in accepted_by.iter_mut().enumerate() {
            if outcome.accepted & (1 << bit) != 0 {
                *count += 1;
            }
        }
    }
    // 13 decoder calls per input: 2 600 000 in all.
    assert_eq!(calls, INPUTS * 13);
    // The shaping works: every decoder gets past its checks for at least 1% of the inputs.
    for (name, count) in DECODERS.iter().zip(accepted_by) {
        assert!(count >= INPUTS / 100, "{name} accepted only {count} inputs");
    }
}

/// Fills `buffer` with random bytes, shaped one time in eight not at all and otherwise like the
/// answer one of the decoders expects (right response code, length fields that mostly fit), so
/// that the decoders' deeper paths are exercised too.
fn random_input(rng: &mut XorShift, buffer: &mut Vec<u8>) {
    let len = if rng.chance(8) {
        rng.below(600)
    } else {
        rng.below(64)
    };
    buffer.clear();
    buffer.extend((0..len).map(|_| rng.byte()));
    // A length field that fits what follows `header` bytes most of the time, and not always.
    let fitting = |rng: &mut XorShift, header: usize, unit: usize| -> u32 {
        let room = len.saturating_sub(header) + if rng.chance(4) { 16 } else { 0 };
        let value = rng.below(room + 1);
        if rng.chance(4) {
            value as u32
        } else {
            (value / unit * unit) as u32
        }
    };
    let put_u32 = |buffer: &mut Vec<u8>, at: usize, value: u32| {
        if let Some(field) = buffer.get_mut(at..at + 4) {
            field.copy_from_slice(&value.to_be_bytes());
        }
    };
    match rng.below(8) {
        0 => {}
        // Sense data: a valid response code, a fitting additional length.
        1 => {
            if let Some(first) = buffer.first_mut() {
                *first = 0x70 | (*first & 0x83);
            }
            let additional = fitting(rng, 8, 1) as u8;
            if let Some(byte) = buffer.get_mut(7) {
                *byte = additional;
            }
        }
        // An iSCSI sense segment.
        2 => {
            let sense_len = fitting(rng, 2, 1) as u16;
            if len >= 3 {
                buffer[..2].copy_from_slice(&sense_len.to_be_bytes());
                buffer[2] = 0x70 | (buffer[2] & 0x83);
            }
        }
        // READ KEYS, or READ RESERVATION with a reservation of a defined type.
        3 => {
            let additional = if rng.chance(2) {
                fitting(rng, 8, 8)
            } else {
                16
            };
            put_u32(buffer, 4, additional);
            if let Some(byte) = buffer.get_mut(21) {
                *byte = [1, 3, 5, 6, 7, 8, 0x15, 2][rng.below(8)];
            }
        }
        // REPORT LUNS with mostly single-level LUNs.
        4 => {
            let list_len = fitting(rng, 8, 8);
            put_u32(buffer, 0, list_len);
            for entry in buffer.get_mut(8..).unwrap_or(&mut []).chunks_mut(8) {
                let first = [0x00, 0x40, 0x7F, 0x80][rng.below(4)];
                for (i, byte) in entry.iter_mut().enumerate() {
                    if i == 0 {
                        *byte = first;
                    } else if i > 1 && !rng.chance(16) {
                        *byte = 0;
                    }
                }
            }
        }
        // Standard INQUIRY data with a plausible additional length.
        5 => {
            if let Some(byte) = buffer.get_mut(4) {
                *byte = 31 + rng.byte() % 64;
            }
        }
        // READ CAPACITY(16) data of a plausible size.
        6 => {
            for byte in buffer.iter_mut().take(3) {
                *byte = 0;
            }
        }
        // REPORT CAPABILITIES.
        _ => {
            if len >= 2 {
                buffer[..2].copy_from_slice(&8u16.to_be_bytes());
            }
        }
    }
}
