//! Persistent reservations (SPC-4: PERSISTENT RESERVE IN, 6.15, and PERSISTENT RESERVE OUT,
//! 6.16): how the nodes of the cluster share a LUN and fence a node that failed.
//!
//! The scheme is the one fence_scsi and Windows failover clusters use: every node registers its
//! own key ([`ReservationKey::for_node`]) and one of them holds a Write Exclusive - Registrants
//! Only reservation, so every registered node may write and an unregistered one may not. Fencing a
//! node is PREEMPT (or PREEMPT AND ABORT) of its key: the target removes its registration, and its
//! next write fails with RESERVATION CONFLICT.
//!
//! This module encodes the PERSISTENT RESERVE OUT parameter list and decodes the PERSISTENT
//! RESERVE IN answers; the CDBs are built by [`super::Command::persistent_reserve_in`] and
//! [`super::Command::persistent_reserve_out`].

use alloc::vec::Vec;
use core::fmt;

use super::data::{be_u32, be_u64, check_len, DataError};

/// Length of the PERSISTENT RESERVE OUT parameter list without transport IDs (SPC-4 6.16).
pub const PR_OUT_PARAMETER_LIST_LEN: usize = 24;

/// The reservation types of SPC-4 6.16, with the TYPE codes of the PERSISTENT RESERVE OUT CDB
/// and the READ RESERVATION data.
///
/// "Registrants only" types let every registered I_T nexus in (the reservation is held by one of
/// them); "all registrants" types make every registrant a holder, and READ RESERVATION then
/// reports reservation key 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    /// 1: only the holder may write; everyone may read.
    WriteExclusive,
    /// 3: only the holder may access the medium.
    ExclusiveAccess,
    /// 5: only registrants may write; everyone may read. The cluster's type.
    WriteExclusiveRegistrantsOnly,
    /// 6: only registrants may access the medium.
    ExclusiveAccessRegistrantsOnly,
    /// 7: like 5, and every registrant is a reservation holder.
    WriteExclusiveAllRegistrants,
    /// 8: like 6, and every registrant is a reservation holder.
    ExclusiveAccessAllRegistrants,
}

impl ReservationType {
    /// Every type, in code order.
    pub const ALL: [ReservationType; 6] = [
        ReservationType::WriteExclusive,
        ReservationType::ExclusiveAccess,
        ReservationType::WriteExclusiveRegistrantsOnly,
        ReservationType::ExclusiveAccessRegistrantsOnly,
        ReservationType::WriteExclusiveAllRegistrants,
        ReservationType::ExclusiveAccessAllRegistrants,
    ];

    /// The 4-bit TYPE code.
    pub const fn code(self) -> u8 {
        match self {
            ReservationType::WriteExclusive => 1,
            ReservationType::ExclusiveAccess => 3,
            ReservationType::WriteExclusiveRegistrantsOnly => 5,
            ReservationType::ExclusiveAccessRegistrantsOnly => 6,
            ReservationType::WriteExclusiveAllRegistrants => 7,
            ReservationType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// The type with TYPE code `code`, or `None` for obsolete and reserved codes.
    pub fn from_code(code: u8) -> Option<ReservationType> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// Whether every registrant holds the reservation (types 7 and 8), so that READ RESERVATION
    /// reports key 0 rather than the key of one holder.
    pub const fn all_registrants_hold(self) -> bool {
        matches!(
            self,
            ReservationType::WriteExclusiveAllRegistrants
                | ReservationType::ExclusiveAccessAllRegistrants
        )
    }
}

impl fmt::Display for ReservationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReservationType::WriteExclusive => "Write Exclusive",
            ReservationType::ExclusiveAccess => "Exclusive Access",
            ReservationType::WriteExclusiveRegistrantsOnly => "Write Exclusive - Registrants Only",
            ReservationType::ExclusiveAccessRegistrantsOnly => {
                "Exclusive Access - Registrants Only"
            }
            ReservationType::WriteExclusiveAllRegistrants => "Write Exclusive - All Registrants",
            ReservationType::ExclusiveAccessAllRegistrants => "Exclusive Access - All Registrants",
        })
    }
}

/// An 8-byte reservation key. 0 means "no key": it is what an unregistered I_T nexus sends, and
/// registering the new key 0 unregisters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ReservationKey(pub u64);

impl ReservationKey {
    /// The absent key.
    pub const NONE: ReservationKey = ReservationKey(0);

