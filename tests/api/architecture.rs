//! The structure rules of `ARCHITECTURE.md`, checked on the source so that
//! a change that breaks one fails here rather than in review: no handler
//! knows which store runs, handler modules do not import each other, the
//! top-level modules form no import cycle, and no outcome code is spelled
//! outside its enum.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tokengate::event::ErrorCode;

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A file's code lines: before its test module, without comment lines.
fn code_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).map(str::to_owned).collect()
}

/// The top-level module a source file belongs to (`None` for the crate
/// root and the binary).
fn top_module(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// `crate::name` paths used in a line.
fn crate_refs(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .map(|(at, _)| {
            line[at + "crate::".len()..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect()
        })
        .filter(|name: &String| !name.is_empty())
        .collect()
}

#[test]
fn no_handler_knows_which_store_runs() {
    for file in rust_files(&src().join("api")) {
        for line in code_lines(&file) {
            assert!(!line.to_ascii_lowercase().contains("redis"), "{} mentions Redis: {line}", file.display());
        }
    }
}

#[test]
fn handler_modules_do_not_import_each_other() {
    let handlers = ["anthropic", "channels", "demo", "health", "openai", "spec", "stream", "streams", "tickets"];
    for file in rust_files(&src().join("api")) {
        for line in code_lines(&file) {
            for handler in handlers {
                for path in [format!("super::{handler}::"), format!("api::{handler}::")] {
                    assert!(!line.contains(&path), "{} imports the `{handler}` handlers: {line}", file.display());
                }
            }
        }
    }
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src()) {
        let Some(module) = top_module(&file) else { continue };
        for line in code_lines(&file) {
            for used in crate_refs(&line) {
                if used != module {
                    uses.entry(module.clone()).or_default().insert(used);
                }
            }
        }
    }
    // Depth-first search for a path back to each module.
    for start in uses.keys() {
        let mut stack: Vec<Vec<String>> = vec![vec![start.clone()]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = path.last().unwrap();
            for next in uses.get(last).into_iter().flatten() {
                assert!(next != start, "import cycle: {} -> {start}", path.join(" -> "));
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push(longer);
                }
            }
        }
    }
    // The scan must see the layering it checks, or it checks nothing.
    assert!(uses["api"].contains("stream") && uses["stream"].contains("store") && uses["store"].contains("event"));
}

#[test]
fn outcome_codes_are_spelled_only_in_their_enum() {
    let home = src().join("event").join("code.rs");
    for file in rust_files(&src()).into_iter().filter(|f| *f != home) {
        for line in code_lines(&file) {
            for code in ErrorCode::ALL {
                let literal = format!("\"{}\"", code.as_str());
                assert!(!line.contains(&literal), "{} spells {literal}: {line}", file.display());
            }
        }
    }
    // The enum itself does spell them (the check looks at real text).
    let text = std::fs::read_to_string(home).unwrap();
    assert!(ErrorCode::ALL.iter().all(|c| text.contains(&format!("\"{}\"", c.as_str()))));
}
