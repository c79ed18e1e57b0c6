//! Sense data: why a command ended in CHECK CONDITION (SPC-4 4.5).
//!
//! Targets return sense data in one of two formats, chosen by the D_SENSE bit of the Control mode
//! page: fixed (response codes 0x70 current and 0x71 deferred, SPC-4 4.5.3), which tgt uses by
//! default, and descriptor (0x72 and 0x73, SPC-4 4.5.2). [`Sense::parse`] reads both into one
//! [`Sense`].
//!
//! Truncated sense data is accepted as far as it goes, the way Linux's `scsi_normalize_sense`
//! does: SPC-4 lets a target cut sense data to the allocation length, and the sense key alone is
//! already worth acting on. Missing ASC/ASCQ bytes read as 0.

use core::fmt;

/// The SENSE KEY: the broad class of the condition (SPC-4 4.5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    /// 0x0: nothing to report (or only a flag such as ILI).
    NoSense,
    /// 0x1: the command succeeded after recovery.
    RecoveredError,
    /// 0x2: the logical unit cannot be accessed now (tgt: LU offline).
    NotReady,
    /// 0x3: an unrecovered error in the medium.
    MediumError,
    /// 0x4: a non-recoverable hardware failure.
    HardwareError,
    /// 0x5: the command or its parameters were not valid.
    IllegalRequest,
    /// 0x6: something changed (reset, reservations released or preempted, capacity...) and this
    /// command was not executed; the condition is cleared by reporting it.
    UnitAttention,
    /// 0x7: the medium is write-protected for this operation.
    DataProtect,
    /// 0x8: blank or end-of-data medium.
    BlankCheck,
    /// 0x9: vendor-specific condition.
    VendorSpecific,
    /// 0xA: EXTENDED COPY was aborted.
    CopyAborted,
    /// 0xB: the target aborted the command; the initiator may retry.
    AbortedCommand,
    /// 0xD: a buffered device reached the end of a partition.
    VolumeOverflow,
    /// 0xE: source data did not match the medium (COMPARE AND WRITE, VERIFY).
    Miscompare,
    /// 0xF: the command completed (used in descriptor sense data for informational conditions).
    Completed,
    /// 0xC, obsolete and reserved. Carries the 4-bit value.
    Reserved(u8),
}

impl SenseKey {
    /// The key with 4-bit code `code & 0x0F`.
    pub const fn from_code(code: u8) -> SenseKey {
        match code & 0x0F {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0x8 => SenseKey::BlankCheck,
            0x9 => SenseKey::VendorSpecific,
            0xA => SenseKey::CopyAborted,
            0xB => SenseKey::AbortedCommand,
            0xD => SenseKey::VolumeOverflow,
            0xE => SenseKey::Miscompare,
            0xF => SenseKey::Completed,
            other => SenseKey::Reserved(other),
        }
    }

    /// The 4-bit code.
    pub const fn code(self) -> u8 {
        match self {
            SenseKey::NoSense => 0x0,
            SenseKey::RecoveredError => 0x1,
            SenseKey::NotReady => 0x2,
            SenseKey::MediumError => 0x3,
            SenseKey::HardwareError => 0x4,
            SenseKey::IllegalRequest => 0x5,
            SenseKey::UnitAttention => 0x6,
            SenseKey::DataProtect => 0x7,
            SenseKey::BlankCheck => 0x8,
            SenseKey::VendorSpecific => 0x9,
            SenseKey::CopyAborted => 0xA,
            SenseKey::AbortedCommand => 0xB,
            SenseKey::VolumeOverflow => 0xD,
            SenseKey::Miscompare => 0xE,
            SenseKey::Completed => 0xF,
            SenseKey::Reserved(code) => code & 0x0F,
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SenseKey::NoSense => "NO SENSE",
            SenseKey::RecoveredError => "RECOVERED ERROR",
            SenseKey::NotReady => "NOT READY",
            SenseKey::MediumError => "MEDIUM ERROR",
            SenseKey::HardwareError => "HARDWARE ERROR",
            SenseKey::IllegalRequest => "ILLEGAL REQUEST",
            SenseKey::UnitAttention => "UNIT ATTENTION",
            SenseKey::DataProtect => "DATA PROTECT",
            SenseKey::BlankCheck => "BLANK CHECK",
            SenseKey::VendorSpecific => "VENDOR SPECIFIC",
            SenseKey::CopyAborted => "COPY ABORTED",
            SenseKey::AbortedCommand => "ABORTED COMMAND",
            SenseKey::VolumeOverflow => "VOLUME OVERFLOW",
            SenseKey::Miscompare => "MISCOMPARE",
            SenseKey::Completed => "COMPLETED",
            SenseKey::Reserved(code) => return write!(f, "reserved sense key {code:#x}"),
        };
        f.write_str(name)
    }
}

