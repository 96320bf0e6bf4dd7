//! Compiles `proto/` into Rust with prost and pbjson, using protox so no system `protoc` is needed.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/keypackages/v1/key_packages.proto";
    println!("cargo:rerun-if-changed={proto}");
    // `sqlx::migrate!` embeds the migrations; without this line a changed migration would not
    // rebuild the crate (naming one path turns off cargo's rebuild on any file change).
    println!("cargo:rerun-if-changed=migrations");

    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("keypackages_descriptor.bin");
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    prost_build::Config::new()
        .bytes(["."])
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        // Zero counts and empty strings are shown, which reads better from curl.
        .emit_fields()
        .build(&[".keypackages.v1"])?;
    Ok(())
}