    /// The key of the cluster node called `name`: one key per node, as fence_scsi does, so that
    /// any node can tell from READ KEYS or READ RESERVATION which nodes are in and who holds the
    /// reservation, and can preempt a failed node by its name alone.
    ///
    /// Derivation: the 64-bit FNV-1a hash of the UTF-8 bytes of `name` (offset basis
    /// 0xcbf29ce484222325, prime 0x100000001b3), with the result 0 replaced by 1 because 0 means
    /// "no key". It is stable across builds and platforms; map a key back to a node with
    /// [`ReservationKey::find_node`] over the known names. Two names sharing a key is possible in
    /// principle (64-bit hash) and a cluster should check its members' keys are distinct.
    pub const fn for_node(name: &str) -> ReservationKey {
        const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let bytes = name.as_bytes();
        let mut hash = OFFSET_BASIS;
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(PRIME);
            i += 1;
        }
        ReservationKey(if hash == 0 { 1 } else { hash })
    }

    /// The first of `names` whose [`ReservationKey::for_node`] is this key.
    pub fn find_node<'a, I>(self, names: I) -> Option<&'a str>
    where
        I: IntoIterator<Item = &'a str>,
    {
        names
            .into_iter()
            .find(|name| ReservationKey::for_node(name) == self)
    }

    /// Whether this is the absent key 0.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }

    /// The key as sent on the wire.
    pub const fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for ReservationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReservationKey({:#018x})", self.0)
    }
}

impl fmt::Display for ReservationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// A PERSISTENT RESERVE OUT service action with the keys it carries (SPC-4 6.16).
///
/// `key` is always the RESERVATION KEY field: the key the sending I_T nexus is registered with,
/// which the target checks (a mismatch is a RESERVATION CONFLICT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrOutAction {
    /// REGISTER (0): register `new_key` if `key` is 0 and the nexus is unregistered, change the
    /// registration from `key` to `new_key`, or unregister if `new_key` is 0.
    Register {
        key: ReservationKey,
        new_key: ReservationKey,
    },
    /// REGISTER AND IGNORE EXISTING KEY (6): register `new_key` whatever the current registration
    /// is. The way back in after a restart, when the old key is unknown.
    RegisterAndIgnoreExistingKey { new_key: ReservationKey },
    /// RESERVE (1): take the reservation with the type in the CDB.
    Reserve { key: ReservationKey },
    /// RELEASE (2): give up the reservation; the CDB's type must match the reservation's.
    Release { key: ReservationKey },
    /// CLEAR (3): remove the reservation and every registration.
    Clear { key: ReservationKey },
    /// PREEMPT (4): remove every registration with key `victim` and, if `victim` holds the
    /// reservation, take it with the type in the CDB. Fences a failed node.
    Preempt {
        key: ReservationKey,
        victim: ReservationKey,
    },
    /// PREEMPT AND ABORT (5): PREEMPT, and also abort the victims' outstanding commands, so no
    /// write of the fenced node still queued in the target lands after the fence.
    PreemptAndAbort {
        key: ReservationKey,
        victim: ReservationKey,
    },
}

impl PrOutAction {
    /// REGISTER with new key 0: drop the registration `key`.
    pub const fn unregister(key: ReservationKey) -> PrOutAction {
        PrOutAction::Register {
            key,
            new_key: ReservationKey::NONE,
        }
    }

    /// The SERVICE ACTION code of the CDB's byte 1.
    pub const fn service_action(&self) -> u8 {
        match self {
            PrOutAction::Register { .. } => 0x00,
            PrOutAction::Reserve { .. } => 0x01,
            PrOutAction::Release { .. } => 0x02,
            PrOutAction::Clear { .. } => 0x03,
            PrOutAction::Preempt { .. } => 0x04,
            PrOutAction::PreemptAndAbort { .. } => 0x05,
            PrOutAction::RegisterAndIgnoreExistingKey { .. } => 0x06,
        }
    }

