//! Which watched files changed: modification times of every file under the watched paths,
//! compared between polls. Polling needs no platform API and sees edits by any editor (those
//! that write in place and those that replace the file); the trees watched are source trees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Directories never watched: version control, dependencies, build output, caches.
const SKIPPED: [&str; 8] = [
    ".git",
    "node_modules",
    "target",
    "__pycache__",
    ".venv",
    "venv",
    ".mypy_cache",
    ".pytest_cache",
];

/// Most files looked at per poll: a bound on the work of watching a tree by mistake.
const MAX_FILES: usize = 50_000;

/// Files and their modification times.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<PathBuf, Option<SystemTime>>);

impl Snapshot {
    pub fn take(paths: &[PathBuf]) -> Self {
        let mut files = BTreeMap::new();
        for path in paths {
            visit(path, &mut files);
        }
        Self(files)
    }

    /// A path that was added, removed or modified since `earlier`.
    pub fn changed_since<'a>(&'a self, earlier: &'a Self) -> Option<&'a Path> {
        let modified = self
            .0
            .iter()
            .find(|(path, time)| earlier.0.get(*path) != Some(*time))
            .map(|(path, _)| path.as_path());
        modified.or_else(|| {
            earlier
                .0
                .keys()
                .find(|path| !self.0.contains_key(*path))
                .map(PathBuf::as_path)
        })
    }
}

fn visit(path: &Path, files: &mut BTreeMap<PathBuf, Option<SystemTime>>) {
    if files.len() >= MAX_FILES {
        return;
    }
    let Ok(metadata) = std::fs::metadata(path) else {
        return;
    };
    if !metadata.is_dir() {
        files.insert(path.to_owned(), metadata.modified().ok());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let skipped = name.to_str().is_some_and(|n| SKIPPED.contains(&n));
        if !skipped {
            visit(&entry.path(), files);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_additions_and_removals_are_changes_and_skipped_trees_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::write(root.join("server.py"), "v1").unwrap();
        std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
        let watched = [root.clone()];
        let first = Snapshot::take(&watched);
        assert_eq!(first.changed_since(&first), None);
        std::fs::write(root.join("node_modules/x/index.js"), "ignored").unwrap();
        assert_eq!(Snapshot::take(&watched).changed_since(&first), None);

        let file = std::fs::File::options()
            .write(true)
            .open(root.join("server.py"))
            .unwrap();
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let second = Snapshot::take(&watched);
        assert_eq!(
            second.changed_since(&first),
            Some(root.join("server.py").as_path())
        );

        std::fs::write(root.join("new.py"), "").unwrap();
        let third = Snapshot::take(&watched);
        assert_eq!(
            third.changed_since(&second),
            Some(root.join("new.py").as_path())
        );
        std::fs::remove_file(root.join("new.py")).unwrap();
        assert_eq!(
            Snapshot::take(&watched).changed_since(&third),
            Some(root.join("new.py").as_path())
        );
        // A single file can be watched too; a missing path is no error.
        let single = [root.join("server.py"), root.join("missing")];
        assert_eq!(Snapshot::take(&single).0.len(), 1);
    }
}
