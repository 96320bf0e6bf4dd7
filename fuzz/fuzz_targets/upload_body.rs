//! Upload bodies, protobuf or JSON, through decoding and whole-request validation.
#![no_main]

use bytes::Bytes;
use keypackage_server::{
    key_package::{Upload, UploadPolicy, MAX_KEY_PACKAGE_LEN, MIN_KEY_PACKAGE_LEN},
    wire::{Format, UploadKeyPackagesRequest},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 { Format::Protobuf } else { Format::Json };
    let Ok(request) = format.decode::<UploadKeyPackagesRequest>(Bytes::copy_from_slice(body)) else {
        return;
    };
    let entries = request.entries.len();
    let Ok(upload) = Upload::parse(
        request
            .entries
            .into_iter()
            .map(|e| (e.key_package_data, e.is_last_resort)),
        &request.signing_key_fingerprint,
        1_700_000_000,
        UploadPolicy::default(),
    ) else {
        return;
    };
    // Whatever got through is a well-formed upload.
    assert!(entries > 0);
    assert!(upload.regular.len() + usize::from(upload.last_resort.is_some()) <= entries);
    for package in upload.regular.iter().chain(upload.last_resort.iter()) {
        let bytes = package.bytes();
        assert!((MIN_KEY_PACKAGE_LEN..=MAX_KEY_PACKAGE_LEN).contains(&bytes.len()));
        assert_eq!(&bytes[..4], &[0, 1, 0, 5]);
    }
    if let Some(fp) = &upload.fingerprint {
        assert_eq!(fp.as_str().len(), 64);
    }
});
