//! The program end to end, as a user runs it: the walkthrough prints the worked example's exact
//! numbers, the benchmark writes valid JSON, CSV and SVG for a tiny sweep, `adapters` names
//! the one it would choose. They need an adapter and fail without one.
#![cfg(feature = "cli")]

use assert_cmd::Command;
use predicates::prelude::*;

fn program() -> Command {
    Command::cargo_bin("wgpu-attention").expect("the wgpu-attention binary is built")
}

#[test]
fn walkthrough_prints_every_step_with_the_exact_numbers() {
    let out = program().arg("walkthrough").assert().success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    for step in 1..=8 {
        assert!(
            stdout.contains(&format!("Step {step}: ")),
            "step {step} missing:\n{stdout}"
        );
    }
    // Softmax rows and outputs of ../shared/worked-example.md, to the 6 decimals f32 holds.
    // Output 1 shows twice (steps 7 and 8), GPU and CPU each time.
    for (row, times) in [
        ("[  0.063379  0.468311  0.468311 ]", 2),
        ("[  0.000006  0.982008  0.017986 ]", 2),
        ("[  0.000295  0.880537  0.119168 ]", 2),
        ("[  1.936621  6.683105  1.595068 ]", 4),
        ("[  1.999705  7.759892  0.358389 ]", 2),
    ] {
        assert_eq!(stdout.matches(row).count(), times, "{row}:\n{stdout}");
    }
    // Output 2: the GPU may differ from the reference in the 7th digit, never more.
    assert!(stdout.contains("[  1.999994  7.96399"), "{stdout}");
    assert!(stdout.contains("Every step agrees"), "{stdout}");
}

#[test]
fn walkthrough_with_the_transformer_scale() {
    let scale = (1.0f32 / 3f32.sqrt()).to_string();
    program()
        .args(["walkthrough", "--scale", &scale])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "[  1.863874  6.319371  1.704189 ]",
        ))
        .stdout(predicate::str::contains(
            "[  1.992555  7.479636  0.735877 ]",
        ));
}

