//! The serial console's line editor.
//!
//! Bytes arrive one at a time from the UART; the editor keeps the line being
//! typed, echoes what the terminal (a VT100/xterm on the other end of the
//! serial line) must show, and reports a finished line as a [`LineEvent`].
//!
//! Keys understood:
//!
//! | key                                         | effect                                   |
//! |---------------------------------------------|------------------------------------------|
//! | printable ASCII `0x20..=0x7E`               | insert at the cursor                     |
//! | CR or LF (a CR LF or LF CR pair is one key) | submit the line                          |
//! | Backspace `0x08`, DEL `0x7F`                | delete before the cursor                 |
//! | `ESC [ 3 ~` (Delete)                        | delete at the cursor                     |
//! | Ctrl-C `0x03`                               | abandon the line ([`LineEvent::Cancelled`]) |
//! | Ctrl-U `0x15`                               | clear the line                           |
//! | Ctrl-A, `ESC [ H`, `ESC [ 1 ~`, `ESC [ 7 ~`, `ESC O H` | cursor to start (Home)        |
//! | Ctrl-E, `ESC [ F`, `ESC [ 4 ~`, `ESC [ 8 ~`, `ESC O F` | cursor to end (End)           |
//! | `ESC [ D` / `ESC [ C` (also `ESC O D` / `ESC O C`) | cursor left / right               |
//! | `ESC [ A` / `ESC [ B` (also `ESC O A` / `ESC O B`) | history: older / newer            |
//!
//! Everything else (other control bytes, bytes `>= 0x80`, unknown or over-long
//! escape sequences) is dropped without echo. A control byte arriving in the
//! middle of an escape sequence aborts the sequence and is then handled as a
//! key of its own (so `ESC` followed by Enter still submits).
//!
//! Echo only ever moves the cursor relative to where the editable text starts,
//! because the editor does not know the prompt in front of it: left is `0x08`,
//! right is re-writing the character under the cursor, and a redraw is "N
//! times `0x08`, write the text, `ESC [ K`". Known limitation: a line longer
//! than the terminal is wide wraps, and `0x08` does not move back across a
//! wrap on most terminals, so editing such a line can leave stale characters
//! on screen (the buffer itself stays correct).
//!
//! Memory is bounded: the line never holds more than `max_len` bytes (further
//! characters are dropped, the bell rings once, and the submit reports
//! [`LineEvent::TooLong`] instead of truncated text), the history holds at
//! most `history_len` lines, and the escape parser holds at most
//! [`MAX_ESCAPE_PARAMS`] bytes.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// Parameter/intermediate bytes kept for one `ESC [` sequence; a longer
/// sequence is abandoned (the byte that overflows it is dropped and the
/// editor is back in its normal state).
pub const MAX_ESCAPE_PARAMS: usize = 8;

/// The line buffer is allocated up front up to this many bytes, so a typical
/// console line never reallocates while typing.
const MAX_PREALLOC: usize = 4096;

const CTRL_A: u8 = 0x01;
const CTRL_C: u8 = 0x03;
const CTRL_E: u8 = 0x05;
const BEL: u8 = 0x07;
const BS: u8 = 0x08;
const LF: u8 = b'\n';
const CR: u8 = b'\r';
const CTRL_U: u8 = 0x15;
const ESC: u8 = 0x1B;
const DEL: u8 = 0x7F;

const ERASE_TO_END: &[u8] = b"\x1b[K";
const NEWLINE: &[u8] = b"\r\n";
const CANCEL_ECHO: &[u8] = b"^C\r\n";

/// What a byte fed to the editor completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// Enter was pressed; the line (possibly empty: the shell just prints the
    /// prompt again). Contains only printable ASCII.
    Submitted(String),
    /// Ctrl-C: the line was abandoned.
    Cancelled,
    /// Enter was pressed on a line that overflowed: characters beyond `max`
    /// were dropped, so the line is not returned at all.
    TooLong {
        /// The editor's `max_len`.
        max: usize,
    },
}

/// Where the escape-sequence parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Not in a sequence.
    Ground,
    /// After `ESC`.
    Esc,
    /// After `ESC [`, collecting parameter bytes.
    Csi,
    /// After `ESC O`.
    Ss3,
}

/// Editing keys that arrive as escape sequences (or their Ctrl aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Up,
    Down,
    Left,
    Right,
    Home,
    End,
    Delete,
}

/// A line editor for a serial console. See the [module docs](self).
#[derive(Debug)]
pub struct LineEditor {
    /// The line being edited, printable ASCII only, `len() <= max_len`.
    buf: Vec<u8>,
    /// Cursor position in `buf`, `<= buf.len()`.
    cursor: usize,
    max_len: usize,
    /// A character was dropped on this line because it was full.
    overflowed: bool,
    escape: Escape,
    params: [u8; MAX_ESCAPE_PARAMS],
    params_len: usize,
    /// The previous byte submitted a line (CR or LF): the other one of the
    /// pair, if it comes next, is swallowed.
    last_newline: Option<u8>,
    /// Oldest first.
    history: VecDeque<String>,
    history_len: usize,
    /// Index into `history` of the entry shown while walking the history.
    browsing: Option<usize>,
    /// What was being typed before walking the history started.
    draft: Vec<u8>,
    draft_overflowed: bool,
}

