//! The EVENTINJ / EXITINTINFO format (AMD APM vol. 2 15.20, figure 15-11 "EVENTINJ field"; 15.7.2
//! for EXITINTINFO, which uses the same layout):
//!
//! | bits  | field |
//! |-------|-------|
//! | 7:0   | VECTOR |
//! | 10:8  | TYPE: 0 external interrupt, 2 NMI, 3 exception, 4 software interrupt (1, 5-7 reserved) |
//! | 11    | EV: an error code is delivered |
//! | 30:12 | reserved, must be 0 |
//! | 31    | V: the field is valid |
//! | 63:32 | ERRORCODE |

#![forbid(unsafe_code)]

use core::fmt;

use crate::state::{PendingEvent, PendingEventKind};

const VECTOR_MASK: u64 = 0xFF;
const TYPE_SHIFT: u32 = 8;
const TYPE_MASK: u64 = 0x7 << TYPE_SHIFT;
const EV: u64 = 1 << 11;
const RESERVED: u64 = 0x7FFF_F000;
const VALID: u64 = 1 << 31;

/// The TYPE field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SvmEventType {
    /// INTR: an external (maskable) interrupt.
    External = 0,
    /// NMI; the vector is ignored.
    Nmi = 2,
    /// A hardware exception (fault or trap).
    Exception = 3,
    /// INTn: a software interrupt.
    Software = 4,
}

/// A decoded, valid EVENTINJ or EXITINTINFO value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmEvent {
    pub vector: u8,
    pub event_type: SvmEventType,
    pub error_code: Option<u32>,
}

/// Why a raw EVENTINJ/EXITINTINFO value is not a valid event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmEventError {
    /// TYPE 1, 5, 6 or 7.
    ReservedType(u8),
    /// Bits 30:12 not zero.
    ReservedBits(u64),
}

impl fmt::Display for SvmEventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReservedType(t) => write!(f, "SVM event with reserved type {t}"),
            Self::ReservedBits(v) => write!(f, "SVM event {v:#x} has reserved bits set"),
        }
    }
}

impl SvmEvent {
    /// The raw 64-bit value with V set.
    pub const fn encode(&self) -> u64 {
        let mut v = self.vector as u64 | (self.event_type as u64) << TYPE_SHIFT | VALID;
        if let Some(code) = self.error_code {
            v |= EV | (code as u64) << 32;
        }
        v
    }

    /// Decodes a raw value: `Ok(None)` when V is clear (no event).
    pub const fn decode(raw: u64) -> Result<Option<SvmEvent>, SvmEventError> {
        if raw & VALID == 0 {
            return Ok(None);
        }
        if raw & RESERVED != 0 {
            return Err(SvmEventError::ReservedBits(raw));
        }
        let t = ((raw & TYPE_MASK) >> TYPE_SHIFT) as u8;
        let event_type = match t {
            0 => SvmEventType::External,
            2 => SvmEventType::Nmi,
            3 => SvmEventType::Exception,
            4 => SvmEventType::Software,
            _ => return Err(SvmEventError::ReservedType(t)),
        };
        Ok(Some(SvmEvent {
            vector: (raw & VECTOR_MASK) as u8,
            event_type,
            error_code: if raw & EV != 0 {
                Some((raw >> 32) as u32)
            } else {
                None
            },
        }))
    }

    /// The EVENTINJ value that delivers a neutral pending event. NMIs use type NMI with vector 2
    /// (the CPU ignores the vector, APM 15.20); the instruction length of a software interrupt is
    /// not part of EVENTINJ (see [`super::load_from_state`] for how RIP accounts for it).
    pub const fn from_pending(ev: &PendingEvent) -> Self {
        let event_type = match ev.kind {
            PendingEventKind::ExternalInterrupt => SvmEventType::External,
            PendingEventKind::Nmi => SvmEventType::Nmi,
            PendingEventKind::Exception => SvmEventType::Exception,
            PendingEventKind::SoftwareInterrupt => SvmEventType::Software,
        };
        Self {
            vector: ev.vector,
            event_type,
            error_code: ev.error_code,
        }
    }

