//! The key-package reader against two independent MLS implementations: for hundreds of packages
//! built by openmls and by mls-rs, the facts it reads equal what each library reports.

use keypackage_server::mls_codec::{self, KeyPackageFacts, Opaque};

/// Packages built with openmls 0.6, and the facts openmls reports about them.
pub(crate) mod with_openmls {
    use keypackage_server::{key_package::Fingerprint, mls_codec::KeyPackageFacts};
    use openmls::prelude::{tls_codec::Serialize as _, *};
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    /// The suites openmls' RustCrypto provider supports: 1, 2 and 3.
    pub(crate) const SUITES: [Ciphersuite; 3] = [
        Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
        Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256,
        Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519,
    ];

    /// An extension type no one registered, listed in the leaf's capabilities when used there.
    pub(crate) const PRIVATE_EXTENSION: u16 = 0xff00;

    /// One openmls client: its provider (which keeps private keys), signer and credential.
    pub(crate) struct Member {
        pub(crate) provider: OpenMlsRustCrypto,
        pub(crate) signer: SignatureKeyPair,
        pub(crate) credential: CredentialWithKey,
        pub(crate) suite: Ciphersuite,
    }

    /// How to vary a generated package.
    #[derive(Clone, Copy, Default)]
    pub(crate) struct Options {
        pub(crate) last_resort: bool,
        /// Seconds from now to `not_after` (`not_before` is always now - 1 h in openmls).
        pub(crate) lifetime_secs: Option<u64>,
        /// A private extension in the KeyPackage's extensions, with this many data bytes.
        pub(crate) key_package_extension: Option<usize>,
        /// A private extension in the leaf node's extensions, with this many data bytes.
        pub(crate) leaf_extension: Option<usize>,
    }

    impl Member {
        /// A member with a basic credential.
        pub(crate) fn basic(suite: Ciphersuite, identity: &[u8]) -> Self {
            Self::new(suite, BasicCredential::new(identity.to_vec()).into())
        }

        /// A member with an x509 credential over these (not necessarily DER) certificates.
        pub(crate) fn x509(suite: Ciphersuite, certificates: &[Vec<u8>]) -> Self {
            // openmls keeps the credential's content as the serialized `certificates` contents.
            let mut chain = Vec::new();
            for certificate in certificates {
                VLBytes::new(certificate.clone())
                    .tls_serialize(&mut chain)
                    .expect("serialize certificate");
            }
            Self::new(suite, Credential::new(CredentialType::X509, chain))
        }

        /// A member with a credential of any type.
        pub(crate) fn new(suite: Ciphersuite, credential: Credential) -> Self {
            let provider = OpenMlsRustCrypto::default();
            let signer = SignatureKeyPair::new(suite.signature_algorithm()).expect("keys");
            signer.store(provider.storage()).expect("store keys");
            let credential = CredentialWithKey {
                credential,
                signature_key: signer.to_public_vec().into(),
            };
            Self {
                provider,
                signer,
                credential,
                suite,
            }
        }

        /// A fresh package (private parts kept in this member's provider) and its MLSMessage.
        pub(crate) fn key_package(&self, options: Options) -> (KeyPackage, Vec<u8>) {
            let mut builder = KeyPackage::builder();
            if options.last_resort {
                builder = builder.mark_as_last_resort();
            }
            if let Some(secs) = options.lifetime_secs {
                builder = builder.key_package_lifetime(Lifetime::new(secs));
            }
            if let Some(len) = options.key_package_extension {
                builder = builder.key_package_extensions(private_extension(len));
            }
            let mut credentials = vec![CredentialType::Basic, CredentialType::X509];
            credentials.push(self.credential.credential.credential_type());
            credentials.dedup();
            let leaf_extensions: &[ExtensionType] = if options.leaf_extension.is_some() {
                &[ExtensionType::Unknown(PRIVATE_EXTENSION)]
            } else {
                &[]
            };
            builder = builder.leaf_node_capabilities(Capabilities::new(
                None,
                None,
                Some(leaf_extensions),
                None,
                Some(&credentials),
            ));
            if let Some(len) = options.leaf_extension {
                builder = builder.leaf_node_extensions(private_extension(len));
            }
            let bundle = builder
                .build(
                    self.suite,
                    &self.provider,
                    &self.signer,
                    self.credential.clone(),
                )
                .expect("key package");
            let key_package = bundle.key_package().clone();
            let bytes = MlsMessageOut::from(key_package.clone())
                .tls_serialize_detached()
                .expect("serialize");
            (key_package, bytes)
        }
    }

    fn private_extension(len: usize) -> Extensions {
        let data = (0..len).map(|i| i as u8).collect();
        Extensions::single(Extension::Unknown(
            PRIVATE_EXTENSION,
            UnknownExtension(data),
        ))
    }

