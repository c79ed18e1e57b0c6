//! A fake guest RAM for the virtio host tests (the split queue's and virtio-blk's): plain bytes
//! from guest address 0 to their length, nothing above. Each test module adds its own helpers
//! (descriptor writers, ring readers) in an `impl Ram` block of its own.

use alloc::vec::Vec;

use crate::guest_mem::GuestMemory;

/// Guest RAM from 0 to its length; nothing above.
pub(super) struct Ram(pub(super) Vec<u8>);

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(end) = gpa.checked_add(buf.len() as u64) else {
            return false;
        };
        if end > self.0.len() as u64 {
            return false;
        }
        buf.copy_from_slice(&self.0[gpa as usize..end as usize]);
        true
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        let Some(end) = gpa.checked_add(bytes.len() as u64) else {
            return false;
        };
        if end > self.0.len() as u64 {
            return false;
        }
        self.0[gpa as usize..end as usize].copy_from_slice(bytes);
        true
    }
}
