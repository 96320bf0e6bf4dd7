//! The RFC 9420 structure reader: decodes an uploaded `MLSMessage(KeyPackage)` by hand, without
//! cryptography, and takes the facts the server keeps (suite, lifetime, signature-key fingerprint,
//! KeyPackageRef, last-resort mark). Anything it cannot read exactly is opaque.

use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::key_package::Fingerprint;

/// MLS 1.0 followed by wire format `mls_key_package` (RFC 9420 §6).
const HEADER: [u8; 4] = [0x00, 0x01, 0x00, 0x05];
/// `ProtocolVersion mls10` (RFC 9420 §6).
const MLS10: u16 = 0x0001;
/// `LeafNodeSource key_package` (RFC 9420 §7.2).
const SOURCE_KEY_PACKAGE: u8 = 1;
/// `CredentialType basic` (RFC 9420 §5.3).
const CREDENTIAL_BASIC: u16 = 1;
/// `CredentialType x509` (RFC 9420 §5.3).
const CREDENTIAL_X509: u16 = 2;
/// `ExtensionType last_resort` (RFC 9420 §17.3, registered by draft-ietf-mls-extensions).
pub const LAST_RESORT_EXTENSION: u16 = 0x000A;
/// The RefHash label of a KeyPackageRef (RFC 9420 §5.2).
const KEY_PACKAGE_REF_LABEL: &[u8] = b"MLS 1.0 KeyPackage Reference";
/// Vector lengths are at most 30 bits (RFC 9420 §2.1.2).
const MAX_VECTOR_LEN: usize = (1 << 30) - 1;

/// What the server takes from a readable key package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackageFacts {
    /// The KeyPackage's `cipher_suite`.
    pub cipher_suite: u16,
    /// The leaf's `lifetime.not_before`, Unix seconds.
    pub not_before: u64,
    /// The leaf's `lifetime.not_after`, Unix seconds.
    pub not_after: u64,
    /// SHA-256 of the leaf's `signature_key`.
    pub signature_key_fingerprint: Fingerprint,
    /// The KeyPackageRef (RFC 9420 §5.2) for suites 1–7; `None` for suites whose hash is unknown.
    pub key_package_ref: Option<Vec<u8>>,
    /// Whether the KeyPackage's extensions hold `last_resort` (0x000A).
    pub last_resort: bool,
}

/// Why an entry is opaque: the first rule of the reader it breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Opaque {
    /// Not `00 01 00 05` (MLS 1.0, `mls_key_package`).
    #[error("not an MLS 1.0 mls_key_package message")]
    Header,
    /// A field runs past the end of the input or of its enclosing vector.
    #[error("a field runs past the end of its input")]
    Truncated,
    /// A vector length starts with the reserved prefix `0b11`.
    #[error("a vector length uses the reserved 0b11 prefix")]
    ReservedLengthPrefix,
    /// A vector length is not in its shortest encoding.
    #[error("a vector length is not minimally encoded")]
    NonMinimalLength,
    /// Bytes remain after the KeyPackage.
    #[error("bytes remain after the key package")]
    TrailingBytes,
    /// The KeyPackage's own `version` is not MLS 1.0.
    #[error("the key package version is not MLS 1.0")]
    Version,
    /// The leaf's `leaf_node_source` is not `key_package`.
    #[error("the leaf node source is not key_package")]
    LeafNodeSource,
    /// The credential is neither `basic` nor `x509`.
    #[error("the credential type is neither basic nor x509")]
    CredentialType,
    /// The KeyPackage is too long for its KeyPackageRef input to be encoded (2^30 bytes).
    #[error("the key package is too long")]
    TooLong,
}

impl Opaque {
    /// A short stable name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Truncated => "truncated",
            Self::ReservedLengthPrefix => "reserved_length_prefix",
            Self::NonMinimalLength => "non_minimal_length",
            Self::TrailingBytes => "trailing_bytes",
            Self::Version => "version",
            Self::LeafNodeSource => "leaf_node_source",
            Self::CredentialType => "credential_type",
            Self::TooLong => "too_long",
        }
    }
}

