//! The small parsers at the request edge: content type, accept, path user ids, bearer tokens.
#![no_main]

use arbitrary::Arbitrary;
use keypackage_server::{
    auth::{Authenticator, VerifyingKey},
    key_package::{Fingerprint, UserId},
    wire::Format,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    content_type: &'a str,
    accept: &'a str,
    path_segment: &'a str,
    token: &'a str,
    fingerprint: &'a str,
}

fuzz_target!(|input: Input<'_>| {
    let _ = Format::from_content_type(input.content_type);
    let _ = Format::from_accept(Some(input.accept));
    if let Ok(user) = UserId::parse(input.path_segment) {
        assert!(user.as_str().len() <= UserId::MAX_LEN);
    }
    if let Ok(fp) = Fingerprint::parse(input.fingerprint) {
        assert_eq!(fp.as_str(), input.fingerprint);
    }
    let auth = Authenticator::new(VerifyingKey::Secret(b"fuzz-secret".to_vec()), None, None);
    assert!(auth.verify(input.token).is_err(), "a random token verified");
});
