//! The library's module graph has no cycles: data flows one way, config -> plan -> encode ->
//! read back -> compare, and the helpers everything uses (errors, tensors, GPU utilities) depend
//! on nothing above them. A module that names `crate::other` depends on `other`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The library's top-level modules, as `src/lib.rs` declares them.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string("src/lib.rs").unwrap();
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect()
}

/// The source files of module `m`: `src/m.rs`, or every file under `src/m/`.
fn files(m: &str) -> Vec<std::path::PathBuf> {
    let single = Path::new("src").join(format!("{m}.rs"));
    if single.exists() {
        return vec![single];
    }
    let mut out = Vec::new();
    let mut dirs = vec![Path::new("src").join(m)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "module {m} has no files");
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    mods.iter()
        .map(|m| {
            let mut deps = BTreeSet::new();
            for file in files(m) {
                let text = std::fs::read_to_string(&file).unwrap();
                for code in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    for (at, _) in code.match_indices("crate::") {
                        let rest = &code[at + "crate::".len()..];
                        let name: String = rest
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if name != *m && mods.contains(&name) {
                            deps.insert(name);
                        }
                    }
                }
            }
            (m.clone(), deps)
        })
        .collect()
}

#[test]
fn the_module_graph_has_no_cycles() {
    let graph = graph();
    assert!(graph.len() >= 10, "too few modules found: {graph:?}");
    // Depth-first search for a back edge; report the cycle's path.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("module cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_string());
        for dep in &graph[m] {
            visit(dep, graph, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

/// The leaves stay leaves: errors, tensors and GPU utilities know nothing of attention.
#[test]
fn the_foundations_depend_on_nothing_above_them() {
    let graph = graph();
    assert!(graph["error"].is_empty(), "{:?}", graph["error"]);
    for m in ["tensor", "gpu"] {
        assert!(
            graph[m].iter().all(|d| d == "error"),
            "{m} depends on {:?}",
            graph[m]
        );
    }
    // The kernels' host side never reaches back into the plan that uses it.
    assert!(!graph["kernels"].contains("plan"), "{:?}", graph["kernels"]);
    assert!(!graph["timing"].contains("plan"), "{:?}", graph["timing"]);
}
