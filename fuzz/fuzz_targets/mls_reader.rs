//! The RFC 9420 key-package reader on arbitrary bytes: no panic, and whatever it reads re-encodes
//! to exactly the input, with facts consistent with its view.
#![no_main]

use keypackage_server::{key_package::Fingerprint, mls_codec};
use libfuzzer_sys::fuzz_target;

/// Checks one input: opaque, or readable with a view that re-encodes to it.
fn check(message: &[u8]) {
    let read = mls_codec::read(message);
    match mls_codec::parse(message) {
        Err(reason) => assert_eq!(read, Err(reason)),
        Ok(view) => {
            assert_eq!(mls_codec::encode(&view), message);
            let facts = read.expect("parse accepted, so read does");
            assert_eq!(facts, view.facts());
            assert_eq!(view.bytes, &message[4..]);
            assert_eq!(
                facts.signature_key_fingerprint,
                Fingerprint::of_public_key(view.leaf_node.signature_key)
            );
            let expected_len = match facts.cipher_suite {
                1..=3 => Some(32),
                4..=6 => Some(64),
                7 => Some(48),
                _ => None,
            };
            assert_eq!(facts.key_package_ref.as_ref().map(Vec::len), expected_len);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Most inputs fail the 4-byte header; also read each one as the body after a valid header,
    // so the search spends its time on the KeyPackage structure.
    let mut message = vec![0x00, 0x01, 0x00, 0x05];
    message.extend_from_slice(data);
    check(&message);
});