    /// The 24-byte parameter list to send as the command's Data-Out (SPC-4 6.16), with APTPL,
    /// ALL_TG_PT and SPEC_I_PT 0:
    ///
    /// ```text
    /// bytes 0..8    RESERVATION KEY
    /// bytes 8..16   SERVICE ACTION RESERVATION KEY: the new key, or the victim's key
    /// bytes 16..20  obsolete
    /// byte 20       bit 3 SPEC_I_PT, bit 2 ALL_TG_PT, bit 0 APTPL
    /// byte 21       reserved
    /// bytes 22..24  obsolete
    /// ```
    ///
    /// APTPL stays 0: whether registrations survive a target power loss is the target's setting,
    /// and tgt keeps them in memory only anyway.
    pub fn parameter_list(&self) -> [u8; PR_OUT_PARAMETER_LIST_LEN] {
        let (key, service_action_key) = match *self {
            PrOutAction::Register { key, new_key } => (key, new_key),
            // The RESERVATION KEY field is ignored by the target for this action.
            PrOutAction::RegisterAndIgnoreExistingKey { new_key } => {
                (ReservationKey::NONE, new_key)
            }
            PrOutAction::Reserve { key }
            | PrOutAction::Release { key }
            | PrOutAction::Clear { key } => (key, ReservationKey::NONE),
            PrOutAction::Preempt { key, victim } | PrOutAction::PreemptAndAbort { key, victim } => {
                (key, victim)
            }
        };
        let mut list = [0u8; PR_OUT_PARAMETER_LIST_LEN];
        list[0..8].copy_from_slice(&key.to_bytes());
        list[8..16].copy_from_slice(&service_action_key.to_bytes());
        list
    }
}

/// A PERSISTENT RESERVE IN service action (SPC-4 6.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrInAction {
    /// READ KEYS (0): the registered keys; parse with [`RegisteredKeys::parse`].
    ReadKeys,
    /// READ RESERVATION (1): the reservation, if any; parse with [`ReservationStatus::parse`].
    ReadReservation,
    /// REPORT CAPABILITIES (2): what the target supports; parse with [`PrCapabilities::parse`].
    ReportCapabilities,
}

impl PrInAction {
    /// The SERVICE ACTION code of the CDB's byte 1.
    pub const fn service_action(self) -> u8 {
        match self {
            PrInAction::ReadKeys => 0x00,
            PrInAction::ReadReservation => 0x01,
            PrInAction::ReportCapabilities => 0x02,
        }
    }
}

/// The READ KEYS answer (SPC-4 6.15).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegisteredKeys {
    /// PRGENERATION: bumped by the target on every successful REGISTER, CLEAR, PREEMPT and
    /// PREEMPT AND ABORT, so a node can tell whether the registrations changed between two reads.
    pub generation: u32,
    /// The registered keys, one per registered I_T nexus (a key registered through two nexuses
    /// appears twice).
    pub keys: Vec<ReservationKey>,
}

impl RegisteredKeys {
    /// Decodes READ KEYS parameter data:
    ///
    /// ```text
    /// bytes 0..4  PRGENERATION
    /// bytes 4..8  ADDITIONAL LENGTH: bytes of keys that follow (8 per key)
    /// bytes 8..   the keys
    /// ```
    ///
    /// If the allocation length cut the list short, this returns [`DataError::Truncated`] with
    /// `needed` set to the allocation length that holds it all: retry with that.
    pub fn parse(bytes: &[u8]) -> Result<RegisteredKeys, DataError> {
        check_len(bytes, 8)?;
        let generation = be_u32(bytes, 0)?;
        let additional = usize::try_from(be_u32(bytes, 4)?)
            .map_err(|_| DataError::Invalid("READ KEYS additional length overflows"))?;
        if additional % 8 != 0 {
            return Err(DataError::Invalid(
                "READ KEYS additional length is not a multiple of 8",
            ));
        }
        let end = 8usize.saturating_add(additional);
        check_len(bytes, end)?;
        // `additional` is a multiple of 8, so there is no remainder.
        let (keys, _) = bytes[8..end].as_chunks::<8>();
        let keys = keys
            .iter()
            .map(|&key| ReservationKey(u64::from_be_bytes(key)))
            .collect();
        Ok(RegisteredKeys { generation, keys })
    }

    /// Whether `key` is registered (through at least one I_T nexus).
    pub fn contains(&self, key: ReservationKey) -> bool {
        self.keys.contains(&key)
    }
}

/// The READ RESERVATION answer (SPC-4 6.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationStatus {
    /// PRGENERATION, as in [`RegisteredKeys::generation`].
    pub generation: u32,
    /// The holder's key and the reservation type, or `None` if no reservation is held. For the
    /// all-registrants types the key is 0 ([`ReservationType::all_registrants_hold`]).
    pub holder: Option<(ReservationKey, ReservationType)>,
}

