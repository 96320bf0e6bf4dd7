//! The end-to-end story with real MLS key packages (openmls 0.6): Bob publishes, Alice consumes
//! one over HTTP, checks Bob's fingerprint, adds him to a group, and they talk both ways.

use openmls::prelude::{
    tls_codec::{Deserialize as _, Serialize as _},
    *,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use sha2::{Digest, Sha256};

use crate::harness::*;

const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// One MLS client: its crypto and key store, its signature key and its credential.
struct Client {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl Client {
    fn new(name: &str) -> Self {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).expect("keys");
        signer.store(provider.storage()).expect("store keys");
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.to_public_vec().into(),
        };
        Self {
            provider,
            signer,
            credential,
        }
    }

    /// SHA-256 of the signature public key, as lowercase hex: what the server stores.
    fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.signer.to_public_vec()))
    }

    /// A fresh key package (its private parts kept in this client's store), serialized as the
    /// MLSMessage the server expects.
    fn key_package(&self, last_resort: bool) -> (KeyPackage, Vec<u8>) {
        let mut builder = KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
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

/// Serializes a message as it would travel, and reads it back.
fn over_the_wire(message: &MlsMessageOut) -> MlsMessageBodyIn {
    let bytes = message.tls_serialize_detached().expect("serialize");
    MlsMessageIn::tls_deserialize_exact(bytes)
        .expect("deserialize")
        .extract()
}

/// Sends `text` from `sender` to `receiver` and returns what the receiver read.
fn send(
    text: &[u8],
    (sender, sender_group): (&Client, &mut MlsGroup),
    (receiver, receiver_group): (&Client, &mut MlsGroup),
) -> Vec<u8> {
    let message = sender_group
        .create_message(&sender.provider, &sender.signer, text)
        .expect("application message");
    let protocol_message = match over_the_wire(&message) {
        MlsMessageBodyIn::PrivateMessage(m) => ProtocolMessage::from(m),
        other => panic!("expected a private message, got {other:?}"),
    };
    let processed = receiver_group
        .process_message(&receiver.provider, protocol_message)
        .expect("process");
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(m) => m.into_bytes(),
        other => panic!("expected an application message, got {other:?}"),
    }
}

#[tokio::test]
async fn alice_adds_bob_with_a_key_package_from_the_server_and_they_exchange_messages() {
    let app = spawn_app().await;
    let alice = Client::new("alice");
    let bob = Client::new("bob");

    // Bob publishes three regular key packages and a last-resort one.
    let packages: Vec<_> = (0..3).map(|_| bob.key_package(false)).collect();
    let (_, last_resort) = bob.key_package(true);
    let mut entries: Vec<_> = packages
        .iter()
        .map(|(_, bytes)| (bytes.clone(), false))
        .collect();
    entries.push((last_resort, true));
    for (bytes, _) in &entries {
        assert_eq!(
            bytes[..4],
            [0x00, 0x01, 0x00, 0x05],
            "MLS 1.0 mls_key_package"
        );
    }
    let status = app.upload("bob", &entries, &bob.fingerprint()).await;
    assert_eq!(status.regular_count, 3);
    assert!(status.has_last_resort);

    // Alice fetches one: the oldest, with the fingerprint Bob published.
    let response = app.consume("alice", "bob").await;
    assert!(!response.is_last_resort);
    assert_eq!(response.key_package_data.to_vec(), packages[0].1);
    assert_eq!(response.signing_key_fingerprint, bob.fingerprint());
    assert_eq!(
        app.fingerprint("alice", "bob").await.fingerprint,
        bob.fingerprint()
    );

    // She parses and validates it, and checks that its leaf is signed by the fingerprinted key.
    let key_package_in =
        match MlsMessageIn::tls_deserialize_exact(response.key_package_data.as_ref())
            .expect("an MLSMessage")
            .extract()
        {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            other => panic!("expected a key package, got {other:?}"),
        };
    let key_package = key_package_in
        .validate(alice.provider.crypto(), ProtocolVersion::Mls10)
        .expect("a valid key package");
    let leaf_key = key_package.leaf_node().signature_key().as_slice();
    assert_eq!(
        hex::encode(Sha256::digest(leaf_key)),
        response.signing_key_fingerprint
    );
    assert_eq!(
        key_package.hash_ref(alice.provider.crypto()).unwrap(),
        packages[0].0.hash_ref(bob.provider.crypto()).unwrap()
    );

    // Alice creates a group and adds Bob; Bob joins from the Welcome.
    let create_config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .build();
    let mut alice_group = MlsGroup::new(
        &alice.provider,
        &alice.signer,
        &create_config,
        alice.credential.clone(),
    )
    .expect("group");
    let (_commit, welcome, _group_info) = alice_group
        .add_members(&alice.provider, &alice.signer, &[key_package])
        .expect("add Bob");
    alice_group
        .merge_pending_commit(&alice.provider)
        .expect("merge");
    let welcome = match over_the_wire(&welcome) {
        MlsMessageBodyIn::Welcome(w) => w,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let join_config = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .build();
    let mut bob_group = StagedWelcome::new_from_welcome(&bob.provider, &join_config, welcome, None)
        .expect("staged welcome")
        .into_group(&bob.provider)
        .expect("join");
    assert_eq!(bob_group.members().count(), 2);

    let read = send(
        b"hi Bob",
        (&alice, &mut alice_group),
        (&bob, &mut bob_group),
    );
    assert_eq!(read, b"hi Bob");
    let read = send(
        b"hi Alice",
        (&bob, &mut bob_group),
        (&alice, &mut alice_group),
    );
    assert_eq!(read, b"hi Alice");

    // The package Alice used is gone from the server.
    assert_eq!(app.status("bob").await.regular_count, 2);
}