#[test]
fn bench_writes_json_csv_and_svg_for_a_tiny_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let (json, csv, svg) = (
        dir.path().join("b.json"),
        dir.path().join("b.csv"),
        dir.path().join("b.svg"),
    );
    program()
        .args([
            "bench",
            "--seq",
            "8,16",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--causal",
            // The operator's rows at lengths a software rasteriser runs at once.
            "--op-len",
            "16,32",
            "--op-cross-kv-len",
            "40",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .assert()
        .success()
        .stdout(predicate::str::contains("4*B*H*N*N*D"))
        .stdout(predicate::str::contains("fus/stg"));

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["heads"], 2);
    assert_eq!(report["causal"], true);
    assert!(report["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    let gpu = report["gpu"].as_array().unwrap();
    assert_eq!(gpu.len(), 4, "two lengths x two paths");
    for row in gpu {
        assert!(row["seq"] == 8 || row["seq"] == 16);
        assert!(row["kernel"] == "staged" || row["kernel"] == "fused");
        for key in ["gpu", "attention", "end_to_end"] {
            let median = row[key]["median"].as_f64().unwrap();
            let min = row[key]["min"].as_f64().unwrap();
            // (min <= median holds by construction: the samples are sorted.)
            assert!(median > 0.0 && min > 0.0, "{key}: {row}");
        }
        assert!(row["attention_gflops"].as_f64().unwrap() > 0.0);
        assert!(row["layer_gflops"].as_f64().unwrap() > 0.0);
        assert!(row["error"]["max_abs"].as_f64().unwrap() < 1e-4);
        assert_eq!(row["error"]["passed"], true);
        assert!(row["memory_bytes"].as_u64().unwrap() > 0);
        assert!(!row["stages"].as_array().unwrap().is_empty());
    }
    let operator = report["operator"].as_array().unwrap();
    let shapes: Vec<(&str, u64, u64, u64, u64)> = operator
        .iter()
        .map(|r| {
            let s = &r["shape"];
            (
                s["name"].as_str().unwrap(),
                s["heads"].as_u64().unwrap(),
                s["kv_heads"].as_u64().unwrap(),
                s["q_len"].as_u64().unwrap(),
                s["kv_len"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            ("gqa", 32, 8, 16, 16),
            ("gqa", 32, 8, 32, 32),
            ("cross", 8, 8, 64, 40)
        ]
    );
    for row in operator {
        for key in ["gpu", "end_to_end"] {
            assert!(row[key]["median"].as_f64().unwrap() > 0.0, "{key}: {row}");
        }
        assert!(row["gflops"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["error"]["passed"], true, "{row}");
        let used = row["error"]["tolerance_used"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&used), "{row}");
    }
    assert_eq!(
        operator[0]["checked_heads"], 8,
        "two groups of 4 query heads"
    );
    let cpu = report["cpu"].as_array().unwrap();
    assert_eq!(cpu.len(), 2);
    for r in cpu {
        assert!(r["layer_gflops"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["error"]["passed"], true, "{r}");
        // The CPU row reports the runs it really timed, after a warm-up.
        assert_eq!(r["samples"], 2, "{r}");
        assert_eq!(r["warmup"], 1, "{r}");
        let used = r["error"]["tolerance_used"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&used), "{r}");
    }

    let csv = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines.len(),
        1 + 4 + 2,
        "header, 4 GPU rows, 2 CPU rows:\n{csv}"
    );
    assert!(lines[0].starts_with("seq,path,adapter,timing,"));
    // CPU rows leave the GPU-only columns empty rather than repeating the CPU time there.
    // Counted from the end: the quoted stage names ("project q, k, v ms") hold commas.
    let header: Vec<&str> = lines[0].split(',').collect();
    let from_end = |name: &str| header.len() - header.iter().position(|h| *h == name).unwrap();
    let cpu_rows: Vec<&&str> = lines
        .iter()
        .filter(|l| l.split(',').nth(1) == Some("cpu"))
        .collect();
    assert_eq!(cpu_rows.len(), 2, "{csv}");
    for line in cpu_rows {
        let fields: Vec<&str> = line.split(',').collect();
        let field = |name: &str| fields[fields.len() - from_end(name)];
        assert_eq!(field("gpu ms"), "", "{line}");
        assert_eq!(field("gpu memory bytes"), "", "{line}");
        assert!(!field("end to end ms").is_empty(), "{line}");
        assert_eq!(field("samples"), "2", "{line}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("sequence length")
            && svg.contains("fused: attention")
    );
}

#[test]
fn adapters_lists_and_chooses() {
    program()
        .arg("adapters")
        .assert()
        .success()
        .stdout(predicate::str::contains("[0] "))
        .stdout(predicate::str::contains("timestamp queries"))
        .stdout(predicate::str::contains("chosen: "))
        .stdout(predicate::str::contains("why: "));
}

#[test]
fn an_adapter_that_does_not_exist_is_a_clear_failure() {
    program()
        .args(["walkthrough", "--adapter", "no-such-gpu"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no GPU adapter found"))
        .stderr(predicate::str::contains("mesa-vulkan-drivers"));
}

#[test]
fn walkthrough_keeps_stderr_clean_without_a_display() {
    // Mesa's device-select layer made libwayland print XDG_RUNTIME_DIR errors on every run.
    let out = program()
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .arg("walkthrough")
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr);
    assert!(stderr.is_empty(), "stderr of a successful run:\n{stderr}");
}

#[test]
fn bench_names_a_zero_head_count() {
    program()
        .args(["bench", "--heads", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "invalid value '0' for '--heads <HEADS>': must be at least 1",
        ));
}

#[test]
fn bench_refuses_a_length_too_large_before_allocating() {
    // This used to abort allocating 68 GB for the input.
    program()
        .args(["bench", "--seq", "4294967297", "--no-cpu"])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "--seq 4294967297: the input x [batch 1, seq 4294967297, d_model 512] alone needs \
             8796093024256 bytes, over this adapter's largest buffer",
        ));
}

#[test]
fn bench_decode_writes_its_rows_and_ceilings_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("d.json");
    program()
        .args([
            "bench",
            "--decode",
            "--kv-len",
            "64,200",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--layer",
        ])
        .arg("--json")
        .arg(&json)
        .assert()
        .success()
        .stdout(predicate::str::contains("split ms/tok"))
        .stdout(predicate::str::contains(
            "cached layer step at kv_len 200 in f32 (d_model 32",
        ))
        .stdout(predicate::str::contains(
            "chunked prefill: 512 queries over 4096 keys",
        ));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (report["heads"].clone(), report["kv_heads"].clone()),
        (4.into(), 2.into())
    );
    for key in ["copy_bytes_per_s", "stream_bytes_per_s"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    let rows = report["decode"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, kv) in rows.iter().zip([64, 200]) {
        assert_eq!(row["kv_len"], kv);
        for key in [
            "ms_per_token",
            "kv_bytes_per_s",
            "single_pass_ms_per_token",
            "layer_ms_per_token",
        ] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {row}");
        }
        assert_eq!(row["passed"], true);
    }
    assert_eq!(report["chunked_prefill"]["q_len"], 512);
    assert!(report["chunked_prefill"]["ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_decode_in_both_precisions_gives_f16_rows_their_time_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("d.json");
    let run = program()
        .args([
            "bench",
            "--decode",
            "--precision",
            "both",
            "--kv-len",
            "64",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-prefill",
        ])
        .arg("--json")
        .arg(&json)
        .assert();
    if !has_f16() {
        run.failure()
            .stderr(predicate::str::contains("lacks shader-f16"));
        return;
    }
    run.success().stdout(predicate::str::contains("f16/f32"));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["decode"].as_array().unwrap();
    let precisions: Vec<&str> = rows
        .iter()
        .map(|r| r["precision"].as_str().unwrap())
        .collect();
    assert_eq!(precisions, ["f32", "f16"]);
    for row in rows {
        assert_eq!(
            (row["kv_len"].clone(), row["passed"].clone()),
            (64.into(), true.into())
        );
        assert!(row["kv_bytes_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(rows[0]["f16_f32_time_ratio"].is_null());
    // The ratio is of the two rows' own times.
    let ratio = rows[1]["f16_f32_time_ratio"].as_f64().unwrap();
    let want =
        rows[1]["ms_per_token"].as_f64().unwrap() / rows[0]["ms_per_token"].as_f64().unwrap();
    assert!((ratio - want).abs() <= 1e-9 * want, "{ratio} {want}");
}

/// Whether this machine's adapter runs f16 storage; without shader-f16 the f16 commands must
/// fail with the named error instead.
fn has_f16() -> bool {
    wgpu_attention::GpuContext::from_env()
        .expect("an adapter")
        .has_f16()
}

#[test]
fn walkthrough_in_f16_shows_the_f16_outputs_within_their_bound() {
    let run = program()
        .args(["walkthrough", "--precision", "f16"])
        .assert();
    if !has_f16() {
        run.failure()
            .stderr(predicate::str::contains("lacks shader-f16"));
        return;
    }
    let out = run.success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(
        stdout.contains("f16 storage: all outputs again"),
        "{stdout}"
    );
    // Output 1 to f16's 11 significant bits: 1.936523 is the f16 nearest 1.936621.
    assert!(stdout.contains("[  1.936523  6.68"), "{stdout}");
    assert!(stdout.contains("of the f16 error bound"), "{stdout}");
}

#[test]
fn bench_in_both_precisions_prints_the_f16_to_f32_ratio() {
    let run = program()
        .args([
            "bench",
            "--precision",
            "both",
            "--seq",
            "8,16",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ])
        .assert();
    if !has_f16() {
        run.failure()
            .stderr(predicate::str::contains("lacks shader-f16"));
        return;
    }
    let out = run.success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(stdout.contains("f16/f32 time ratio"), "{stdout}");
    for seq in [8, 16] {
        for prec in ["f32", "f16"] {
            let row = stdout
                .lines()
                .find(|l| {
                    let cells: Vec<&str> = l.split_whitespace().collect();
                    cells.first() == Some(&seq.to_string().as_str()) && cells.get(1) == Some(&prec)
                })
                .unwrap_or_else(|| panic!("no row for seq {seq} {prec}:\n{stdout}"));
            assert!(row.ends_with("pass"), "{row}");
        }
    }
}
