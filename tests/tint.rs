//! Every kernel specialisation the host can emit, compiled by Tint: Dawn's WGSL compiler, which
//! is what a browser's WebGPU (and so a wgpu app built for the web) hands our WGSL to. naga
//! accepts some WGSL that Tint rejects (constant expressions that evaluate to infinity, comparisons
//! mixed with bitwise operators without parentheses), so the naga checks of tests/shaders.rs
//! are not enough.
//!
//! The sources, override sets and pipeline layouts come from the host's own enumerator,
//! `wgpu_attention::kernels::variants`, for three limit sets: WebGPU's defaults, WebGPU's
//! compatibility-mode defaults, and the limits the host takes from this machine's adapter
//! (`DeviceLimits::Adapter`). tests/tint/check.mjs compiles them with npm's `webgpu` package
//! (Dawn's Node bindings, pinned in tests/tint/package-lock.json): the first two on Dawn's `null`
//! backend, which needs no GPU; the adapter's on Dawn's OpenGL ES backend (Mesa's llvmpipe
//! through EGL on a machine without a GPU), since the null backend offers no more than WebGPU's
//! defaults.
//!
//! Needs Node.js and `npm ci --prefix tests/tint`; fails, never skips, without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value, json};
use wgpu_attention::kernels::{Access, FusedIo, Kernel, Variant, variants};
use wgpu_attention::{AdapterOptions, DeviceLimits, GpuContext};

/// WebGPU's compatibility-mode defaults where they differ from the core defaults in what the
/// host's tile choices and bindings read (the WebGPU specification's limits table).
fn compatibility_defaults() -> wgpu::Limits {
    wgpu::Limits {
        max_compute_invocations_per_workgroup: 128,
        max_compute_workgroup_size_x: 128,
        max_compute_workgroup_size_y: 128,
        max_storage_buffers_per_shader_stage: 4,
        max_uniform_buffer_binding_size: 16 << 10,
        ..wgpu::Limits::default()
    }
}

/// The limits the host reads when it chooses tiles, under their WebGPU names. Dawn must give a
/// device exactly these, so that it checks each pipeline against the limits it was chosen for.
fn compute_limits(l: &wgpu::Limits) -> Value {
    json!({
        "maxComputeWorkgroupStorageSize": l.max_compute_workgroup_storage_size,
        "maxComputeInvocationsPerWorkgroup": l.max_compute_invocations_per_workgroup,
        "maxComputeWorkgroupSizeX": l.max_compute_workgroup_size_x,
        "maxComputeWorkgroupSizeY": l.max_compute_workgroup_size_y,
        "maxComputeWorkgroupSizeZ": l.max_compute_workgroup_size_z,
    })
}

/// Each composed module with the files it joins and the lines each occupies (1-based), so the
/// check can name `shaders/FILE:LINE` rather than a line of the composition.
fn modules() -> Value {
    let mut modules = Map::new();
    for kernel in Kernel::all() {
        let name = kernel.name();
        let mut first_line = 1;
        let mut files = Vec::new();
        for (file, text) in kernel.parts() {
            // The composition puts a newline after each file.
            let lines = text.matches('\n').count() + 1;
            files.push(json!({ "file": file, "first_line": first_line, "lines": lines }));
            first_line += lines;
        }
        assert_eq!(
            first_line - 1,
            kernel.source().matches('\n').count(),
            "{name}: parts do not add up to the source",
        );
        modules.insert(name, json!({ "source": kernel.source(), "files": files }));
    }
    Value::Object(modules)
}

/// The specialisations Tint builds: every override set of every kernel, each fused variant but
/// the one binding everything with only the first and last of its override sets. The fused
/// variants differ only in their bindings and loads (shaders/fused_io_*.wgsl), not in anything an
/// override sizes, so each override set is built once with every binding, and each binding
/// choice with the smallest and largest tiles; the product (800 pipelines per profile) made the
/// check take minutes. naga (tests/shaders.rs) still translates the whole product. The f16
/// variants of split-K decode and of the staged scores and weighted sum likewise differ from
/// their f32 ones only in their loads and stores (the `*_f16.wgsl` includes), so they too are
/// built with their first and last override sets.
fn checked(limits: &wgpu::Limits) -> Vec<Variant> {
    let all = variants(limits);
    let full = Kernel::Fused(FusedIo::ALL[0]);
    let sampled = |k: Kernel| {
        matches!(k, Kernel::Fused(_))
            || matches!(
                k,
                Kernel::DecodeSplit {
                    precision: wgpu_attention::Precision::F16,
                    ..
                } | Kernel::Scores(wgpu_attention::Precision::F16)
                    | Kernel::WeightedSum(wgpu_attention::Precision::F16)
            )
    };
    all.iter()
        .filter(|v| {
            let same: Vec<&Variant> = all.iter().filter(|w| w.kernel == v.kernel).collect();
            !sampled(v.kernel)
                || v.kernel == full
                || std::ptr::eq(*same.first().unwrap(), *v)
                || std::ptr::eq(*same.last().unwrap(), *v)
        })
        .cloned()
        .collect()
}

