//! `POST /api/v1/key-packages`: entry validation, the storage rules, and body handling.

use keypackage_server::{
    app::Limits,
    key_package::{Upload, UploadPolicy, UserId},
    wire::KeyPackageStatus,
};
use prost::Message;

use crate::harness::*;

/// Asserts that `user` holds exactly what `before` says and that the fingerprint route still
/// answers `fingerprint_before` (`None`: 404).
async fn assert_unchanged(
    app: &TestApp,
    user: &str,
    before: &KeyPackageStatus,
    fingerprint_before: Option<&str>,
) {
    assert_eq!(
        &app.status(user).await,
        before,
        "a rejected upload changed the status"
    );
    let response = app.fingerprint_raw(user, user).await;
    match fingerprint_before {
        Some(expected) => {
            assert_eq!(response.status(), 200);
            let current: keypackage_server::wire::SigningKeyFingerprint = decode(response).await;
            assert_eq!(current.fingerprint, expected);
        }
        None => {
            problem(response, 404, "no_fingerprint").await;
        }
    }
}

/// Bob holds two regular packages, a last-resort one and fingerprint `a`.
async fn bob_with_packages(app: &TestApp) -> KeyPackageStatus {
    app.upload(
        "bob",
        &[
            (kp("held-1"), false),
            (kp("held-2"), false),
            (kp("held-lr"), true),
        ],
        &fingerprint('a'),
    )
    .await
}

#[tokio::test]
async fn upload_returns_201_with_the_callers_status_after_the_upload() {
    let app = spawn_app().await;
    let response = app
        .upload_raw(
            "bob",
            &upload_request(
                &[(kp("r1"), false), (kp("r2"), false), (kp("lr"), true)],
                &fingerprint('a'),
            ),
        )
        .await;
    assert_eq!(response.status(), 201);
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(v1_status(&status), (2, true, fingerprint('a'), 0));
    assert_eq!(app.status("bob").await, status);
}

#[tokio::test]
async fn upload_accepts_key_packages_of_exactly_4_and_exactly_16384_bytes() {
    let app = spawn_app().await;
    let smallest = kp_of_len(4, 0);
    let largest = kp_of_len(16_384, 9);
    let status = app
        .upload(
            "bob",
            &[(smallest.clone(), false), (largest.clone(), false)],
            "",
        )
        .await;
    assert_eq!(status.regular_count, 2);
    app.assert_hands_out("bob", &[smallest, largest]).await;
}

#[tokio::test]
async fn upload_rejects_an_entry_shorter_than_4_bytes_with_400_invalid_key_package_and_its_index() {
    let app = spawn_app().await;
    for short in [vec![], vec![0x00], vec![0x00, 0x01, 0x00]] {
        let response = app
            .upload_raw(
                "bob",
                &upload_request(&[(kp("ok"), false), (short.clone(), false)], ""),
            )
            .await;
        let body = problem(response, 400, "invalid_key_package").await;
        assert_eq!(body["entry_index"], 1, "{short:?}: {body}");
    }
}

#[tokio::test]
async fn upload_rejects_an_entry_longer_than_16384_bytes_with_400_invalid_key_package_and_its_index(
) {
    let app = spawn_app().await;
    let response = app
        .upload_raw("bob", &upload_request(&[(kp_of_len(16_385, 1), false)], ""))
        .await;
    let body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(body["entry_index"], 0, "{body}");
}

#[tokio::test]
async fn upload_rejects_an_entry_that_is_not_mls_1_0() {
    let app = spawn_app().await;
    for header in [
        [0x00, 0x00, 0x00, 0x05],
        [0x00, 0x02, 0x00, 0x05],
        [0x01, 0x01, 0x00, 0x05],
    ] {
        let mut entry = header.to_vec();
        entry.extend_from_slice(b"body");
        let response = app
            .upload_raw("bob", &upload_request(&[(entry, false)], ""))
            .await;
        let body = problem(response, 400, "invalid_key_package").await;
        assert_eq!(body["entry_index"], 0, "{header:02x?}: {body}");
    }
}