/// Reads a whole MLSMessage (header included) as a KeyPackage and returns its facts.
pub fn read(message: &[u8]) -> Result<KeyPackageFacts, Opaque> {
    parse(message).map(|view| view.facts())
}

/// Parses a whole MLSMessage (header included) into a view borrowing from it.
pub fn parse(message: &[u8]) -> Result<KeyPackageView<'_>, Opaque> {
    let key_package = message.strip_prefix(&HEADER).ok_or(Opaque::Header)?;
    let mut cursor = Cursor::new(key_package);
    if cursor.read_u16()? != MLS10 {
        return Err(Opaque::Version);
    }
    let cipher_suite = cursor.read_u16()?;
    let init_key = cursor.read_vector()?;
    let leaf_node = LeafNodeView::parse(&mut cursor)?;
    let extensions = Extensions::parse(cursor.read_vector()?)?;
    let signature = cursor.read_vector()?;
    if !cursor.is_empty() {
        return Err(Opaque::TrailingBytes);
    }
    if key_package.len() > MAX_VECTOR_LEN {
        return Err(Opaque::TooLong);
    }
    Ok(KeyPackageView {
        bytes: key_package,
        cipher_suite,
        init_key,
        leaf_node,
        extensions,
        signature,
    })
}

/// Serializes a view back into an MLSMessage; for a parsed view, exactly the bytes it came from.
pub fn encode(view: &KeyPackageView<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER.len() + view.bytes.len());
    out.extend_from_slice(&HEADER);
    out.extend_from_slice(&MLS10.to_be_bytes());
    out.extend_from_slice(&view.cipher_suite.to_be_bytes());
    put_vector(&mut out, view.init_key);
    view.leaf_node.encode(&mut out);
    view.extensions.encode(&mut out);
    put_vector(&mut out, view.signature);
    out
}

/// A parsed KeyPackage (RFC 9420 §10) with inner `version` MLS 1.0, borrowing from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPackageView<'a> {
    /// The serialized KeyPackage: the message without its 4-byte header.
    pub bytes: &'a [u8],
    /// `cipher_suite`.
    pub cipher_suite: u16,
    /// `init_key`.
    pub init_key: &'a [u8],
    /// `leaf_node`.
    pub leaf_node: LeafNodeView<'a>,
    /// `extensions`.
    pub extensions: Extensions<'a>,
    /// `signature`.
    pub signature: &'a [u8],
}

impl KeyPackageView<'_> {
    /// The facts the server keeps; hashes the KeyPackage bytes once, straight from the input.
    pub fn facts(&self) -> KeyPackageFacts {
        KeyPackageFacts {
            cipher_suite: self.cipher_suite,
            not_before: self.leaf_node.lifetime.not_before,
            not_after: self.leaf_node.lifetime.not_after,
            signature_key_fingerprint: Fingerprint::of_public_key(self.leaf_node.signature_key),
            key_package_ref: key_package_ref(self.cipher_suite, self.bytes),
            last_resort: self
                .extensions
                .iter()
                .any(|e| e.extension_type == LAST_RESORT_EXTENSION),
        }
    }
}

/// A parsed LeafNode (RFC 9420 §7.2) of source `key_package`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafNodeView<'a> {
    /// `encryption_key`.
    pub encryption_key: &'a [u8],
    /// `signature_key`.
    pub signature_key: &'a [u8],
    /// `credential`.
    pub credential: CredentialView<'a>,
    /// `capabilities`.
    pub capabilities: CapabilitiesView<'a>,
    /// `lifetime`, present because the source is `key_package`.
    pub lifetime: Lifetime,
    /// `extensions`.
    pub extensions: Extensions<'a>,
    /// `signature`.
    pub signature: &'a [u8],
}