    /// The neutral pending event for an event that must be delivered again, or `None` for events
    /// the guest re-creates by re-executing its instruction: software interrupts (INTn) and the
    /// #BP/#OF exceptions INT3/INTO raise. For those, RIP still points at the instruction when a
    /// VM exit interrupts their delivery, so dropping them and resuming at RIP is exact and needs
    /// no instruction length, which SVM without NRIPS cannot supply.
    pub const fn to_pending_after_exit(&self) -> Option<PendingEvent> {
        let kind = match self.event_type {
            SvmEventType::External => PendingEventKind::ExternalInterrupt,
            SvmEventType::Nmi => PendingEventKind::Nmi,
            SvmEventType::Exception if self.vector == 3 || self.vector == 4 => return None,
            SvmEventType::Exception => PendingEventKind::Exception,
            SvmEventType::Software => return None,
        };
        Some(PendingEvent {
            kind,
            vector: if matches!(kind, PendingEventKind::Nmi) {
                2
            } else {
                self.vector
            },
            error_code: if matches!(kind, PendingEventKind::Exception) {
                self.error_code
            } else {
                None
            },
            instruction_len: 0,
        })
    }

    /// The neutral pending event for a not-yet-delivered EVENTINJ that the hypervisor queued
    /// itself (all types kept; a software interrupt's RIP was already advanced past the
    /// instruction by [`super::load_from_state`], hence length 0).
    pub const fn to_pending_queued(&self) -> PendingEvent {
        let kind = match self.event_type {
            SvmEventType::External => PendingEventKind::ExternalInterrupt,
            SvmEventType::Nmi => PendingEventKind::Nmi,
            SvmEventType::Exception => PendingEventKind::Exception,
            SvmEventType::Software => PendingEventKind::SoftwareInterrupt,
        };
        PendingEvent {
            kind,
            vector: if matches!(kind, PendingEventKind::Nmi) {
                2
            } else {
                self.vector
            },
            error_code: if matches!(kind, PendingEventKind::Exception) {
                self.error_code
            } else {
                None
            },
            instruction_len: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_per_apm_layout() {
        let pf = SvmEvent {
            vector: 14,
            event_type: SvmEventType::Exception,
            error_code: Some(0x6),
        };
        assert_eq!(pf.encode(), 0x0000_0006_8000_0B0E);
        let nmi = SvmEvent {
            vector: 2,
            event_type: SvmEventType::Nmi,
            error_code: None,
        };
        assert_eq!(nmi.encode(), 0x8000_0202);
        let intr = SvmEvent {
            vector: 0x30,
            event_type: SvmEventType::External,
            error_code: None,
        };
        assert_eq!(intr.encode(), 0x8000_0030);
        let soft = SvmEvent {
            vector: 0x80,
            event_type: SvmEventType::Software,
            error_code: None,
        };
        assert_eq!(soft.encode(), 0x8000_0480);
    }

    #[test]
    fn round_trips() {
        for t in [
            SvmEventType::External,
            SvmEventType::Nmi,
            SvmEventType::Exception,
            SvmEventType::Software,
        ] {
            for error_code in [None, Some(0), Some(0xFFFF_FFFF)] {
                for vector in [0u8, 2, 13, 0x80, 0xFF] {
                    let e = SvmEvent {
                        vector,
                        event_type: t,
                        error_code,
                    };
                    assert_eq!(SvmEvent::decode(e.encode()), Ok(Some(e)));
                }
            }
        }
    }

    #[test]
    fn invalid_and_reserved() {
        assert_eq!(SvmEvent::decode(0), Ok(None));
        assert_eq!(SvmEvent::decode(0x0000_0B0E), Ok(None), "V clear");
        assert_eq!(
            SvmEvent::decode(0x8000_0100),
            Err(SvmEventError::ReservedType(1))
        );
        assert_eq!(
            SvmEvent::decode(0x8000_0700),
            Err(SvmEventError::ReservedType(7))
        );
        assert_eq!(
            SvmEvent::decode(0x8000_1000),
            Err(SvmEventError::ReservedBits(0x8000_1000))
        );
    }

    #[test]
    fn software_events_are_re_executed_not_re_injected() {
        let soft = SvmEvent {
            vector: 0x80,
            event_type: SvmEventType::Software,
            error_code: None,
        };
        assert_eq!(soft.to_pending_after_exit(), None);
        let bp = SvmEvent {
            vector: 3,
            event_type: SvmEventType::Exception,
            error_code: None,
        };
        assert_eq!(bp.to_pending_after_exit(), None);
        let gp = SvmEvent {
            vector: 13,
            event_type: SvmEventType::Exception,
            error_code: Some(0),
        };
        assert_eq!(
            gp.to_pending_after_exit(),
            Some(PendingEvent {
                kind: PendingEventKind::Exception,
                vector: 13,
                error_code: Some(0),
                instruction_len: 0
            })
        );
        assert_eq!(
            soft.to_pending_queued().kind,
            PendingEventKind::SoftwareInterrupt
        );
    }
}
