//! Two MLS implementations meeting through the server: a member on one library consumes a package
//! the other library published, adds its owner, and the owner joins from the Welcome.

use keypackage_server::mls_codec;
use mls_rs::{ExtensionList, MlsMessage};
use openmls::prelude::{
    tls_codec::{Deserialize as _, Serialize as _},
    Capabilities, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, OpenMlsProvider as _, ProtocolVersion, StagedWelcome,
};

use crate::{
    harness::*,
    mls_oracle::{with_mls_rs, with_openmls},
};

const EXPORTER_LABEL: &str = "interop check";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test]
async fn an_openmls_member_adds_an_mls_rs_member_from_a_package_the_server_handed_out() {
    let app = spawn_app().await;
    let bob = with_mls_rs::client(
        with_mls_rs::SUITES[0],
        with_mls_rs::basic(b"bob"),
        std::time::Duration::from_secs(86_400),
    );
    // mls-rs sets not_before to the time it is given, and openmls accepts a package only once
    // not_before < now: a package made this second would be refused until the next. Date it a
    // minute back, as a client with a slightly slow clock would.
    let not_before = unix_now() - 60;
    let packages: Vec<_> = (0..3)
        .map(|i| {
            let options = with_mls_rs::Options {
                last_resort: i == 2,
                not_before: Some(not_before),
                ..Default::default()
            };
            with_mls_rs::key_package(&bob, options)
        })
        .collect();
    let fingerprint = with_mls_rs::facts(&packages[0].0, not_before)
        .signature_key_fingerprint
        .as_str()
        .to_owned();
    let entries: Vec<_> = packages
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| (bytes.clone(), i == 2))
        .collect();
    app.upload("bob", &entries, &fingerprint).await;

    let response = app.consume("alice", "bob").await;
    let consumed = response.key_package_data.to_vec();
    assert_eq!(consumed, packages[0].1);
    let facts = mls_codec::read(&consumed).expect("readable");
    assert_eq!(facts, with_mls_rs::facts(&packages[0].0, not_before));
    assert_eq!(
        facts.signature_key_fingerprint.as_str(),
        response.signing_key_fingerprint
    );

    // Alice, on openmls, validates the package and adds Bob.
    let alice = with_openmls::Member::basic(with_openmls::SUITES[0], b"alice");
    let key_package = match MlsMessageIn::tls_deserialize_exact(consumed.as_slice())
        .expect("an MLSMessage")
        .extract()
    {
        MlsMessageBodyIn::KeyPackage(kp) => kp
            .validate(alice.provider.crypto(), ProtocolVersion::Mls10)
            .expect("openmls accepts the mls-rs package"),
        other => panic!("expected a key package, got {other:?}"),
    };
    let reference = key_package.hash_ref(alice.provider.crypto()).unwrap();
    assert_eq!(Some(reference.as_slice().to_vec()), facts.key_package_ref);
    // openmls lists the RFC's default extension and proposal types in its default capabilities;
    // mls-rs refuses a leaf that does (RFC 9420 §7.2 leaves them implied), so Alice lists none.
    let create_config = MlsGroupCreateConfig::builder()
        .ciphersuite(alice.suite)
        .capabilities(Capabilities::new(None, None, Some(&[]), Some(&[]), None))
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

    // Bob, on mls-rs, joins from the Welcome and holds the same epoch secrets.
    let welcome = MlsMessage::from_bytes(&welcome.tls_serialize_detached().unwrap()).unwrap();
    let (bob_group, _) = bob.join_group(None, &welcome, None).expect("join");
    assert_eq!(bob_group.roster().members().len(), 2);
    assert_eq!(bob_group.current_epoch(), alice_group.epoch().as_u64());
    assert_eq!(
        bob_group.epoch_authenticator().unwrap().as_bytes(),
        alice_group.epoch_authenticator().as_slice()
    );
    assert_eq!(
        bob_group
            .export_secret(EXPORTER_LABEL.as_bytes(), b"", 32)
            .unwrap()
            .as_bytes(),
        alice_group
            .export_secret(&alice.provider, EXPORTER_LABEL, b"", 32)
            .unwrap()
    );
    assert_eq!(app.status("bob").await.regular_count, 1);
}

#[tokio::test]
async fn an_mls_rs_member_adds_an_openmls_member_from_a_package_the_server_handed_out() {
    let app = spawn_app().await;
    let bob = with_openmls::Member::basic(with_openmls::SUITES[0], b"bob");
    let packages: Vec<_> = (0..3)
        .map(|i| {
            bob.key_package(with_openmls::Options {
                last_resort: i == 2,
                ..Default::default()
            })
        })
        .collect();
    let fingerprint = with_openmls::facts(&packages[0].0, &bob.provider)
        .signature_key_fingerprint
        .as_str()
        .to_owned();
    let entries: Vec<_> = packages
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| (bytes.clone(), i == 2))
        .collect();
    app.upload("bob", &entries, &fingerprint).await;

    let response = app.consume("alice", "bob").await;
    let consumed = response.key_package_data.to_vec();
    assert_eq!(consumed, packages[0].1);
    let facts = mls_codec::read(&consumed).expect("readable");
    assert_eq!(facts, with_openmls::facts(&packages[0].0, &bob.provider));
    assert_eq!(
        facts.signature_key_fingerprint.as_str(),
        response.signing_key_fingerprint
    );

    // Alice, on mls-rs, adds Bob with the package as it came from the server. Her own leaf is
    // dated a minute back: openmls, joining, checks her lifetime with not_before < now too.
    let alice = with_mls_rs::client(
        with_mls_rs::SUITES[0],
        with_mls_rs::basic(b"alice"),
        std::time::Duration::from_secs(86_400),
    );
    let mut alice_group = alice
        .create_group(
            ExtensionList::new(),
            ExtensionList::new(),
            Some((unix_now() - 60).into()),
        )
        .expect("group");
    let key_package = MlsMessage::from_bytes(&consumed).expect("mls-rs reads the package");
    let reference =
        with_mls_rs::facts(&with_mls_rs::parse(&consumed), facts.not_before).key_package_ref;
    assert_eq!(reference, facts.key_package_ref);
    let commit = alice_group
        .commit_builder()
        .add_member(key_package)
        .expect("add Bob")
        .build()
        .expect("commit");
    alice_group.apply_pending_commit().expect("apply");

    // Bob, on openmls, joins from the Welcome and holds the same epoch secrets.
    let welcome = match MlsMessageIn::tls_deserialize_exact(
        commit.welcome_messages[0].to_bytes().unwrap().as_slice(),
    )
    .expect("an MLSMessage")
    .extract()
    {
        MlsMessageBodyIn::Welcome(w) => w,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let join_config = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .build();
    let bob_group = StagedWelcome::new_from_welcome(&bob.provider, &join_config, welcome, None)
        .expect("staged welcome")
        .into_group(&bob.provider)
        .expect("join");
    assert_eq!(bob_group.members().count(), 2);
    assert_eq!(bob_group.epoch().as_u64(), alice_group.current_epoch());
    assert_eq!(
        bob_group.epoch_authenticator().as_slice(),
        alice_group.epoch_authenticator().unwrap().as_bytes()
    );
    assert_eq!(
        bob_group
            .export_secret(&bob.provider, EXPORTER_LABEL, b"", 32)
            .unwrap(),
        alice_group
            .export_secret(EXPORTER_LABEL.as_bytes(), b"", 32)
            .unwrap()
            .as_bytes()
    );
    assert_eq!(app.status("bob").await.regular_count, 1);
}