/// Which of the two sense data formats the target used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseFormat {
    /// Response codes 0x70 and 0x71 (SPC-4 4.5.3).
    Fixed,
    /// Response codes 0x72 and 0x73 (SPC-4 4.5.2).
    Descriptor,
}

/// Decoded sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    /// The SENSE KEY.
    pub key: SenseKey,
    /// ADDITIONAL SENSE CODE: with `ascq`, the precise condition (e.g. 2A/04).
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub ascq: u8,
    /// The INFORMATION field, when the target marked it valid: for a medium error, typically the
    /// first failing LBA.
    pub information: Option<u64>,
    /// The format the target used.
    pub format: SenseFormat,
    /// A deferred error (0x71, 0x73): it belongs to an earlier command that already reported
    /// GOOD, e.g. a cached write that later failed, not to the command that received it.
    pub deferred: bool,
    /// The three SENSE KEY SPECIFIC bytes, when SKSV is set (e.g. the field pointer to the bad
    /// CDB byte of an ILLEGAL REQUEST). Byte 0 keeps its SKSV bit 7.
    pub sense_key_specific: Option<[u8; 3]>,
}

/// Why sense data could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseError {
    /// Too short to hold even the sense key: `needed` bytes, `got`.
    Truncated { needed: usize, got: usize },
    /// RESPONSE CODE is not one of 0x70..=0x73 (0x7F is vendor-specific, others reserved).
    UnsupportedResponseCode(u8),
}

impl fmt::Display for SenseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SenseError::Truncated { needed, got } => write!(
                f,
                "sense data of {got} bytes is too short: {needed} bytes needed"
            ),
            SenseError::UnsupportedResponseCode(code) => {
                write!(f, "unsupported sense data response code {code:#04x}")
            }
        }
    }
}

impl core::error::Error for SenseError {}

/// ASC 0x2A: parameters changed, the family of the persistent reservation UNIT ATTENTIONs.
const ASC_PARAMETERS_CHANGED: u8 = 0x2A;

