//! Compiles the OpAMP protos with protox (pure Rust), so a fresh machine needs no system `protoc`.
//! The descriptor set is also written out so `tests/wire.rs` can check it against the field table.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["opamp/v1/opamp.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("opamp.fds"), fds.encode_to_vec())?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