impl LineEditor {
    /// An editor whose lines hold at most `max_len` characters and which
    /// remembers the last `history_len` submitted lines (0 disables history).
    pub fn new(max_len: usize, history_len: usize) -> Self {
        LineEditor {
            buf: Vec::with_capacity(max_len.min(MAX_PREALLOC)),
            cursor: 0,
            max_len,
            overflowed: false,
            escape: Escape::Ground,
            params: [0; MAX_ESCAPE_PARAMS],
            params_len: 0,
            last_newline: None,
            history: VecDeque::new(),
            history_len,
            browsing: None,
            draft: Vec::new(),
            draft_overflowed: false,
        }
    }

    /// Feeds one byte received from the terminal. `echo` is called with the
    /// bytes to send back (zero or more times). Returns an event when the
    /// byte finished the line.
    pub fn feed(&mut self, byte: u8, echo: &mut dyn FnMut(&[u8])) -> Option<LineEvent> {
        if let Some(previous) = self.last_newline.take() {
            if (previous == CR && byte == LF) || (previous == LF && byte == CR) {
                return None;
            }
        }
        match self.escape {
            Escape::Ground => self.ground(byte, echo),
            Escape::Esc => match byte {
                b'[' => {
                    self.escape = Escape::Csi;
                    self.params_len = 0;
                    None
                }
                b'O' => {
                    self.escape = Escape::Ss3;
                    None
                }
                // Alt+key and other two-byte sequences: ignored.
                0x20..=0x7E => {
                    self.escape = Escape::Ground;
                    None
                }
                _ => self.abort_escape(byte, echo),
            },
            Escape::Ss3 => match byte {
                0x20..=0x7E => {
                    self.escape = Escape::Ground;
                    let key = match byte {
                        b'A' => Some(Key::Up),
                        b'B' => Some(Key::Down),
                        b'C' => Some(Key::Right),
                        b'D' => Some(Key::Left),
                        b'H' => Some(Key::Home),
                        b'F' => Some(Key::End),
                        _ => None,
                    };
                    if let Some(key) = key {
                        self.key(key, echo);
                    }
                    None
                }
                _ => self.abort_escape(byte, echo),
            },
            Escape::Csi => match byte {
                // Parameter and intermediate bytes.
                0x20..=0x3F => {
                    if let Some(slot) = self.params.get_mut(self.params_len) {
                        *slot = byte;
                        self.params_len += 1;
                    } else {
                        self.escape = Escape::Ground;
                    }
                    None
                }
                // Final byte.
                0x40..=0x7E => {
                    self.escape = Escape::Ground;
                    let params = self.params.get(..self.params_len).unwrap_or(&[]);
                    let key = match (params, byte) {
                        (b"", b'A') => Some(Key::Up),
                        (b"", b'B') => Some(Key::Down),
                        (b"", b'C') => Some(Key::Right),
                        (b"", b'D') => Some(Key::Left),
                        (b"", b'H') => Some(Key::Home),
                        (b"", b'F') => Some(Key::End),
                        (b"1" | b"7", b'~') => Some(Key::Home),
                        (b"4" | b"8", b'~') => Some(Key::End),
                        (b"3", b'~') => Some(Key::Delete),
                        _ => None,
                    };
                    if let Some(key) = key {
                        self.key(key, echo);
                    }
                    None
                }
                _ => self.abort_escape(byte, echo),
            },
        }
    }

