//! Hostile user ids in the path (traversal, encodings, control bytes, overlong): refused
//! or naming nobody, and never touching a real user's packages, fingerprint or budget.

use keypackage_server::key_package::UserId;

use crate::harness::*;

#[tokio::test]
async fn hostile_path_user_ids_are_refused_and_touch_no_real_user() {
    let app = spawn_app().await;
    let packages: Vec<Vec<u8>> = (0..10).map(|i| kp(&format!("bob-{i}"))).collect();
    let mut entries: Vec<(Vec<u8>, bool)> = packages.iter().map(|p| (p.clone(), false)).collect();
    entries.push((kp("bob-lr"), true));
    let before = app.upload("bob", &entries, &fingerprint('b')).await;

    let long = "b".repeat(129);
    let encoded_long = "%62".repeat(129);
    let ids: Vec<Vec<u8>> = [
        b"".as_slice(),
        b"/",
        b"bob/",
        b"/bob",
        b"bob/..",
        b"bob/.",
        b"bob/../bob",
        b"..",
        b".",
        b"../bob",
        b"./bob",
        b"%2E%2E",
        b"%2e%2e%2Fbob",
        b"..%2Fbob",
        b"bob%2F..",
        b"bob%2F",
        b"%2Fbob",
        b"bob%5C..",
        b"bob%00",
        b"%00bob",
        b"bob\0",
        b"bob%01",
        b"bob%1F",
        b"bob%7F",
        b"bob%0D%0AX-Injected:%201",
        b"bob%09",
        b"bob%20",
        b"bob\x01",
        b"bob\x7f",
        b"bob\t",
        b"b%C3%A9b",
        b"b\xc3\xa9b",
        b"bob%C0%AF",
        b"bob%E2%80%8B",
        b"%EF%BC%A2ob",
        b"bob%FF",
        b"bob\xff",
        b"bob%",
        b"bob%2",
        b"bob%zz",
        b"bob;x=1",
        long.as_bytes(),
        encoded_long.as_bytes(),
    ]
    .iter()
    .map(|id| id.to_vec())
    .collect();

    let auth = bearer_line("alice");
    for id in &ids {
        // What the id names once the router has split the path and percent-decoded it.
        let splits = id.is_empty() || id.contains(&b'/');
        let decoded = percent_encoding::percent_decode(id).decode_utf8().ok();
        let names_a_valid_id = decoded.is_some_and(|d| UserId::parse(&d).is_ok());
        let routes = [
            [b"/api/v1/key-packages/".as_slice(), id].concat(),
            [b"/api/v1/users/".as_slice(), id, b"/fingerprint"].concat(),
        ];
        for target in routes {
            let what = String::from_utf8_lossy(&target).into_owned();
            let reply = exchange(
                &app,
                &raw_request("GET", &target, std::slice::from_ref(&auth), b""),
            )
            .await;
            let got = (reply.status(), reply.code());
            let expected = match got {
                // No such route (or, for an empty segment, an empty id).
                (Some(404), Some(code)) if splits => code == "not_found",
                (Some(400), Some(code)) if id.is_empty() => code == "invalid_user_id",
                // A valid id, such as "..", of a user who has nothing.
                (Some(404), Some(code)) if names_a_valid_id => {
                    code == "no_key_package" || code == "no_fingerprint"
                }
                // The app refusing the id, or the HTTP layer refusing the request line.
                (Some(400), Some(code)) => {
                    !splits && !names_a_valid_id && code == "invalid_user_id"
                }
                (Some(400), None) => !names_a_valid_id,
                _ => false,
            };
            assert!(expected, "{what:?}: {reply:?}");
        }
    }
    assert_eq!(
        app.status("bob").await,
        before,
        "an attack changed bob's packages"
    );
    assert_eq!(
        app.fingerprint("alice", "bob").await.fingerprint,
        fingerprint('b')
    );
    // Bob's budget is untouched: all ten of his packages can still be had, in order.
    for package in &packages {
        assert_eq!(
            &app.consume("carol", "bob").await.key_package_data.to_vec(),
            package
        );
    }
    app.assert_alive().await;
}