impl<'a> LeafNodeView<'a> {
    fn parse(cursor: &mut Cursor<'a>) -> Result<Self, Opaque> {
        let encryption_key = cursor.read_vector()?;
        let signature_key = cursor.read_vector()?;
        let credential = CredentialView::parse(cursor)?;
        let capabilities = CapabilitiesView::parse(cursor)?;
        if cursor.read_u8()? != SOURCE_KEY_PACKAGE {
            return Err(Opaque::LeafNodeSource);
        }
        let lifetime = Lifetime {
            not_before: cursor.read_u64()?,
            not_after: cursor.read_u64()?,
        };
        let extensions = Extensions::parse(cursor.read_vector()?)?;
        let signature = cursor.read_vector()?;
        Ok(Self {
            encryption_key,
            signature_key,
            credential,
            capabilities,
            lifetime,
            extensions,
            signature,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_vector(out, self.encryption_key);
        put_vector(out, self.signature_key);
        self.credential.encode(out);
        self.capabilities.encode(out);
        out.push(SOURCE_KEY_PACKAGE);
        out.extend_from_slice(&self.lifetime.not_before.to_be_bytes());
        out.extend_from_slice(&self.lifetime.not_after.to_be_bytes());
        self.extensions.encode(out);
        put_vector(out, self.signature);
    }
}

/// `Lifetime` (RFC 9420 §7.2): Unix seconds, taken as they are (no ordering is implied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// `not_before`.
    pub not_before: u64,
    /// `not_after`.
    pub not_after: u64,
}

/// A `Credential` (RFC 9420 §5.3) of a type the reader knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialView<'a> {
    /// `basic`: an opaque identity.
    Basic {
        /// `identity`.
        identity: &'a [u8],
    },
    /// `x509`: a chain of DER certificates (not decoded further).
    X509 {
        /// `certificates`.
        certificates: Certificates<'a>,
    },
}

impl<'a> CredentialView<'a> {
    fn parse(cursor: &mut Cursor<'a>) -> Result<Self, Opaque> {
        match cursor.read_u16()? {
            CREDENTIAL_BASIC => Ok(Self::Basic {
                identity: cursor.read_vector()?,
            }),
            CREDENTIAL_X509 => Ok(Self::X509 {
                certificates: Certificates::parse(cursor.read_vector()?)?,
            }),
            _ => Err(Opaque::CredentialType),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Basic { identity } => {
                out.extend_from_slice(&CREDENTIAL_BASIC.to_be_bytes());
                put_vector(out, identity);
            }
            Self::X509 { certificates } => {
                out.extend_from_slice(&CREDENTIAL_X509.to_be_bytes());
                put_nested(out, |out| {
                    for certificate in certificates.iter() {
                        put_vector(out, certificate);
                    }
                });
            }
        }
    }
}

/// `Capabilities` (RFC 9420 §7.2): five lists of 16-bit code points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapabilitiesView<'a> {
    /// `versions`.
    pub versions: U16List<'a>,
    /// `cipher_suites`.
    pub cipher_suites: U16List<'a>,
    /// `extensions`.
    pub extensions: U16List<'a>,
    /// `proposals`.
    pub proposals: U16List<'a>,
    /// `credentials`.
    pub credentials: U16List<'a>,
}

impl<'a> CapabilitiesView<'a> {
    fn parse(cursor: &mut Cursor<'a>) -> Result<Self, Opaque> {
        Ok(Self {
            versions: U16List::parse(cursor.read_vector()?)?,
            cipher_suites: U16List::parse(cursor.read_vector()?)?,
            extensions: U16List::parse(cursor.read_vector()?)?,
            proposals: U16List::parse(cursor.read_vector()?)?,
            credentials: U16List::parse(cursor.read_vector()?)?,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for list in [
            self.versions,
            self.cipher_suites,
            self.extensions,
            self.proposals,
            self.credentials,
        ] {
            put_nested(out, |out| {
                for value in list.iter() {
                    out.extend_from_slice(&value.to_be_bytes());
                }
            });
        }
    }
}

/// The contents of a vector of `uint16`, checked to hold a whole number of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U16List<'a>(&'a [u8]);

impl<'a> U16List<'a> {
    fn parse(contents: &'a [u8]) -> Result<Self, Opaque> {
        if !contents.len().is_multiple_of(2) {
            return Err(Opaque::Truncated);
        }
        Ok(Self(contents))
    }

    /// The values, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
    }
}

/// One `Extension` (RFC 9420 §13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension<'a> {
    /// `extension_type`.
    pub extension_type: u16,
    /// `extension_data`.
    pub extension_data: &'a [u8],
}

