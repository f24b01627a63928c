//! Compiles the node agent's gRPC service and the kubelet's device plugin
//! API from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may be
    // reused from a shared target directory by another.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let agent = root.join("sandfork/agent/v1/agent.proto");
    let device_plugin = root.join("deviceplugin/v1beta1/api.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    tonic_prost_build::configure().compile_protos(&[agent, device_plugin], &[root])?;
    Ok(())
}
