//! Compiles every proto under `proto/` with protox (a pure-Rust protobuf compiler), so building
//! greeter needs no system `protoc`, and writes the encoded descriptor set that reflection, the
//! Connect translation and every per-method table read (`greeter::methods::DESCRIPTOR_SETS`).
//! The protos of the examples (`examples/proto/`) are compiled the same way into files of their
//! own, which only the examples and tests include: the server does not serve them.

use std::{
    env,
    path::{Path, PathBuf},
};

use prost::Message as _;

/// Skipped under `proto/`: `grpc/health/v1/health.proto` is there only so grpcurl can be pointed
/// at the probe port, which has no reflection. tonic-health already generates, serves and
/// describes it; compiled here too, reflection would be given two descriptors of one file.
const NOT_OURS: &str = "proto/grpc";

/// The protos of the examples and tests only.
const EXAMPLES: &str = "examples/proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    compile("proto", Some(Path::new(NOT_OURS)), "greeter")?;
    // Absent from builds of the binary alone: the container image's context holds no examples.
    if Path::new(EXAMPLES).is_dir() {
        compile(EXAMPLES, None, "examples")?;
    }
    emit_git_commit();
    Ok(())
}

/// Compiles the protos under `root` (but not under `skip`) into `OUT_DIR`: one `<package>.rs`
/// per package, `<name>_protos.rs` including them all as nested modules, and
/// `<name>_descriptor.bin`, their encoded `FileDescriptorSet`.
fn compile(root: &str, skip: Option<&Path>, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    // A directory, so an added or removed file reruns the build too.
    println!("cargo:rerun-if-changed={root}");
    let mut protos = Vec::new();
    find_protos(Path::new(root), skip, &mut protos)?;
    protos.sort();
    let fds = protox::compile(&protos, [root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join(format!("{name}_descriptor.bin")),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file(format!("{name}_protos.rs"))
        .compile_fds(fds)?;
    Ok(())
}

fn find_protos(dir: &Path, skip: Option<&Path>, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if Some(path.as_path()) == skip {
            continue;
        }
        if path.is_dir() {
            find_protos(&path, skip, found)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(path);
        }
    }
    Ok(())
}
/// `greeter --version` names the commit it was built from when there is one. Builds without
/// `.git` (container builds, source tarballs) can pass it as `GREETER_GIT_COMMIT`; otherwise
/// "unknown".
fn emit_git_commit() {
    println!("cargo:rerun-if-env-changed=GREETER_GIT_COMMIT");
    let from_env = env::var("GREETER_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = from_env
        .or_else(git_head)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=GREETER_GIT_COMMIT={commit}");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

fn git_head() -> Option<String> {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
