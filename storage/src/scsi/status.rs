//! SCSI status codes (SAM-5, status codes table) and [`CommandError`], the classification of a
//! completed command that did not succeed.

use core::fmt;

use super::sense::Sense;

/// The status byte a command completes with (SAM-5). Obsolete codes (INTERMEDIATE, COMMAND
/// TERMINATED...) and reserved ones are [`Status::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 0x00: the command succeeded.
    Good,
    /// 0x02: the command failed; sense data says why.
    CheckCondition,
    /// 0x04: PRE-FETCH found the data it was asked to cache.
    ConditionMet,
    /// 0x08: the logical unit is busy; retry later.
    Busy,
    /// 0x18: a reservation held by another I_T nexus forbids this command.
    ReservationConflict,
    /// 0x28: the target's task set is full; retry once a command of this nexus completes.
    TaskSetFull,
    /// 0x30: an auto contingent allegiance is active for another nexus.
    AcaActive,
    /// 0x40: the command was aborted by another nexus (e.g. PREEMPT AND ABORT).
    TaskAborted,
    /// Any other value. [`Status::from_u8`] never puts one of the codes above here.
    Other(u8),
}

impl Status {
    /// The status with code `code`.
    pub const fn from_u8(code: u8) -> Status {
        match code {
            0x00 => Status::Good,
            0x02 => Status::CheckCondition,
            0x04 => Status::ConditionMet,
            0x08 => Status::Busy,
            0x18 => Status::ReservationConflict,
            0x28 => Status::TaskSetFull,
            0x30 => Status::AcaActive,
            0x40 => Status::TaskAborted,
            other => Status::Other(other),
        }
    }

    /// The status code.
    pub const fn code(self) -> u8 {
        match self {
            Status::Good => 0x00,
            Status::CheckCondition => 0x02,
            Status::ConditionMet => 0x04,
            Status::Busy => 0x08,
            Status::ReservationConflict => 0x18,
            Status::TaskSetFull => 0x28,
            Status::AcaActive => 0x30,
            Status::TaskAborted => 0x40,
            Status::Other(code) => code,
        }
    }

    /// Whether the command succeeded: GOOD, or CONDITION MET.
    pub const fn is_success(self) -> bool {
        matches!(self, Status::Good | Status::ConditionMet)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Good => "GOOD",
            Status::CheckCondition => "CHECK CONDITION",
            Status::ConditionMet => "CONDITION MET",
            Status::Busy => "BUSY",
            Status::ReservationConflict => "RESERVATION CONFLICT",
            Status::TaskSetFull => "TASK SET FULL",
            Status::AcaActive => "ACA ACTIVE",
            Status::TaskAborted => "TASK ABORTED",
            Status::Other(code) => return write!(f, "status {code:#04x}"),
        })
    }
}

/// What went wrong with a command that completed with a status other than GOOD or CONDITION MET.
///
/// Callers match on it to decide: retry (BUSY, TASK SET FULL, most UNIT ATTENTIONs), give up the
/// disk (RESERVATION CONFLICT: this node is fenced or not registered), or report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandError {
    /// RESERVATION CONFLICT.
    ReservationConflict,
    /// CHECK CONDITION with the decoded sense data.
    CheckCondition(Sense),
    /// CHECK CONDITION without sense data, or with sense data that could not be decoded.
    CheckConditionWithoutSense,
    /// BUSY.
    Busy,
    /// TASK SET FULL.
    TaskSetFull,
    /// TASK ABORTED.
    TaskAborted,
    /// Any other status that is not success (ACA ACTIVE, obsolete and reserved codes).
    Other(Status),
}

impl CommandError {
    /// Classifies a completed command: `None` if `status` is success (GOOD, CONDITION MET).
    ///
    /// `sense` is the sense data, as SPC-4 lays it out. For convenience, the data segment of an
    /// iSCSI SCSI Response (2-byte SenseLength, then the sense data) is accepted too: the two are
    /// told apart by byte 0, which is a response code 0x70..=0x73 (bit 7 aside) in sense data
    /// and the high byte of SenseLength, 0x00 or 0x01, in a segment.
    pub fn from_status(status: Status, sense: Option<&[u8]>) -> Option<CommandError> {
        Some(match status {
            Status::Good | Status::ConditionMet => return None,
            Status::CheckCondition => match sense.and_then(decode_sense) {
                Some(sense) => CommandError::CheckCondition(sense),
                None => CommandError::CheckConditionWithoutSense,
            },
            Status::ReservationConflict => CommandError::ReservationConflict,
            Status::Busy => CommandError::Busy,
            Status::TaskSetFull => CommandError::TaskSetFull,
            Status::TaskAborted => CommandError::TaskAborted,
            Status::AcaActive | Status::Other(_) => CommandError::Other(status),
        })
    }

