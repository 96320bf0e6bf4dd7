//! What goes over the wire in tests: key-package bytes, fingerprints, upload requests, and the
//! decoding of protobuf and problem+json answers.

use keypackage_server::wire::UploadKeyPackagesRequest;
use prost::Message;

/// Key-package bytes with a valid MLS header and a distinguishing tail.
pub(crate) fn kp(tag: &str) -> Vec<u8> {
    let mut v = vec![0x00, 0x01, 0x00, 0x05];
    v.extend_from_slice(tag.as_bytes());
    v
}

/// A valid fingerprint made from one hex digit.
pub(crate) fn fingerprint(digit: char) -> String {
    std::iter::repeat_n(digit, 64).collect()
}

/// A key package of exactly `len` bytes (`len` ≥ 4) with a valid header.
pub(crate) fn kp_of_len(len: usize, fill: u8) -> Vec<u8> {
    let mut v = kp("");
    v.resize(len, fill);
    v
}

/// An upload request from `(bytes, is_last_resort)` entries.
pub(crate) fn upload_request(
    entries: &[(Vec<u8>, bool)],
    fingerprint: &str,
) -> UploadKeyPackagesRequest {
    UploadKeyPackagesRequest {
        entries: entries
            .iter()
            .map(
                |(data, last_resort)| keypackage_server::wire::KeyPackageEntry {
                    key_package_data: data.clone().into(),
                    is_last_resort: *last_resort,
                },
            )
            .collect(),
        signing_key_fingerprint: fingerprint.to_owned(),
    }
}

/// Decodes a protobuf response body.
pub(crate) async fn decode<T: Message + Default>(response: reqwest::Response) -> T {
    let ct = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/x-protobuf", "expected a protobuf body");
    T::decode(response.bytes().await.expect("body")).expect("decodes")
}

/// A problem+json error body, checked for its required members; returns it.
pub(crate) async fn problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// Standard base64 with padding, written out here so JSON tests don't trust the server's codec.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// [`readable_kp`] of cipher suite `suite`.
pub(crate) fn readable_kp_of_suite(
    suite: u16,
    tag: &str,
    signature_key: &[u8],
    not_after: u64,
) -> Vec<u8> {
    let out = keypackage_server::mls_codec::sample_key_package_of_suite(
        suite,
        tag.as_bytes(),
        signature_key,
        0,
        not_after,
    );
    let facts =
        keypackage_server::mls_codec::read(&out).expect("the helper builds readable packages");
    assert_eq!((facts.cipher_suite, facts.not_after), (suite, not_after));
    out
}

/// A minimal readable RFC 9420 KeyPackage (suite 1, basic credential) signed by
/// `signature_key`, with `tag` (under 64 bytes) as its init key so that packages differ.
pub(crate) fn readable_kp(
    tag: &str,
    signature_key: &[u8],
    not_before: u64,
    not_after: u64,
) -> Vec<u8> {
    let out = keypackage_server::mls_codec::sample_key_package(
        tag.as_bytes(),
        signature_key,
        not_before,
        not_after,
    );
    let facts =
        keypackage_server::mls_codec::read(&out).expect("the helper builds readable packages");
    assert_eq!((facts.not_before, facts.not_after), (not_before, not_after));
    out
}

/// The v1 fields of a status: counts, fingerprint and last-resort hand-outs.
pub(crate) fn v1_status(
    status: &keypackage_server::wire::KeyPackageStatus,
) -> (u32, bool, String, u64) {
    (
        status.regular_count,
        status.has_last_resort,
        status.signing_key_fingerprint.clone(),
        status.last_resort_handouts,
    )
}
