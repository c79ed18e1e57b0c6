//! Routing a PCI device's legacy interrupt (INTx) to a CPU through an I/O APIC: which global
//! system interrupt (GSI) its line reaches and with which polarity and trigger mode, the vector
//! it gets, and the IOAPIC redirection entry that says all of it (the 82093AA datasheet's
//! layout, which QEMU's and Bochs' IOAPICs follow).
//!
//! The firmware writes the ISA IRQ number a PCI function's INTx pin is routed to into the
//! function's Interrupt Line register (PCI config 0x3C). With the IOAPIC, that ISA IRQ reaches
//! GSI = IRQ unless the MADT has an interrupt source override for it, which may also give the
//! input's polarity and trigger mode. QEMU's and Bochs' firmware declare the PCI IRQs (5, 9, 10,
//! 11) level-triggered, active-high there. Without an override, a PCI line is taken as the PCI
//! specification has it: level-triggered, active-low. A Line of 16 or more is already a GSI
//! (firmware that routes PCI interrupts straight to IOAPIC inputs). Real machines that route
//! PCI INTx to IOAPIC inputs 16-23 and say so only in the DSDT's `_PRT` (AML) are not handled:
//! their Interrupt Line names the legacy PIC routing.

use core::fmt;

use crate::acpi::SourceOverride;

/// An interrupt input's active level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    ActiveHigh,
    ActiveLow,
}

/// How an interrupt input is sensed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}

impl fmt::Display for Polarity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Polarity::ActiveHigh => "active-high",
            Polarity::ActiveLow => "active-low",
        })
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Edge => "edge",
            Trigger::Level => "level",
        })
    }
}

/// The MPS INTI flags of an MADT override: each field may "conform to the bus" (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntiFlags {
    pub polarity: Option<Polarity>,
    pub trigger: Option<Trigger>,
}

impl IntiFlags {
    /// Bits 1:0 polarity, 3:2 trigger mode: 00 conforms, 01 high / edge, 11 low / level; 10 is
    /// reserved (`None`: the whole entry is suspect).
    pub fn decode(flags: u16) -> Option<IntiFlags> {
        let polarity = match flags & 0b11 {
            0b00 => None,
            0b01 => Some(Polarity::ActiveHigh),
            0b11 => Some(Polarity::ActiveLow),
            _ => return None,
        };
        let trigger = match (flags >> 2) & 0b11 {
            0b00 => None,
            0b01 => Some(Trigger::Edge),
            0b11 => Some(Trigger::Level),
            _ => return None,
        };
        Some(IntiFlags { polarity, trigger })
    }
}

/// Where a PCI interrupt line ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The Interrupt Line register's value.
    pub line: u8,
    pub gsi: u32,
    pub polarity: Polarity,
    pub trigger: Trigger,
    /// The MADT had an override for this ISA IRQ.
    pub from_override: bool,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GSI {}, {}, {}", self.gsi, self.trigger, self.polarity)?;
        if self.from_override {
            write!(f, " (MADT override of IRQ {})", self.line)
        } else if self.line < 16 {
            write!(f, " (IRQ {}, no MADT override: PCI default)", self.line)
        } else {
            write!(f, " (line {} is a GSI)", self.line)
        }
    }
}

/// Why a PCI function's interrupt cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// Interrupt Pin 0: the function has no INTx pin.
    NoPin,
    /// Interrupt Line 0xFF (or 0): the firmware routed the pin nowhere.
    Unassigned { line: u8 },
    /// The override for this IRQ has reserved flag values.
    BadOverride { irq: u8, flags: u16 },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoPin => write!(f, "the function has no interrupt pin"),
            RouteError::Unassigned { line } => {
                write!(f, "the firmware assigned no interrupt line ({line:#04x})")
            }
            RouteError::BadOverride { irq, flags } => write!(
                f,
                "the MADT override of IRQ {irq} has reserved flags {flags:#06x}"
            ),
        }
    }
}

