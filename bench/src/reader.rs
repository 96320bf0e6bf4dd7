//! `kps-bench reader`: the cost of reading one key package with `mls_codec::read`, for a typical
//! openmls package and for a 16 KiB one, with one SHA-256 pass over 16 KiB for comparison.

use std::{hint::black_box, time::Instant};

use anyhow::{ensure, Result};
use keypackage_server::{key_package::MAX_KEY_PACKAGE_LEN, mls_codec};
use sha2::{Digest, Sha256};

use crate::workload::OPENMLS_KEY_PACKAGE_HEX;

/// Times `read` on both packages and prints nanoseconds per read.
pub(crate) fn run(iterations: u32) -> Result<()> {
    let typical = hex::decode(OPENMLS_KEY_PACKAGE_HEX.trim())?;
    let large = large_key_package();
    ensure!(
        mls_codec::read(&typical).is_ok(),
        "the openmls fixture is readable"
    );
    ensure!(
        mls_codec::read(&large).is_ok(),
        "the 16 KiB package is readable"
    );
    ensure!(large.len() == MAX_KEY_PACKAGE_LEN);

    let iterations = iterations.max(1);
    report(
        "read, typical openmls package",
        typical.len(),
        iterations,
        || black_box(mls_codec::read(black_box(&typical))).is_ok(),
    );
    report("read, 16 KiB package", large.len(), iterations, || {
        black_box(mls_codec::read(black_box(&large))).is_ok()
    });
    report("sha-256 of 16 KiB (floor)", large.len(), iterations, || {
        black_box(Sha256::digest(black_box(&large)))[0] != 1
    });
    Ok(())
}

/// Best of five rounds, so that a busy machine shows the cost rather than the noise.
fn report(label: &str, bytes: usize, iterations: u32, mut once: impl FnMut() -> bool) {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..iterations {
            black_box(once());
        }
        best = best.min(started.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    eprintln!("{label:<32} {bytes:>6} bytes  {best:>9.0} ns/read");
}

/// A readable suite-1 package of exactly 16 KiB: realistic keys and signatures, padded by a long
/// basic identity, as the largest upload the server accepts.
fn large_key_package() -> Vec<u8> {
    let build = |identity_len: usize| {
        let mut out = vec![0x00, 0x01, 0x00, 0x05, 0x00, 0x01, 0x00, 0x01];
        vector(&mut out, &[1; 32]); // init_key
        vector(&mut out, &[2; 32]); // encryption_key
        vector(&mut out, &[3; 32]); // signature_key
        out.extend_from_slice(&[0x00, 0x01]); // basic
        vector(&mut out, &vec![b'a'; identity_len]);
        vector(&mut out, &[0, 1]); // versions
        vector(&mut out, &[0, 1, 0, 2, 0, 3]); // cipher_suites
        vector(&mut out, &[0, 0x0a]); // extensions
        vector(&mut out, &[]); // proposals
        vector(&mut out, &[0, 1]); // credentials
        out.push(1); // key_package
        out.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        out.extend_from_slice(&1_800_000_000u64.to_be_bytes());
        vector(&mut out, &[]); // leaf extensions
        vector(&mut out, &[4; 64]); // leaf signature
        vector(&mut out, &[0x00, 0x0a, 0x00]); // extensions: last_resort
        vector(&mut out, &[5; 64]); // signature
        out
    };
    let overhead = build(0).len();
    // `overhead` counts a one-byte identity length; the padded identity takes two.
    let identity_len = MAX_KEY_PACKAGE_LEN - overhead - 1;
    build(identity_len)
}

/// Appends an RFC 9420 §2.1.2 vector with its minimal length prefix.
fn vector(out: &mut Vec<u8>, data: &[u8]) {
    match data.len() {
        len @ 0..=63 => out.push(len as u8),
        len @ 64..=16_383 => out.extend_from_slice(&(len as u16 | 0x4000).to_be_bytes()),
        len => out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes()),
    }
    out.extend_from_slice(data);
}
