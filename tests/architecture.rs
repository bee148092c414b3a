//! The crate's shape, checked: its top-level modules import one another without a circle, the
//! proxy's layer folders import only from the layers below them (and `mcp/` from none), and no
//! function hands back a bool inside a tuple (a named type says what the flag means).
//!
//! The imports are read from the source text (`crate::a::...` paths, `use super::...` in the
//! proxy); comments are skipped, so a doc link is no dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The proxy's layer folders, lowest first: each may import from those before it.
const PROXY_LAYERS: [&str; 6] = [
    "mcp",
    "upstream",
    "session",
    "stream",
    "legacy",
    "lifecycle",
];

fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(source_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A file's code without its comments (line comments, doc comments).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string (a URL) is kept: only a comment after code or alone goes.
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names that follow `prefix` in `code`: `crate::a::b` with prefix `crate::` gives `a`;
/// a group `crate::{a, b::c}` gives `a` and `b`.
fn imported(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        // `foo_crate::` is not `crate::`.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The top-level module a file under src/ belongs to.
fn top_module(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in source_files(&src()) {
        let Some(module) = top_module(&file) else {
            continue;
        };
        let imports = imported(&code(&file), "crate::");
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(imports.into_iter().filter(|m| *m != module));
    }
    graph
}

/// A circle in the graph, if there is one, as the modules along it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_top_level_modules_import_one_another_without_a_circle() {
    let graph = module_graph();
    assert!(
        graph.len() >= 10,
        "read too few modules to mean anything: {graph:?}"
    );
    assert!(
        graph["api"].iter().all(|m| m == "store"),
        "api sits at the bottom, beside the store only: it imports {:?}",
        graph["api"]
    );
    if let Some(circle) = find_circle(&graph) {
        panic!("the modules import in a circle: {}", circle.join(" -> "));
    }
}

#[test]
fn the_circle_check_finds_a_circle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_circle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.get_mut("c").expect("c").clear();
    assert_eq!(find_circle(&graph), None);
}

#[test]
fn each_proxy_layer_imports_only_the_layers_below_it() {
    let proxy = src().join("proxy");
    let mut checked = 0;
    for (level, layer) in PROXY_LAYERS.iter().enumerate() {
        let below = &PROXY_LAYERS[..level];
        let files = source_files(&proxy.join(layer));
        assert!(!files.is_empty(), "src/proxy/{layer}/ has no files");
        for file in files {
            let code = code(&file);
            let mut imports = imported(&code, "crate::proxy::");
            // A file directly in the folder reaches the proxy's top level as `super::`.
            if file.parent() == Some(proxy.join(layer).as_path())
                && file.file_name().is_some_and(|n| n == "mod.rs")
            {
                imports.extend(imported(&code, "super::"));
            }
            for import in imports {
                let is_layer = PROXY_LAYERS.contains(&import.as_str());
                assert!(
                    !is_layer || import == *layer || below.contains(&import.as_str()),
                    "{} imports crate::proxy::{import}, a layer not below {layer}",
                    file.display()
                );
                assert!(
                    *layer != "mcp" || import == "mcp",
                    "{} (mcp/) imports crate::proxy::{import}: mcp/ imports nothing of the proxy",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked only {checked} files");
}

#[test]
fn no_function_returns_a_bool_in_a_tuple() {
    let mut offenders = Vec::new();
    for file in source_files(&src()) {
        let code = code(&file);
        for (at, _) in code.match_indices("fn ") {
            let signature = &code[at..];
            let end = signature.find(['{', ';']).unwrap_or(signature.len());
            let signature = &signature[..end];
            let Some((_, returns)) = signature.split_once("->") else {
                continue;
            };
            let tuple_with_bool = returns.split('(').skip(1).any(|inside| {
                inside
                    .split(')')
                    .next()
                    .is_some_and(|t| t.contains("bool") && t.contains(','))
            });
            if tuple_with_bool {
                let line = code[..at].lines().count() + 1;
                offenders.push(format!("{}:{line}: {}", file.display(), signature.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "functions that return a bool in a tuple (name the state instead):\n{}",
        offenders.join("\n")
    );
}