impl Sense {
    /// Decodes sense data in fixed or descriptor format.
    ///
    /// Fixed format (SPC-4 4.5.3):
    ///
    /// ```text
    /// byte 0        bit 7 VALID (INFORMATION is valid), bits 6..0 RESPONSE CODE 0x70/0x71
    /// byte 2        bits 3..0 SENSE KEY (bits 7..5 FILEMARK, EOM, ILI)
    /// bytes 3..7    INFORMATION
    /// byte 7        ADDITIONAL SENSE LENGTH (n - 7)
    /// bytes 8..12   COMMAND-SPECIFIC INFORMATION
    /// byte 12       ADDITIONAL SENSE CODE
    /// byte 13       ADDITIONAL SENSE CODE QUALIFIER
    /// byte 14       FIELD REPLACEABLE UNIT CODE
    /// bytes 15..18  bit 7 SKSV, SENSE KEY SPECIFIC
    /// ```
    ///
    /// Descriptor format (SPC-4 4.5.2), with the information (type 0x00) and sense key specific
    /// (type 0x02) descriptors read, the others skipped:
    ///
    /// ```text
    /// byte 0        RESPONSE CODE 0x72/0x73
    /// byte 1        bits 3..0 SENSE KEY
    /// byte 2        ADDITIONAL SENSE CODE
    /// byte 3        ADDITIONAL SENSE CODE QUALIFIER
    /// byte 7        ADDITIONAL SENSE LENGTH (n - 7)
    /// bytes 8..     descriptors: type, additional length, that many bytes
    /// ```
    ///
    /// Data beyond ADDITIONAL SENSE LENGTH is ignored; a descriptor cut short is skipped.
    pub fn parse(bytes: &[u8]) -> Result<Sense, SenseError> {
        let first = *bytes
            .first()
            .ok_or(SenseError::Truncated { needed: 1, got: 0 })?;
        let response_code = first & 0x7F;
        let (format, deferred) = match response_code {
            0x70 => (SenseFormat::Fixed, false),
            0x71 => (SenseFormat::Fixed, true),
            0x72 => (SenseFormat::Descriptor, false),
            0x73 => (SenseFormat::Descriptor, true),
            other => return Err(SenseError::UnsupportedResponseCode(other)),
        };
        // The bytes the target says are sense data: ADDITIONAL SENSE LENGTH counts from byte 8.
        let declared = match bytes.get(7) {
            Some(&additional) => bytes.len().min(8 + usize::from(additional)),
            None => bytes.len(),
        };
        let data = &bytes[..declared];
        let byte = |index: usize| data.get(index).copied().unwrap_or(0);
        match format {
            SenseFormat::Fixed => {
                let key = *data.get(2).ok_or(SenseError::Truncated {
                    needed: 3,
                    got: data.len(),
                })?;
                let information = if first & 0x80 != 0 {
                    data.get(3..7)
                        .and_then(|field| field.try_into().ok())
                        .map(|field| u64::from(u32::from_be_bytes(field)))
                } else {
                    None
                };
                let sense_key_specific = data
                    .get(15..18)
                    .and_then(|field| <[u8; 3]>::try_from(field).ok())
                    .filter(|field| field[0] & 0x80 != 0);
                Ok(Sense {
                    key: SenseKey::from_code(key),
                    asc: byte(12),
                    ascq: byte(13),
                    information,
                    format,
                    deferred,
                    sense_key_specific,
                })
            }
            SenseFormat::Descriptor => {
                let key = *data.get(1).ok_or(SenseError::Truncated {
                    needed: 2,
                    got: data.len(),
                })?;
                let mut sense = Sense {
                    key: SenseKey::from_code(key),
                    asc: byte(2),
                    ascq: byte(3),
                    information: None,
                    format,
                    deferred,
                    sense_key_specific: None,
                };
                let mut rest = data.get(8..).unwrap_or(&[]);
                while let [kind, len, tail @ ..] = rest {
                    let Some(body) = tail.get(..usize::from(*len)) else {
                        break;
                    };
                    match (*kind, body) {
                        // Information descriptor: VALID, reserved, 8-byte INFORMATION.
                        (0x00, [valid, _, information @ ..]) if valid & 0x80 != 0 => {
                            if let Some(field) = information
                                .get(..8)
                                .and_then(|field| <[u8; 8]>::try_from(field).ok())
                            {
                                sense.information = Some(u64::from_be_bytes(field));
                            }
                        }
                        // Sense key specific descriptor: reserved x2, SKSV + 3 bytes.
                        (0x02, [_, _, specific @ ..]) => {
                            sense.sense_key_specific = specific
                                .get(..3)
                                .and_then(|field| <[u8; 3]>::try_from(field).ok())
                                .filter(|field| field[0] & 0x80 != 0);
                        }
                        _ => {}
                    }
                    rest = &tail[body.len()..];
                }
                Ok(sense)
            }
        }
    }

    /// Decodes the sense data carried in the data segment of an iSCSI SCSI Response PDU, which
    /// puts a 2-byte SenseLength before it (RFC 7143 section 11.4.7.2).
    pub fn from_iscsi_segment(segment: &[u8]) -> Result<Sense, SenseError> {
        let [high, low, rest @ ..] = segment else {
            return Err(SenseError::Truncated {
                needed: 2,
                got: segment.len(),
            });
        };
        let len = usize::from(u16::from_be_bytes([*high, *low]));
        let sense = rest.get(..len).ok_or(SenseError::Truncated {
            needed: 2 + len,
            got: segment.len(),
        })?;
        Sense::parse(sense)
    }

    /// Whether this is a UNIT ATTENTION: the command was not executed, and repeating it (after
    /// acting on the ASC/ASCQ) is how to proceed.
    pub fn is_unit_attention(&self) -> bool {
        self.key == SenseKey::UnitAttention
    }

