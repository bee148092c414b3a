//! docs/configuration.md is generated from the CRD schema (`McpSessionPolicy`) and from the
//! chart's values (values.schema.json for types and limits, values.yaml for defaults and the
//! comments above each key): this test fails when it drifts. Regenerate with
//! `MCP_UPDATE_REFERENCE=1 cargo test --test reference`.

use kube::CustomResourceExt as _;
use mcp_session_operator::api::McpSessionPolicy;
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mcp-session-operator");

/// A row: the key's path, its type (and limits), its default, what it is for.
struct Row {
    path: String,
    kind: String,
    default: String,
    description: String,
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn kind_of(schema: &Value) -> String {
    let mut kind = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ if schema.get("x-kubernetes-int-or-string").is_some() => "integer or string".into(),
        _ => "object".into(),
    };
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
        kind = format!("{kind}: one of {}", values.join(", "));
    }
    let limit = |key: &str| schema[key].as_f64().map(|v| v.to_string());
    match (limit("minimum"), limit("maximum")) {
        (Some(min), Some(max)) => kind.push_str(&format!(", {min} to {max}")),
        (Some(min), None) => kind.push_str(&format!(", at least {min}")),
        (None, Some(max)) => kind.push_str(&format!(", at most {max}")),
        (None, None) => {}
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        kind.push_str(&format!(", matching `{pattern}`"));
    }
    kind
}

fn shown(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) if s.is_empty() => "`\"\"`".into(),
        other => format!("`{other}`"),
    }
}

/// The CRD's spec, field by field (objects first, then their fields).
fn crd_rows(schema: &Value, path: &str, rows: &mut Vec<Row>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (name, field) in properties {
        let field_path = format!("{path}.{name}");
        let mut description = field["description"].as_str().unwrap_or_default().to_owned();
        if required.contains(&name.as_str()) {
            description = format!("**Required.** {description}");
        }
        let nested = field["properties"].is_object();
        rows.push(Row {
            path: field_path.clone(),
            kind: kind_of(field),
            default: if nested {
                String::new()
            } else {
                shown(&field["default"])
            },
            description,
        });
        if nested {
            crd_rows(field, &field_path, rows);
        }
    }
}

/// Comments directly above each key of values.yaml, by dotted path.
fn value_comments(yaml: &str) -> std::collections::BTreeMap<String, String> {
    let mut comments = std::collections::BTreeMap::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    for line in yaml.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            pending.clear();
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            pending.push(comment.trim().to_owned());
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        if key.starts_with('-') || key.contains(' ') {
            pending.clear();
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        if !pending.is_empty() {
            comments.insert(path.join("."), pending.join(" "));
        }
        pending.clear();
    }
    comments
}

fn chart_rows(
    schema: &Value,
    defaults: &Value,
    comments: &std::collections::BTreeMap<String, String>,
    path: &str,
    rows: &mut Vec<Row>,
) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (name, field) in properties {
        let field_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        let nested = field["properties"].is_object();
        let description = comments
            .get(&field_path)
            .cloned()
            .or_else(|| field["description"].as_str().map(str::to_owned))
            .unwrap_or_default();
        rows.push(Row {
            path: field_path.clone(),
            kind: kind_of(field),
            default: if nested {
                String::new()
            } else {
                shown(&defaults[name])
            },
            description,
        });
        if nested {
            chart_rows(field, &defaults[name], comments, &field_path, rows);
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| key | type | default | description |\n| --- | --- | --- | --- |\n");
    for row in rows {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            row.path,
            cell(&row.kind),
            cell(&row.default),
            cell(&row.description)
        ));
    }
    out
}

fn reference() -> String {
    let crd = serde_json::to_value(McpSessionPolicy::crd()).expect("CRD as JSON");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut policy = Vec::new();
    crd_rows(spec, "spec", &mut policy);

    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART}/values.schema.json"))
            .expect("values.schema.json"),
    )
    .expect("values schema");
    let values_yaml = std::fs::read_to_string(format!("{CHART}/values.yaml")).expect("values.yaml");
    let defaults: Value = serde_yaml::from_str(&values_yaml).expect("values.yaml");
    let mut chart = Vec::new();
    chart_rows(
        &schema,
        &defaults,
        &value_comments(&values_yaml),
        "",
        &mut chart,
    );

    format!(
        "# Configuration reference\n\n\
         Generated from the `McpSessionPolicy` CRD schema and the chart's values by\n\
         `tests/reference.rs` (`MCP_UPDATE_REFERENCE=1 cargo test --test reference`); do not edit.\n\
         The flags of the binary are in [cli.md](cli.md) and `mcp-session-operator <command> --help`.\n\n\
         ## McpSessionPolicy (`mcpsession.dev/v1alpha1`)\n\n\
         What the operator reads; `kubectl explain mcpsessionpolicy.spec` shows the same. The\n\
         validating webhook refuses what the schema cannot say (docs/webhook.md).\n\n{}\n\
         ## Helm chart values (`charts/mcp-session-operator`)\n\n\
         `values.schema.json` refuses unknown keys and wrong types at install.\n\n{}",
        table(&policy),
        table(&chart)
    )
}

#[test]
fn the_configuration_reference_is_generated_from_the_crd_and_the_chart() {
    let generated = reference();
    if std::env::var_os("MCP_UPDATE_REFERENCE").is_some() {
        std::fs::write(REFERENCE, &generated).expect("write docs/configuration.md");
    }
    let committed = std::fs::read_to_string(REFERENCE).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md is out of date: MCP_UPDATE_REFERENCE=1 cargo test --test reference"
    );
}

/// Metric families the binary registers, read from the registrations in the source.
fn registered_metrics() -> Vec<String> {
    let mut names = Vec::new();
    for source in [
        include_str!("../src/metrics/controller.rs"),
        include_str!("../src/metrics/webhook.rs"),
        include_str!("../src/proxy/metrics.rs"),
    ] {
        let mut lines = source.lines();
        while let Some(line) = lines.next() {
            if line.trim_end().ends_with("registry.register(")
                && let Some(name) = lines.next()
            {
                names.push(
                    name.trim()
                        .trim_end_matches(',')
                        .trim_matches('"')
                        .to_owned(),
                );
            }
        }
    }
    names
}

/// Every metric the Grafana dashboard and the chart's alerts query is one the binary exports
/// (a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`).
#[test]
fn the_dashboard_and_the_alerts_query_metrics_that_exist() {
    let registered = registered_metrics();
    assert!(registered.len() > 20, "{registered:?}");
    let exists = |name: &str| {
        registered.iter().any(|family| {
            ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{family}{suffix}"))
        })
    };
    let dashboard = include_str!("../docs/grafana-dashboard.json");
    let dashboard_json: serde_json::Value =
        serde_json::from_str(dashboard).expect("the dashboard is JSON");
    assert!(
        dashboard_json["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let alerts = include_str!("../charts/mcp-session-operator/templates/prometheusrule.yaml");
    for (file, text) in [
        ("docs/grafana-dashboard.json", dashboard),
        ("prometheusrule.yaml", alerts),
    ] {
        let mut queried = 0;
        for (at, _) in text.match_indices("mcp_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            queried += 1;
            assert!(
                exists(&name),
                "{file} queries {name}, which is not exported: {registered:?}"
            );
        }
        assert!(queried > 0, "{file} queries no metric");
    }
}