/// The contents of an `Extension extensions<V>` vector, checked to decode exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extensions<'a>(&'a [u8]);

impl<'a> Extensions<'a> {
    fn parse(contents: &'a [u8]) -> Result<Self, Opaque> {
        let mut cursor = Cursor::new(contents);
        while !cursor.is_empty() {
            cursor.read_u16()?;
            cursor.read_vector()?;
        }
        Ok(Self(contents))
    }

    /// The extensions, in order.
    pub fn iter(&self) -> impl Iterator<Item = Extension<'a>> + 'a {
        let mut cursor = Cursor::new(self.0);
        // The contents were checked when parsed, so the iteration ends only at their end.
        std::iter::from_fn(move || {
            if cursor.is_empty() {
                return None;
            }
            Some(Extension {
                extension_type: cursor.read_u16().ok()?,
                extension_data: cursor.read_vector().ok()?,
            })
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_nested(out, |out| {
            for extension in self.iter() {
                out.extend_from_slice(&extension.extension_type.to_be_bytes());
                put_vector(out, extension.extension_data);
            }
        });
    }
}

/// The contents of a `Certificate certificates<V>` vector, checked to decode exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Certificates<'a>(&'a [u8]);

impl<'a> Certificates<'a> {
    fn parse(contents: &'a [u8]) -> Result<Self, Opaque> {
        let mut cursor = Cursor::new(contents);
        while !cursor.is_empty() {
            cursor.read_vector()?;
        }
        Ok(Self(contents))
    }

    /// Each certificate's `cert_data`, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut cursor = Cursor::new(self.0);
        std::iter::from_fn(move || {
            if cursor.is_empty() {
                return None;
            }
            cursor.read_vector().ok()
        })
    }
}

/// The KeyPackageRef of a serialized KeyPackage, for the suites whose hash RFC 9420 names.
fn key_package_ref(cipher_suite: u16, key_package: &[u8]) -> Option<Vec<u8>> {
    match cipher_suite {
        0x0001..=0x0003 => Some(ref_hash::<Sha256>(key_package)),
        0x0004..=0x0006 => Some(ref_hash::<Sha512>(key_package)),
        0x0007 => Some(ref_hash::<Sha384>(key_package)),
        _ => None,
    }
}

/// `RefHash(label, value) = Hash(struct { opaque label<V>; opaque value<V>; })`, fed piecewise so
/// the value is hashed in place, once.
fn ref_hash<D: Digest>(value: &[u8]) -> Vec<u8> {
    let mut hasher = D::new();
    let (label_len, n) = varint(KEY_PACKAGE_REF_LABEL.len());
    hasher.update(&label_len[..n]);
    hasher.update(KEY_PACKAGE_REF_LABEL);
    // `parse` refuses KeyPackages too long for a 30-bit length.
    let (value_len, n) = varint(value.len());
    hasher.update(&value_len[..n]);
    hasher.update(value);
    hasher.finalize().to_vec()
}

/// The minimal RFC 9420 §2.1.2 encoding of `len` (at most 2^30 - 1) and its size in bytes.
fn varint(len: usize) -> ([u8; 4], usize) {
    let len = len.min(MAX_VECTOR_LEN) as u32;
    if len < 1 << 6 {
        ([len as u8, 0, 0, 0], 1)
    } else if len < 1 << 14 {
        let [a, b] = (len as u16 | 0x4000).to_be_bytes();
        ([a, b, 0, 0], 2)
    } else {
        ((len | 0x8000_0000).to_be_bytes(), 4)
    }
}

/// Appends `opaque data<V>`.
fn put_vector(out: &mut Vec<u8>, data: &[u8]) {
    let (len, n) = varint(data.len());
    out.extend_from_slice(&len[..n]);
    out.extend_from_slice(data);
}

/// Appends a vector whose contents `write` produces.
fn put_nested(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let mut contents = Vec::new();
    write(&mut contents);
    put_vector(out, &contents);
}

/// A reading position in untrusted bytes; every read is bounds-checked and never allocates.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Opaque> {
        if n > self.rest.len() {
            return Err(Opaque::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], Opaque> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn read_u8(&mut self) -> Result<u8, Opaque> {
        Ok(self.take_array::<1>()?[0])
    }

    fn read_u16(&mut self) -> Result<u16, Opaque> {
        self.take_array().map(u16::from_be_bytes)
    }

    fn read_u64(&mut self) -> Result<u64, Opaque> {
        self.take_array().map(u64::from_be_bytes)
    }

    /// Reads `opaque data<V>`: a minimal §2.1.2 length, then that many bytes.
    fn read_vector(&mut self) -> Result<&'a [u8], Opaque> {
        let first = self.read_u8()?;
        let len = match first >> 6 {
            0b00 => usize::from(first),
            0b01 => {
                let len = usize::from(u16::from_be_bytes([first & 0x3f, self.read_u8()?]));
                if len < 1 << 6 {
                    return Err(Opaque::NonMinimalLength);
                }
                len
            }
            0b10 => {
                let [b, c, d] = self.take_array()?;
                let len = u32::from_be_bytes([first & 0x3f, b, c, d]) as usize;
                if len < 1 << 14 {
                    return Err(Opaque::NonMinimalLength);
                }
                len
            }
            _ => return Err(Opaque::ReservedLengthPrefix),
        };
        self.take(len)
    }
}

