//! Domain types parsed at the edge: once a value of these types exists, it is valid.
//!
//! Handlers turn untrusted wire input into these types; storage and everything after it trust them.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::mls_codec::{self, KeyPackageFacts, Opaque};

/// Smallest accepted key package: the 4-byte MLS header alone.
pub const MIN_KEY_PACKAGE_LEN: usize = 4;
/// Largest accepted key package (16 KiB).
pub const MAX_KEY_PACKAGE_LEN: usize = 16 * 1024;
/// Regular packages kept per user; uploads beyond it replace the oldest.
pub const MAX_REGULAR_PACKAGES: usize = 10;

/// How far ahead of the server's clock a readable package's `not_before` may lie (clock skew).
pub const MAX_NOT_BEFORE_SKEW_SECS: u64 = 300;

/// MLS protocol version 1.0 followed by wire format `mls_key_package` (RFC 9420 §6).
const MLS_KEY_PACKAGE_HEADER: [u8; 4] = [0x00, 0x01, 0x00, 0x05];

/// A user id: 1–128 characters of `A–Z a–z 0–9 . _ ~ @ : + -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

/// Why a string is not a [`UserId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("user ids are 1-128 characters of A-Z a-z 0-9 . _ ~ @ : + -")]
pub struct InvalidUserId;

impl UserId {
    /// Longest accepted user id, in characters (all allowed characters are ASCII).
    pub const MAX_LEN: usize = 128;

    /// Parses a user id, refusing anything outside the allowed alphabet and length.
    pub fn parse(s: &str) -> Result<Self, InvalidUserId> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b".-_~@:+".contains(&b);
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.bytes().all(allowed) {
            return Err(InvalidUserId);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

/// A signing-key fingerprint: SHA-256 as 64 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

/// Why a string is not a [`Fingerprint`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a signing-key fingerprint is exactly 64 lowercase hex characters")]
pub struct InvalidFingerprint;

impl Fingerprint {
    /// Parses a fingerprint, refusing uppercase, other lengths and non-hex characters.
    pub fn parse(s: &str) -> Result<Self, InvalidFingerprint> {
        let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if s.len() != 64 || !s.bytes().all(lower_hex) {
            return Err(InvalidFingerprint);
        }
        Ok(Self(s.to_owned()))
    }

    /// The fingerprint of a signing public key, as clients compute it.
    pub fn of_public_key(public_key: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(public_key)))
    }

    /// The fingerprint as hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why bytes are not a [`KeyPackage`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidKeyPackage {
    /// Shorter than the header or longer than 16 KiB.
    #[error("a key package is {MIN_KEY_PACKAGE_LEN}-{MAX_KEY_PACKAGE_LEN} bytes, got {0}")]
    Length(usize),
    /// Not an MLS 1.0 `mls_key_package` message.
    #[error("a key package starts with 00 01 00 05 (MLS 1.0, mls_key_package)")]
    Header,
}