    /// UNIT ATTENTION 2A/04, RESERVATIONS RELEASED: the holder released or unregistered and this
    /// nexus's access changed. tgt reports it to the other registrants' next command.
    pub fn is_reservations_released(&self) -> bool {
        self.is_unit_attention() && (self.asc, self.ascq) == (ASC_PARAMETERS_CHANGED, 0x04)
    }

    /// UNIT ATTENTION 2A/03, RESERVATIONS PREEMPTED: another node took the reservation.
    pub fn is_reservations_preempted(&self) -> bool {
        self.is_unit_attention() && (self.asc, self.ascq) == (ASC_PARAMETERS_CHANGED, 0x03)
    }

    /// UNIT ATTENTION 2A/05, REGISTRATIONS PREEMPTED: this nexus's registration was removed by
    /// another node's PREEMPT; it has been fenced.
    pub fn is_registrations_preempted(&self) -> bool {
        self.is_unit_attention() && (self.asc, self.ascq) == (ASC_PARAMETERS_CHANGED, 0x05)
    }

    /// Whether the sense key is NOT READY (e.g. the LU is offline or becoming ready).
    pub fn is_not_ready(&self) -> bool {
        self.key == SenseKey::NotReady
    }

    /// The standard's description of this ASC/ASCQ, for the ones this hypervisor is likely to
    /// meet (SPC-4 table "ASC and ASCQ assignments"); `None` for the rest.
    pub fn description(&self) -> Option<&'static str> {
        describe(self.asc, self.ascq)
    }
}

impl fmt::Display for Sense {
    /// Says it the way SCSI logs do: "UNIT ATTENTION 2A/04 (reservations released)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:02X}/{:02X}", self.key, self.asc, self.ascq)?;
        if let Some(description) = self.description() {
            write!(f, " ({description})")?;
        }
        if self.deferred {
            write!(f, ", deferred")?;
        }
        if let Some(information) = self.information {
            write!(f, ", information {information:#x}")?;
        }
        Ok(())
    }
}