impl ReservationStatus {
    /// Decodes READ RESERVATION parameter data:
    ///
    /// ```text
    /// bytes 0..4    PRGENERATION
    /// bytes 4..8    ADDITIONAL LENGTH: 0 (no reservation) or 16
    /// bytes 8..16   RESERVATION KEY
    /// bytes 16..20  obsolete
    /// byte 20       reserved
    /// byte 21       bits 7..4 SCOPE (0: logical unit), bits 3..0 TYPE
    /// bytes 22..24  obsolete
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<ReservationStatus, DataError> {
        check_len(bytes, 8)?;
        let generation = be_u32(bytes, 0)?;
        match be_u32(bytes, 4)? {
            0 => Ok(ReservationStatus {
                generation,
                holder: None,
            }),
            16 => {
                check_len(bytes, 24)?;
                let key = ReservationKey(be_u64(bytes, 8)?);
                let scope_and_type = bytes[21];
                if scope_and_type >> 4 != 0 {
                    // Element and other scopes are obsolete; this crate only reserves LUs.
                    return Err(DataError::Invalid(
                        "READ RESERVATION scope is not the logical unit",
                    ));
                }
                let kind = ReservationType::from_code(scope_and_type & 0x0F)
                    .ok_or(DataError::Invalid("READ RESERVATION type is not defined"))?;
                Ok(ReservationStatus {
                    generation,
                    holder: Some((key, kind)),
                })
            }
            _ => Err(DataError::Invalid(
                "READ RESERVATION additional length is neither 0 nor 16",
            )),
        }
    }
}

/// The REPORT CAPABILITIES answer (SPC-4 6.15): what the target's persistent reservations
/// support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrCapabilities {
    /// CRH: RESERVE/RELEASE(6/10) are handled compatibly with persistent reservations.
    pub compatible_reservation_handling: bool,
    /// SIP_C: REGISTER accepts SPEC_I_PT (registering other initiator ports).
    pub specify_initiator_ports: bool,
    /// ATP_C: REGISTER accepts ALL_TG_PT (registering through every target port).
    pub all_target_ports: bool,
    /// PTPL_C: registrations can persist through power loss (APTPL).
    pub persist_through_power_loss_capable: bool,
    /// PTPL_A: persistence through power loss is currently on.
    pub persist_through_power_loss_active: bool,
    /// PERSISTENT RESERVATION TYPE MASK (bytes 4..6), if TMV says it is valid.
    pub type_mask: Option<u16>,
}

impl PrCapabilities {
    /// Decodes REPORT CAPABILITIES parameter data:
    ///
    /// ```text
    /// bytes 0..2  LENGTH (8)
    /// byte 2      bit 7 RLR_C, bit 4 CRH, bit 3 SIP_C, bit 2 ATP_C, bit 0 PTPL_C
    /// byte 3      bit 7 TMV, bits 6..4 ALLOW COMMANDS, bit 0 PTPL_A
    /// bytes 4..6  PERSISTENT RESERVATION TYPE MASK
    /// bytes 6..8  reserved
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<PrCapabilities, DataError> {
        check_len(bytes, 6)?;
        let length = u16::from_be_bytes([bytes[0], bytes[1]]);
        if length < 6 {
            return Err(DataError::Invalid(
                "REPORT CAPABILITIES length is below 6 bytes",
            ));
        }
        let flags = bytes[2];
        let type_mask_valid = bytes[3] & 0x80 != 0;
        Ok(PrCapabilities {
            compatible_reservation_handling: flags & 0x10 != 0,
            specify_initiator_ports: flags & 0x08 != 0,
            all_target_ports: flags & 0x04 != 0,
            persist_through_power_loss_capable: flags & 0x01 != 0,
            persist_through_power_loss_active: bytes[3] & 0x01 != 0,
            type_mask: type_mask_valid.then(|| u16::from_be_bytes([bytes[4], bytes[5]])),
        })
    }

