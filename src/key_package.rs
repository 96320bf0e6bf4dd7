//! Domain types parsed at the edge: once a value of these types exists, it is valid.
//!
//! Handlers turn untrusted wire input into these types; storage and everything after it trust them.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Smallest accepted key package: the 4-byte MLS header alone.
pub const MIN_KEY_PACKAGE_LEN: usize = 4;
/// Largest accepted key package (16 KiB).
pub const MAX_KEY_PACKAGE_LEN: usize = 16 * 1024;
/// Regular packages kept per user; uploads beyond it replace the oldest.
pub const MAX_REGULAR_PACKAGES: usize = 10;

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

/// A key package whose wire header and size have been checked; the bytes are opaque otherwise.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPackage {
    bytes: Bytes,
    digest: [u8; 32],
}

impl KeyPackage {
    /// Checks the size and the MLS wire header; clients do the cryptographic checks.
    pub fn parse(bytes: Bytes) -> Result<Self, InvalidKeyPackage> {
        if !(MIN_KEY_PACKAGE_LEN..=MAX_KEY_PACKAGE_LEN).contains(&bytes.len()) {
            return Err(InvalidKeyPackage::Length(bytes.len()));
        }
        if bytes[..4] != MLS_KEY_PACKAGE_HEADER {
            return Err(InvalidKeyPackage::Header);
        }
        let digest = Sha256::digest(&bytes).into();
        Ok(Self { bytes, digest })
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
            "KeyPackage({} bytes, sha256 {}…)",
            self.bytes.len(),
            hex::encode(&self.digest[..4])
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
}

impl Upload {
    /// Validates a whole upload before anything is stored.
    ///
    /// Entries are `(bytes, is_last_resort)` in request order. A later entry byte-identical to
    /// an earlier one is dropped here, so the store only has to compare against what it holds.
    pub fn parse(
        entries: impl IntoIterator<Item = (Bytes, bool)>,
        fingerprint: &str,
    ) -> Result<Self, InvalidUpload> {
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
        let fingerprint = match fingerprint {
            "" => None,
            s => Some(Fingerprint::parse(s)?),
        };
        Ok(Self {
            regular,
            last_resort,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(Upload::parse([], "").unwrap_err(), InvalidUpload::Empty);
        assert_eq!(
            Upload::parse([(kp(b"a"), true), (kp(b"b"), true)], "").unwrap_err(),
            InvalidUpload::MultipleLastResort
        );
        assert_eq!(
            Upload::parse([(kp(b"a"), false), (Bytes::from_static(b"xx"), false)], "").unwrap_err(),
            InvalidUpload::KeyPackage {
                index: 1,
                reason: InvalidKeyPackage::Length(2)
            }
        );
        assert_eq!(
            Upload::parse([(kp(b"a"), false)], "ABC").unwrap_err(),
            InvalidUpload::Fingerprint(InvalidFingerprint)
        );
    }

    #[test]
    fn upload_drops_later_duplicates_keeping_the_first_occurrence() {
        let up = Upload::parse(
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
}
