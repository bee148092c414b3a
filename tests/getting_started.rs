//! docs/getting-started.md, run as it is written: every `sh` block, line by line, by bash with
//! the real kubectl and helm against the 1.35 control plane; every `yaml` block whose first line
//! names a file (`# policy.yaml`) written to that file first. The commands run in a scratch
//! copy of the chart and the examples, as a user's checkout would hold them. A command that
//! fails, or prints columns other than the sample output under it in the page, fails the test,
//! so the page cannot drift from what works.
//!
//! Everything runs on the bed's real node (docs/testing.md): the chart's operator pods, from the
//! project's image pushed where the page's `helm install` points (tagged so on the node), two
//! replicas electing a leader with their service account's in-cluster credentials, the
//! apiserver calling their webhooks through the webhook Service; and the reader's own MCP
//! server (the Python SDK test server's image as `my-mcp:1` and `:2`), its pods injected with
//! the proxy. What the bed lacks: a registry (the chart's Redis image is not there, so its pod
//! never starts) and cluster DNS (a Service name does not resolve): the page's policy is
//! reconciled, and reports its Redis unreachable.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use mcp_session_operator::api::McpSessionPolicy;
use serde_json::json;
use support::control_plane::{ControlPlane, apply_object, control_plane, kube_bin_dir};
use support::images;
use support::node::RealNode;
use support::wait::{wait_for, wait_until};

const PAGE: &str = include_str!("../docs/getting-started.md");
/// How long one command may take; a watch (`-w`) is stopped sooner, once it printed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const WATCH_FOR: Duration = Duration::from_secs(3);

/// A fenced block of the page.
#[derive(Debug)]
struct Block {
    language: String,
    lines: Vec<String>,
    /// The page's line number of the opening fence, for messages.
    at: usize,
}

fn blocks(page: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (number, line) in page.lines().enumerate() {
        match (open.take(), line.strip_prefix("```")) {
            (None, Some(language)) => {
                open = Some(Block {
                    language: language.trim().to_owned(),
                    lines: Vec::new(),
                    at: number + 1,
                });
            }
            (Some(block), Some(_)) => blocks.push(block),
            (Some(mut block), None) => {
                block.lines.push(line.to_owned());
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    blocks
}

/// A command of an `sh` block (continuation lines joined) and the sample output the page shows
/// under it (`# ` lines, when their first is a header of capitalised column names).
#[derive(Debug, PartialEq)]
struct Step {
    command: String,
    sample_header: Option<Vec<String>>,
}

fn steps(block: &Block) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for line in &block.lines {
        let trimmed = line.trim();
        if pending.is_empty()
            && let Some(comment) = trimmed.strip_prefix("# ")
        {
            let columns: Vec<String> = comment.split_whitespace().map(str::to_owned).collect();
            let is_header = !columns.is_empty()
                && columns
                    .iter()
                    .all(|c| c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '-'));
            if let Some(last) = steps.last_mut()
                && is_header
                && last.sample_header.is_none()
            {
                last.sample_header = Some(columns);
            }
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(trimmed);
                steps.push(Step {
                    command: std::mem::take(&mut pending),
                    sample_header: None,
                });
            }
        }
    }
    steps
}

/// Where the page's commands run: a scratch directory holding the chart and the examples,
/// the real kubectl and helm on `PATH`, the bed's admin kubeconfig.
struct Shell {
    dir: tempfile::TempDir,
    path: String,
    kubeconfig: std::path::PathBuf,
}

