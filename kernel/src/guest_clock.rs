//! The state of a guest's clock that travels with it in a migration.
//!
//! The guest TSC stands still from the pause on the source until the resume on the
//! destination, as during a `vm pause`. The source sends the guest TSC value at the pause (not
//! its host-relative offset, which means nothing on another host); the destination sets its
//! offset so that the guest TSC continues from that value. The guest never sees time jump
//! backwards, nor forwards by more than it ran.

use alloc::vec::Vec;

/// Bytes of the clock state: guest TSC at the pause, the source's TSC frequency, and whether
/// the VM was running (1) or paused (0) when the migration began.
const CLOCK_STATE_LEN: usize = 17;

/// The clock state a destination received, applied when the VM resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockState {
    pub guest_tsc: u64,
    pub tsc_hz: u64,
    pub running: bool,
}

impl ClockState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CLOCK_STATE_LEN);
        out.extend_from_slice(&self.guest_tsc.to_le_bytes());
        out.extend_from_slice(&self.tsc_hz.to_le_bytes());
        out.push(u8::from(self.running));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ClockState, &'static str> {
        let bytes: &[u8; CLOCK_STATE_LEN] = bytes
            .try_into()
            .map_err(|_| "clock state has the wrong length")?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let running = match bytes[16] {
            0 => false,
            1 => true,
            _ => return Err("clock state has a bad run flag"),
        };
        Ok(ClockState {
            guest_tsc: word(0),
            tsc_hz: word(8),
            running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_state_round_trips_and_rejects_garbage() {
        let c = ClockState {
            guest_tsc: u64::MAX - 5,
            tsc_hz: 2_000_000_000,
            running: true,
        };
        assert_eq!(ClockState::decode(&c.encode()), Ok(c));
        assert!(ClockState::decode(&[0; 16]).is_err());
        let mut bad = c.encode();
        bad[16] = 7;
        assert!(ClockState::decode(&bad).is_err());
    }
}