/// A few ASC/ASCQ descriptions from SPC-4's assignment table.
fn describe(asc: u8, ascq: u8) -> Option<&'static str> {
    Some(match (asc, ascq) {
        (0x00, 0x00) => "no additional sense information",
        (0x04, 0x00) => "logical unit not ready, cause not reportable",
        (0x04, 0x01) => "logical unit is in process of becoming ready",
        (0x04, 0x02) => "logical unit not ready, initializing command required",
        (0x04, 0x03) => "logical unit not ready, manual intervention required",
        (0x08, 0x00) => "logical unit communication failure",
        (0x0C, 0x00) => "write error",
        (0x11, 0x00) => "unrecovered read error",
        (0x1A, 0x00) => "parameter list length error",
        (0x20, 0x00) => "invalid command operation code",
        (0x21, 0x00) => "logical block address out of range",
        (0x24, 0x00) => "invalid field in CDB",
        (0x25, 0x00) => "logical unit not supported",
        (0x26, 0x00) => "invalid field in parameter list",
        (0x27, 0x00) => "write protected",
        (0x28, 0x00) => "not ready to ready change, medium may have changed",
        (0x29, 0x00) => "power on, reset, or bus device reset occurred",
        (0x29, 0x01) => "power on occurred",
        (0x29, 0x02) => "SCSI bus reset occurred",
        (0x29, 0x03) => "bus device reset function occurred",
        (0x29, 0x04) => "device internal reset",
        (0x29, 0x07) => "I_T nexus loss occurred",
        (0x2A, 0x01) => "mode parameters changed",
        (0x2A, 0x03) => "reservations preempted",
        (0x2A, 0x04) => "reservations released",
        (0x2A, 0x05) => "registrations preempted",
        (0x2A, 0x09) => "capacity data has changed",
        (0x2C, 0x00) => "command sequence error",
        (0x3A, 0x00) => "medium not present",
        (0x3F, 0x0E) => "reported luns data has changed",
        (0x47, 0x00) => "SCSI parity error",
        (0x55, 0x02) => "insufficient reservation resources",
        (0x55, 0x04) => "insufficient registration resources",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// Fixed-format sense as tgt builds it (18 bytes): UNIT ATTENTION 2A/04.
    #[rustfmt::skip]
    const FIXED_UA: [u8; 18] = [
        0x70, 0x00, 0x06,           // current, fixed; UNIT ATTENTION
        0, 0, 0, 0,                 // INFORMATION (not valid)
        0x0A,                       // ADDITIONAL SENSE LENGTH: 18 - 8
        0, 0, 0, 0,                 // COMMAND-SPECIFIC INFORMATION
        0x2A, 0x04,                 // RESERVATIONS RELEASED
        0,                          // FRU
        0, 0, 0,                    // sense key specific (SKSV 0)
    ];

    #[test]
    fn fixed_unit_attention() {
        let sense = Sense::parse(&FIXED_UA).unwrap();
        assert_eq!(
            sense,
            Sense {
                key: SenseKey::UnitAttention,
                asc: 0x2A,
                ascq: 0x04,
                information: None,
                format: SenseFormat::Fixed,
                deferred: false,
                sense_key_specific: None,
            }
        );
        assert!(sense.is_unit_attention());
        assert!(sense.is_reservations_released());
        assert!(!sense.is_reservations_preempted());
        assert!(!sense.is_registrations_preempted());
        assert!(!sense.is_not_ready());
        assert_eq!(
            sense.to_string(),
            "UNIT ATTENTION 2A/04 (reservations released)"
        );
    }

    #[test]
    fn reservation_unit_attentions() {
        for (ascq, preempted, registrations) in [(0x03, true, false), (0x05, false, true)] {
            let mut bytes = FIXED_UA;
            bytes[13] = ascq;
            let sense = Sense::parse(&bytes).unwrap();
            assert_eq!(sense.is_reservations_preempted(), preempted);
            assert_eq!(sense.is_registrations_preempted(), registrations);
            assert!(!sense.is_reservations_released());
        }
        // 2A/04 under another sense key is not the UNIT ATTENTION.
        let mut bytes = FIXED_UA;
        bytes[2] = 0x05;
        assert!(!Sense::parse(&bytes).unwrap().is_reservations_released());
    }

    #[test]
    fn fixed_medium_error_with_information_and_deferred() {
        #[rustfmt::skip]
        let bytes = [
            0xF1, 0x00, 0x03,           // VALID, deferred; MEDIUM ERROR
            0x00, 0x01, 0x02, 0x03,     // INFORMATION
            0x0A,
            0, 0, 0, 0,
            0x0C, 0x00,                 // WRITE ERROR
            0,
            0x80, 0x00, 0x07,           // SKSV, sense key specific
        ];
        let sense = Sense::parse(&bytes).unwrap();
        assert_eq!(sense.key, SenseKey::MediumError);
        assert!(sense.deferred);
        assert_eq!(sense.information, Some(0x0001_0203));
        assert_eq!(sense.sense_key_specific, Some([0x80, 0x00, 0x07]));
        assert_eq!(
            sense.to_string(),
            "MEDIUM ERROR 0C/00 (write error), deferred, information 0x10203"
        );
    }

    #[test]
    fn descriptor_format_with_information() {
        #[rustfmt::skip]
        let bytes = [
            0x72, 0x05, 0x24, 0x00,     // current, descriptor; ILLEGAL REQUEST, INVALID FIELD IN CDB
            0, 0, 0,
            0x1C,                       // ADDITIONAL SENSE LENGTH: 12 + 8 + 8
            // Information descriptor.
            0x00, 0x0A, 0x80, 0x00,
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
            // Sense key specific descriptor: field pointer to CDB byte 2.
            0x02, 0x06, 0x00, 0x00, 0xC0, 0x00, 0x02, 0x00,
            // A vendor descriptor, skipped.
            0x80, 0x06, 1, 2, 3, 4, 5, 6,
        ];
        let sense = Sense::parse(&bytes).unwrap();
        assert_eq!(sense.format, SenseFormat::Descriptor);
        assert_eq!(sense.key, SenseKey::IllegalRequest);
        assert_eq!((sense.asc, sense.ascq), (0x24, 0x00));
        assert_eq!(sense.information, Some(0x0102_0304_0506_0708));
        assert_eq!(sense.sense_key_specific, Some([0xC0, 0x00, 0x02]));
        assert!(!sense.deferred);
        assert_eq!(
            sense.to_string(),
            "ILLEGAL REQUEST 24/00 (invalid field in CDB), information 0x102030405060708"
        );
    }

    #[test]
    fn descriptor_unit_attention_and_cut_descriptors() {
        let ua = [0x73, 0x06, 0x2A, 0x05, 0, 0, 0, 0];
        let sense = Sense::parse(&ua).unwrap();
        assert!(sense.is_registrations_preempted());
        assert!(sense.deferred);
        // An information descriptor without VALID, and one cut short by the length: ignored.
        let bytes = [
            0x72, 0x03, 0x11, 0x00, 0, 0, 0, 18, 0x00, 0x0A, 0x00, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0x00,
            0x0A, 0x80, 0,
        ];
        let sense = Sense::parse(&bytes).unwrap();
        assert_eq!(sense.information, None);
        assert_eq!(sense.key, SenseKey::MediumError);
    }

    #[test]
    fn truncated_sense_is_read_as_far_as_it_goes() {
        // Only up to the sense key: ASC/ASCQ read as 0.
        let sense = Sense::parse(&[0x70, 0x00, 0x02]).unwrap();
        assert!(sense.is_not_ready());
        assert_eq!((sense.asc, sense.ascq), (0, 0));
        // The additional sense length bounds the data: bytes after it are ignored.
        let mut bytes = FIXED_UA;
        bytes[7] = 4; // ends before ASC
        let sense = Sense::parse(&bytes).unwrap();
        assert_eq!((sense.asc, sense.ascq), (0, 0));
        assert_eq!(
            Sense::parse(&[0x70, 0x00]),
            Err(SenseError::Truncated { needed: 3, got: 2 })
        );
        assert_eq!(
            Sense::parse(&[0x72]),
            Err(SenseError::Truncated { needed: 2, got: 1 })
        );
        assert_eq!(
            Sense::parse(&[]),
            Err(SenseError::Truncated { needed: 1, got: 0 })
        );
    }

    #[test]
    fn unknown_response_codes_are_refused() {
        for code in [0x00, 0x01, 0x6F, 0x74, 0x7F, 0xFF] {
            let mut bytes = FIXED_UA;
            bytes[0] = code;
            assert_eq!(
                Sense::parse(&bytes),
                Err(SenseError::UnsupportedResponseCode(code & 0x7F))
            );
        }
        assert_eq!(
            SenseError::UnsupportedResponseCode(0x7F).to_string(),
            "unsupported sense data response code 0x7f"
        );
    }

    #[test]
    fn iscsi_sense_segment() {
        let mut segment = alloc::vec![0x00, 18];
        segment.extend_from_slice(&FIXED_UA);
        segment.extend_from_slice(&[0, 0]); // padding or response data
        assert_eq!(Sense::from_iscsi_segment(&segment), Sense::parse(&FIXED_UA));
        assert_eq!(
            Sense::from_iscsi_segment(&segment[..10]),
            Err(SenseError::Truncated {
                needed: 20,
                got: 10
            })
        );
        assert_eq!(
            Sense::from_iscsi_segment(&[0]),
            Err(SenseError::Truncated { needed: 2, got: 1 })
        );
    }

    #[test]
    fn sense_key_codes_round_trip() {
        for code in 0..=0x0F {
            let key = SenseKey::from_code(code);
            assert_eq!(key.code(), code);
            assert_eq!(matches!(key, SenseKey::Reserved(_)), code == 0x0C);
        }
        assert_eq!(SenseKey::from_code(0xF6), SenseKey::UnitAttention);
        assert_eq!(
            SenseKey::Reserved(0xC).to_string(),
            "reserved sense key 0xc"
        );
        assert_eq!(SenseKey::AbortedCommand.to_string(), "ABORTED COMMAND");
    }

    #[test]
    fn unknown_asc_has_no_description() {
        let mut bytes = FIXED_UA;
        bytes[12] = 0x99;
        let sense = Sense::parse(&bytes).unwrap();
        assert_eq!(sense.description(), None);
        assert_eq!(sense.to_string(), "UNIT ATTENTION 99/04");
    }
}
