//! Compiles the .proto files with protox (pure Rust, no `protoc` needed) and generates the
//! prost messages and tonic services; also writes the encoded descriptor set for gRPC server
//! reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["rrt/v1/generate.proto", "rrt/v1/node.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rrt_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