#[tokio::test]
async fn upload_rejects_an_entry_whose_wire_format_is_not_mls_key_package() {
    let app = spawn_app().await;
    // public_message, private_message, welcome, group_info, then values around key_package.
    for wire_format in [
        [0x00, 0x01],
        [0x00, 0x02],
        [0x00, 0x03],
        [0x00, 0x04],
        [0x00, 0x06],
        [0x01, 0x05],
    ] {
        let mut entry = vec![0x00, 0x01];
        entry.extend_from_slice(&wire_format);
        entry.extend_from_slice(b"body");
        let response = app
            .upload_raw(
                "bob",
                &upload_request(&[(kp("a"), false), (kp("b"), true), (entry, false)], ""),
            )
            .await;
        let body = problem(response, 400, "invalid_key_package").await;
        assert_eq!(body["entry_index"], 2, "{wire_format:02x?}: {body}");
    }
}

#[tokio::test]
async fn upload_names_the_first_invalid_entry() {
    let app = spawn_app().await;
    let entries = [
        (kp("a"), false),
        (kp("b"), false),
        (vec![0x00, 0x01, 0x00, 0x01], false),
        (vec![0xff], false),
    ];
    let response = app.upload_raw("bob", &upload_request(&entries, "")).await;
    let body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(body["entry_index"], 2, "{body}");
}

#[tokio::test]
async fn upload_with_one_invalid_entry_stores_nothing_of_the_request() {
    let app = spawn_app().await;
    let before = bob_with_packages(&app).await;
    let entries = [
        (kp("new-1"), false),
        (kp("new-lr"), true),
        (kp("new-2"), false),
        (vec![0x00, 0x01, 0x00, 0x03, 0x00], false),
    ];
    let response = app
        .upload_raw("bob", &upload_request(&entries, &fingerprint('b')))
        .await;
    problem(response, 400, "invalid_key_package").await;
    assert_unchanged(&app, "bob", &before, Some(&fingerprint('a'))).await;
    // The held packages, in their order, and the old last-resort one are all that is there.
    app.assert_hands_out("bob", &[kp("held-1"), kp("held-2"), kp("held-lr")])
        .await;
}

#[tokio::test]
async fn upload_without_entries_returns_400_empty_upload_and_records_no_fingerprint() {
    let app = spawn_app().await;
    let response = app
        .upload_raw("bob", &upload_request(&[], &fingerprint('a')))
        .await;
    problem(response, 400, "empty_upload").await;
    assert_unchanged(&app, "bob", &KeyPackageStatus::default(), None).await;
}

#[tokio::test]
async fn upload_of_an_empty_protobuf_body_returns_400_empty_upload() {
    let app = spawn_app().await;
    let response = app
        .upload_body("bob", Some("application/x-protobuf"), Vec::new())
        .await;
    problem(response, 400, "empty_upload").await;
}

#[tokio::test]
async fn upload_with_two_last_resort_entries_returns_400_multiple_last_resort_and_stores_nothing() {
    let app = spawn_app().await;
    let before = bob_with_packages(&app).await;
    let entries = [(kp("new-1"), false), (kp("lr-1"), true), (kp("lr-2"), true)];
    let response = app
        .upload_raw("bob", &upload_request(&entries, &fingerprint('b')))
        .await;
    problem(response, 400, "multiple_last_resort").await;
    assert_unchanged(&app, "bob", &before, Some(&fingerprint('a'))).await;
}

#[tokio::test]
async fn upload_with_a_malformed_fingerprint_returns_400_invalid_fingerprint_and_stores_nothing() {
    let app = spawn_app().await;
    let good = "0123456789abcdef".repeat(4);
    let malformed = [
        good.to_uppercase(),
        format!("{}A", &good[..63]),
        good[..63].to_owned(),
        format!("{good}0"),
        "g".repeat(64),
        format!("{} ", &good[..63]),
        format!("sha256:{}", &good[..57]),
        "abc".to_owned(),
    ];
    for fp in malformed {
        let response = app
            .upload_raw(
                "bob",
                &upload_request(&[(kp("r1"), false), (kp("lr"), true)], &fp),
            )
            .await;
        problem(response, 400, "invalid_fingerprint").await;
        assert_unchanged(&app, "bob", &KeyPackageStatus::default(), None).await;
    }
}

