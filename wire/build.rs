//! Compiles `proto/*.proto` into Rust with prost-build, parsing them with protox so that
//! building needs no system `protoc`. The generated files land in `OUT_DIR` and are
//! included by `src/proto.rs`.

use std::error::Error;

/// The protocol sources, relative to this crate's root.
const PROTO_FILES: [&str; 2] = ["proto/chatlog.proto", "proto/node.proto"];
/// Where imports are resolved from.
const PROTO_INCLUDE_DIR: &str = "proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_INCLUDE_DIR}");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }

    let descriptors = protox::compile(PROTO_FILES, [PROTO_INCLUDE_DIR])?;

    let mut config = prost_build::Config::new();
    // `bytes` fields decode as `bytes::Bytes`: a Raft payload decoded from a frame's
    // `Bytes` then shares that buffer instead of being copied.
    config.bytes(["."]);
    config.compile_fds(descriptors)?;
    Ok(())
}
