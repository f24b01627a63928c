//! Writes the CRDs generated from the Rust types into a directory (default
//! `crds/` of the workspace), or prints them with `-` as the directory.
#![forbid(unsafe_code)]

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let arg = std::env::args().nth(1);
    let crds = sandfork_api::crdgen::render();
    if arg.as_deref() == Some("-") {
        for (_, yaml) in crds {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    let dir = arg
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds"));
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in crds {
        let path = dir.join(name);
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
