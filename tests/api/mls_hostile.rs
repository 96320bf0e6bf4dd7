//! Hostile bytes for the key-package reader: every truncation and every single-byte change of
//! real packages, and random edits, are either readable with consistent facts or opaque.

use keypackage_server::{key_package::Fingerprint, mls_codec};
use proptest::prelude::*;
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::mls_oracle::{with_mls_rs, with_openmls};

/// A minimal RFC 9420 §2.1.2 vector, encoded independently of the reader.
fn vector(out: &mut Vec<u8>, data: &[u8]) {
    match data.len() {
        len @ 0..=63 => out.push(len as u8),
        len @ 64..=16_383 => out.extend_from_slice(&(len as u16 | 0x4000).to_be_bytes()),
        len => out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes()),
    }
    out.extend_from_slice(data);
}

/// The KeyPackageRef recomputed with a copied RefHashInput.
fn expected_ref(suite: u16, key_package: &[u8]) -> Option<Vec<u8>> {
    let mut input = Vec::new();
    vector(&mut input, b"MLS 1.0 KeyPackage Reference");
    vector(&mut input, key_package);
    match suite {
        1..=3 => Some(Sha256::digest(&input).to_vec()),
        4..=6 => Some(Sha512::digest(&input).to_vec()),
        7 => Some(Sha384::digest(&input).to_vec()),
        _ => None,
    }
}

/// Readable with facts consistent with its own view and bytes, or opaque; never a panic.
pub(crate) fn assert_consistent(input: &[u8]) {
    let read = mls_codec::read(input);
    let view = match mls_codec::parse(input) {
        Ok(view) => view,
        Err(reason) => {
            assert_eq!(read, Err(reason), "read and parse disagree");
            return;
        }
    };
    assert_eq!(
        mls_codec::encode(&view),
        input,
        "re-encoding reproduces the input"
    );
    let facts = read.expect("parse accepted, so read does");
    assert_eq!(input[..4], [0, 1, 0, 5]);
    assert_eq!(facts.cipher_suite, u16::from_be_bytes([input[6], input[7]]));
    assert_eq!(view.bytes, &input[4..]);
    assert_eq!(facts.not_before, view.leaf_node.lifetime.not_before);
    assert_eq!(facts.not_after, view.leaf_node.lifetime.not_after);
    assert_eq!(
        facts.signature_key_fingerprint,
        Fingerprint::of_public_key(view.leaf_node.signature_key)
    );
    assert_eq!(
        facts.key_package_ref,
        expected_ref(facts.cipher_suite, &input[4..])
    );
    assert_eq!(
        facts.last_resort,
        view.extensions.iter().any(|e| e.extension_type == 0x000a)
    );
}

/// A few real packages: openmls (plain, last-resort with extensions, x509) and mls-rs (P-256
/// with extensions, P-384).
fn real_packages() -> Vec<Vec<u8>> {
    let mut packages = Vec::new();
    let member = with_openmls::Member::basic(with_openmls::SUITES[0], b"alice");
    packages.push(member.key_package(Default::default()).1);
    packages.push(
        member
            .key_package(with_openmls::Options {
                last_resort: true,
                key_package_extension: Some(3),
                leaf_extension: Some(70),
                ..Default::default()
            })
            .1,
    );
    let member = with_openmls::Member::x509(with_openmls::SUITES[2], &[vec![0x30; 80], vec![1]]);
    packages.push(member.key_package(Default::default()).1);
    let client = with_mls_rs::client(
        with_mls_rs::SUITES[1],
        with_mls_rs::basic(b"bob"),
        std::time::Duration::from_secs(3_600),
    );
    let options = with_mls_rs::Options {
        last_resort: true,
        key_package_extension: Some(5),
        leaf_extension: Some(1),
        ..Default::default()
    };
    packages.push(with_mls_rs::key_package(&client, options).1);
    let client = with_mls_rs::client(
        with_mls_rs::SUITES[3],
        with_mls_rs::basic(b"carol"),
        std::time::Duration::from_secs(3_600),
    );
    packages.push(with_mls_rs::key_package(&client, Default::default()).1);
    for package in &packages {
        assert!(
            mls_codec::read(package).is_ok(),
            "the originals are readable"
        );
    }
    packages
}

#[test]
fn every_truncation_of_a_real_package_is_opaque() {
    for package in real_packages() {
        for len in 0..package.len() {
            assert_consistent(&package[..len]);
            // A prefix ends inside some vector or integer, never on a whole KeyPackage.
            assert!(mls_codec::read(&package[..len]).is_err(), "length {len}");
        }
    }
}

/// Changes every byte of `package` to each of `values` (except its own) and checks each result;
/// returns how many were readable and how many opaque.
fn change_every_byte(package: &[u8], values: impl Fn(u8) -> Vec<u8>) -> (usize, usize) {
    let (mut readable, mut opaque) = (0, 0);
    let mut changed = package.to_vec();
    for at in 0..package.len() {
        for value in values(package[at]) {
            if value == package[at] {
                continue;
            }
            changed[at] = value;
            assert_consistent(&changed);
            if mls_codec::read(&changed).is_ok() {
                readable += 1;
            } else {
                opaque += 1;
            }
        }
        changed[at] = package[at];
    }
    (readable, opaque)
}

#[test]
fn every_single_byte_change_of_a_real_package_is_consistent_or_opaque() {
    let packages = real_packages();
    // All 255 changes of every byte of the openmls last-resort package with extensions in both
    // places.
    let (readable, opaque) = change_every_byte(&packages[1], |_| (0..=255).collect());
    // Changes inside keys, signatures and identities stay readable; changes to lengths, tags and
    // versions mostly do not. Both kinds must have been exercised.
    assert!(
        readable > 0 && opaque > 0,
        "{readable} readable, {opaque} opaque"
    );
    // For the others (exhaustive would take minutes in a debug build), every byte takes the values
    // that change a length's size class or hit the reserved prefix, and a one-bit flip.
    for package in &packages {
        change_every_byte(package, |original| {
            vec![
                0x00,
                0x01,
                0x3f,
                0x40,
                0x7f,
                0x80,
                0xbf,
                0xc0,
                0xff,
                original ^ 1,
            ]
        });
    }
}

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<usize>(), 1..16usize).prop_map(|(at, n)| Edit::Remove(at, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let len = bytes.len().max(1);
    match edit {
        Edit::Set(at, b) if !bytes.is_empty() => bytes[at % len] = *b,
        Edit::Set(..) => {}
        Edit::Insert(at, data) => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, data.iter().copied());
        }
        Edit::Remove(at, n) if !bytes.is_empty() => {
            let at = at % len;
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        Edit::Remove(..) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn random_edits_of_a_real_package_are_consistent_or_opaque(
        which in 0..5usize,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        thread_local! {
            static PACKAGES: Vec<Vec<u8>> = real_packages();
        }
        let mut bytes = PACKAGES.with(|p| p[which].clone());
        for edit in &edits {
            apply(&mut bytes, edit);
        }
        assert_consistent(&bytes);
    }
}