/// Routes the INTx of a PCI function with Interrupt `pin` (1-4, 0: none) and `line`.
pub fn route_pci_line(
    pin: u8,
    line: u8,
    overrides: &[SourceOverride],
) -> Result<Route, RouteError> {
    if pin == 0 {
        return Err(RouteError::NoPin);
    }
    // IRQ 0 is the timer's: no firmware routes PCI there; 0xFF means "unknown / none".
    if line == 0 || line == 0xFF {
        return Err(RouteError::Unassigned { line });
    }
    let found = if line < 16 {
        overrides.iter().find(|o| o.bus == 0 && o.irq == line)
    } else {
        None
    };
    match found {
        Some(o) => {
            let flags = IntiFlags::decode(o.flags).ok_or(RouteError::BadOverride {
                irq: line,
                flags: o.flags,
            })?;
            Ok(Route {
                line,
                gsi: o.gsi,
                // Conforming to the override's bus, ISA: active-high. The trigger stays
                // level whatever the bus would say: a PCI line is shared and held until served.
                polarity: flags.polarity.unwrap_or(Polarity::ActiveHigh),
                trigger: flags.trigger.unwrap_or(Trigger::Level),
                from_override: true,
            })
        }
        None => Ok(Route {
            line,
            gsi: u32::from(line),
            polarity: Polarity::ActiveLow,
            trigger: Trigger::Level,
            from_override: false,
        }),
    }
}

/// The first vector of the IOAPIC inputs: GSI n arrives on `VECTOR_BASE + n` (above the timer,
/// 0x30, and the remapped PIC, 0x20-0x2F).
pub const VECTOR_BASE: u8 = 0x40;
/// GSIs that have a vector: 0..64 (two 24-input IOAPICs and then some).
pub const VECTOR_GSIS: u32 = 64;

/// The vector of `gsi`, if it has one.
pub fn vector_for_gsi(gsi: u32) -> Option<u8> {
    (gsi < VECTOR_GSIS).then(|| VECTOR_BASE + gsi as u8)
}

/// The GSI whose interrupts arrive on `vector`, if it is one of theirs.
pub fn gsi_for_vector(vector: u8) -> Option<u32> {
    let gsi = u32::from(vector.checked_sub(VECTOR_BASE)?);
    (gsi < VECTOR_GSIS).then_some(gsi)
}

/// Inputs an IOAPIC has, from its version register (bits 23:16: the highest entry's index).
pub fn redirection_entries(version: u32) -> u32 {
    ((version >> 16) & 0xFF) + 1
}

/// One redirection table entry: fixed delivery, physical destination mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectionEntry {
    pub vector: u8,
    pub polarity: Polarity,
    pub trigger: Trigger,
    pub masked: bool,
    /// The destination local APIC's ID.
    pub destination: u8,
}

const ENTRY_POLARITY_LOW: u64 = 1 << 13;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DELIVERY_MODE: u64 = 0b111 << 8;
const ENTRY_LOGICAL: u64 = 1 << 11;

impl RedirectionEntry {
    /// The entry for `route` on `vector`, to the local APIC `destination`.
    pub fn for_route(route: &Route, vector: u8, destination: u8, masked: bool) -> Self {
        RedirectionEntry {
            vector,
            polarity: route.polarity,
            trigger: route.trigger,
            masked,
            destination,
        }
    }

    /// The 64-bit entry: low dword at register 0x10 + 2n, high dword at 0x11 + 2n.
    pub fn encode(&self) -> u64 {
        let mut e = u64::from(self.vector) | (u64::from(self.destination) << 56);
        if self.polarity == Polarity::ActiveLow {
            e |= ENTRY_POLARITY_LOW;
        }
        if self.trigger == Trigger::Level {
            e |= ENTRY_LEVEL;
        }
        if self.masked {
            e |= ENTRY_MASKED;
        }
        e
    }

