//! Regenerates `src/v2/pb.rs` (the Open Inference Protocol's gRPC messages, server and client)
//! from `proto/open_inference_grpc.proto`.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto = root.join("proto");
    let fds = protox::compile([proto.join("open_inference_grpc.proto")], [&proto])?;
    let out = tempdir()?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(fds)?;
    let generated = std::fs::read_to_string(out.join("inference.rs"))?;
    let header = "// Generated from proto/open_inference_grpc.proto by tools/protogen; do not edit.\n\
                  // Regenerate: cargo run --manifest-path tools/protogen/Cargo.toml\n\n";
    let dest = root.join("src/v2/pb.rs");
    std::fs::write(&dest, format!("{header}{generated}"))?;
    eprintln!("wrote {}", dest.display());
    Ok(())
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("maas-protogen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