    /// The submitted lines remembered, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &str> {
        self.history.iter().map(String::as_str)
    }

    /// True when the line being edited is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The line being edited (printable ASCII).
    pub fn line(&self) -> &str {
        // Only bytes 0x20..=0x7E are ever stored, so this never fails.
        core::str::from_utf8(&self.buf).unwrap_or("")
    }

    /// The cursor position within [`line`](Self::line), in characters.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The longest line accepted.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A byte that is not valid inside the current escape sequence ends it;
    /// the byte is then handled on its own.
    fn abort_escape(&mut self, byte: u8, echo: &mut dyn FnMut(&[u8])) -> Option<LineEvent> {
        self.escape = Escape::Ground;
        self.ground(byte, echo)
    }

    fn ground(&mut self, byte: u8, echo: &mut dyn FnMut(&[u8])) -> Option<LineEvent> {
        match byte {
            CR | LF => {
                self.last_newline = Some(byte);
                return Some(self.submit(echo));
            }
            CTRL_C => {
                echo(CANCEL_ECHO);
                self.reset_line();
                return Some(LineEvent::Cancelled);
            }
            ESC => {
                self.escape = Escape::Esc;
                self.params_len = 0;
            }
            BS | DEL => self.backspace(echo),
            CTRL_A => self.key(Key::Home, echo),
            CTRL_E => self.key(Key::End, echo),
            CTRL_U => self.clear_line(echo),
            0x20..=0x7E => self.insert(byte, echo),
            _ => {}
        }
        None
    }

    fn key(&mut self, key: Key, echo: &mut dyn FnMut(&[u8])) {
        match key {
            Key::Up => self.history_older(echo),
            Key::Down => self.history_newer(echo),
            Key::Left => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    echo(&[BS]);
                }
            }
            Key::Right => {
                if let Some(&c) = self.buf.get(self.cursor) {
                    self.cursor += 1;
                    echo(&[c]);
                }
            }
            Key::Home => {
                move_left(self.cursor, echo);
                self.cursor = 0;
            }
            Key::End => {
                let tail = self.buf.get(self.cursor..).unwrap_or(&[]);
                if !tail.is_empty() {
                    echo(tail);
                }
                self.cursor = self.buf.len();
            }
            Key::Delete => {
                if self.cursor < self.buf.len() {
                    self.edited();
                    self.buf.remove(self.cursor);
                    self.redraw_tail_after_delete(echo);
                }
            }
        }
    }

    fn insert(&mut self, byte: u8, echo: &mut dyn FnMut(&[u8])) {
        if self.buf.len() >= self.max_len {
            if !self.overflowed {
                self.overflowed = true;
                echo(&[BEL]);
            }
            return;
        }
        self.edited();
        self.buf.insert(self.cursor, byte);
        let written = self.buf.get(self.cursor..).unwrap_or(&[]);
        echo(written);
        self.cursor += 1;
        move_left(self.buf.len() - self.cursor, echo);
    }

    fn backspace(&mut self, echo: &mut dyn FnMut(&[u8])) {
        if self.cursor == 0 {
            return;
        }
        self.edited();
        self.cursor -= 1;
        self.buf.remove(self.cursor);
        echo(&[BS]);
        self.redraw_tail_after_delete(echo);
    }

    /// After removing the character at the cursor: rewrite the tail one place
    /// to the left, blank the last cell, and come back.
    fn redraw_tail_after_delete(&self, echo: &mut dyn FnMut(&[u8])) {
        let tail = self.buf.get(self.cursor..).unwrap_or(&[]);
        if !tail.is_empty() {
            echo(tail);
        }
        echo(b" ");
        move_left(tail.len() + 1, echo);
    }

    fn clear_line(&mut self, echo: &mut dyn FnMut(&[u8])) {
        self.overflowed = false;
        if self.buf.is_empty() {
            return;
        }
        self.edited();
        move_left(self.cursor, echo);
        echo(ERASE_TO_END);
        self.buf.clear();
        self.cursor = 0;
    }

    /// The line was changed by the user: it is no longer a history entry but
    /// the text being typed.
    fn edited(&mut self) {
        if self.browsing.take().is_some() {
            self.draft.clear();
            self.draft_overflowed = false;
        }
    }

    fn history_older(&mut self, echo: &mut dyn FnMut(&[u8])) {
        let index = match self.browsing {
            None if self.history.is_empty() => return,
            None => {
                // Keep what was being typed; `buf` is refilled below.
                self.draft.clear();
                self.draft.reserve_exact(self.buf.len());
                self.draft.extend_from_slice(&self.buf);
                self.draft_overflowed = self.overflowed;
                self.history.len() - 1
            }
            Some(0) => return,
            Some(index) => index - 1,
        };
        self.browsing = Some(index);
        move_left(self.cursor, echo);
        self.show_history_entry(index, echo);
    }

    fn history_newer(&mut self, echo: &mut dyn FnMut(&[u8])) {
        let Some(index) = self.browsing else {
            return;
        };
        move_left(self.cursor, echo);
        if index + 1 < self.history.len() {
            self.browsing = Some(index + 1);
            self.show_history_entry(index + 1, echo);
        } else {
            self.browsing = None;
            self.buf.clear();
            self.buf.extend_from_slice(&self.draft);
            self.draft.clear();
            self.overflowed = self.draft_overflowed;
            self.draft_overflowed = false;
            self.finish_redraw(echo);
        }
    }

    fn show_history_entry(&mut self, index: usize, echo: &mut dyn FnMut(&[u8])) {
        self.buf.clear();
        if let Some(entry) = self.history.get(index) {
            self.buf.extend_from_slice(entry.as_bytes());
        }
        self.overflowed = false;
        self.finish_redraw(echo);
    }

    /// With the terminal cursor at the start of the text: write the whole
    /// line, erase what was there beyond it, leave the cursor at the end.
    fn finish_redraw(&mut self, echo: &mut dyn FnMut(&[u8])) {
        if !self.buf.is_empty() {
            echo(&self.buf);
        }
        echo(ERASE_TO_END);
        self.cursor = self.buf.len();
    }

    fn submit(&mut self, echo: &mut dyn FnMut(&[u8])) -> LineEvent {
        echo(NEWLINE);
        let event = if self.overflowed {
            LineEvent::TooLong { max: self.max_len }
        } else {
            let line: String = self.buf.iter().copied().map(char::from).collect();
            self.remember(&line);
            LineEvent::Submitted(line)
        };
        self.reset_line();
        event
    }

    /// Puts a submitted line into the history unless it is blank or repeats
    /// the newest entry.
    fn remember(&mut self, line: &str) {
        if self.history_len == 0
            || line.trim().is_empty()
            || self.history.back().map(String::as_str) == Some(line)
        {
            return;
        }
        while self.history.len() >= self.history_len {
            self.history.pop_front();
        }
        self.history.push_back(String::from(line));
    }

    fn reset_line(&mut self) {
        self.buf.clear();
        self.cursor = 0;
        self.overflowed = false;
        self.escape = Escape::Ground;
        self.params_len = 0;
        self.browsing = None;
        self.draft.clear();
        self.draft_overflowed = false;
    }
}