#[tokio::test]
async fn upload_appends_regular_packages_in_request_order_after_those_held() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false), (kp("2"), false)], "")
        .await;
    app.upload("bob", &[(kp("3"), false), (kp("4"), false)], "")
        .await;
    for expected in ["1", "2", "3", "4"] {
        assert_eq!(
            app.consume("alice", "bob").await.key_package_data.to_vec(),
            kp(expected)
        );
    }
}

#[tokio::test]
async fn upload_of_more_than_10_packages_keeps_the_10_newest() {
    let app = spawn_app().await;
    let entries: Vec<_> = (1..=12).map(|i| (kp(&format!("p{i:02}")), false)).collect();
    let status = app.upload("bob", &entries, "").await;
    assert_eq!(status.regular_count, 10);
    for i in 3..=12 {
        let got = app.consume("alice", "bob").await;
        assert_eq!(got.key_package_data.to_vec(), kp(&format!("p{i:02}")));
    }
    assert_eq!(
        app.status("bob").await.regular_count,
        0,
        "p01 and p02 were never kept"
    );
}

#[tokio::test]
async fn upload_beyond_the_cap_removes_the_oldest_held_packages() {
    let app = spawn_app().await;
    let held: Vec<_> = (1..=8).map(|i| (kp(&format!("p{i:02}")), false)).collect();
    app.upload("bob", &held, "").await;
    let more: Vec<_> = (9..=13).map(|i| (kp(&format!("p{i:02}")), false)).collect();
    let status = app.upload("bob", &more, "").await;
    assert_eq!(status.regular_count, 10);
    for i in 4..=13 {
        let got = app.consume("alice", "bob").await;
        assert_eq!(got.key_package_data.to_vec(), kp(&format!("p{i:02}")));
    }
}

#[tokio::test]
async fn upload_of_a_last_resort_package_replaces_the_previous_one() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("lr-old"), true)], "").await;
    let status = app.upload("bob", &[(kp("lr-new"), true)], "").await;
    assert!(status.has_last_resort);
    assert_eq!(status.regular_count, 0);
    for _ in 0..2 {
        let got = app.consume("alice", "bob").await;
        assert_eq!(got.key_package_data.to_vec(), kp("lr-new"));
        assert!(got.is_last_resort);
    }
}

#[tokio::test]
async fn a_retried_upload_changes_nothing() {
    let app = spawn_app().await;
    let entries = [(kp("r1"), false), (kp("r2"), false), (kp("lr"), true)];
    let first = app.upload("bob", &entries, &fingerprint('a')).await;
    let updated_at = app.fingerprint("bob", "bob").await.updated_at;
    let second = app.upload("bob", &entries, &fingerprint('a')).await;
    assert_eq!(second, first);
    assert_eq!(app.fingerprint("bob", "bob").await.updated_at, updated_at);
    app.assert_hands_out("bob", &[kp("r1"), kp("r2")]).await;
    let fallback = app.consume("alice", "bob").await;
    assert!(
        fallback.is_last_resort,
        "r1 and r2 must have been stored once each"
    );
}

#[tokio::test]
async fn upload_skips_entries_identical_to_held_packages_or_to_earlier_entries() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("r1"), false), (kp("lr"), true)], "")
        .await;
    // r1 is held, lr is held as last resort, r2 appears twice.
    let status = app
        .upload(
            "bob",
            &[
                (kp("r1"), false),
                (kp("r2"), false),
                (kp("r2"), false),
                (kp("lr"), false),
            ],
            "",
        )
        .await;
    assert_eq!(status.regular_count, 2);
    app.assert_hands_out("bob", &[kp("r1"), kp("r2")]).await;
    let fallback = app.consume("alice", "bob").await;
    assert!(fallback.is_last_resort);
    assert_eq!(fallback.key_package_data.to_vec(), kp("lr"));
}