/// An `Idempotency-Key` of a claim: 1–255 characters `0x21`–`0x7E`. Keys belong to the caller
/// that sent them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a header value is not an [`IdempotencyKey`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Idempotency-Key is 1-255 characters from 0x21 to 0x7E")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    /// Longest accepted key, in characters.
    pub const MAX_LEN: usize = 255;

    /// Parses a header value's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidIdempotencyKey> {
        let visible = |b: &u8| (0x21..=0x7e).contains(b);
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN || !bytes.iter().all(visible) {
            return Err(InvalidIdempotencyKey);
        }
        // Visible ASCII only, so always UTF-8.
        Ok(Self(String::from_utf8_lossy(bytes).into_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A cipher suite as a client names it in a query: a decimal or `0x`-prefixed hex number from
/// 1 to 65535 (suite 0 is reserved by RFC 9420). Anything else is `None`.
pub fn parse_cipher_suite(s: &str) -> Option<u16> {
    let (digits, radix) = match s.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    // `from_str_radix` alone would accept a leading `+`.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u16::from_str_radix(digits, radix).ok().filter(|&n| n != 0)
}

/// A key package whose wire header and size have been checked, read once as RFC 9420
/// structures: readable (with its facts) or opaque (with the reason).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPackage {
    bytes: Bytes,
    digest: [u8; 32],
    read: Result<KeyPackageFacts, Opaque>,
}

impl KeyPackage {
    /// Checks the size and the MLS wire header, then reads the structure (no cryptography:
    /// clients do the cryptographic checks).
    pub fn parse(bytes: Bytes) -> Result<Self, InvalidKeyPackage> {
        if !(MIN_KEY_PACKAGE_LEN..=MAX_KEY_PACKAGE_LEN).contains(&bytes.len()) {
            return Err(InvalidKeyPackage::Length(bytes.len()));
        }
        if bytes[..4] != MLS_KEY_PACKAGE_HEADER {
            return Err(InvalidKeyPackage::Header);
        }
        let digest = Sha256::digest(&bytes).into();
        let read = mls_codec::read(&bytes);
        Ok(Self {
            bytes,
            digest,
            read,
        })
    }

    /// The facts of a readable package; `None` for an opaque one.
    pub fn facts(&self) -> Option<&KeyPackageFacts> {
        self.read.as_ref().ok()
    }

    /// Why the package is opaque; `None` for a readable one.
    pub fn opaque_reason(&self) -> Option<Opaque> {
        self.read.as_ref().err().copied()
    }

    /// The serialized MLSMessage.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// SHA-256 of the bytes: how storage recognises a package uploaded twice.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

// Key-package bytes never reach logs: Debug shows only size and a digest prefix.
impl fmt::Debug for KeyPackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyPackage({} bytes, sha256 {}…, {})",
            self.bytes.len(),
            hex::encode(&self.digest[..4]),
            if self.read.is_ok() {
                "readable"
            } else {
                "opaque"
            }
        )
    }
}

/// A validated upload: what the store is asked to apply atomically.
#[derive(Clone, Debug)]
pub struct Upload {
    /// Regular packages in request order (earlier = older), duplicates within the request removed.
    pub regular: Vec<KeyPackage>,
    /// The new last-resort package, if the request carried one.
    pub last_resort: Option<KeyPackage>,
    /// The signing-key fingerprint sent with the request, if any.
    pub fingerprint: Option<Fingerprint>,
}

/// Why an upload request was refused; nothing of it is stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidUpload {
    /// The request carried no entries.
    #[error("the upload carries no key packages")]
    Empty,
    /// More than one entry is flagged `is_last_resort`.
    #[error("at most one entry may be a last-resort key package")]
    MultipleLastResort,
    /// The entry at this index is not a key package.
    #[error("entry {index}: {reason}")]
    KeyPackage {
        /// Position of the offending entry in the request.
        index: usize,
        /// What is wrong with it.
        reason: InvalidKeyPackage,
    },
    /// The fingerprint is neither empty nor 64 lowercase hex characters.
    #[error(transparent)]
    Fingerprint(#[from] InvalidFingerprint),
    /// The entry at this index is opaque and the policy requires readable packages.
    #[error("entry {index}: not a readable RFC 9420 key package: {reason}")]
    Unreadable {
        /// Position of the offending entry in the request.
        index: usize,
        /// The first reader rule it breaks.
        reason: Opaque,
    },
    /// The readable entry at this index has a lifetime the server does not accept.
    #[error("entry {index}: {reason}")]
    Lifetime {
        /// Position of the offending entry in the request.
        index: usize,
        /// What is wrong with the lifetime.
        reason: InvalidLifetime,
    },
    /// The readable entry at this index is signed by another key than the request's fingerprint.
    #[error("entry {index}: the signature key does not match signing_key_fingerprint")]
    FingerprintMismatch {
        /// Position of the first entry whose signature-key fingerprint differs.
        index: usize,
    },
}