/// The variants of one profile: those whose features (`SHADER_F16` for f16 storage) the
/// profile's device has, requested from Dawn as WebGPU features.
fn profile(
    name: &str,
    backend: &str,
    feature_level: &str,
    limits: &wgpu::Limits,
    features: wgpu::Features,
) -> Value {
    let variants: Vec<Value> = checked(limits)
        .iter()
        .filter(|v| features.contains(v.features))
        .map(|v| {
            let overrides: Map<String, Value> = v
                .overrides
                .iter()
                .map(|&(name, value)| (name.to_string(), json!(value)))
                .collect();
            let bindings: Vec<Value> = v
                .bindings
                .iter()
                .map(|b| {
                    json!({
                        "group": b.group,
                        "binding": b.binding,
                        "access": match b.access {
                            Access::Uniform => "uniform",
                            Access::Read => "read",
                            Access::ReadWrite => "read_write",
                        },
                        "has_dynamic_offset": b.has_dynamic_offset,
                        "min_binding_size": b.min_binding_size.map(|s| s.get()),
                    })
                })
                .collect();
            json!({
                "kernel": v.kernel.name(),
                "overrides": overrides,
                "bindings": bindings,
            })
        })
        .collect();
    eprintln!("{name}: {} kernel specialisations", variants.len());
    json!({
        "name": name,
        "backend": backend,
        "feature_level": feature_level,
        "limits": compute_limits(limits),
        "features": if features.contains(wgpu::Features::SHADER_F16) {
            json!(["shader-f16"])
        } else {
            json!([])
        },
        "variants": variants,
    })
}

fn check_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tint")
}

#[test]
fn tint_compiles_every_kernel_specialisation_for_three_limit_sets() {
    let dir = check_dir();
    let node_version = Command::new("node").arg("--version").output().unwrap_or_else(|e| {
        panic!("the Tint check needs Node.js (`node` on PATH): {e}; then `npm ci --prefix tests/tint`")
    });
    assert!(node_version.status.success(), "`node --version` failed");
    assert!(
        dir.join("node_modules/webgpu/package.json").is_file(),
        "the Tint check needs npm's `webgpu` package: run `npm ci --prefix tests/tint`"
    );

    let adapter = GpuContext::from_options(&AdapterOptions {
        limits: DeviceLimits::Adapter,
        ..AdapterOptions::from_env()
    })
    .unwrap_or_else(|e| panic!("the adapter's limit set needs an adapter: {e}"));
    let info = adapter.adapter_info();
    let adapter_name = format!("adapter ({}, {:?})", info.name, info.backend);
    let f16 = wgpu::Features::SHADER_F16;
    let dump = json!({
        "modules": modules(),
        "profiles": [
            // Dawn's null backend offers shader-f16 (core and compatibility), so the f16
            // variants are compiled there; its OpenGL ES backend does not, as wgpu's GL does not.
            profile("webgpu-defaults", "null", "core", &wgpu::Limits::default(), f16),
            profile(
                "compatibility-defaults",
                "null",
                "compatibility",
                &compatibility_defaults(),
                f16,
            ),
            profile(
                &adapter_name,
                "opengles",
                "compatibility",
                &adapter.limits(),
                wgpu::Features::empty(),
            ),
        ],
    });
    let profiles: Vec<(String, usize, usize)> = dump["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            let variants = p["variants"].as_array().unwrap();
            let modules: std::collections::BTreeSet<&str> = variants
                .iter()
                .map(|v| v["kernel"].as_str().unwrap())
                .collect();
            let has_f16 = !p["features"].as_array().unwrap().is_empty();
            let kernels = Kernel::all()
                .iter()
                .filter(|k| has_f16 || k.features().is_empty())
                .count();
            // Every kernel the profile's device can run has specialisations in it.
            assert_eq!(modules.len(), kernels, "{name}: kernels missing");
            (name, modules.len(), variants.len())
        })
        .collect();
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    serde_json::to_writer(&file, &dump).expect("writing the dump");
    let runtime_dir = tempfile::tempdir().expect("a temporary directory");

    let out = Command::new("node")
        .arg("check.mjs")
        .arg(file.path())
        .current_dir(&dir)
        // Dawn's OpenGL ES backend reaches Mesa through EGL with no display.
        .env("EGL_PLATFORM", "surfaceless")
        .env("XDG_RUNTIME_DIR", runtime_dir.path())
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "node {}{stdout}{stderr}",
        String::from_utf8_lossy(&node_version.stdout)
    );
    assert!(
        out.status.success(),
        "Tint rejected kernel specialisations the host emits (see above)"
    );
    // Each profile reports every kernel and every specialisation built.
    for (profile, n, variants) in profiles {
        let expected =
            format!("{profile}: {n} of {n} modules and {variants} of {variants} pipelines built");
        assert!(
            stdout.lines().any(|l| l == expected),
            "no line {expected:?}"
        );
    }
}