impl Shell {
    fn new(plane: &ControlPlane) -> Self {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new("cp")
            .args(["-r", "charts", "examples"])
            .arg(dir.path())
            .current_dir(root)
            .status()
            .expect("cp");
        assert!(status.success(), "copy the chart and the examples");
        let path = format!(
            "{}:{}",
            kube_bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Self {
            dir,
            path,
            kubeconfig: plane.kubeconfig.clone(),
        }
    }

    /// Runs `command` with bash; its standard output, or a panic that quotes what it said.
    fn run(&self, command: &str, at: usize) -> String {
        let watch = command.split_whitespace().any(|word| word == "-w");
        let mut child = Command::new("bash")
            .args(["-o", "pipefail", "-c", command])
            .current_dir(self.dir.path())
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash");
        let started = Instant::now();
        let limit = if watch { WATCH_FOR } else { COMMAND_TIMEOUT };
        while started.elapsed() < limit {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let stopped = child.try_wait().ok().flatten().is_none();
        if stopped {
            let _ = child.kill();
        }
        let output = child.wait_with_output().expect("the command's output");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        eprintln!("$ {command}\n{stdout}{stderr}");
        match (stopped, watch) {
            (true, true) => assert!(
                !stdout.trim().is_empty(),
                "line {at}: `{command}` printed nothing in {WATCH_FOR:?}: {stderr}"
            ),
            (true, false) => panic!("line {at}: `{command}` still running after {limit:?}"),
            (false, _) => assert!(
                output.status.success(),
                "line {at}: `{command}` failed ({}): {stderr}{stdout}",
                output.status
            ),
        }
        stdout
    }

    fn write(&self, name: &str, lines: &[String]) {
        std::fs::write(self.dir.path().join(name), lines.join("\n") + "\n")
            .expect("write the page's file");
    }
}

/// The file a `yaml` block is, when its first line names one (`# policy.yaml`).
fn file_name(block: &Block) -> Option<&str> {
    let first = block.lines.first()?.trim().strip_prefix("# ")?;
    first.ends_with(".yaml").then_some(first)
}

#[test]
fn the_page_s_commands_are_read_as_a_user_reads_them() {
    let page = "intro\n```sh\nkubectl get msp -A\n# NAME   READY\n# a      True\nhelm install x \\\n  --set a=b \\\n  --set c=d   # why\n```\n```yaml\n# policy.yaml\nkind: X\n```\n";
    let found = blocks(page);
    assert_eq!(found.len(), 2);
    assert_eq!(file_name(&found[1]), Some("policy.yaml"));
    assert_eq!(
        steps(&found[0]),
        [
            Step {
                command: "kubectl get msp -A".into(),
                sample_header: Some(vec!["NAME".into(), "READY".into()]),
            },
            Step {
                command: "helm install x --set a=b --set c=d   # why".into(),
                sample_header: None,
            },
        ]
    );
}

/// The reader's MCP server's image; the page's upgrade sets `my-mcp:2`.
const READERS_SERVER_V1: &str = "my-mcp:1";

/// What a reader has before the page starts: the MCP server of step 2, a Deployment `my-mcp`
/// in `prod` whose container `server` serves on 8000.
async fn the_readers_server(plane: &ControlPlane) {
    let client = plane.client().await.expect("admin client");
    for object in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "my-mcp", "namespace": "prod"},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "my-mcp"}},
                        "template": {"metadata": {"labels": {"app": "my-mcp"}},
                                     "spec": {"containers": [{"name": "server", "image": READERS_SERVER_V1,
                                                              "ports": [{"containerPort": 8000}]}]}}}}),
    ] {
        let object = serde_json::from_value(object).expect("object");
        apply_object(&client, &object, false)
            .await
            .expect("the reader's server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_getting_started_works_as_written() {
    let plane = control_plane();
    let node = RealNode::start(plane).await;
    for name in operator_images(PAGE) {
        node.tag(images::PROJECT, &name);
    }
    let serve: &[&str] = &["8000", "--host", "0.0.0.0"];
    node.import(&images::python_server(&[
        (READERS_SERVER_V1, serve),
        ("my-mcp:2", serve),
    ]));
    the_readers_server(plane).await;
    let shell = Shell::new(plane);
    let mut installed = false;
    let mut ran = 0;
    for block in blocks(PAGE) {
        match block.language.as_str() {
            "yaml" => {
                if let Some(name) = file_name(&block) {
                    shell.write(name, &block.lines);
                }
            }
            "sh" => {
                for step in steps(&block) {
                    // The image build is the real-pods issue's; this bed runs no image.
                    if step.command.starts_with("docker ") {
                        continue;
                    }
                    let stdout = tokio::task::block_in_place(|| shell.run(&step.command, block.at));
                    ran += 1;
                    if let Some(sample) = &step.sample_header {
                        let printed: Vec<String> = stdout
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect();
                        assert_eq!(
                            &printed, sample,
                            "line {}: `{}` prints other columns than the page shows",
                            block.at, step.command
                        );
                    }
                    if step.command.starts_with("helm install") {
                        wait_the_charts_webhook(plane).await;
                        installed = true;
                    }
                    if step.command == "kubectl apply -f policy.yaml" {
                        wait_reconciled(plane, "prod", "my-mcp").await;
                    }
                }
            }
            _ => {}
        }
    }
    assert!(installed, "the page installs the chart");
    assert!(
        ran >= 15,
        "only {ran} commands ran: is the page still read?"
    );
    // "Two operator replicas, one of them leading."
    let client = plane.client().await.expect("admin client");
    let operators: Vec<String> = Api::<Pod>::namespaced(client.clone(), "mcp-system")
        .list(&ListParams::default().labels("app.kubernetes.io/name=mcp-session-operator"))
        .await
        .expect("the operator's pods")
        .items
        .iter()
        .filter(|pod| mcp_session_operator::api::pod::takes_requests(pod))
        .map(|pod| pod.name_any())
        .collect();
    assert_eq!(operators.len(), 2, "{operators:?}");
    let lease = Api::<Lease>::namespaced(client.clone(), "mcp-system")
        .get("mcp-session-operator")
        .await
        .expect("the leader's Lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        operators.contains(&holder),
        "{holder:?} leads, not one of {operators:?}"
    );
    // Step 3's restart made the reader's pods again, through the chart's webhook.
    let pods = Api::<Pod>::namespaced(client, "prod")
        .list(&ListParams::default().labels("app=my-mcp"))
        .await
        .expect("the reader's pods");
    let injected = pods
        .items
        .iter()
        .filter(|pod| pod.annotations().contains_key("mcpsession.dev/injected-by"))
        .count();
    assert!(injected > 0, "no pod of my-mcp got the proxy");
    eprintln!("{ran} commands of docs/getting-started.md ran as written; {injected} pods injected");
    for namespace in ["mcp-system", "prod"] {
        eprintln!("{namespace}:\n{}", node.wide_pods(namespace));
    }
}

/// The names the page gives the operator's image: the one it builds (`docker build -t`, which
/// the examples run) and the one it pushes, which its `helm install` names
/// (`--set image.repository=`, tagged with the chart's appVersion).
fn operator_images(page: &str) -> [String; 2] {
    let words: Vec<&str> = page.split_whitespace().collect();
    let built = words
        .windows(2)
        .find_map(|pair| (pair[0] == "-t").then(|| pair[1].trim_end_matches('`')))
        .expect("the page builds the image");
    let repository = words
        .iter()
        .find_map(|word| word.strip_prefix("image.repository="))
        .expect("the page sets image.repository");
    let chart = include_str!("../charts/mcp-session-operator/Chart.yaml");
    let version = chart
        .lines()
        .find_map(|line| line.strip_prefix("appVersion: "))
        .expect("the chart's appVersion")
        .trim_matches('"');
    [built.to_owned(), format!("{repository}:{version}")]
}

/// Waits until the apiserver reaches the chart's validating webhook through its Service, in
/// the operator pods the node runs: a policy that only the webhook can refuse is refused.
async fn wait_the_charts_webhook(plane: &ControlPlane) {
    let client = plane.client().await.expect("admin client");
    let resource = kube::api::ApiResource::erase::<McpSessionPolicy>(&());
    let policies: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let only_the_webhook_refuses: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
        "metadata": {"name": "probe"},
        "spec": {"selector": {"matchLabels": {"app": "probe"}}, "redis": {"url": "redis://h:notaport"}},
    }))
    .expect("policy");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_until(
        Duration::from_secs(90),
        "the chart's webhook answering through its Service",
        || async {
            match policies.create(&dry_run, &only_the_webhook_refuses).await {
                Err(error) if error.to_string().contains("denied the request") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Until the operator wrote the policy's status.
async fn wait_reconciled(plane: &ControlPlane, namespace: &str, name: &str) {
    let client = plane.client().await.expect("admin client");
    let policies: Api<McpSessionPolicy> = Api::namespaced(client, namespace);
    wait_for(
        Duration::from_secs(60),
        "the page's policy reconciled",
        || async {
            policies
                .get(name)
                .await
                .is_ok_and(|p| p.status.is_some_and(|s| !s.conditions.is_empty()))
        },
    )
    .await;
}