    /// Reads back an entry; `None` for delivery modes other than fixed or a logical
    /// destination (not what this kernel programs).
    pub fn decode(e: u64) -> Option<Self> {
        if e & (ENTRY_DELIVERY_MODE | ENTRY_LOGICAL) != 0 {
            return None;
        }
        Some(RedirectionEntry {
            vector: e as u8,
            polarity: if e & ENTRY_POLARITY_LOW != 0 {
                Polarity::ActiveLow
            } else {
                Polarity::ActiveHigh
            },
            trigger: if e & ENTRY_LEVEL != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
            masked: e & ENTRY_MASKED != 0,
            destination: (e >> 56) as u8,
        })
    }

    /// Remote IRR of a read-back entry: a level interrupt delivered and not yet acknowledged
    /// by an EOI.
    pub fn remote_irr(e: u64) -> bool {
        e & ENTRY_REMOTE_IRR != 0
    }
}

/// The entry that masks an input (everything else as after reset).
pub const MASKED_ENTRY: u64 = ENTRY_MASKED;

#[cfg(test)]
mod tests {
    use super::*;

    fn ov(irq: u8, gsi: u32, flags: u16) -> SourceOverride {
        SourceOverride {
            bus: 0,
            irq,
            gsi,
            flags,
        }
    }

    /// QEMU's pc machine: IRQ 0 -> GSI 2, IRQs 5/9/10/11 level, active-high.
    fn qemu() -> alloc::vec::Vec<SourceOverride> {
        let mut v = alloc::vec![ov(0, 2, 0)];
        v.extend([5, 9, 10, 11].map(|irq| ov(irq, u32::from(irq), 0xD)));
        v
    }

    #[test]
    fn inti_flags_decode() {
        assert_eq!(
            IntiFlags::decode(0),
            Some(IntiFlags {
                polarity: None,
                trigger: None
            })
        );
        assert_eq!(
            IntiFlags::decode(0xD),
            Some(IntiFlags {
                polarity: Some(Polarity::ActiveHigh),
                trigger: Some(Trigger::Level)
            })
        );
        assert_eq!(
            IntiFlags::decode(0xF),
            Some(IntiFlags {
                polarity: Some(Polarity::ActiveLow),
                trigger: Some(Trigger::Level)
            })
        );
        assert_eq!(IntiFlags::decode(0x5).unwrap().trigger, Some(Trigger::Edge));
        assert_eq!(IntiFlags::decode(0b10), None);
        assert_eq!(IntiFlags::decode(0b1000), None);
    }

    #[test]
    fn qemu_pci_lines_follow_the_overrides() {
        let route = route_pci_line(1, 11, &qemu()).unwrap();
        assert_eq!(
            route,
            Route {
                line: 11,
                gsi: 11,
                polarity: Polarity::ActiveHigh,
                trigger: Trigger::Level,
                from_override: true
            }
        );
        assert_eq!(
            route.to_string(),
            "GSI 11, level, active-high (MADT override of IRQ 11)"
        );
    }

    #[test]
    fn an_override_may_move_the_irq_to_another_gsi() {
        let route = route_pci_line(1, 9, &[ov(9, 20, 0xF)]).unwrap();
        assert_eq!((route.gsi, route.polarity), (20, Polarity::ActiveLow));
        // Fields that conform to the (ISA) bus: active-high, and level for a PCI line.
        let route = route_pci_line(1, 10, &[ov(10, 10, 0)]).unwrap();
        assert_eq!(
            (route.polarity, route.trigger),
            (Polarity::ActiveHigh, Trigger::Level)
        );
    }