#[tokio::test]
async fn reuploading_the_held_last_resort_package_keeps_its_handout_count() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("lr"), true)], "").await;
    app.consume("alice", "bob").await;
    let status = app.upload("bob", &[(kp("lr"), true)], "").await;
    assert_eq!(
        status.last_resort_handouts, 1,
        "a retried upload changes nothing"
    );
}

#[tokio::test]
async fn upload_records_its_fingerprint_with_each_of_its_packages_and_as_the_current_one() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("r1"), false), (kp("lr"), true)],
        &fingerprint('a'),
    )
    .await;
    let status = app
        .upload("bob", &[(kp("r2"), false)], &fingerprint('b'))
        .await;
    assert_eq!(status.signing_key_fingerprint, fingerprint('b'));
    let status = app.upload("bob", &[(kp("r3"), false)], "").await;
    assert_eq!(
        status.signing_key_fingerprint,
        fingerprint('b'),
        "an empty one keeps the current"
    );
    assert_eq!(
        app.fingerprint("alice", "bob").await.fingerprint,
        fingerprint('b')
    );

    let r1 = app.consume("alice", "bob").await;
    assert_eq!(r1.signing_key_fingerprint, fingerprint('a'));
    let r2 = app.consume("alice", "bob").await;
    assert_eq!(r2.signing_key_fingerprint, fingerprint('b'));
    let r3 = app.consume("alice", "bob").await;
    assert_eq!(r3.key_package_data.to_vec(), kp("r3"));
    assert_eq!(r3.signing_key_fingerprint, "", "none was given with r3");
    let lr = app.consume("alice", "bob").await;
    assert!(lr.is_last_resort);
    assert_eq!(lr.signing_key_fingerprint, fingerprint('a'));
}

#[tokio::test]
async fn fingerprint_updated_at_changes_only_when_the_value_changes() {
    let app = spawn_app().await;
    // Record fingerprint `a` long ago, through the store, so a change is visible at once.
    let bob = UserId::parse("bob").unwrap();
    let long_ago = 1_000_000_000;
    let upload = Upload::parse(
        [(kp("old").into(), false)],
        &fingerprint('a'),
        long_ago as u64,
        UploadPolicy::default(),
    )
    .unwrap();
    app.state
        .store
        .upload(&bob, &upload, long_ago)
        .await
        .unwrap();
    assert_eq!(app.fingerprint("bob", "bob").await.updated_at, long_ago);

    app.upload("bob", &[(kp("same"), false)], &fingerprint('a'))
        .await;
    assert_eq!(
        app.fingerprint("bob", "bob").await.updated_at,
        long_ago,
        "same value"
    );
    app.upload("bob", &[(kp("none"), false)], "").await;
    assert_eq!(
        app.fingerprint("bob", "bob").await.updated_at,
        long_ago,
        "no value"
    );

    let before = unix_now();
    app.upload("bob", &[(kp("new"), false)], &fingerprint('b'))
        .await;
    let after = unix_now();
    let changed = app.fingerprint("bob", "bob").await;
    assert_eq!(changed.fingerprint, fingerprint('b'));
    assert!(
        (before..=after).contains(&changed.updated_at),
        "{changed:?} not in {before}..={after}"
    );
}

#[tokio::test]
async fn upload_over_the_body_limit_returns_413_and_stores_nothing() {
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            max_body_bytes: 1024,
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    let fits = upload_request(&[(kp_of_len(900, 1), false)], "");
    assert!(fits.encoded_len() <= 1024);
    assert_eq!(app.upload_raw("bob", &fits).await.status(), 201);

    let too_large = upload_request(
        &[(kp_of_len(600, 2), false), (kp_of_len(600, 3), false)],
        "",
    );
    assert!(too_large.encoded_len() > 1024);
    problem(
        app.upload_raw("bob", &too_large).await,
        413,
        "body_too_large",
    )
    .await;
    let json = format!(
        r#"{{"entries":[{{"keyPackageData":"{}"}}]}}"#,
        base64(&kp_of_len(1024, 4))
    );
    let response = app.upload_body("bob", Some("application/json"), json).await;
    assert_eq!(response.status(), 413);
    assert_eq!(app.status("bob").await.regular_count, 1);
}