/// A minimal readable KeyPackage message (suite 1, basic credential, one-byte lengths) signed by
/// `signature_key`, with `init_key` (under 64 bytes) so that packages differ: for tests.
#[cfg(any(test, feature = "conformance"))]
pub fn sample_key_package(
    init_key: &[u8],
    signature_key: &[u8],
    not_before: u64,
    not_after: u64,
) -> Vec<u8> {
    sample_key_package_of_suite(1, init_key, signature_key, not_before, not_after)
}

/// [`sample_key_package`] of cipher suite `suite`.
#[cfg(any(test, feature = "conformance"))]
pub fn sample_key_package_of_suite(
    suite: u16,
    init_key: &[u8],
    signature_key: &[u8],
    not_before: u64,
    not_after: u64,
) -> Vec<u8> {
    fn vector(out: &mut Vec<u8>, data: &[u8]) {
        let len = u8::try_from(data.len()).ok().filter(|l| *l < 64);
        out.push(len.expect("one-byte lengths only"));
        out.extend_from_slice(data);
    }
    let mut out = vec![0, 1, 0, 5]; // MLS 1.0, mls_key_package
    out.extend_from_slice(&[0, 1]); // version mls10
    out.extend_from_slice(&suite.to_be_bytes());
    vector(&mut out, init_key);
    vector(&mut out, &[2; 32]); // encryption_key
    vector(&mut out, signature_key);
    out.extend_from_slice(&[0, 1]); // basic credential
    vector(&mut out, b"bob");
    for list in [&[0, 1][..], &[0, 1], &[], &[], &[0, 1]] {
        vector(&mut out, list); // capabilities
    }
    out.push(1); // leaf_node_source key_package
    out.extend_from_slice(&not_before.to_be_bytes());
    out.extend_from_slice(&not_after.to_be_bytes());
    vector(&mut out, &[]); // leaf extensions
    vector(&mut out, &[3; 8]); // leaf signature
    vector(&mut out, &[]); // extensions
    vector(&mut out, &[4; 8]); // signature
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a minimal-length vector, as test builders need.
    fn vector(out: &mut Vec<u8>, data: &[u8]) {
        put_vector(out, data);
    }

    /// The parts of a hand-built key package, each already encoded where it is structured.
    struct Parts {
        version: u16,
        suite: u16,
        signature_key: Vec<u8>,
        credential: Vec<u8>,
        source: u8,
        not_before: u64,
        not_after: u64,
        extensions: Vec<u8>,
    }

    impl Default for Parts {
        fn default() -> Self {
            let mut credential = CREDENTIAL_BASIC.to_be_bytes().to_vec();
            vector(&mut credential, b"alice");
            Self {
                version: MLS10,
                suite: 1,
                signature_key: vec![7; 32],
                credential,
                source: SOURCE_KEY_PACKAGE,
                not_before: 1_000,
                not_after: 2_000,
                extensions: Vec::new(),
            }
        }
    }

    impl Parts {
        fn build(&self) -> Vec<u8> {
            let mut out = HEADER.to_vec();
            out.extend_from_slice(&self.version.to_be_bytes());
            out.extend_from_slice(&self.suite.to_be_bytes());
            vector(&mut out, &[1; 32]); // init_key
            vector(&mut out, &[2; 32]); // encryption_key
            vector(&mut out, &self.signature_key);
            out.extend_from_slice(&self.credential);
            vector(&mut out, &[0, 1]); // versions
            vector(&mut out, &[0, 1, 0, 2, 0, 3]); // cipher_suites
            vector(&mut out, &[]); // extensions
            vector(&mut out, &[]); // proposals
            vector(&mut out, &[0, 1, 0, 2]); // credentials
            out.push(self.source);
            out.extend_from_slice(&self.not_before.to_be_bytes());
            out.extend_from_slice(&self.not_after.to_be_bytes());
            vector(&mut out, &[]); // leaf extensions
            vector(&mut out, &[3; 64]); // leaf signature
            vector(&mut out, &self.extensions);
            vector(&mut out, &[4; 64]); // signature
            out
        }
    }

    fn extension(extension_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = extension_type.to_be_bytes().to_vec();
        vector(&mut out, data);
        out
    }

    fn expected_ref<D: Digest>(message: &[u8]) -> Vec<u8> {
        let mut input = vec![28];
        input.extend_from_slice(KEY_PACKAGE_REF_LABEL);
        vector(&mut input, &message[4..]);
        D::digest(&input).to_vec()
    }

    #[test]
    fn reads_the_facts_of_a_well_formed_package() {
        let message = Parts::default().build();
        let facts = read(&message).expect("readable");
        assert_eq!(facts.cipher_suite, 1);
        assert_eq!((facts.not_before, facts.not_after), (1_000, 2_000));
        assert_eq!(
            facts.signature_key_fingerprint,
            Fingerprint::of_public_key(&[7; 32])
        );
        assert_eq!(
            facts.key_package_ref,
            Some(expected_ref::<Sha256>(&message))
        );
        assert!(!facts.last_resort);
        assert_eq!(encode(&parse(&message).unwrap()), message);
    }

    #[test]
    fn last_resort_is_read_from_the_key_package_extensions() {
        let mut extensions = extension(0xff00, b"x");
        extensions.extend(extension(LAST_RESORT_EXTENSION, b""));
        let message = Parts {
            extensions,
            ..Parts::default()
        }
        .build();
        assert!(read(&message).unwrap().last_resort);
        assert_eq!(encode(&parse(&message).unwrap()), message);
    }

    #[test]
    fn a_header_other_than_mls10_key_package_is_opaque() {
        let mut message = Parts::default().build();
        message[3] = 0x01;
        assert_eq!(read(&message), Err(Opaque::Header));
        assert_eq!(read(&[0, 1, 0]), Err(Opaque::Header));
        assert_eq!(read(&HEADER), Err(Opaque::Truncated));
    }

    #[test]
    fn a_wrong_inner_version_is_opaque() {
        let message = Parts {
            version: 2,
            ..Parts::default()
        }
        .build();
        assert_eq!(read(&message), Err(Opaque::Version));
    }

    #[test]
    fn leaf_node_sources_other_than_key_package_are_opaque() {
        for source in [0, 2, 3, 255] {
            let message = Parts {
                source,
                ..Parts::default()
            }
            .build();
            assert_eq!(read(&message), Err(Opaque::LeafNodeSource), "{source}");
        }
    }

    #[test]
    fn unknown_credential_types_are_opaque() {
        for credential_type in [0u16, 3, 0xf000] {
            let mut credential = credential_type.to_be_bytes().to_vec();
            vector(&mut credential, b"alice");
            let message = Parts {
                credential,
                ..Parts::default()
            }
            .build();
            assert_eq!(read(&message), Err(Opaque::CredentialType));
        }
    }

    #[test]
    fn x509_credentials_are_read_certificate_by_certificate() {
        let mut certificates = Vec::new();
        vector(&mut certificates, &[0x30; 100]);
        vector(&mut certificates, &[0x31; 3]);
        let mut credential = CREDENTIAL_X509.to_be_bytes().to_vec();
        vector(&mut credential, &certificates);
        let message = Parts {
            credential,
            ..Parts::default()
        }
        .build();
        let view = parse(&message).expect("readable");
        let CredentialView::X509 { certificates } = view.leaf_node.credential else {
            panic!("an x509 credential");
        };
        assert_eq!(certificates.iter().count(), 2);
        assert_eq!(encode(&view), message);

        // A certificate chain whose last entry is cut short is not a chain.
        let mut credential = CREDENTIAL_X509.to_be_bytes().to_vec();
        vector(&mut credential, &[0x05, 1, 2]);
        let message = Parts {
            credential,
            ..Parts::default()
        }
        .build();
        assert_eq!(read(&message), Err(Opaque::Truncated));
    }

    #[test]
    fn varint_lengths_decode_in_all_three_sizes() {
        for len in [0, 63, 64, 16_383, 16_384, 70_000] {
            let message = Parts {
                signature_key: vec![9; len],
                ..Parts::default()
            }
            .build();
            let facts = read(&message).expect("readable");
            assert_eq!(
                facts.signature_key_fingerprint,
                Fingerprint::of_public_key(&vec![9; len])
            );
            assert_eq!(encode(&parse(&message).unwrap()), message, "{len}");
        }
    }

    /// Replaces the one-byte length of the 32-byte signature key with `prefix`.
    fn with_signature_key_length(prefix: &[u8]) -> Vec<u8> {
        let message = Parts::default().build();
        // header 4, version 2, suite 2, init_key 1+32, encryption_key 1+32
        let at = 4 + 2 + 2 + 33 + 33;
        assert_eq!(message[at], 32);
        [&message[..at], prefix, &message[at + 1..]].concat()
    }

    #[test]
    fn non_minimal_lengths_are_opaque() {
        assert!(read(&with_signature_key_length(&[32])).is_ok());
        assert_eq!(
            read(&with_signature_key_length(&[0x40, 32])),
            Err(Opaque::NonMinimalLength)
        );
        assert_eq!(
            read(&with_signature_key_length(&[0x80, 0, 0, 32])),
            Err(Opaque::NonMinimalLength)
        );
        // 64 needs two bytes, 16384 four: their shortest encodings are accepted elsewhere, but a
        // four-byte 64 is still non-minimal.
        let mut four_byte_64 = Parts {
            signature_key: vec![9; 64],
            ..Parts::default()
        }
        .build();
        let at = 4 + 2 + 2 + 33 + 33;
        assert_eq!(four_byte_64[at..at + 2], [0x40, 64]);
        four_byte_64.splice(at..at + 2, [0x80, 0, 0, 64]);
        assert_eq!(read(&four_byte_64), Err(Opaque::NonMinimalLength));
    }

    #[test]
    fn the_reserved_length_prefix_is_opaque() {
        for prefix in [&[0xc0, 0, 0, 0, 0, 0, 0, 32][..], &[0xff][..]] {
            assert_eq!(
                read(&with_signature_key_length(prefix)),
                Err(Opaque::ReservedLengthPrefix)
            );
        }
    }

    #[test]
    fn huge_lengths_are_truncation_not_allocation() {
        assert_eq!(
            read(&with_signature_key_length(&[0xbf, 0xff, 0xff, 0xff])),
            Err(Opaque::Truncated)
        );
        assert_eq!(
            read(&with_signature_key_length(&[0x7f, 0xff])),
            Err(Opaque::Truncated)
        );
    }

    #[test]
    fn trailing_bytes_are_opaque() {
        let mut message = Parts::default().build();
        message.push(0);
        assert_eq!(read(&message), Err(Opaque::TrailingBytes));
    }

    #[test]
    fn every_truncation_is_opaque() {
        let message = Parts::default().build();
        for len in 0..message.len() {
            assert!(read(&message[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn malformed_inner_lists_are_opaque() {
        // An extension list whose last extension lacks its data.
        let message = Parts {
            extensions: vec![0x00, 0x0a],
            ..Parts::default()
        }
        .build();
        assert_eq!(read(&message), Err(Opaque::Truncated));
        // An inner length with the reserved prefix.
        let message = Parts {
            extensions: vec![0x00, 0x0a, 0xc0],
            ..Parts::default()
        }
        .build();
        assert_eq!(read(&message), Err(Opaque::ReservedLengthPrefix));
        // An inner non-minimal length.
        let message = Parts {
            extensions: vec![0x00, 0x0a, 0x40, 0x00],
            ..Parts::default()
        }
        .build();
        assert_eq!(read(&message), Err(Opaque::NonMinimalLength));
    }

    #[test]
    fn lifetimes_are_taken_as_they_are_up_to_u64_max() {
        for (not_before, not_after) in [(u64::MAX, u64::MAX), (0, u64::MAX), (u64::MAX, 0)] {
            let message = Parts {
                not_before,
                not_after,
                ..Parts::default()
            }
            .build();
            let facts = read(&message).expect("readable");
            assert_eq!((facts.not_before, facts.not_after), (not_before, not_after));
        }
    }

    #[test]
    fn ref_hashes_follow_the_suite() {
        for suite in 1..=7 {
            let message = Parts {
                suite,
                ..Parts::default()
            }
            .build();
            let expected = match suite {
                1..=3 => expected_ref::<Sha256>(&message),
                4..=6 => expected_ref::<Sha512>(&message),
                _ => expected_ref::<Sha384>(&message),
            };
            let facts = read(&message).expect("readable");
            assert_eq!(facts.key_package_ref, Some(expected), "{suite}");
        }
        let lengths: Vec<_> = (1..=7)
            .map(|suite| {
                let message = Parts {
                    suite,
                    ..Parts::default()
                }
                .build();
                read(&message).unwrap().key_package_ref.unwrap().len()
            })
            .collect();
        assert_eq!(lengths, [32, 32, 32, 64, 64, 64, 48]);
    }

    #[test]
    fn unknown_suites_are_readable_without_a_ref() {
        for suite in [0, 8, 0x0a0a, 0xffff] {
            let message = Parts {
                suite,
                ..Parts::default()
            }
            .build();
            let facts = read(&message).expect("readable");
            assert_eq!(facts.cipher_suite, suite);
            assert_eq!(facts.key_package_ref, None);
        }
    }

    #[test]
    fn varint_encodes_at_the_size_boundaries() {
        assert_eq!(varint(63), ([63, 0, 0, 0], 1));
        assert_eq!(varint(64), ([0x40, 64, 0, 0], 2));
        assert_eq!(varint(16_383), ([0x7f, 0xff, 0, 0], 2));
        assert_eq!(varint(16_384), ([0x80, 0, 0x40, 0], 4));
        assert_eq!(varint(MAX_VECTOR_LEN), ([0xbf, 0xff, 0xff, 0xff], 4));
    }
}
