//! The test guest's dirty workload as the console takes and shows it: `vm create ... dirty=N
//! hot=H` and the `memory:` line of `vm show`.
//!
//! The guest rewrites `dirty` pages per second, cycling over its hot set: the first `hot` data
//! pages (0 = all of them), like a Linux guest rewriting one file. What a hot set means for a
//! given memory size is guest-abi's [`HotSet`]; this module only parses the option and words
//! it for the operator, so both are host-tested.

use alloc::format;
use alloc::string::String;

use guest_abi::{DataLayout, HotSet};

use crate::console::shell::{parse_number, CommandError};

/// Parses the value of `hot=`: a page count (decimal or `0x..`), 0 for all data pages. A count
/// larger than the guest's data pages is accepted: the guest clamps it and says so (how many
/// data pages a guest has depends on its memory, which may be given after `hot=`).
pub fn parse_hot_pages(value: &str) -> Result<u64, CommandError> {
    parse_number("hot", value).map_err(|_| {
        CommandError::BadArguments(format!(
            "hot must be a number of data pages (0 = all of them), not '{value}'"
        ))
    })
}

/// The workload part of `vm show`'s memory line for a guest of `mem_bytes`:
/// `dirty rate 20000 pages/s over data pages 0..512 (512 of 3069)`, or `over all 3069 data
/// pages`, with a note when `hot_pages` asks for more pages than there are.
pub fn describe(dirty_pages_per_sec: u64, hot_pages: u64, mem_bytes: u64) -> String {
    let data_pages = DataLayout::for_memory(mem_bytes).pages;
    let hot = HotSet::new(hot_pages, data_pages);
    let over = if hot.is_all(data_pages) {
        format!("over all {data_pages} data pages")
    } else {
        format!(
            "over data pages 0..{} ({} of {data_pages})",
            hot.pages, hot.pages
        )
    };
    let note = match hot.clamped_from {
        Some(asked) => format!(" (hot={asked} is more than the data pages)"),
        None => String::new(),
    };
    format!("dirty rate {dirty_pages_per_sec} pages/s {over}{note}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_takes_page_counts_and_refuses_anything_else_clearly() {
        assert_eq!(parse_hot_pages("512"), Ok(512));
        assert_eq!(parse_hot_pages("0x200"), Ok(512));
        assert_eq!(parse_hot_pages("0"), Ok(0));
        // Clamped by the guest, not refused here.
        assert_eq!(parse_hot_pages("99999999"), Ok(99_999_999));
        for bad in [
            "",
            "many",
            "-1",
            "1.5",
            "12MiB",
            "0x",
            "18446744073709551616",
        ] {
            match parse_hot_pages(bad) {
                Err(CommandError::BadArguments(text)) => {
                    assert!(
                        text.contains("hot must be a number of data pages")
                            && text.contains(&format!("'{bad}'")),
                        "{bad:?}: {text}"
                    );
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn describes_the_hot_set_against_the_data_pages() {
        // 16 MiB: 3069 data pages (the guest's own start line says the same).
        let mem = 16 << 20;
        assert_eq!(DataLayout::for_memory(mem).pages, 3069);
        assert_eq!(
            describe(20000, 512, mem),
            "dirty rate 20000 pages/s over data pages 0..512 (512 of 3069)"
        );
        assert_eq!(
            describe(0, 0, mem),
            "dirty rate 0 pages/s over all 3069 data pages"
        );
        assert_eq!(
            describe(100, 3069, mem),
            "dirty rate 100 pages/s over all 3069 data pages"
        );
        assert_eq!(
            describe(100, 5000, mem),
            "dirty rate 100 pages/s over all 3069 data pages (hot=5000 is more than the data pages)"
        );
    }
}