impl InvalidUpload {
    /// The stable error code clients (and the refusal metric) see.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "empty_upload",
            Self::MultipleLastResort => "multiple_last_resort",
            Self::KeyPackage { .. } | Self::Unreadable { .. } => "invalid_key_package",
            Self::Fingerprint(_) => "invalid_fingerprint",
            Self::Lifetime { .. } => "invalid_lifetime",
            Self::FingerprintMismatch { .. } => "fingerprint_mismatch",
        }
    }

    /// The position of the offending entry, for errors about one entry.
    pub fn entry_index(&self) -> Option<usize> {
        match self {
            Self::KeyPackage { index, .. }
            | Self::Unreadable { index, .. }
            | Self::Lifetime { index, .. }
            | Self::FingerprintMismatch { index } => Some(*index),
            Self::Empty | Self::MultipleLastResort | Self::Fingerprint(_) => None,
        }
    }
}

/// Why a readable package's lifetime is refused (all compared without overflow).
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidLifetime {
    /// `not_after` is not after now.
    #[error("the key package has expired (not_after is not after now)")]
    Expired,
    /// `not_before` is after `not_after`.
    #[error("the key package's not_before is after its not_after")]
    Inverted,
    /// `not_before` lies more than [`MAX_NOT_BEFORE_SKEW_SECS`] ahead.
    #[error("the key package's not_before is more than 300 s in the future")]
    NotYetValid,
    /// `not_after` lies further ahead than the configured maximum lifetime.
    #[error("the key package's not_after is beyond the configured maximum lifetime")]
    TooLong,
}

/// What the server asks of uploaded packages beyond v1's checks (settings, not per request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadPolicy {
    /// Refuse opaque entries (`KPS_REQUIRE_READABLE_KEY_PACKAGES`).
    pub require_readable: bool,
    /// Largest accepted `not_after - now`, in seconds (`KPS_MAX_KEY_PACKAGE_LIFETIME_SECS`);
    /// `None`: no limit.
    pub max_lifetime_secs: Option<u64>,
}

impl UploadPolicy {
    /// Judges one entry against the v1.1 rules at Unix time `now`; `fingerprint` is the
    /// request's, when it sent a valid one.
    fn check(
        &self,
        index: usize,
        package: &KeyPackage,
        fingerprint: Option<&Fingerprint>,
        now: u64,
    ) -> Result<(), InvalidUpload> {
        let facts = match &package.read {
            Ok(facts) => facts,
            Err(reason) if self.require_readable => {
                return Err(InvalidUpload::Unreadable {
                    index,
                    reason: *reason,
                })
            }
            Err(_) => return Ok(()),
        };
        self.check_lifetime(facts, now)
            .map_err(|reason| InvalidUpload::Lifetime { index, reason })?;
        if fingerprint.is_some_and(|f| *f != facts.signature_key_fingerprint) {
            return Err(InvalidUpload::FingerprintMismatch { index });
        }
        Ok(())
    }

    fn check_lifetime(&self, facts: &KeyPackageFacts, now: u64) -> Result<(), InvalidLifetime> {
        let (not_before, not_after) = (facts.not_before, facts.not_after);
        if not_after <= now {
            return Err(InvalidLifetime::Expired);
        }
        if not_before > not_after {
            return Err(InvalidLifetime::Inverted);
        }
        if not_before > now.saturating_add(MAX_NOT_BEFORE_SKEW_SECS) {
            return Err(InvalidLifetime::NotYetValid);
        }
        if self
            .max_lifetime_secs
            .is_some_and(|max| not_after > now.saturating_add(max))
        {
            return Err(InvalidLifetime::TooLong);
        }
        Ok(())
    }
}