    #[test]
    fn without_an_override_a_pci_line_is_level_active_low() {
        let route = route_pci_line(1, 11, &[ov(0, 2, 0)]).unwrap();
        assert_eq!(
            (
                route.gsi,
                route.polarity,
                route.trigger,
                route.from_override
            ),
            (11, Polarity::ActiveLow, Trigger::Level, false)
        );
        assert!(route.to_string().contains("no MADT override"));
        // A line of 16 or more is a GSI already: overrides (ISA IRQs) do not apply.
        let route = route_pci_line(1, 19, &qemu()).unwrap();
        assert_eq!((route.gsi, route.polarity), (19, Polarity::ActiveLow));
        assert!(route.to_string().contains("is a GSI"));
        // Overrides of another bus do not apply either.
        let other_bus = SourceOverride {
            bus: 1,
            ..ov(11, 30, 0xD)
        };
        assert_eq!(route_pci_line(1, 11, &[other_bus]).unwrap().gsi, 11);
    }

    #[test]
    fn unusable_lines_are_errors() {
        assert_eq!(route_pci_line(0, 11, &qemu()), Err(RouteError::NoPin));
        assert_eq!(
            route_pci_line(1, 0xFF, &qemu()),
            Err(RouteError::Unassigned { line: 0xFF })
        );
        assert_eq!(
            route_pci_line(1, 0, &qemu()),
            Err(RouteError::Unassigned { line: 0 })
        );
        assert_eq!(
            route_pci_line(1, 11, &[ov(11, 11, 0b10)]),
            Err(RouteError::BadOverride {
                irq: 11,
                flags: 0b10
            })
        );
        assert!(RouteError::Unassigned { line: 0xFF }
            .to_string()
            .contains("0xff"));
    }

    #[test]
    fn vectors_map_to_gsis_and_back() {
        assert_eq!(vector_for_gsi(0), Some(0x40));
        assert_eq!(vector_for_gsi(11), Some(0x4B));
        assert_eq!(vector_for_gsi(63), Some(0x7F));
        assert_eq!(vector_for_gsi(64), None);
        assert_eq!(gsi_for_vector(0x4B), Some(11));
        assert_eq!(gsi_for_vector(0x30), None);
        assert_eq!(gsi_for_vector(0x80), None);
        assert_eq!(gsi_for_vector(0xFF), None);
        for gsi in 0..VECTOR_GSIS {
            assert_eq!(gsi_for_vector(vector_for_gsi(gsi).unwrap()), Some(gsi));
        }
    }

    #[test]
    fn redirection_entries_encode_as_the_datasheet_says() {
        let route = route_pci_line(1, 11, &qemu()).unwrap();
        let e = RedirectionEntry::for_route(&route, 0x4B, 0, true);
        // Vector 0x4B, fixed, physical, active-high, level (bit 15), masked (bit 16).
        assert_eq!(e.encode(), 0x0000_0000_0001_804B);
        let unmasked = RedirectionEntry { masked: false, ..e };
        assert_eq!(unmasked.encode(), 0x804B);
        let low = RedirectionEntry {
            polarity: Polarity::ActiveLow,
            destination: 3,
            ..unmasked
        };
        assert_eq!(low.encode(), 0x0300_0000_0000_A04B);
        for entry in [e, unmasked, low] {
            assert_eq!(RedirectionEntry::decode(entry.encode()), Some(entry));
        }
        // Remote IRR and delivery status are read-only state, not part of the entry.
        assert_eq!(
            RedirectionEntry::decode(unmasked.encode() | 1 << 14 | 1 << 12),
            Some(unmasked)
        );
        assert!(RedirectionEntry::remote_irr(0x804B | 1 << 14));
        // Not fixed delivery, or a logical destination: not ours.
        assert_eq!(RedirectionEntry::decode(0x0700), None);
        assert_eq!(RedirectionEntry::decode(0x0800), None);
        assert_eq!(
            RedirectionEntry::decode(MASKED_ENTRY).map(|e| e.masked),
            Some(true)
        );
    }

    #[test]
    fn the_version_register_gives_the_entry_count() {
        // QEMU's and Bochs' IOAPIC: version 0x11 or 0x20, 24 entries.
        assert_eq!(redirection_entries(0x0017_0011), 24);
        assert_eq!(redirection_entries(0x0017_0020), 24);
        assert_eq!(redirection_entries(0), 1);
    }
}
