//! The synthetic population: user ids, their fingerprints and key packages, bearer tokens, and
//! the order in which requests visit users.

use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::header::HeaderValue;
use keypackage_server::{
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
};
use sha2::{Digest, Sha256};

/// The id of the `i`-th synthetic user.
pub(crate) fn user_id(i: u64) -> String {
    format!("u{i}")
}

/// The signing-key fingerprint the `i`-th user sends (64 lowercase hex characters): with
/// openmls packages, the fingerprint of their signature key (the server checks it).
pub(crate) fn fingerprint(i: u64) -> String {
    match openmls_fixture() {
        Some(fixture) => fixture.fingerprint.clone(),
        None => hex::encode(Sha256::digest(format!("fingerprint:{i}"))),
    }
}

/// What the load sends as key packages (`--package-kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Packages {
    /// The MLS header, a unique label and filler: opaque to the server's reader.
    #[default]
    Synthetic,
    /// Copies of a package made by openmls 0.6 (suite 1, about 300 bytes), each with a unique
    /// init key and a lifetime from now on: readable, as real clients' packages are.
    Openmls,
}

static PACKAGES: std::sync::OnceLock<Packages> = std::sync::OnceLock::new();

/// Chooses the kind of packages for this process; call once, before any package is made.
pub(crate) fn use_packages(kind: Packages) {
    let _ = PACKAGES.set(kind);
}

/// A key package made once by openmls 0.6 (suite 1, basic credential "alice", default
/// capabilities and lifetime), as an MLSMessage.
pub(crate) const OPENMLS_KEY_PACKAGE_HEX: &str = include_str!("reader_openmls_key_package.hex");

/// The openmls package, decoded once, when `--package-kind openmls` was chosen.
struct Fixture {
    bytes: Vec<u8>,
    fingerprint: String,
}

fn openmls_fixture() -> Option<&'static Fixture> {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    if PACKAGES.get().copied().unwrap_or_default() != Packages::Openmls {
        return None;
    }
    Some(FIXTURE.get_or_init(|| {
        let bytes = hex::decode(OPENMLS_KEY_PACKAGE_HEX.trim()).expect("hex fixture");
        let facts = keypackage_server::mls_codec::read(&bytes).expect("readable fixture");
        Fixture {
            fingerprint: facts.signature_key_fingerprint.as_str().to_owned(),
            bytes,
        }
    }))
}

/// The openmls package with `a` and `b` written into its init key (so it is unique) and a
/// lifetime of 30 days from now.
fn openmls_package(fixture: &Fixture, a: u64, b: u64) -> Bytes {
    use keypackage_server::mls_codec;
    let view = mls_codec::parse(&fixture.bytes).expect("readable fixture");
    let mut init_key = view.init_key.to_vec();
    let unique = [a.to_be_bytes(), b.to_be_bytes()].concat();
    let n = unique.len().min(init_key.len());
    init_key[..n].copy_from_slice(&unique[..n]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut leaf_node = view.leaf_node;
    leaf_node.lifetime = mls_codec::Lifetime {
        not_before: now.saturating_sub(3_600),
        not_after: now + 30 * 86_400,
    };
    let changed = mls_codec::KeyPackageView {
        init_key: &init_key,
        leaf_node,
        ..view
    };
    Bytes::from(mls_codec::encode(&changed))
}

/// A key package of exactly `size` bytes (at least enough for its label): the MLS 1.0
/// `mls_key_package` header, a label that makes it unique, then filler.
pub(crate) fn package(kind: &str, a: u64, b: u64, size: usize) -> Bytes {
    use std::io::Write;
    if let Some(fixture) = openmls_fixture() {
        // Seeded, uploaded and last-resort packages must differ from each other too.
        let salt = kind
            .bytes()
            .fold(0u64, |h, c| h.wrapping_mul(31).wrapping_add(c.into()));
        return openmls_package(fixture, a ^ (salt << 40), b);
    }
    let mut v = Vec::with_capacity(size.max(64));
    v.extend_from_slice(&[0x00, 0x01, 0x00, 0x05]);
    let _ = write!(v, "{kind}:{a}:{b}:");
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b;
    while v.len() < size {
        // xorshift filler: incompressible, as real key packages are.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    Bytes::from(v)
}

/// SHA-256 of a package, as the server stores it to recognise duplicates.
pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Visits `0..n` in a fixed scattered order: `offset + k * step (mod n)` with `step` coprime to
/// `n`, so every user is visited once per `n` requests (the per-target budget is never the limit)
/// and consecutive requests land far apart in the key space (no cache-friendly runs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spread {
    n: u64,
    step: u64,
    offset: u64,
}

impl Spread {
    /// A scattered order over `0..n`.
    pub(crate) fn new(n: u64, seed: u64) -> Self {
        let n = n.max(1);
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let mut step = 0x9E37_79B9_7F4A_7C15 % n;
        while n > 1 && (step == 0 || gcd(step, n) != 1) {
            step = (step + 1) % n;
        }
        Self {
            n,
            step: step.max(1),
            offset: seed % n,
        }
    }

    /// The `k`-th user visited.
    pub(crate) fn at(&self, k: u64) -> u64 {
        ((u128::from(self.offset) + u128::from(k) * u128::from(self.step)) % u128::from(self.n))
            as u64
    }
}

/// `Authorization` header values for users `0..n`, signed once up front so that signing costs
/// the load generator nothing while it runs.
pub(crate) fn bearer_tokens(secret: &str, n: u64, ttl_secs: u64) -> Result<Vec<HeaderValue>> {
    let auth = Authenticator::new(VerifyingKey::Secret(secret.as_bytes().to_vec()), None, None);
    (0..n)
        .map(|i| {
            let user = UserId::parse(&user_id(i)).context("user id")?;
            let token = auth.issue(&user, ttl_secs).map_err(anyhow::Error::msg)?;
            HeaderValue::from_str(&format!("Bearer {token}")).context("token header")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_visits_every_user_once_per_round() {
        for n in [1, 2, 7, 10, 1000, 4096] {
            let s = Spread::new(n, 12345);
            let mut seen: Vec<u64> = (0..n).map(|k| s.at(k)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn packages_have_the_mls_header_and_the_requested_size() {
        let p = package("seed", 1, 2, 256);
        assert_eq!(&p[..4], &[0, 1, 0, 5]);
        assert_eq!(p.len(), 256);
        assert_ne!(p, package("seed", 1, 3, 256));
    }
}
