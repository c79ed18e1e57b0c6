//! The kernel heap: a linked-list allocator over a fixed, eagerly mapped virtual range.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Heap occupancy for `mem`.
#[derive(Debug, Clone, Copy)]
pub struct HeapStats {
    pub size: usize,
    pub used: usize,
}

pub(super) fn init(start: u64, size: usize) {
    // SAFETY: [start, start + size) was just mapped writable for the heap alone and is never
    // unmapped; init runs once.
    unsafe { HEAP.lock().init(start as *mut u8, size) };
}

/// Current heap size and usage.
pub fn heap_stats() -> HeapStats {
    let heap = HEAP.lock();
    HeapStats {
        size: heap.size(),
        used: heap.used(),
    }
}