#[tokio::test]
async fn upload_of_an_undecodable_protobuf_body_returns_400_malformed_body() {
    let app = spawn_app().await;
    let bodies: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff],       // a tag that never ends
        &[0x0a, 0x05, 0x0a],       // entries: 5 bytes announced, 1 present
        &[0x0a, 0x02, 0x0a, 0x7f], // key_package_data longer than its entry
    ];
    for body in bodies {
        let response = app
            .upload_body("bob", Some("application/x-protobuf"), body.to_vec())
            .await;
        problem(response, 400, "malformed_body").await;
    }
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn upload_of_an_undecodable_json_body_returns_400_malformed_body() {
    let app = spawn_app().await;
    let bodies = [
        "{not json",
        "",
        "[]",
        r#"{"entries": 5}"#,
        r#"{"entries": [{"keyPackageData": "***not base64***"}]}"#,
        r#"{"entries": [{"isLastResort": "yes"}]}"#,
        r#"{"signingKeyFingerprint": 7}"#,
    ];
    for body in bodies {
        let response = app.upload_body("bob", Some("application/json"), body).await;
        let got = problem(response, 400, "malformed_body").await;
        assert!(got.get("entry_index").is_none(), "{body}: {got}");
    }
}

#[tokio::test]
async fn upload_without_a_content_type_returns_415() {
    let app = spawn_app().await;
    let body = upload_request(&[(kp("r1"), false)], "").encode_to_vec();
    problem(
        app.upload_body("bob", None, body).await,
        415,
        "unsupported_media_type",
    )
    .await;
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn upload_with_any_other_content_type_returns_415() {
    let app = spawn_app().await;
    let body = upload_request(&[(kp("r1"), false)], "").encode_to_vec();
    for content_type in [
        "text/plain",
        "application/octet-stream",
        "application/xml",
        "application/jsonx",
        "application/x-protobuf-stream",
        "multipart/form-data; boundary=x",
        "application/problem+json",
    ] {
        let response = app
            .upload_body("bob", Some(content_type), body.clone())
            .await;
        problem(response, 415, "unsupported_media_type").await;
    }
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn upload_accepts_both_protobuf_media_types_and_media_type_parameters() {
    let app = spawn_app().await;
    let content_types = [
        "application/x-protobuf",
        "application/protobuf",
        "application/x-protobuf; charset=utf-8",
        "Application/Protobuf;proto=keypackages.v1.UploadKeyPackagesRequest",
    ];
    for (i, content_type) in content_types.iter().enumerate() {
        let body = upload_request(&[(kp(&format!("p{i}")), false)], "").encode_to_vec();
        let response = app.upload_body("bob", Some(content_type), body).await;
        assert_eq!(response.status(), 201, "{content_type}");
    }
    let json = format!(
        r#"{{"entries":[{{"keyPackageData":"{}"}}]}}"#,
        base64(&kp("json"))
    );
    let response = app
        .upload_body("bob", Some("application/json; charset=utf-8"), json)
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(app.status("bob").await.regular_count, 5);
}

#[tokio::test]
async fn a_chunked_upload_over_the_body_limit_returns_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_with(AppOptions {
        limits: Limits {
            max_body_bytes: 1024,
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    // No Content-Length: the limit must hold while the body streams in.
    let body = upload_request(&[(kp_of_len(2000, 1), false)], "").encode_to_vec();
    let addr = app.base.trim_start_matches("http://");
    let mut request = format!(
        "POST /api/v1/key-packages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        token("bob")
    )
    .into_bytes();
    for chunk in body.chunks(500) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert_eq!(app.status("bob").await.regular_count, 0);
}
