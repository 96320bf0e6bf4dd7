//! Whole requests (method, path, headers, body) through the real router on an SQLite store:
//! nothing may panic or answer 5xx.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use axum::{body::Body, http::Request};
use keypackage_server::{
    app::{router, AppState, Limits},
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
    store::{connect, ConnectOptions},
};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: u8,
    path: &'a str,
    authorized: bool,
    content_type: &'a str,
    accept: &'a str,
    body: &'a [u8],
}

struct Harness {
    rt: tokio::runtime::Runtime,
    state: AppState,
    token: String,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("kps-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("fuzz.db").display());
        let store = rt
            .block_on(connect(&ConnectOptions::new(url)))
            .expect("store");
        let auth = Authenticator::new(VerifyingKey::Secret(SECRET.to_vec()), None, None);
        let token = auth
            .issue(&UserId::parse("fuzzer").expect("id"), 3600)
            .expect("token");
        let limits = Limits {
            budget: keypackage_server::rate_limit::Budget::per_minute(1_000_000),
            ..Limits::default()
        };
        let state = AppState::new(store, auth, limits);
        Harness { rt, state, token }
    })
}

fuzz_target!(|input: Input<'_>| {
    let h = harness();
    let method = ["GET", "POST", "DELETE", "PUT", "HEAD"][usize::from(input.method % 5)];
    let prefix = ["/api/v1/key-packages", "/api/v1/key-packages/", "/api/v1/users/", "/"]
        [usize::from(input.method / 5 % 4)];
    let uri = format!("{prefix}{}", input.path);
    let mut builder = Request::builder().method(method).uri(uri.as_str());
    if input.authorized {
        builder = builder.header("authorization", format!("Bearer {}", h.token));
    }
    builder = builder
        .header("content-type", input.content_type)
        .header("accept", input.accept);
    let Ok(request) = builder.body(Body::from(input.body.to_vec())) else {
        return; // not a representable HTTP request
    };
    let app = router(h.state.clone());
    let response = h.rt.block_on(app.oneshot(request)).expect("infallible");
    assert!(
        !response.status().is_server_error(),
        "{method} {uri} -> {}",
        response.status()
    );
});