    /// What openmls says about a package: its suite, lifetime, signature key, ref and last-resort
    /// mark.
    pub(crate) fn facts(key_package: &KeyPackage, provider: &OpenMlsRustCrypto) -> KeyPackageFacts {
        // openmls keeps the lifetime private; its serialization is `source (1) || not_before ||
        // not_after`, the same bytes the reader reads, so this checks the reader's offsets.
        let source = key_package
            .leaf_node()
            .leaf_node_source()
            .tls_serialize_detached()
            .expect("serialize source");
        assert_eq!(source.len(), 17, "a key_package source with a lifetime");
        assert_eq!(source[0], 1);
        let not_before = u64::from_be_bytes(source[1..9].try_into().unwrap());
        let not_after = u64::from_be_bytes(source[9..17].try_into().unwrap());
        KeyPackageFacts {
            cipher_suite: u16::from(key_package.ciphersuite()),
            not_before,
            not_after,
            signature_key_fingerprint: Fingerprint::of_public_key(
                key_package.leaf_node().signature_key().as_slice(),
            ),
            key_package_ref: Some(
                key_package
                    .hash_ref(provider.crypto())
                    .expect("hash ref")
                    .as_slice()
                    .to_vec(),
            ),
            last_resort: key_package.last_resort(),
        }
    }
}

/// Packages built with mls-rs (RustCrypto provider), and the facts mls-rs reports about them.
pub(crate) mod with_mls_rs {
    use keypackage_server::{key_package::Fingerprint, mls_codec::KeyPackageFacts};
    use mls_rs::{
        client_builder::MlsConfig,
        identity::{
            basic::{BasicCredential, BasicIdentityProvider},
            Credential, CustomCredential, SigningIdentity,
        },
        time::MlsTime,
        CipherSuite, CipherSuiteProvider, Client, CryptoProvider, Extension, ExtensionList,
        KeyPackage, MlsMessage,
    };
    use mls_rs_crypto_rustcrypto::RustCryptoProvider;
    use std::time::Duration;

    /// Suites 1, 2 and 3, and 7 (P-384, whose ref is SHA-384).
    pub(crate) const SUITES: [CipherSuite; 4] = [
        CipherSuite::CURVE25519_AES128,
        CipherSuite::P256_AES128,
        CipherSuite::CURVE25519_CHACHA,
        CipherSuite::P384_AES256,
    ];

    /// `last_resort` (0x000A); mls-rs knows it only behind a feature, so it is set raw here.
    pub(crate) const LAST_RESORT: u16 = 0x000a;
    /// A private extension type, listed in the client's capabilities.
    pub(crate) const PRIVATE_EXTENSION: u16 = 0xff01;

    /// A client with a fixed identity and key-package lifetime.
    pub(crate) fn client(
        suite: CipherSuite,
        credential: Credential,
        lifetime: Duration,
    ) -> Client<impl MlsConfig> {
        let crypto = RustCryptoProvider::default();
        let suite_provider = crypto
            .cipher_suite_provider(suite)
            .expect("supported suite");
        let (secret, public) = suite_provider.signature_key_generate().expect("keys");
        Client::builder()
            .identity_provider(BasicIdentityProvider)
            .crypto_provider(crypto)
            .extension_types([PRIVATE_EXTENSION.into(), LAST_RESORT.into()])
            .key_package_lifetime(lifetime)
            .signing_identity(SigningIdentity::new(credential, public), secret, suite)
            .build()
    }

    /// A basic credential.
    pub(crate) fn basic(identity: &[u8]) -> Credential {
        BasicCredential::new(identity.to_vec()).into_credential()
    }

    /// A credential of a type the reader does not know.
    pub(crate) fn custom(credential_type: u16, data: &[u8]) -> Credential {
        Credential::Custom(CustomCredential::new(credential_type.into(), data.to_vec()))
    }

    /// How to vary a generated package.
    #[derive(Clone, Copy, Default)]
    pub(crate) struct Options {
        pub(crate) last_resort: bool,
        /// `not_before` in Unix seconds; mls-rs uses it as its "now" (default: the clock).
        pub(crate) not_before: Option<u64>,
        /// A private extension in the KeyPackage's extensions, with this many data bytes.
        pub(crate) key_package_extension: Option<usize>,
        /// A private extension in the leaf node's extensions, with this many data bytes.
        pub(crate) leaf_extension: Option<usize>,
    }

    fn private_extension(len: usize) -> Extension {
        Extension::new(
            PRIVATE_EXTENSION.into(),
            (0..len).map(|i| i as u8).collect(),
        )
    }