/// Moves the terminal cursor `count` cells to the left.
fn move_left(mut count: usize, echo: &mut dyn FnMut(&[u8])) {
    const BACKSPACES: [u8; 32] = [BS; 32];
    while count > 0 {
        let n = count.min(BACKSPACES.len());
        echo(&BACKSPACES[..n]);
        count -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    /// Feeds `bytes`, returning the events and everything echoed.
    fn feed_all(ed: &mut LineEditor, bytes: &[u8]) -> (Vec<LineEvent>, Vec<u8>) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        for &b in bytes {
            if let Some(e) = ed.feed(b, &mut |s: &[u8]| out.extend_from_slice(s)) {
                events.push(e);
            }
        }
        (events, out)
    }

    fn submitted(s: &str) -> LineEvent {
        LineEvent::Submitted(s.to_string())
    }

    fn hist(ed: &LineEditor) -> Vec<&str> {
        ed.history().collect()
    }

    /// Types `bytes` into a fresh default editor and returns it.
    fn typed(bytes: &[u8]) -> LineEditor {
        let mut ed = LineEditor::new(64, 8);
        let (events, _) = feed_all(&mut ed, bytes);
        assert!(events.is_empty(), "{events:?}");
        ed
    }

    #[test]
    fn typing_echoes_and_enter_submits() {
        let mut ed = LineEditor::new(64, 8);
        let (ev, out) = feed_all(&mut ed, b"vm list");
        assert!(ev.is_empty());
        assert_eq!(out, b"vm list");
        assert!(!ed.is_empty());
        let (ev, out) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("vm list")]);
        assert_eq!(out, b"\r\n");
        assert!(ed.is_empty());
        assert_eq!(hist(&ed), ["vm list"]);
    }

    #[test]
    fn lf_alone_submits() {
        let mut ed = LineEditor::new(64, 8);
        let (ev, out) = feed_all(&mut ed, b"a\nb\n");
        assert_eq!(ev, vec![submitted("a"), submitted("b")]);
        assert_eq!(out, b"a\r\nb\r\n");
    }

    #[test]
    fn crlf_and_lfcr_pairs_submit_once() {
        let mut ed = LineEditor::new(64, 8);
        let (ev, out) = feed_all(&mut ed, b"a\r\nb\n\rc\r\n");
        assert_eq!(ev, vec![submitted("a"), submitted("b"), submitted("c")]);
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
        // The pair may be split across feeds (it is one byte per feed anyway).
        let (ev, _) = feed_all(&mut ed, b"d\r");
        assert_eq!(ev, vec![submitted("d")]);
        let (ev, out) = feed_all(&mut ed, b"\n");
        assert!(ev.is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn repeated_cr_or_lf_are_separate_submits() {
        for (input, expected) in [
            (&b"x\r\r"[..], &["x", ""][..]),
            (b"\n\n", &["", ""]),
            // CR LF CR LF is two lines (the second one empty).
            (b"\r\n\r\n", &["", ""]),
            // CR CR LF: the LF pairs with the second CR.
            (b"\r\r\n", &["", ""]),
            // Only the byte right after the newline is paired.
            (b"y\rz\n", &["y", "z"]),
        ] {
            let mut ed = LineEditor::new(64, 8);
            let (ev, _) = feed_all(&mut ed, input);
            let expected: Vec<LineEvent> = expected.iter().map(|s| submitted(s)).collect();
            assert_eq!(ev, expected, "{input:?}");
        }
    }

    #[test]
    fn empty_and_blank_submits_are_returned_but_not_remembered() {
        let mut ed = LineEditor::new(64, 8);
        let (ev, out) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("")]);
        assert_eq!(out, b"\r\n");
        let (ev, _) = feed_all(&mut ed, b"   \r");
        assert_eq!(ev, vec![submitted("   ")]);
        assert_eq!(hist(&ed), Vec::<&str>::new());
    }

    #[test]
    fn repeat_of_newest_history_entry_is_not_stored_again() {
        let mut ed = LineEditor::new(64, 8);
        feed_all(&mut ed, b"ls\rls\rps\rls\r");
        assert_eq!(hist(&ed), ["ls", "ps", "ls"]);
    }

    #[test]
    fn history_is_bounded_oldest_dropped() {
        let mut ed = LineEditor::new(64, 3);
        feed_all(&mut ed, b"1\r2\r3\r4\r5\r");
        assert_eq!(hist(&ed), ["3", "4", "5"]);
        let mut none = LineEditor::new(64, 0);
        feed_all(&mut none, b"1\r2\r\x1b[A");
        assert_eq!(hist(&none), Vec::<&str>::new());
        assert!(none.is_empty());
    }

    #[test]
    fn backspace_and_del_delete_before_cursor() {
        let mut ed = typed(b"abc");
        let (_, out) = feed_all(&mut ed, &[0x08]);
        assert_eq!(out, b"\x08 \x08");
        assert_eq!(ed.line(), "ab");
        let (_, out) = feed_all(&mut ed, &[0x7F]);
        assert_eq!(out, b"\x08 \x08");
        assert_eq!(ed.line(), "a");
        feed_all(&mut ed, &[0x7F]);
        // At the start: nothing happens, nothing is echoed.
        let (_, out) = feed_all(&mut ed, &[0x7F, 0x08]);
        assert!(out.is_empty());
        assert!(ed.is_empty());
    }

    #[test]
    fn backspace_mid_line_redraws_tail() {
        let mut ed = typed(b"abcd\x1b[D\x1b[D");
        assert_eq!(ed.cursor(), 2);
        let (_, out) = feed_all(&mut ed, &[0x7F]);
        assert_eq!(ed.line(), "acd");
        assert_eq!(ed.cursor(), 1);
        assert_eq!(out, b"\x08cd \x08\x08\x08");
    }

    #[test]
    fn insert_mid_line_redraws_tail() {
        let mut ed = typed(b"ac\x1b[D");
        let (_, out) = feed_all(&mut ed, b"b");
        assert_eq!(ed.line(), "abc");
        assert_eq!(ed.cursor(), 2);
        assert_eq!(out, b"bc\x08");
        let (ev, _) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("abc")]);
    }

    #[test]
    fn delete_key_deletes_at_cursor() {
        let mut ed = typed(b"abc\x01");
        let (_, out) = feed_all(&mut ed, b"\x1b[3~");
        assert_eq!(ed.line(), "bc");
        assert_eq!(ed.cursor(), 0);
        assert_eq!(out, b"bc \x08\x08\x08");
        // At the end of the line: nothing.
        let mut ed = typed(b"abc");
        let (_, out) = feed_all(&mut ed, b"\x1b[3~");
        assert_eq!(ed.line(), "abc");
        assert!(out.is_empty());
    }

    #[test]
    fn ctrl_c_cancels_the_line() {
        let mut ed = typed(b"migrate vm1");
        let (ev, out) = feed_all(&mut ed, &[0x03]);
        assert_eq!(ev, vec![LineEvent::Cancelled]);
        assert_eq!(out, b"^C\r\n");
        assert!(ed.is_empty());
        assert_eq!(hist(&ed), Vec::<&str>::new());
        // Also on an empty line.
        let (ev, _) = feed_all(&mut ed, &[0x03]);
        assert_eq!(ev, vec![LineEvent::Cancelled]);
    }

    #[test]
    fn ctrl_u_clears_the_line() {
        let mut ed = typed(b"abcd\x1b[D");
        let (ev, out) = feed_all(&mut ed, &[0x15]);
        assert!(ev.is_empty());
        assert_eq!(out, b"\x08\x08\x08\x1b[K");
        assert!(ed.is_empty());
        assert_eq!(ed.cursor(), 0);
        let (_, out) = feed_all(&mut ed, &[0x15]);
        assert!(out.is_empty());
    }

    #[test]
    fn all_home_keys_move_to_start() {
        for home in [&b"\x01"[..], b"\x1b[H", b"\x1b[1~", b"\x1b[7~", b"\x1bOH"] {
            let mut ed = typed(b"abc");
            let (_, out) = feed_all(&mut ed, home);
            assert_eq!(out, b"\x08\x08\x08", "{home:?}");
            assert_eq!(ed.cursor(), 0);
            feed_all(&mut ed, b"X");
            assert_eq!(ed.line(), "Xabc");
        }
    }

    #[test]
    fn all_end_keys_move_to_end() {
        for end in [&b"\x05"[..], b"\x1b[F", b"\x1b[4~", b"\x1b[8~", b"\x1bOF"] {
            let mut ed = typed(b"abc\x01\x1b[C");
            assert_eq!(ed.cursor(), 1);
            let (_, out) = feed_all(&mut ed, end);
            assert_eq!(out, b"bc", "{end:?}");
            assert_eq!(ed.cursor(), 3);
            feed_all(&mut ed, b"X");
            assert_eq!(ed.line(), "abcX");
        }
    }

    #[test]
    fn arrows_move_the_cursor_within_bounds() {
        let mut ed = typed(b"ab");
        let (_, out) = feed_all(&mut ed, b"\x1b[C");
        assert!(out.is_empty(), "right at the end does nothing");
        let (_, out) = feed_all(&mut ed, b"\x1b[D\x1b[D");
        assert_eq!(out, b"\x08\x08");
        assert_eq!(ed.cursor(), 0);
        let (_, out) = feed_all(&mut ed, b"\x1b[D");
        assert!(out.is_empty(), "left at the start does nothing");
        let (_, out) = feed_all(&mut ed, b"\x1b[C");
        assert_eq!(out, b"a", "right rewrites the character it passes");
        assert_eq!(ed.cursor(), 1);
        // Application-cursor-mode arrows.
        feed_all(&mut ed, b"\x1bOD");
        assert_eq!(ed.cursor(), 0);
        feed_all(&mut ed, b"\x1bOC\x1bOC");
        assert_eq!(ed.cursor(), 2);
    }

    #[test]
    fn history_walk_up_down_restores_draft() {
        let mut ed = LineEditor::new(64, 8);
        feed_all(&mut ed, b"one\rtwo\r");
        feed_all(&mut ed, b"dr");
        let (_, out) = feed_all(&mut ed, b"\x1b[A");
        assert_eq!(ed.line(), "two");
        assert_eq!(out, b"\x08\x08two\x1b[K");
        let (_, out) = feed_all(&mut ed, b"\x1b[A");
        assert_eq!(ed.line(), "one");
        assert_eq!(out, b"\x08\x08\x08one\x1b[K");
        let (_, out) = feed_all(&mut ed, b"\x1b[A");
        assert_eq!(ed.line(), "one", "no older entry");
        assert!(out.is_empty());
        feed_all(&mut ed, b"\x1b[B");
        assert_eq!(ed.line(), "two");
        let (_, out) = feed_all(&mut ed, b"\x1b[B");
        assert_eq!(ed.line(), "dr");
        assert_eq!(ed.cursor(), 2);
        assert_eq!(out, b"\x08\x08\x08dr\x1b[K");
        let (_, out) = feed_all(&mut ed, b"\x1b[B");
        assert!(out.is_empty(), "already at the draft");
        assert_eq!(ed.line(), "dr");
    }

    #[test]
    fn history_up_from_empty_line_and_back() {
        let mut ed = LineEditor::new(64, 8);
        let (_, out) = feed_all(&mut ed, b"\x1b[A\x1b[B");
        assert!(out.is_empty(), "no history: arrows do nothing");
        feed_all(&mut ed, b"abc\r");
        let (_, out) = feed_all(&mut ed, b"\x1bOA");
        assert_eq!(out, b"abc\x1b[K");
        let (_, out) = feed_all(&mut ed, b"\x1bOB");
        assert_eq!(out, b"\x08\x08\x08\x1b[K");
        assert!(ed.is_empty());
    }

    #[test]
    fn editing_a_recalled_line_makes_it_the_draft() {
        let mut ed = LineEditor::new(64, 8);
        feed_all(&mut ed, b"one\rtwo\r");
        feed_all(&mut ed, b"\x1b[A\x1b[Ax");
        assert_eq!(ed.line(), "onex");
        feed_all(&mut ed, b"\x1b[A");
        assert_eq!(ed.line(), "two", "walk starts again from the newest");
        feed_all(&mut ed, b"\x1b[B");
        assert_eq!(ed.line(), "onex");
        let (ev, _) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("onex")]);
        assert_eq!(hist(&ed), ["one", "two", "onex"]);
        // Submitting a recalled entry unchanged re-adds it as the newest.
        let (ev, _) = feed_all(&mut ed, b"\x1b[A\x1b[A\x1b[A\r");
        assert_eq!(ev, vec![submitted("one")]);
        assert_eq!(hist(&ed), ["one", "two", "onex", "one"]);
    }

    #[test]
    fn cursor_moves_while_browsing_keep_the_walk() {
        let mut ed = LineEditor::new(64, 8);
        feed_all(&mut ed, b"one\rtwo\r");
        feed_all(&mut ed, b"\x1b[A\x1b[D\x01\x1b[C");
        assert_eq!(ed.line(), "two");
        assert_eq!(ed.cursor(), 1);
        let (_, out) = feed_all(&mut ed, b"\x1b[A");
        assert_eq!(ed.line(), "one");
        assert_eq!(out, b"\x08one\x1b[K", "redraw goes back from the cursor");
    }

    #[test]
    fn escape_sequences_split_across_feeds() {
        let mut ed = typed(b"abc");
        let mut out = Vec::new();
        assert_eq!(
            ed.feed(0x1b, &mut |s: &[u8]| out.extend_from_slice(s)),
            None
        );
        assert_eq!(
            ed.feed(b'[', &mut |s: &[u8]| out.extend_from_slice(s)),
            None
        );
        assert!(out.is_empty());
        assert_eq!(
            ed.feed(b'D', &mut |s: &[u8]| out.extend_from_slice(s)),
            None
        );
        assert_eq!(out, b"\x08");
        assert_eq!(ed.cursor(), 2);
        // Delete split as ESC [ 3 | ~ over two chunks.
        feed_all(&mut ed, b"\x01\x1b[3");
        assert_eq!(ed.line(), "abc");
        feed_all(&mut ed, b"~");
        assert_eq!(ed.line(), "bc");
    }

    #[test]
    fn unknown_escape_sequences_are_ignored_silently() {
        let mut ed = typed(b"ab");
        for seq in [
            &b"\x1b[Z"[..], // shift-tab
            b"\x1b[1;5C",   // ctrl-right
            b"\x1b[200~",   // bracketed paste start
            b"\x1b[2~",     // insert
            b"\x1b[5~",     // page up
            b"\x1bOP",      // F1
            b"\x1b[15~",    // F5
            b"\x1bx",       // alt-x
            b"\x1b[?25h",   // private mode
            b"\x1b\x1b[Z",  // ESC restarting the sequence
        ] {
            let (ev, out) = feed_all(&mut ed, seq);
            assert!(ev.is_empty(), "{seq:?}");
            assert!(out.is_empty(), "{seq:?}: {out:?}");
            assert_eq!(ed.line(), "ab", "{seq:?}");
            assert_eq!(ed.cursor(), 2);
        }
        feed_all(&mut ed, b"c");
        assert_eq!(ed.line(), "abc");
    }

    #[test]
    fn over_long_escape_sequence_drops_back_to_normal() {
        let mut ed = LineEditor::new(64, 8);
        // 8 parameter bytes are kept, the 9th abandons the sequence.
        let (_, out) = feed_all(&mut ed, b"\x1b[123456789");
        assert!(out.is_empty());
        assert!(ed.is_empty());
        let (_, out) = feed_all(&mut ed, b"a");
        assert_eq!(out, b"a");
        assert_eq!(ed.line(), "a");
        // A very long parameter run ends up as ordinary text (bounded).
        let mut ed = LineEditor::new(16, 8);
        let mut seq = vec![0x1b, b'['];
        seq.extend(core::iter::repeat_n(b'1', 1000));
        feed_all(&mut ed, &seq);
        assert!(ed.line().len() <= 16);
        assert_eq!(ed.escape, Escape::Ground);
    }

    #[test]
    fn control_byte_inside_escape_aborts_it_and_acts() {
        let mut ed = typed(b"ab");
        let (ev, _) = feed_all(&mut ed, b"\x1b\r");
        assert_eq!(ev, vec![submitted("ab")]);
        feed_all(&mut ed, b"cd");
        let (ev, out) = feed_all(&mut ed, b"\x1b[\x03");
        assert_eq!(ev, vec![LineEvent::Cancelled]);
        assert_eq!(out, b"^C\r\n");
        feed_all(&mut ed, b"ef");
        let (_, out) = feed_all(&mut ed, b"\x1bO\x7f");
        assert_eq!(out, b"\x08 \x08");
        assert_eq!(ed.line(), "e");
        // A high byte inside a sequence aborts it and is dropped.
        let (_, out) = feed_all(&mut ed, b"\x1b[\xC3D");
        assert_eq!(out, b"D");
        assert_eq!(ed.line(), "eD");
    }

    #[test]
    fn other_controls_and_high_bytes_are_ignored() {
        let mut ed = typed(b"ab");
        let ignored: Vec<u8> = (0x00..0x20)
            .filter(|b| ![0x01, 0x03, 0x05, 0x08, 0x0A, 0x0D, 0x15, 0x1B].contains(b))
            .chain(0x80..=0xFF)
            .collect();
        let (ev, out) = feed_all(&mut ed, &ignored);
        assert!(ev.is_empty());
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(ed.line(), "ab");
        assert_eq!(ed.cursor(), 2);
    }

    #[test]
    fn every_printable_character_is_accepted() {
        let mut ed = LineEditor::new(200, 8);
        let all: Vec<u8> = (0x20..=0x7E).collect();
        let (_, out) = feed_all(&mut ed, &all);
        assert_eq!(out, all);
        let (ev, _) = feed_all(&mut ed, b"\n");
        assert_eq!(
            ev,
            vec![LineEvent::Submitted(String::from_utf8(all).unwrap())]
        );
    }

    #[test]
    fn over_long_line_rings_once_and_submits_too_long() {
        let mut ed = LineEditor::new(5, 8);
        let (ev, out) = feed_all(&mut ed, b"abcdefgh");
        assert!(ev.is_empty());
        assert_eq!(out, b"abcde\x07");
        assert_eq!(ed.line(), "abcde");
        let (ev, out) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![LineEvent::TooLong { max: 5 }]);
        assert_eq!(out, b"\r\n");
        assert_eq!(hist(&ed), Vec::<&str>::new());
        // The next line is fresh: exactly max_len is fine, the bell rings again on overflow.
        let (ev, out) = feed_all(&mut ed, b"12345\r");
        assert_eq!(ev, vec![submitted("12345")]);
        assert_eq!(out, b"12345\r\n");
        let (_, out) = feed_all(&mut ed, b"123456789");
        assert_eq!(out, b"12345\x07");
        // Deleting after an overflow does not make the line whole again.
        let (ev, _) = feed_all(&mut ed, b"\x7f\x7f\r");
        assert_eq!(ev, vec![LineEvent::TooLong { max: 5 }]);
    }

    #[test]
    fn ctrl_u_or_ctrl_c_forget_an_overflow() {
        let mut ed = LineEditor::new(3, 8);
        feed_all(&mut ed, b"abcdef\x15xy");
        let (ev, _) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("xy")]);
        feed_all(&mut ed, b"abcdef\x03");
        let (ev, _) = feed_all(&mut ed, b"z\r");
        assert_eq!(ev, vec![submitted("z")]);
    }

    #[test]
    fn overflowed_draft_survives_a_history_walk() {
        let mut ed = LineEditor::new(3, 8);
        feed_all(&mut ed, b"ab\r");
        feed_all(&mut ed, b"wxyz\x1b[A");
        assert_eq!(ed.line(), "ab");
        let (ev, _) = feed_all(&mut ed, b"\x1b[B\r");
        assert_eq!(ev, vec![LineEvent::TooLong { max: 3 }]);
        // A recalled entry is not overflowed, even if the draft was.
        feed_all(&mut ed, b"wxyz\x1b[A");
        let (ev, _) = feed_all(&mut ed, b"\r");
        assert_eq!(ev, vec![submitted("ab")]);
    }

    #[test]
    fn ten_thousand_character_line_stays_bounded() {
        let mut ed = LineEditor::new(256, 8);
        let capacity = ed.buf.capacity();
        let line: Vec<u8> = (0..10_000).map(|i| b'a' + (i % 26) as u8).collect();
        let (ev, out) = feed_all(&mut ed, &line);
        assert!(ev.is_empty());
        assert_eq!(out.len(), 257, "256 echoed characters and one bell");
        assert_eq!(ed.line().len(), 256);
        assert_eq!(ed.buf.capacity(), capacity, "no reallocation");
        let (ev, _) = feed_all(&mut ed, b"\r\n");
        assert_eq!(ev, vec![LineEvent::TooLong { max: 256 }]);
    }

    #[test]
    fn zero_max_len_accepts_only_empty_lines() {
        let mut ed = LineEditor::new(0, 8);
        let (ev, out) = feed_all(&mut ed, b"\rx\r");
        assert_eq!(ev, vec![submitted(""), LineEvent::TooLong { max: 0 }]);
        assert_eq!(out, b"\r\n\x07\r\n");
    }

    /// A minimal terminal: the cells of the editable text after the prompt and
    /// the cursor column, driven by the echo bytes. It checks the editor never
    /// moves left of the start of the text and only sends what it understands.
    #[derive(Default)]
    struct Screen {
        cells: Vec<u8>,
        col: usize,
        pending: Vec<u8>,
        lines_done: usize,
    }

    impl Screen {
        fn apply(&mut self, bytes: &[u8]) {
            for &b in bytes {
                if !self.pending.is_empty() || b == ESC {
                    self.pending.push(b);
                    match self.pending.as_slice() {
                        [ESC] | [ESC, b'['] => {}
                        b"\x1b[K" => {
                            self.cells.truncate(self.col);
                            self.pending.clear();
                        }
                        other => panic!("unexpected echo sequence {other:?}"),
                    }
                    continue;
                }
                match b {
                    BS => {
                        assert!(self.col > 0, "moved left of the start of the line");
                        self.col -= 1;
                    }
                    BEL => {}
                    b'\r' | b'\n' => {
                        // A line end only ever comes as "\r\n" or "^C\r\n".
                        if b == b'\n' {
                            self.cells.clear();
                            self.col = 0;
                            self.lines_done += 1;
                        }
                    }
                    0x20..=0x7E => {
                        if self.col < self.cells.len() {
                            self.cells[self.col] = b;
                        } else {
                            assert_eq!(self.col, self.cells.len());
                            self.cells.push(b);
                        }
                        self.col += 1;
                    }
                    other => panic!("unexpected echo byte {other:#x}"),
                }
            }
        }

        fn assert_shows(&self, ed: &LineEditor) {
            let line = ed.line().as_bytes();
            assert!(
                self.cells.len() >= line.len(),
                "{:?} vs {:?}",
                self.cells,
                line
            );
            assert_eq!(&self.cells[..line.len()], line);
            assert!(self.cells[line.len()..].iter().all(|&c| c == b' '));
            assert_eq!(self.col, ed.cursor());
        }
    }

    /// xorshift64*: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn check_invariants(ed: &LineEditor, capacity: usize) {
        assert!(ed.buf.len() <= ed.max_len);
        assert!(ed.cursor <= ed.buf.len());
        assert!(ed.buf.iter().all(|b| (0x20..=0x7E).contains(b)));
        assert!(ed.draft.len() <= ed.max_len);
        assert!(ed.history.len() <= ed.history_len);
        assert!(ed.history.iter().all(|h| h.len() <= ed.max_len));
        assert!(ed.params_len <= MAX_ESCAPE_PARAMS);
        assert_eq!(ed.buf.capacity(), capacity, "line buffer reallocated");
    }

    fn check_event(ev: &Option<LineEvent>, max: usize) {
        if let Some(LineEvent::Submitted(s)) = ev {
            assert!(s.len() <= max);
            assert!(s.bytes().all(|b| (0x20..=0x7E).contains(&b)));
        }
    }

    #[test]
    fn fuzz_random_bytes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut ed = LineEditor::new(40, 5);
        let capacity = ed.buf.capacity();
        for _ in 0..200_000 {
            let b = rng.next() as u8;
            let ev = ed.feed(b, &mut |_: &[u8]| {});
            check_event(&ev, 40);
            check_invariants(&ed, capacity);
        }
    }

    /// Random keys weighted towards editing: every echo is replayed on the
    /// model terminal, which must show exactly the buffer and cursor.
    #[test]
    fn fuzz_keys_against_terminal_model() {
        const KEYS: &[&[u8]] = &[
            b"\x1b[A",
            b"\x1b[B",
            b"\x1b[C",
            b"\x1b[D",
            b"\x1b[H",
            b"\x1b[F",
            b"\x1b[1~",
            b"\x1b[4~",
            b"\x1b[3~",
            b"\x1bOH",
            b"\x1bOF",
            b"\x1bOA",
            b"\x1b[1;5C",
            b"\x1b[",
            b"\x1b",
            b"\x01",
            b"\x05",
            b"\x08",
            b"\x7f",
            b"\x15",
            b"\x03",
            b"\r",
            b"\n",
            b"\r\n",
            b"\t",
            b"\xff",
        ];
        for (seed, max_len, history_len) in [(1u64, 12, 4), (2, 1, 2), (3, 30, 0), (4, 64, 16)] {
            let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
            let mut ed = LineEditor::new(max_len, history_len);
            let capacity = ed.buf.capacity();
            let mut screen = Screen::default();
            let mut bytes = 0usize;
            while bytes < 100_000 {
                let key: Vec<u8> = if rng.below(3) == 0 {
                    KEYS[rng.below(KEYS.len() as u64) as usize].to_vec()
                } else {
                    vec![b' ' + rng.below(95) as u8]
                };
                for b in key {
                    bytes += 1;
                    let mut out = Vec::new();
                    let ev = ed.feed(b, &mut |s: &[u8]| out.extend_from_slice(s));
                    check_event(&ev, max_len);
                    check_invariants(&ed, capacity);
                    let before = screen.lines_done;
                    screen.apply(&out);
                    assert_eq!(screen.lines_done - before, usize::from(ev.is_some()));
                    // Between the bytes of an escape sequence nothing changes.
                    screen.assert_shows(&ed);
                }
            }
        }
    }
}