    /// The sense data, for CHECK CONDITION.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            CommandError::CheckCondition(sense) => Some(sense),
            _ => None,
        }
    }

    /// Whether this is a CHECK CONDITION with a UNIT ATTENTION sense key.
    pub fn is_unit_attention(&self) -> bool {
        self.sense().is_some_and(Sense::is_unit_attention)
    }

    /// The status the command completed with.
    pub fn status(&self) -> Status {
        match self {
            CommandError::ReservationConflict => Status::ReservationConflict,
            CommandError::CheckCondition(_) | CommandError::CheckConditionWithoutSense => {
                Status::CheckCondition
            }
            CommandError::Busy => Status::Busy,
            CommandError::TaskSetFull => Status::TaskSetFull,
            CommandError::TaskAborted => Status::TaskAborted,
            CommandError::Other(status) => *status,
        }
    }
}

/// Raw sense data, or failing that an iSCSI sense segment (see [`CommandError::from_status`]).
fn decode_sense(bytes: &[u8]) -> Option<Sense> {
    Sense::parse(bytes)
        .or_else(|_| Sense::from_iscsi_segment(bytes))
        .ok()
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::ReservationConflict => f.write_str("reservation conflict"),
            CommandError::CheckCondition(sense) => write!(f, "{sense}"),
            CommandError::CheckConditionWithoutSense => {
                f.write_str("check condition without usable sense data")
            }
            CommandError::Busy => f.write_str("logical unit busy"),
            CommandError::TaskSetFull => f.write_str("task set full"),
            CommandError::TaskAborted => f.write_str("task aborted"),
            CommandError::Other(status) => write!(f, "command failed with {status}"),
        }
    }
}

impl core::error::Error for CommandError {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    const UA_RELEASED: [u8; 18] = [
        0x70, 0, 0x06, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x2A, 0x04, 0, 0, 0, 0,
    ];

    #[test]
    fn status_codes_round_trip() {
        let named: Vec<u8> = [0x00, 0x02, 0x04, 0x08, 0x18, 0x28, 0x30, 0x40].to_vec();
        for code in 0..=0xFF {
            let status = Status::from_u8(code);
            assert_eq!(status.code(), code);
            assert_eq!(matches!(status, Status::Other(_)), !named.contains(&code));
        }
        assert_eq!(Status::from_u8(0x18), Status::ReservationConflict);
        assert!(Status::Good.is_success());
        assert!(Status::ConditionMet.is_success());
        assert!(!Status::Busy.is_success());
        assert_eq!(Status::TaskSetFull.to_string(), "TASK SET FULL");
        assert_eq!(Status::Other(0x22).to_string(), "status 0x22");
    }

    #[test]
    fn success_is_not_an_error() {
        assert_eq!(CommandError::from_status(Status::Good, None), None);
        assert_eq!(
            CommandError::from_status(Status::ConditionMet, Some(&UA_RELEASED)),
            None
        );
    }

    #[test]
    fn classification() {
        let cases = [
            (
                Status::ReservationConflict,
                CommandError::ReservationConflict,
            ),
            (Status::Busy, CommandError::Busy),
            (Status::TaskSetFull, CommandError::TaskSetFull),
            (Status::TaskAborted, CommandError::TaskAborted),
            (Status::AcaActive, CommandError::Other(Status::AcaActive)),
            (
                Status::Other(0x22),
                CommandError::Other(Status::Other(0x22)),
            ),
            (
                Status::CheckCondition,
                CommandError::CheckConditionWithoutSense,
            ),
        ];
        for (status, expected) in cases {
            let error = CommandError::from_status(status, None).unwrap();
            assert_eq!(error, expected);
            assert_eq!(error.status(), status);
            assert_eq!(error.sense(), None);
        }
    }

    #[test]
    fn check_condition_with_sense() {
        let error = CommandError::from_status(Status::CheckCondition, Some(&UA_RELEASED)).unwrap();
        let sense = error.sense().unwrap();
        assert!(sense.is_reservations_released());
        assert!(error.is_unit_attention());
        assert_eq!(
            error.to_string(),
            "UNIT ATTENTION 2A/04 (reservations released)"
        );
        // Undecodable or empty sense data.
        assert_eq!(
            CommandError::from_status(Status::CheckCondition, Some(&[0x7F, 0, 6])),
            Some(CommandError::CheckConditionWithoutSense)
        );
        assert_eq!(
            CommandError::from_status(Status::CheckCondition, Some(&[])),
            Some(CommandError::CheckConditionWithoutSense)
        );
    }

    #[test]
    fn check_condition_with_an_iscsi_sense_segment() {
        let mut segment = alloc::vec![0x00, 18];
        segment.extend_from_slice(&UA_RELEASED);
        let error = CommandError::from_status(Status::CheckCondition, Some(&segment)).unwrap();
        assert_eq!(
            error,
            CommandError::from_status(Status::CheckCondition, Some(&UA_RELEASED)).unwrap()
        );
    }

    #[test]
    fn errors_display_in_words() {
        assert_eq!(
            CommandError::ReservationConflict.to_string(),
            "reservation conflict"
        );
        assert_eq!(CommandError::Busy.to_string(), "logical unit busy");
        assert_eq!(
            CommandError::Other(Status::AcaActive).to_string(),
            "command failed with ACA ACTIVE"
        );
        assert_eq!(
            CommandError::CheckConditionWithoutSense.to_string(),
            "check condition without usable sense data"
        );
    }
}