    /// A fresh package (private parts kept in the client) and its serialized MLSMessage.
    pub(crate) fn key_package(
        client: &Client<impl MlsConfig>,
        options: Options,
    ) -> (KeyPackage, Vec<u8>) {
        let mut extensions = ExtensionList::new();
        if options.last_resort {
            extensions.set(Extension::new(LAST_RESORT.into(), Vec::new()));
        }
        if let Some(len) = options.key_package_extension {
            extensions.set(private_extension(len));
        }
        let mut leaf_extensions = ExtensionList::new();
        if let Some(len) = options.leaf_extension {
            leaf_extensions.set(private_extension(len));
        }
        let message = client
            .generate_key_package_message(
                extensions,
                leaf_extensions,
                options.not_before.map(MlsTime::from),
            )
            .expect("key package");
        let bytes = message.to_bytes().expect("serialize");
        let key_package = message.into_key_package().expect("a key package");
        (key_package, bytes)
    }

    /// Reads a serialized MLSMessage back as mls-rs does.
    pub(crate) fn parse(bytes: &[u8]) -> KeyPackage {
        MlsMessage::from_bytes(bytes)
            .expect("an MLSMessage")
            .into_key_package()
            .expect("a key package")
    }

    /// What mls-rs says about a package. mls-rs exposes `not_after` (its expiration) but not
    /// `not_before`, which it sets to the time it was given: the caller passes that.
    pub(crate) fn facts(key_package: &KeyPackage, not_before: u64) -> KeyPackageFacts {
        let suite = key_package.cipher_suite();
        let suite_provider = RustCryptoProvider::default()
            .cipher_suite_provider(suite)
            .expect("supported suite");
        KeyPackageFacts {
            cipher_suite: u16::from(suite),
            not_before,
            not_after: key_package
                .expiration()
                .expect("a lifetime")
                .seconds_since_epoch(),
            signature_key_fingerprint: Fingerprint::of_public_key(
                key_package.signing_identity().signature_key.as_bytes(),
            ),
            key_package_ref: Some(
                key_package
                    .to_reference(&suite_provider)
                    .expect("reference")
                    .to_vec(),
            ),
            last_resort: key_package.extensions.has_extension(LAST_RESORT.into()),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Reads a package, checking on the way that its view re-encodes to the same bytes.
fn read(bytes: &[u8]) -> Result<KeyPackageFacts, Opaque> {
    if let Ok(view) = mls_codec::parse(bytes) {
        assert_eq!(
            mls_codec::encode(&view),
            bytes,
            "re-encoding a readable package"
        );
    }
    mls_codec::read(bytes)
}

/// Identities of every size class: empty, one-byte length, the 63/64 boundary, long.
fn identity(i: usize) -> Vec<u8> {
    let len = [0, 1, 5, 17, 63, 64, 100, 300][i % 8];
    (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect()
}

#[test]
fn the_reader_agrees_with_openmls_on_hundreds_of_packages() {
    use with_openmls::{facts, Member, Options, SUITES};
    let mut compared = 0;
    let mut last_resort = 0;
    for suite in SUITES {
        for m in 0..12 {
            let member = if m % 4 == 3 {
                let certificates: Vec<Vec<u8>> =
                    (0..=m % 3).map(|c| vec![0x30; 40 + 90 * c + m]).collect();
                Member::x509(suite, &certificates)
            } else {
                Member::basic(suite, &identity(m))
            };
            for p in 0..8 {
                let options = Options {
                    last_resort: p % 3 == 0,
                    lifetime_secs: [None, Some(1), Some(3_600), Some(86_400 * 365 * 5)][p % 4],
                    key_package_extension: (p % 2 == 1).then_some(p * 37),
                    leaf_extension: (p % 4 == 2).then_some(p * 11),
                };
                let (key_package, bytes) = member.key_package(options);
                let expected = facts(&key_package, &member.provider);
                assert_eq!(read(&bytes), Ok(expected.clone()), "suite {suite:?}");
                assert_eq!(expected.key_package_ref.as_ref().map(Vec::len), Some(32));
                compared += 1;
                last_resort += usize::from(expected.last_resort);
            }
        }
    }
    assert_eq!(compared, 288);
    assert_eq!(last_resort, 108);
}

#[test]
fn the_reader_agrees_with_mls_rs_on_hundreds_of_packages() {
    use with_mls_rs::{basic, client, facts, key_package, parse, Options, SUITES};
    let now = unix_now();
    let mut compared = 0;
    for (s, suite) in SUITES.into_iter().enumerate() {
        // P-384 keys are slow to make and sign with: fewer of them.
        let members = if s == 3 { 3 } else { 10 };
        for m in 0..members {
            let lifetime = [1, 60, 86_400 * 28, 86_400 * 365 * 10][m % 4];
            let client = client(
                suite,
                basic(&identity(m + s)),
                std::time::Duration::from_secs(lifetime),
            );
            for p in 0..8u64 {
                // mls-rs sets not_before to the time it is given, and not_after to that plus the
                // configured lifetime: vary both, from the epoch to a year ahead.
                let not_before = [now, now - 3_600, 0, now + 86_400 * 365][p as usize % 4];
                let options = Options {
                    last_resort: p % 3 == 1,
                    not_before: Some(not_before),
                    key_package_extension: (p % 2 == 0).then_some(p as usize * 53),
                    leaf_extension: (p % 4 == 3).then_some(p as usize * 13),
                };
                let (generated, bytes) = key_package(&client, options);
                let expected = facts(&generated, not_before);
                assert_eq!(expected.not_after, not_before + lifetime);
                assert_eq!(read(&bytes), Ok(expected.clone()), "suite {suite:?}");
                // mls-rs reading the bytes back agrees too.
                assert_eq!(facts(&parse(&bytes), not_before), expected);
                let hash_len = if s == 3 { 48 } else { 32 };
                assert_eq!(
                    expected.key_package_ref.as_ref().map(Vec::len),
                    Some(hash_len)
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 8 * (3 * 10 + 3));
}

#[test]
fn the_reader_agrees_with_both_libraries_on_long_identities() {
    // 16 384 bytes and more take the four-byte vector length; the reader has no size limit of
    // its own (the upload rules have).
    let long = vec![b'x'; 20_000];
    let member = with_openmls::Member::basic(with_openmls::SUITES[0], &long);
    let (key_package, bytes) = member.key_package(Default::default());
    assert_eq!(
        read(&bytes),
        Ok(with_openmls::facts(&key_package, &member.provider))
    );

    let now = unix_now();
    let client = with_mls_rs::client(
        with_mls_rs::SUITES[0],
        with_mls_rs::basic(&long),
        std::time::Duration::from_secs(60),
    );
    let options = with_mls_rs::Options {
        not_before: Some(now),
        ..Default::default()
    };
    let (key_package, bytes) = with_mls_rs::key_package(&client, options);
    assert_eq!(read(&bytes), Ok(with_mls_rs::facts(&key_package, now)));
}

#[test]
fn custom_credentials_from_either_library_are_opaque() {
    use openmls::prelude::{Credential, CredentialType};
    for credential_type in [0x0003, 0xf000] {
        let member = with_openmls::Member::new(
            with_openmls::SUITES[0],
            Credential::new(CredentialType::Other(credential_type), b"custom".to_vec()),
        );
        let (_, bytes) = member.key_package(Default::default());
        assert_eq!(read(&bytes), Err(Opaque::CredentialType));

        let client = with_mls_rs::client(
            with_mls_rs::SUITES[0],
            with_mls_rs::custom(credential_type, b"custom"),
            std::time::Duration::from_secs(60),
        );
        let (_, bytes) = with_mls_rs::key_package(&client, Default::default());
        assert_eq!(read(&bytes), Err(Opaque::CredentialType));
    }
}

#[test]
fn an_x509_credential_made_by_mls_rs_as_raw_type_2_is_read_certificate_by_certificate() {
    // mls-rs builds x509 credentials only with its x509 feature (and a validating identity
    // provider); a custom credential of type 2 is the same bytes on the wire.
    let mut chain = Vec::new();
    for len in [3usize, 70, 500] {
        let (prefix, n) = if len < 64 {
            (vec![len as u8], 1)
        } else {
            (((len as u16) | 0x4000).to_be_bytes().to_vec(), 2)
        };
        assert_eq!(prefix.len(), n);
        chain.extend(prefix);
        chain.extend(std::iter::repeat_n(0x30, len));
    }
    let now = unix_now();
    let client = with_mls_rs::client(
        with_mls_rs::SUITES[1],
        with_mls_rs::custom(2, &chain),
        std::time::Duration::from_secs(600),
    );
    let options = with_mls_rs::Options {
        not_before: Some(now),
        ..Default::default()
    };
    let (key_package, bytes) = with_mls_rs::key_package(&client, options);
    assert_eq!(read(&bytes), Ok(with_mls_rs::facts(&key_package, now)));
    let view = mls_codec::parse(&bytes).unwrap();
    let mls_codec::CredentialView::X509 { certificates } = view.leaf_node.credential else {
        panic!("an x509 credential");
    };
    let lens: Vec<_> = certificates.iter().map(<[u8]>::len).collect();
    assert_eq!(lens, [3, 70, 500]);
}
