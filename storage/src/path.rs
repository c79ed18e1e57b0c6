//! How the hypervisor names a shared disk: `<target name>/<lun>`, e.g.
//! `iqn.2026-11.test.hv:cluster/1` (the console's `disk list`, `vm create ... disk=`, and the
//! migration stream's `SharedDisk::id`).
//!
//! The target name is an iSCSI name (RFC 7143 section 4.2.7.1 and RFC 3722): `iqn.`, `eui.` or
//! `naa.` followed by lower-case letters, digits, `-`, `.` and `:`, at most 223 bytes. The LUN
//! is the single-level number the target reports (0..=16383, SAM's flat space addressing).
//! Parsing is strict so two spellings of one disk never look like two disks.

use alloc::string::{String, ToString};
use core::fmt;

/// Longest iSCSI name (RFC 7143 section 6.1: 223 bytes).
pub const MAX_NAME_LEN: usize = 223;
/// Largest single-level LUN (14 bits).
pub const MAX_LUN: u16 = 0x3FFF;

/// A LUN of an iSCSI target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LunPath {
    pub target: String,
    pub lun: u16,
}

/// What is wrong with a disk name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LunPathError {
    /// No `/<lun>` after the target name.
    MissingLun,
    /// The target name is not an iSCSI name.
    BadTargetName,
    /// The LUN is not a decimal number 0..=16383.
    BadLun,
}

impl fmt::Display for LunPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LunPathError::MissingLun => "a disk is <target iqn>/<lun>, e.g. iqn.2026-11.test.hv:cluster/1",
            LunPathError::BadTargetName => {
                "the target is an iSCSI name: iqn., eui. or naa. and then lower-case letters, digits, '-', '.' or ':'"
            }
            LunPathError::BadLun => "the LUN is a number from 0 to 16383",
        })
    }
}

impl core::error::Error for LunPathError {}

/// Whether `name` is an iSCSI name this hypervisor accepts.
pub fn is_iscsi_name(name: &str) -> bool {
    let prefixed = ["iqn.", "eui.", "naa."]
        .iter()
        .any(|p| name.len() > p.len() && name.starts_with(p));
    prefixed
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
}

impl LunPath {
    pub fn new(target: &str, lun: u16) -> Result<LunPath, LunPathError> {
        if !is_iscsi_name(target) {
            return Err(LunPathError::BadTargetName);
        }
        if lun > MAX_LUN {
            return Err(LunPathError::BadLun);
        }
        Ok(LunPath {
            target: target.to_string(),
            lun,
        })
    }

    /// Parses `<target>/<lun>`.
    pub fn parse(text: &str) -> Result<LunPath, LunPathError> {
        let (target, lun) = text.rsplit_once('/').ok_or(LunPathError::MissingLun)?;
        let digits_ok = !lun.is_empty()
            && lun.len() <= 5
            && lun.bytes().all(|b| b.is_ascii_digit())
            && !(lun.len() > 1 && lun.starts_with('0'));
        let lun = if digits_ok {
            lun.parse::<u16>().map_err(|_| LunPathError::BadLun)?
        } else {
            return Err(LunPathError::BadLun);
        };
        LunPath::new(target, lun)
    }
}

impl fmt::Display for LunPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.target, self.lun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn parses_and_prints_the_same() {
        let path = LunPath::parse("iqn.2026-11.test.hv:cluster/1").unwrap();
        assert_eq!(path.target, "iqn.2026-11.test.hv:cluster");
        assert_eq!(path.lun, 1);
        assert_eq!(format!("{path}"), "iqn.2026-11.test.hv:cluster/1");
        assert_eq!(
            LunPath::parse("naa.60014051234/16383").unwrap().lun,
            MAX_LUN
        );
        assert_eq!(LunPath::parse("eui.02004567a425678d/0").unwrap().lun, 0);
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        use LunPathError::*;
        for (text, why) in [
            ("iqn.2026-11.test.hv:cluster", MissingLun),
            ("iqn.2026-11.test.hv:cluster/", BadLun),
            ("iqn.2026-11.test.hv:cluster/01", BadLun),
            ("iqn.2026-11.test.hv:cluster/16384", BadLun),
            ("iqn.2026-11.test.hv:cluster/-1", BadLun),
            ("iqn.2026-11.test.hv:cluster/99999", BadLun),
            ("IQN.2026-11.test.hv:cluster/1", BadTargetName),
            ("iqn.2026-11.Test.hv:cluster/1", BadTargetName),
            ("iqn./1", BadTargetName),
            ("cluster/1", BadTargetName),
            ("/1", BadTargetName),
            ("iqn.a b/1", BadTargetName),
            ("iqn.a/b/1", BadTargetName),
        ] {
            assert_eq!(LunPath::parse(text), Err(why), "{text}");
        }
        let long = format!("iqn.{}/1", "a".repeat(MAX_NAME_LEN));
        assert_eq!(LunPath::parse(&long), Err(BadTargetName));
    }
}
