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

/// The signing-key fingerprint the `i`-th user sends (64 lowercase hex characters).
pub(crate) fn fingerprint(i: u64) -> String {
    hex::encode(Sha256::digest(format!("fingerprint:{i}")))
}

/// A key package of exactly `size` bytes (at least enough for its label): the MLS 1.0
/// `mls_key_package` header, a label that makes it unique, then filler.
pub(crate) fn package(kind: &str, a: u64, b: u64, size: usize) -> Bytes {
    use std::io::Write;
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