    /// Whether the target supports reservation type `kind`, or `None` if it did not say (TMV 0).
    pub fn supports(&self, kind: ReservationType) -> Option<bool> {
        // Bit positions in the 16-bit mask (byte 4 is the high byte), SPC-4 table "Persistent
        // Reservation Type Mask": WR_EX_AR 15, EX_AC_RO 14, WR_EX_RO 13, EX_AC 11, WR_EX 9,
        // EX_AC_AR 0.
        let bit = match kind {
            ReservationType::WriteExclusiveAllRegistrants => 15,
            ReservationType::ExclusiveAccessRegistrantsOnly => 14,
            ReservationType::WriteExclusiveRegistrantsOnly => 13,
            ReservationType::ExclusiveAccess => 11,
            ReservationType::WriteExclusive => 9,
            ReservationType::ExclusiveAccessAllRegistrants => 0,
        };
        self.type_mask.map(|mask| mask & (1 << bit) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn reservation_type_codes() {
        let codes: Vec<u8> = ReservationType::ALL.iter().map(|t| t.code()).collect();
        assert_eq!(codes, [1, 3, 5, 6, 7, 8]);
        for code in 0..=0xFF {
            match ReservationType::from_code(code) {
                Some(kind) => assert_eq!(kind.code(), code),
                None => assert!(!codes.contains(&code)),
            }
        }
        assert!(ReservationType::ExclusiveAccessAllRegistrants.all_registrants_hold());
        assert!(!ReservationType::WriteExclusiveRegistrantsOnly.all_registrants_hold());
        assert_eq!(
            ReservationType::WriteExclusiveRegistrantsOnly.to_string(),
            "Write Exclusive - Registrants Only"
        );
    }

    #[test]
    fn node_keys_are_fnv1a_and_never_zero() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(
            ReservationKey::for_node(""),
            ReservationKey(0xcbf29ce484222325)
        );
        assert_eq!(
            ReservationKey::for_node("a"),
            ReservationKey(0xaf63dc4c8601ec8c)
        );
        assert_eq!(
            ReservationKey::for_node("foobar"),
            ReservationKey(0x85944171f73967e8)
        );
        let names = ["node-1", "node-2", "node-3"];
        let keys: Vec<_> = names.iter().map(|n| ReservationKey::for_node(n)).collect();
        assert!(keys.iter().all(|key| !key.is_none()));
        assert_ne!(keys[0], keys[1]);
        assert_eq!(keys[1].find_node(names), Some("node-2"));
        assert_eq!(ReservationKey(42).find_node(names), None);
        assert_eq!(ReservationKey(0x1234).to_string(), "0x0000000000001234");
    }

    #[test]
    fn parameter_lists() {
        let mine = ReservationKey(0x0102_0304_0506_0708);
        let theirs = ReservationKey(0x1112_1314_1516_1718);
        let list = |key: [u8; 8], sark: [u8; 8]| {
            let mut expected = [0u8; 24];
            expected[..8].copy_from_slice(&key);
            expected[8..16].copy_from_slice(&sark);
            expected
        };
        let none = [0u8; 8];
        assert_eq!(
            PrOutAction::Register {
                key: ReservationKey::NONE,
                new_key: mine
            }
            .parameter_list(),
            list(none, mine.to_bytes())
        );
        assert_eq!(
            PrOutAction::Register {
                key: mine,
                new_key: theirs
            }
            .parameter_list(),
            list(mine.to_bytes(), theirs.to_bytes())
        );
        assert_eq!(
            PrOutAction::unregister(mine).parameter_list(),
            list(mine.to_bytes(), none)
        );
        assert_eq!(
            PrOutAction::RegisterAndIgnoreExistingKey { new_key: mine }.parameter_list(),
            list(none, mine.to_bytes())
        );
        for action in [
            PrOutAction::Reserve { key: mine },
            PrOutAction::Release { key: mine },
            PrOutAction::Clear { key: mine },
        ] {
            assert_eq!(action.parameter_list(), list(mine.to_bytes(), none));
        }
        for action in [
            PrOutAction::Preempt {
                key: mine,
                victim: theirs,
            },
            PrOutAction::PreemptAndAbort {
                key: mine,
                victim: theirs,
            },
        ] {
            let bytes = action.parameter_list();
            assert_eq!(bytes, list(mine.to_bytes(), theirs.to_bytes()));
            assert_eq!(bytes[20], 0, "APTPL, ALL_TG_PT, SPEC_I_PT are 0");
        }
    }

    #[test]
    fn read_keys() {
        #[rustfmt::skip]
        let data = [
            0, 0, 0, 9,                 // PRGENERATION 9
            0, 0, 0, 16,                // two keys
            0, 0, 0, 0, 0, 0, 0, 0x11,
            0xAA, 0, 0, 0, 0, 0, 0, 0x22,
        ];
        let keys = RegisteredKeys::parse(&data).unwrap();
        assert_eq!(keys.generation, 9);
        assert_eq!(
            keys.keys,
            vec![ReservationKey(0x11), ReservationKey(0xAA00_0000_0000_0022)]
        );
        assert!(keys.contains(ReservationKey(0x11)));
        assert!(!keys.contains(ReservationKey(0x12)));

        let empty = RegisteredKeys::parse(&[0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
        assert_eq!(empty.generation, 1);
        assert!(empty.keys.is_empty());

        // Allocation length too short for the list: say how much is needed.
        assert_eq!(
            RegisteredKeys::parse(&data[..16]),
            Err(DataError::Truncated {
                needed: 24,
                got: 16
            })
        );
        assert_eq!(
            RegisteredKeys::parse(&[0, 0, 0, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
            Err(DataError::Invalid(
                "READ KEYS additional length is not a multiple of 8"
            ))
        );
    }

    #[test]
    fn read_reservation() {
        let none = ReservationStatus::parse(&[0, 0, 0, 3, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            none,
            ReservationStatus {
                generation: 3,
                holder: None
            }
        );
        #[rustfmt::skip]
        let held = [
            0, 0, 0, 4,                 // PRGENERATION
            0, 0, 0, 16,                // ADDITIONAL LENGTH
            0, 0, 0, 0, 0, 0, 0x12, 0x34, // RESERVATION KEY
            0, 0, 0, 0,                 // obsolete
            0,                          // reserved
            0x05,                       // scope LU, Write Exclusive - Registrants Only
            0, 0,                       // obsolete
        ];
        assert_eq!(
            ReservationStatus::parse(&held).unwrap(),
            ReservationStatus {
                generation: 4,
                holder: Some((
                    ReservationKey(0x1234),
                    ReservationType::WriteExclusiveRegistrantsOnly
                ))
            }
        );
        let mut bad_type = held;
        bad_type[21] = 0x02;
        assert_eq!(
            ReservationStatus::parse(&bad_type),
            Err(DataError::Invalid("READ RESERVATION type is not defined"))
        );
        let mut bad_scope = held;
        bad_scope[21] = 0x15;
        assert!(ReservationStatus::parse(&bad_scope).is_err());
        let mut bad_length = held;
        bad_length[7] = 8;
        assert!(ReservationStatus::parse(&bad_length).is_err());
        assert_eq!(
            ReservationStatus::parse(&held[..20]),
            Err(DataError::Truncated {
                needed: 24,
                got: 20
            })
        );
    }

    #[test]
    fn report_capabilities() {
        // ATP_C and PTPL_C, and a valid type mask with all six types.
        let data = [0x00, 0x08, 0x05, 0x80, 0xEA, 0x01, 0, 0];
        let caps = PrCapabilities::parse(&data).unwrap();
        assert!(caps.all_target_ports);
        assert!(caps.persist_through_power_loss_capable);
        assert!(!caps.persist_through_power_loss_active);
        assert!(!caps.specify_initiator_ports);
        assert!(!caps.compatible_reservation_handling);
        assert_eq!(caps.type_mask, Some(0xEA01));
        for kind in ReservationType::ALL {
            assert_eq!(caps.supports(kind), Some(true), "{kind}");
        }
        let no_mask = PrCapabilities::parse(&[0, 8, 0x10, 0x01, 0xFF, 0xFF, 0, 0]).unwrap();
        assert!(no_mask.compatible_reservation_handling);
        assert!(no_mask.persist_through_power_loss_active);
        assert_eq!(no_mask.supports(ReservationType::WriteExclusive), None);
        let only_we = PrCapabilities::parse(&[0, 8, 0, 0x80, 0x02, 0x00, 0, 0]).unwrap();
        assert_eq!(
            only_we.supports(ReservationType::WriteExclusive),
            Some(true)
        );
        assert_eq!(
            only_we.supports(ReservationType::ExclusiveAccessAllRegistrants),
            Some(false)
        );
        assert!(PrCapabilities::parse(&[0, 2, 0, 0, 0, 0]).is_err());
        assert!(PrCapabilities::parse(&data[..5]).is_err());
    }

    #[test]
    fn service_action_codes() {
        assert_eq!(PrInAction::ReadKeys.service_action(), 0);
        assert_eq!(PrInAction::ReadReservation.service_action(), 1);
        assert_eq!(PrInAction::ReportCapabilities.service_action(), 2);
        let key = ReservationKey(1);
        assert_eq!(
            PrOutAction::RegisterAndIgnoreExistingKey { new_key: key }.service_action(),
            6
        );
        assert_eq!(PrOutAction::unregister(key).service_action(), 0);
    }
}
