//! A VM's nested page tables in the format of the host's vendor: NPT on AMD, EPT on Intel.
//! Same operations, different entry bits (see `vmx::paging`).

use core::ops::Range;

use vmx::dirty::DirtyBitmap;
use vmx::paging::{
    EptFormat, NestedPageTable, NptFormat, PagingError, PendingFlush, Perm, TableMemory,
};

pub enum NestedTables {
    Npt(NestedPageTable<NptFormat>),
    Ept(NestedPageTable<EptFormat>),
}

impl NestedTables {
    pub fn root_hpa(&self) -> u64 {
        match self {
            NestedTables::Npt(t) => t.root_hpa(),
            NestedTables::Ept(t) => t.root_hpa(),
        }
    }

    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        perm: Perm,
    ) -> Result<(), PagingError> {
        match self {
            NestedTables::Npt(t) => t.map(mem, gpa, hpa, perm),
            NestedTables::Ept(t) => t.map(mem, gpa, hpa, perm),
        }
    }

    pub fn harvest_dirty(
        &mut self,
        mem: &mut impl TableMemory,
        range: Range<u64>,
        into: &mut DirtyBitmap,
    ) -> Result<PendingFlush, PagingError> {
        match self {
            NestedTables::Npt(t) => t.harvest_dirty(mem, range, into),
            NestedTables::Ept(t) => t.harvest_dirty(mem, range, into),
        }
    }

    pub fn write_protect_range(
        &mut self,
        mem: &mut impl TableMemory,
        range: Range<u64>,
    ) -> Result<PendingFlush, PagingError> {
        match self {
            NestedTables::Npt(t) => t.write_protect_range(mem, range),
            NestedTables::Ept(t) => t.write_protect_range(mem, range),
        }
    }

    pub fn restore_write(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
    ) -> Result<(), PagingError> {
        match self {
            NestedTables::Npt(t) => t.restore_write(mem, gpa),
            NestedTables::Ept(t) => t.restore_write(mem, gpa),
        }
    }

    pub fn teardown(self, mem: &mut impl TableMemory) -> PendingFlush {
        match self {
            NestedTables::Npt(t) => t.teardown(mem),
            NestedTables::Ept(t) => t.teardown(mem),
        }
    }
}
