//! The images the real node runs, as OCI archives written here (`scripts/oci-archive.sh`), for
//! `ctr -n k8s.io images import`: the sandbox's, the project's (`scripts/image.sh`, the
//! Dockerfile's recipe), the MCP servers' (the Python SDK test server's and server-everything's,
//! cached per machine), and a program of this build's.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// The Python SDK test server (tests/mcp/server.py) as images: one per `(name, arguments)`,
/// each serving MCP at `/mcp` on port 8000 as user 65532, alive while `/livez` is 200 (it turns
/// 503 once `/tmp/sick` exists in the container).
pub fn python_server(versions: &[(&str, &[&str])]) -> PathBuf {
    let mut command = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/mcp/server-image.sh"
    ));
    for (name, args) in versions {
        command.arg(name).arg(json!(args).to_string());
    }
    cached_archive(&mut command)
}

/// `server-everything`, the reference MCP server (tests/mcp/ts/everything-image.sh), as images
/// named `names`: Streamable HTTP at `/mcp` on port 8000, as user 65532.
pub fn server_everything(names: &[&str]) -> PathBuf {
    cached_archive(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/mcp/ts/everything-image.sh"
        ))
        .args(names),
    )
}

/// The archive a script that builds (or finds) a cached image prints.
fn cached_archive(command: &mut Command) -> PathBuf {
    let built = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(built.status.success(), "{command:?} failed");
    String::from_utf8_lossy(&built.stdout).trim().into()
}

/// The sandbox image, built from Debian's busybox-static.
pub const PAUSE: &str = "pause:local";

/// The sandbox image: Debian's busybox-static, waiting for its SIGTERM.
pub fn pause(dir: &Path) -> PathBuf {
    let rootfs = dir.join("pause-rootfs/bin");
    std::fs::create_dir_all(&rootfs).expect("pause rootfs");
    std::fs::copy("/bin/busybox", rootfs.join("busybox")).expect("busybox-static");
    let archive = dir.join("pause.oci.tar");
    oci_archive(
        &dir.join("pause-rootfs"),
        &[(
            r#"{"User":"65535:65535","Entrypoint":["/bin/busybox","sh","-c","trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"],"WorkingDir":"/"}"#,
            PAUSE,
        )],
        &archive,
    );
    archive
}

/// The project's image as an OCI archive in `dir`, from `scripts/image.sh` with this test
/// build's binary (stripped), named [`PROJECT`].
pub fn project(dir: &Path) -> PathBuf {
    let binary = dir.join("mcp-session-operator");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(env!("CARGO_BIN_EXE_mcp-session-operator"))
        .status()
        .expect("strip");
    assert!(stripped.success(), "strip the binary");
    let archive = dir.join("mcp-session-operator.oci.tar");
    run_script(
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/image.sh"))
            .arg("--binary")
            .arg(&binary)
            .arg("--output")
            .arg(&archive)
            .args(["--name", PROJECT]),
    );
    archive
}

/// The project's image as the node knows it.
pub const PROJECT: &str = "mcp-session-operator:bed";

/// An image of a program of this build (a benchmark's backend, say), as OCI archive in `dir`:
/// the binary and the libraries it links, run as 65532 with `args`, under each of `names`.
pub fn binary(binary: &Path, args: &[&str], names: &[&str], dir: &Path) -> PathBuf {
    let rootfs = dir.join("binary-rootfs");
    let installed = rootfs.join("bin/program");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
    std::fs::copy(binary, &installed).expect("copy the binary");
    let linked = Command::new("ldd").arg(binary).output().expect("ldd");
    for library in String::from_utf8_lossy(&linked.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
    {
        let target = rootfs.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("a library's directory")).expect("dir");
        std::fs::copy(library, &target).expect("copy a library");
    }
    let entrypoint: Vec<&str> = std::iter::once("/bin/program")
        .chain(args.iter().copied())
        .collect();
    let config =
        json!({"User": "65532:65532", "Entrypoint": entrypoint, "WorkingDir": "/"}).to_string();
    let images: Vec<(&str, &str)> = names.iter().map(|name| (config.as_str(), *name)).collect();
    let archive = dir.join("binary.oci.tar");
    oci_archive(&rootfs, &images, &archive);
    archive
}

/// `scripts/oci-archive.sh`: `rootfs` as one layer, an image of it per (configuration, name).
fn oci_archive(rootfs: &Path, images: &[(&str, &str)], archive: &Path) {
    let mut command = Command::new("bash");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/oci-archive.sh"
        ))
        .arg(rootfs);
    let (config, name) = images.first().expect("an image");
    command.args([config, name]).arg(archive);
    for (config, name) in &images[1..] {
        command.args([config, name]);
    }
    run_script(&mut command);
}

fn run_script(command: &mut Command) {
    let output = command.output().expect("a script");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An image's fully qualified name, as containerd stores it (`scripts/oci-archive.sh` names the
/// images it writes the same way): a name without a registry is Docker Hub's, and one without a
/// path is in its `library`.
pub fn qualified(image: &str) -> String {
    match image.split_once('/') {
        None => format!("docker.io/library/{image}"),
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => image.to_owned(),
        Some(_) => format!("docker.io/{image}"),
    }
}
