//! Arbitrary bytes into everything that reads the network: the PDU stream decoder (with every
//! digest choice), the typed PDU parsers, text keys, CHAP values and SendTargets answers.
//! Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use storage::iscsi::pdus::{InitiatorPdu, TargetPdu};
use storage::iscsi::stream::{Digests, PduDecoder};
use storage::iscsi::{chap, discovery, TextKeys};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let digests = Digests {
        header: selector & 1 != 0,
        data: selector & 2 != 0,
    };
    let mut decoder = PduDecoder::new(if selector & 4 != 0 { 8192 } else { 1 << 24 });
    decoder.set_digests(digests);
    // Feed in pieces whose sizes the input chooses, as a TCP stream would arrive.
    let piece = usize::from(selector >> 3).max(1);
    for chunk in rest.chunks(piece) {
        decoder.push(chunk);
        while let Ok(Some(pdu)) = decoder.next_pdu() {
            let _ = TargetPdu::parse(pdu.clone());
            let _ = InitiatorPdu::parse(pdu);
        }
    }
    if let Ok(keys) = TextKeys::decode(rest) {
        let _ = discovery::parse_send_targets(&keys);
    }
    if let Ok(text) = core::str::from_utf8(rest) {
        let _ = chap::decode_binary(text);
        let _ = discovery::parse_target_address(text);
    }
});
