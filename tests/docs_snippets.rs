//! The Python and shell snippets of docs/safetensors.md run as written.
//!
//! Every Python block must be marked `python numpy` or `python torch` and must compile. The
//! `numpy` blocks, with the `sh numpy` commands between them, run in order in a scratch
//! directory against the program built here, when python3 has numpy and safetensors; under
//! CI=true their absence is a failure, not a skip. The `torch` blocks need torch and run with
//! `tests/docs_snippets/run.sh torch`.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::Command;

const DOC: &str = include_str!("../docs/safetensors.md");

/// A fenced block: its info string split into words, and its text.
struct Block {
    info: Vec<String>,
    code: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    for line in markdown.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => {
                current = Some(Block {
                    info: info.split_whitespace().map(String::from).collect(),
                    code: String::new(),
                })
            }
            (Some(_), Some("")) => blocks.push(current.take().expect("inside a block")),
            (Some(block), _) => {
                block.code.push_str(line);
                block.code.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    blocks
}

fn has(info: &[String], word: &str) -> bool {
    info.iter().any(|w| w == word)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn python_can(imports: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_python_snippet_is_marked_and_compiles() {
    if !python_can("sys") {
        assert!(
            !in_ci(),
            "python3 is needed to check docs/safetensors.md's snippets"
        );
        eprintln!("python3 not found: the snippets' syntax was NOT checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let python: Vec<Block> = blocks(DOC)
        .into_iter()
        .filter(|b| b.info.first().is_some_and(|l| l == "python"))
        .collect();
    assert!(python.len() >= 5, "found {} Python snippets", python.len());
    for (i, block) in python.iter().enumerate() {
        assert!(
            has(&block.info, "numpy") || has(&block.info, "torch"),
            "Python snippet {i} is marked neither numpy nor torch:\n{}",
            block.code
        );
        let file = dir.path().join(format!("snippet{i}.py"));
        std::fs::write(&file, &block.code).unwrap();
        let out = Command::new("python3")
            .args(["-m", "py_compile"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snippet {i} does not compile: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            block.code
        );
    }
}

/// Runs the blocks marked `tag`, in order, in `dir`, with the program on the PATH.
fn run_in_order(tag: &str, dir: &Path) {
    let program = assert_cmd::cargo::cargo_bin("wgpu-attention");
    let mut path = program.parent().unwrap().as_os_str().to_owned();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let mut ran = 0;
    for block in blocks(DOC).into_iter().filter(|b| has(&b.info, tag)) {
        let (interpreter, ext) = match block.info[0].as_str() {
            "python" => ("python3", "py"),
            "sh" => ("sh", "sh"),
            other => panic!("a `{other} {tag}` block cannot be run"),
        };
        let file = dir.join(format!("snippet{ran}.{ext}"));
        std::fs::write(&file, &block.code).unwrap();
        let out = Command::new(interpreter)
            .arg(&file)
            .current_dir(dir)
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snippet failed:\n{}\nstdout:\n{}\nstderr:\n{}",
            block.code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 3, "only {ran} `{tag}` snippets found");
}

#[test]
fn the_numpy_snippets_run_as_written() {
    if !python_can("numpy, safetensors") {
        assert!(
            !in_ci(),
            "python3 with numpy and safetensors is needed to run docs/safetensors.md's \
             snippets: pip install numpy safetensors"
        );
        eprintln!("numpy or safetensors missing: the numpy snippets were NOT run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_in_order("numpy", dir.path());
    assert!(dir.path().join("out.safetensors").is_file());
    // The operator's snippets wrote their own output, which the last one checked.
    assert!(dir.path().join("qkv-out.safetensors").is_file());
}