impl Upload {
    /// Validates a whole upload before anything is stored, at Unix time `now`.
    ///
    /// Entries are `(bytes, is_last_resort)` in request order. A later entry byte-identical to
    /// an earlier one is dropped here, so the store only has to compare against what it holds.
    ///
    /// v1's errors come first, exactly as before; only a request v1 accepts is judged by
    /// `policy` (readability, lifetime, fingerprint), reporting the first offending entry.
    pub fn parse(
        entries: impl IntoIterator<Item = (Bytes, bool)>,
        fingerprint: &str,
        now: u64,
        policy: UploadPolicy,
    ) -> Result<Self, InvalidUpload> {
        let parsed_fingerprint = match fingerprint {
            "" => Ok(None),
            s => Fingerprint::parse(s).map(Some),
        };
        let mut refused: Option<InvalidUpload> = None;
        let mut regular: Vec<KeyPackage> = Vec::new();
        let mut last_resort: Option<KeyPackage> = None;
        let mut last_resort_seen = false;
        let mut seen = std::collections::HashSet::new();
        let mut count = 0;
        for (index, (bytes, is_last_resort)) in entries.into_iter().enumerate() {
            count += 1;
            let package = KeyPackage::parse(bytes)
                .map_err(|reason| InvalidUpload::KeyPackage { index, reason })?;
            if is_last_resort {
                if last_resort_seen {
                    return Err(InvalidUpload::MultipleLastResort);
                }
                last_resort_seen = true;
            }
            if refused.is_none() {
                let fingerprint = parsed_fingerprint.as_ref().ok().and_then(Option::as_ref);
                refused = policy.check(index, &package, fingerprint, now).err();
            }
            if !seen.insert(*package.digest()) {
                continue;
            }
            if is_last_resort {
                last_resort = Some(package);
            } else {
                regular.push(package);
            }
        }
        if count == 0 {
            return Err(InvalidUpload::Empty);
        }
        let fingerprint = parsed_fingerprint?;
        if let Some(refused) = refused {
            return Err(refused);
        }
        Ok(Self {
            regular,
            last_resort,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idempotency_keys_are_1_to_255_visible_ascii_characters() {
        use super::IdempotencyKey as K;
        for ok in [&b"a"[..], b"!~", &[b'x'; 255], b"2f1c-9e07:retry/1"] {
            assert_eq!(K::parse(ok).unwrap().as_str().as_bytes(), ok);
        }
        for bad in [
            &b""[..],
            &[b'x'; 256],
            b"a b",
            b"a\tb",
            b"\x7f",
            b"caf\xc3\xa9",
            b"\x00",
        ] {
            assert!(K::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cipher_suites_are_decimal_or_0x_hex_from_1_to_65535() {
        use super::parse_cipher_suite as p;
        for (text, suite) in [
            ("1", 1),
            ("0x0003", 3),
            ("0x1", 1),
            ("0xFFFF", 65535),
            ("0xa", 10),
            ("65535", 65535),
            ("007", 7),
        ] {
            assert_eq!(p(text), Some(suite), "{text}");
        }
        for text in [
            "", "0", "0x0", "0x", "65536", "0x10000", "+1", "-1", "1.0", " 1", "1 ", "0X3", "abc",
            "0xg", "x1", "1e3",
        ] {
            assert_eq!(p(text), None, "{text:?}");
        }
    }

    use super::*;

    /// An upload judged with the default policy, as v1 requests are.
    fn parse_v1<const N: usize>(
        entries: [(Bytes, bool); N],
        fingerprint: &str,
    ) -> Result<Upload, InvalidUpload> {
        Upload::parse(entries, fingerprint, NOW, UploadPolicy::default())
    }

    const NOW: u64 = 1_700_000_000;

    fn kp(tail: &[u8]) -> Bytes {
        let mut v = MLS_KEY_PACKAGE_HEADER.to_vec();
        v.extend_from_slice(tail);
        Bytes::from(v)
    }

    #[test]
    fn user_id_accepts_the_whole_alphabet_and_refuses_anything_else() {
        assert!(UserId::parse("AZaz09._~@:+-").is_ok());
        assert!(UserId::parse(&"a".repeat(128)).is_ok());
        for bad in ["", "a/b", "a b", "é", "a%2F", "a\0", "a?b", "a#b", "a,b"] {
            assert_eq!(UserId::parse(bad), Err(InvalidUserId), "{bad:?}");
        }
        assert_eq!(UserId::parse(&"a".repeat(129)), Err(InvalidUserId));
    }

    #[test]
    fn fingerprint_must_be_64_lowercase_hex() {
        let good = "0123456789abcdef".repeat(4);
        assert!(Fingerprint::parse(&good).is_ok());
        assert!(Fingerprint::parse(&good.to_uppercase()).is_err());
        assert!(Fingerprint::parse(&good[..63]).is_err());
        assert!(Fingerprint::parse(&format!("{good}0")).is_err());
        assert!(Fingerprint::parse(&"g".repeat(64)).is_err());
        assert_eq!(
            Fingerprint::of_public_key(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_package_checks_size_and_header() {
        assert!(KeyPackage::parse(kp(&[])).is_ok());
        assert!(KeyPackage::parse(kp(&vec![7; MAX_KEY_PACKAGE_LEN - 4])).is_ok());
        assert_eq!(
            KeyPackage::parse(kp(&vec![7; MAX_KEY_PACKAGE_LEN - 3])),
            Err(InvalidKeyPackage::Length(MAX_KEY_PACKAGE_LEN + 1))
        );
        assert_eq!(
            KeyPackage::parse(Bytes::from_static(&[0, 1, 0])),
            Err(InvalidKeyPackage::Length(3))
        );
        assert_eq!(
            KeyPackage::parse(Bytes::from_static(&[0, 1, 0, 1, 9])),
            Err(InvalidKeyPackage::Header)
        );
        assert_eq!(
            KeyPackage::parse(Bytes::from_static(&[0, 2, 0, 5, 9])),
            Err(InvalidKeyPackage::Header)
        );
    }

    #[test]
    fn key_package_debug_never_shows_the_bytes() {
        let p = KeyPackage::parse(kp(b"secret-bytes")).unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("16 bytes"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn upload_rejects_empty_multiple_last_resort_and_names_the_bad_entry() {
        assert_eq!(parse_v1([], "").unwrap_err(), InvalidUpload::Empty);
        assert_eq!(
            parse_v1([(kp(b"a"), true), (kp(b"b"), true)], "").unwrap_err(),
            InvalidUpload::MultipleLastResort
        );
        assert_eq!(
            parse_v1([(kp(b"a"), false), (Bytes::from_static(b"xx"), false)], "").unwrap_err(),
            InvalidUpload::KeyPackage {
                index: 1,
                reason: InvalidKeyPackage::Length(2)
            }
        );
        assert_eq!(
            parse_v1([(kp(b"a"), false)], "ABC").unwrap_err(),
            InvalidUpload::Fingerprint(InvalidFingerprint)
        );
    }

    #[test]
    fn upload_drops_later_duplicates_keeping_the_first_occurrence() {
        let up = parse_v1(
            [
                (kp(b"a"), false),
                (kp(b"b"), false),
                (kp(b"a"), false),
                (kp(b"b"), true),
                (kp(b"c"), false),
            ],
            "",
        )
        .unwrap();
        let regular: Vec<_> = up.regular.iter().map(|p| p.bytes().clone()).collect();
        assert_eq!(regular, vec![kp(b"a"), kp(b"b"), kp(b"c")]);
        assert!(
            up.last_resort.is_none(),
            "the last-resort entry repeated entry 1"
        );
        assert!(up.fingerprint.is_none());
    }

    /// A minimal readable KeyPackage (RFC 9420 §10) signed by `signature_key`, with `tag` in its
    /// init key so that packages differ.
    pub(crate) fn readable(
        tag: &[u8],
        signature_key: &[u8],
        not_before: u64,
        not_after: u64,
    ) -> Bytes {
        crate::mls_codec::sample_key_package(tag, signature_key, not_before, not_after).into()
    }

    const KEY: &[u8] = &[7; 32];

    fn judge(
        packages: &[Bytes],
        fingerprint: &str,
        policy: UploadPolicy,
    ) -> Result<Upload, InvalidUpload> {
        Upload::parse(
            packages.iter().map(|p| (p.clone(), false)),
            fingerprint,
            NOW,
            policy,
        )
    }

    fn lifetime_error(index: usize, reason: InvalidLifetime) -> Result<(), InvalidUpload> {
        Err(InvalidUpload::Lifetime { index, reason })
    }

    fn verdict(not_before: u64, not_after: u64, policy: UploadPolicy) -> Result<(), InvalidUpload> {
        judge(&[readable(b"a", KEY, not_before, not_after)], "", policy).map(|_| ())
    }

    #[test]
    fn key_package_keeps_the_facts_of_a_readable_package_and_none_for_an_opaque_one() {
        let p = KeyPackage::parse(readable(b"a", KEY, 1, 2)).unwrap();
        let facts = p.facts().expect("readable");
        assert_eq!((facts.not_before, facts.not_after), (1, 2));
        assert_eq!(
            facts.signature_key_fingerprint,
            Fingerprint::of_public_key(KEY)
        );
        assert_eq!(p.opaque_reason(), None);
        let opaque = KeyPackage::parse(kp(b"tag")).unwrap();
        assert!(opaque.facts().is_none());
        assert_eq!(opaque.opaque_reason(), Some(Opaque::Version));
    }

    #[test]
    fn upload_refuses_expired_packages_including_not_after_equal_to_now() {
        let policy = UploadPolicy::default();
        assert_eq!(
            verdict(0, NOW, policy),
            lifetime_error(0, InvalidLifetime::Expired)
        );
        assert_eq!(
            verdict(0, NOW - 1, policy),
            lifetime_error(0, InvalidLifetime::Expired)
        );
        assert_eq!(verdict(0, NOW + 1, policy), Ok(()));
    }

    #[test]
    fn upload_refuses_not_before_after_not_after() {
        let policy = UploadPolicy::default();
        assert_eq!(
            verdict(NOW + 20, NOW + 10, policy),
            lifetime_error(0, InvalidLifetime::Inverted)
        );
        assert_eq!(verdict(NOW + 10, NOW + 10, policy), Ok(()));
    }

    #[test]
    fn upload_accepts_not_before_up_to_300_seconds_ahead_and_no_further() {
        let policy = UploadPolicy::default();
        assert_eq!(verdict(NOW + 300, NOW + 1000, policy), Ok(()));
        assert_eq!(
            verdict(NOW + 301, NOW + 1000, policy),
            lifetime_error(0, InvalidLifetime::NotYetValid)
        );
    }

    #[test]
    fn upload_applies_the_maximum_lifetime_only_when_set() {
        let capped = UploadPolicy {
            max_lifetime_secs: Some(3600),
            ..UploadPolicy::default()
        };
        assert_eq!(verdict(0, NOW + 3600, capped), Ok(()));
        assert_eq!(
            verdict(0, NOW + 3601, capped),
            lifetime_error(0, InvalidLifetime::TooLong)
        );
        assert_eq!(verdict(0, NOW + 3601, UploadPolicy::default()), Ok(()));
    }

    #[test]
    fn u64_max_lifetimes_compare_without_overflow() {
        let open = UploadPolicy::default();
        assert_eq!(verdict(0, u64::MAX, open), Ok(()));
        assert_eq!(
            verdict(u64::MAX, u64::MAX, open),
            lifetime_error(0, InvalidLifetime::NotYetValid)
        );
        let huge_max = UploadPolicy {
            max_lifetime_secs: Some(u64::MAX),
            ..UploadPolicy::default()
        };
        assert_eq!(
            verdict(0, u64::MAX, huge_max),
            Ok(()),
            "now + max saturates"
        );
        let capped = UploadPolicy {
            max_lifetime_secs: Some(86_400),
            ..UploadPolicy::default()
        };
        assert_eq!(
            verdict(0, u64::MAX, capped),
            lifetime_error(0, InvalidLifetime::TooLong)
        );
        // The check holds for a clock at the very end of time too.
        let late = Upload::parse(
            [(readable(b"a", KEY, u64::MAX - 1, u64::MAX), false)],
            "",
            u64::MAX - 1,
            huge_max,
        );
        assert!(late.is_ok());
    }

    #[test]
    fn upload_refuses_the_first_entry_signed_by_another_key_than_the_fingerprint() {
        let ours = Fingerprint::of_public_key(KEY);
        let packages = [
            readable(b"a", KEY, 0, NOW + 10),
            kp(b"opaque"),
            readable(b"b", &[8; 32], 0, NOW + 10),
            readable(b"c", &[9; 32], 0, NOW + 10),
        ];
        assert_eq!(
            judge(&packages, ours.as_str(), UploadPolicy::default()).unwrap_err(),
            InvalidUpload::FingerprintMismatch { index: 2 }
        );
        let up = judge(&packages[..2], ours.as_str(), UploadPolicy::default()).unwrap();
        assert_eq!(
            up.regular.len(),
            2,
            "opaque entries carry no key to compare"
        );
        assert_eq!(up.fingerprint, Some(ours));
        assert!(
            judge(&packages, "", UploadPolicy::default()).is_ok(),
            "no fingerprint, no check"
        );
    }

    #[test]
    fn opaque_entries_are_refused_only_when_readable_ones_are_required() {
        let packages = [readable(b"a", KEY, 0, NOW + 10), kp(b"opaque")];
        assert!(judge(&packages, "", UploadPolicy::default()).is_ok());
        let strict = UploadPolicy {
            require_readable: true,
            ..UploadPolicy::default()
        };
        assert_eq!(
            judge(&packages, "", strict).unwrap_err(),
            InvalidUpload::Unreadable {
                index: 1,
                reason: Opaque::Version
            }
        );
        assert_eq!(
            InvalidUpload::Unreadable {
                index: 1,
                reason: Opaque::Version
            }
            .code(),
            "invalid_key_package"
        );
    }

    #[test]
    fn new_rules_report_the_first_bad_entry_and_yield_to_v1_errors() {
        let expired = readable(b"x", KEY, 0, 1);
        let stranger = readable(b"y", &[8; 32], 0, NOW + 10);
        let ours = Fingerprint::of_public_key(KEY);
        assert_eq!(
            judge(
                &[stranger.clone(), expired.clone()],
                ours.as_str(),
                UploadPolicy::default()
            )
            .unwrap_err(),
            InvalidUpload::FingerprintMismatch { index: 0 }
        );
        assert_eq!(
            judge(
                &[expired.clone(), stranger.clone()],
                ours.as_str(),
                UploadPolicy::default()
            )
            .unwrap_err(),
            lifetime_error(0, InvalidLifetime::Expired).unwrap_err()
        );
        // v1's errors win, wherever they are.
        assert_eq!(
            judge(
                &[expired.clone(), Bytes::from_static(b"xx")],
                "",
                UploadPolicy::default()
            )
            .unwrap_err(),
            InvalidUpload::KeyPackage {
                index: 1,
                reason: InvalidKeyPackage::Length(2)
            }
        );
        assert_eq!(
            judge(
                std::slice::from_ref(&expired),
                "ABC",
                UploadPolicy::default()
            )
            .unwrap_err(),
            InvalidUpload::Fingerprint(InvalidFingerprint)
        );
        assert_eq!(
            Upload::parse(
                [(expired.clone(), true), (kp(b"b"), true)],
                "",
                NOW,
                UploadPolicy::default()
            )
            .unwrap_err(),
            InvalidUpload::MultipleLastResort
        );
    }
}
