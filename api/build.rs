//! Compiles the node agent's gRPC service from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let agent = root.join("sandfork/agent/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    tonic_prost_build::configure().compile_protos(&[agent], &[root])?;
    Ok(())
}
