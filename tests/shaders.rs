//! Every kernel parses and validates with naga and translates to SPIR-V (Vulkan), MSL (Metal),
//! HLSL (DX12) and GLSL (OpenGL), so the Metal and DX12 paths are checked without those GPUs.
//! Each is translated with every override set the host can emit (overrides change workgroup
//! array sizes), and each kernel's interface (uniform struct layout, binding slots and access,
//! override names) is checked against the host's description of it.

use naga::back::pipeline_constants::process_overrides;
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use wgpu_attention::kernels::{Access, Kernel, Variant, variants};

fn parse(kernel: Kernel) -> (naga::Module, ModuleInfo) {
    let src = kernel.source();
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| {
        panic!(
            "{} does not parse:\n{}",
            kernel.name(),
            e.emit_to_string(src)
        )
    });
    // f16 storage variants need shader-f16, which the host requires of the device.
    let capabilities = if kernel.features().contains(wgpu::Features::SHADER_F16) {
        Capabilities::SHADER_FLOAT16
    } else {
        Capabilities::empty()
    };
    let info = Validator::new(ValidationFlags::all(), capabilities)
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{} does not validate:\n{}",
                kernel.name(),
                e.emit_to_string(src)
            )
        });
    (module, info)
}

/// Limit sets whose tile choices the translations cover: WebGPU's defaults, wgpu's downlevel
/// defaults (16352 bytes of workgroup memory), WebGPU's compatibility defaults (128 invocations)
/// and a desktop-class device such as lavapipe (32 KiB, 1024 invocations).
fn limit_sets() -> [wgpu::Limits; 4] {
    let webgpu = wgpu::Limits::default();
    [
        webgpu.clone(),
        wgpu::Limits::downlevel_defaults(),
        wgpu::Limits {
            max_compute_invocations_per_workgroup: 128,
            max_compute_workgroup_size_x: 128,
            max_compute_workgroup_size_y: 128,
            ..webgpu.clone()
        },
        wgpu::Limits {
            max_compute_workgroup_storage_size: 32 << 10,
            max_compute_invocations_per_workgroup: 1024,
            max_compute_workgroup_size_x: 1024,
            max_compute_workgroup_size_y: 1024,
            max_compute_workgroup_size_z: 1024,
            ..webgpu
        },
    ]
}

/// Every override set the host can emit for `kernel` under any of [`limit_sets`], from the
/// host's own enumerator; computed once per test binary.
fn specialisations(kernel: Kernel) -> Vec<Vec<(&'static str, f64)>> {
    static ALL: OnceLock<Vec<Variant>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let mut all: Vec<Variant> = Vec::new();
        for limits in limit_sets() {
            for v in variants(&limits) {
                if !all
                    .iter()
                    .any(|w| w.kernel == v.kernel && w.overrides == v.overrides)
                {
                    all.push(v);
                }
            }
        }
        all
    });
    let sets: Vec<_> = all
        .iter()
        .filter(|v| v.kernel == kernel)
        .map(|v| v.overrides.clone())
        .collect();
    assert!(
        !sets.is_empty(),
        "{}: the host emits nothing",
        kernel.name()
    );
    sets
}

fn specialise<'a>(
    kernel: Kernel,
    module: &'a naga::Module,
    info: &'a ModuleInfo,
    overrides: &[(&'static str, f64)],
) -> (naga::Module, ModuleInfo) {
    let constants: naga::back::PipelineConstants =
        overrides.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    let (m, i) = process_overrides(
        module,
        info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{} with {overrides:?}: {e}", kernel.name()));
    (m.into_owned(), i.into_owned())
}

#[test]
fn every_kernel_validates_and_opens_with_a_comment() {
    for kernel in Kernel::all() {
        let (module, _) = parse(kernel);
        assert_eq!(
            module.entry_points.len(),
            1,
            "{}: one kernel per file",
            kernel.name()
        );
        assert_eq!(module.entry_points[0].name, "main");
        let first = kernel.source().lines().next().unwrap_or("");
        assert!(
            first.starts_with("// "),
            "{} must open with a comment",
            kernel.name()
        );
        for word in ["Bindings", "binding(0)"] {
            assert!(
                kernel.source().contains(word),
                "{} lacks {word}",
                kernel.name()
            );
        }
    }
}

#[test]
fn every_shared_include_opens_with_its_contract() {
    for kernel in Kernel::all() {
        let parts = kernel.parts();
        let (own, _) = parts.last().expect("a kernel has its own file");
        assert_eq!(*own, kernel.file_name(), "the kernel's own file comes last");
        for (file, text) in &parts[..parts.len() - 1] {
            let first = text.lines().next().unwrap_or("");
            assert!(
                first.starts_with("// Contract: "),
                "{file} (included in {own}) must open with a one-line contract, not {first:?}"
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_spirv() {
    for kernel in Kernel::all() {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let words =
                naga::back::spv::write_vec(&m, &i, &naga::back::spv::Options::default(), None)
                    .unwrap_or_else(|e| panic!("{} {o:?} to SPIR-V: {e}", kernel.name()));
            assert_eq!(words[0], 0x0723_0203, "SPIR-V magic number");
        }
    }
}

#[test]
fn every_kernel_translates_to_msl() {
    for kernel in Kernel::all() {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let options = naga::back::msl::Options {
                lang_version: (2, 1),
                fake_missing_bindings: true,
                ..Default::default()
            };
            let pipeline = naga::back::msl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, "main".into())),
                ..Default::default()
            };
            let (msl, _) = naga::back::msl::write_string(&m, &i, &options, &pipeline)
                .unwrap_or_else(|e| panic!("{} {o:?} to MSL: {e:?}", kernel.name()));
            assert!(
                msl.contains("kernel void"),
                "{}: no MSL kernel",
                kernel.name()
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_hlsl() {
    for kernel in Kernel::all() {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let options = naga::back::hlsl::Options {
                // DX12 has 16-bit types from shader model 6.2, which wgpu requires for f16.
                shader_model: if kernel.features().contains(wgpu::Features::SHADER_F16) {
                    naga::back::hlsl::ShaderModel::V6_2
                } else {
                    naga::back::hlsl::ShaderModel::V5_1
                },
                fake_missing_bindings: true,
                ..Default::default()
            };
            let pipeline = naga::back::hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, "main".into())),
            };
            let mut hlsl = String::new();
            naga::back::hlsl::Writer::new(&mut hlsl, &options, &pipeline)
                .write(&m, &i, None)
                .unwrap_or_else(|e| panic!("{} {o:?} to HLSL: {e:?}", kernel.name()));
            assert!(
                hlsl.contains("[numthreads("),
                "{}: no HLSL compute entry",
                kernel.name()
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_glsl() {
    // wgpu's OpenGL backend never offers SHADER_F16, so f16 variants never reach GLSL: the
    // host refuses f16 there by name (tests/f16.rs checks that on GL).
    for kernel in Kernel::all()
        .into_iter()
        .filter(|k| k.features().is_empty())
    {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let options = naga::back::glsl::Options {
                version: naga::back::glsl::Version::Embedded {
                    version: 310,
                    is_webgl: false,
                },
                ..Default::default()
            };
            let pipeline = naga::back::glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".into(),
                multiview: None,
            };
            let mut glsl = String::new();
            naga::back::glsl::Writer::new(
                &mut glsl,
                &m,
                &i,
                &options,
                &pipeline,
                Default::default(),
            )
            .and_then(|mut w| w.write())
            .unwrap_or_else(|e| panic!("{} {o:?} to GLSL: {e:?}", kernel.name()));
            assert!(
                glsl.contains("layout(local_size_x"),
                "{}: no GLSL compute layout",
                kernel.name()
            );
        }
    }
}

#[test]
fn every_kernel_interface_matches_the_host() {
    for kernel in Kernel::all() {
        let name = kernel.name();
        let (module, _) = parse(kernel);
        let host: BTreeMap<(u32, u32), _> = kernel
            .bindings()
            .into_iter()
            .map(|b| ((b.group, b.binding), b))
            .collect();
        let mut seen = BTreeSet::new();
        for (_, var) in module.global_variables.iter() {
            let Some(rb) = &var.binding else { continue };
            let slot = (rb.group, rb.binding);
            let var_name = var.name.as_deref().unwrap_or("?");
            let b = host.get(&slot).unwrap_or_else(|| {
                panic!("{name}: `{var_name}` at {slot:?} is not in the host's layout")
            });
            seen.insert(slot);
            let access = match var.space {
                naga::AddressSpace::Uniform => Access::Uniform,
                naga::AddressSpace::Storage { access } if access == naga::StorageAccess::LOAD => {
                    Access::Read
                }
                naga::AddressSpace::Storage { access }
                    if access == naga::StorageAccess::LOAD | naga::StorageAccess::STORE =>
                {
                    Access::ReadWrite
                }
                other => panic!("{name}: `{var_name}` in {other:?}"),
            };
            assert_eq!(access, b.access, "{name}: `{var_name}` at {slot:?}");
            if access != Access::Uniform {
                assert!(b.uniform.is_none(), "{name}: {slot:?}");
                continue;
            }
            let rust = b
                .uniform
                .unwrap_or_else(|| panic!("{name}: no Rust layout for uniform `{var_name}`"));
            let ty = &module.types[var.ty];
            let naga::TypeInner::Struct { members, span } = &ty.inner else {
                panic!("{name}: uniform `{var_name}` is not a struct");
            };
            assert_eq!(
                ty.name.as_deref(),
                Some(rust.name),
                "{name}: `{var_name}`'s type"
            );
            let wgsl: Vec<(&str, usize)> = members
                .iter()
                .map(|m| (m.name.as_deref().unwrap_or("?"), m.offset as usize))
                .collect();
            assert_eq!(
                wgsl, rust.fields,
                "{name}: {} fields and offsets",
                rust.name
            );
            assert_eq!(*span as usize, rust.size, "{name}: {} size", rust.name);
            assert_eq!(
                b.min_binding_size.map(|s| s.get()),
                Some(*span as u64),
                "{name}: {}'s binding size",
                rust.name
            );
        }
        let unused: Vec<_> = host.keys().filter(|k| !seen.contains(k)).collect();
        assert!(
            unused.is_empty(),
            "{name}: the host binds {unused:?}, the shader declares none"
        );

        // The host sets every override, so the compiled shape never falls back to a default.
        let declared: BTreeSet<&str> = module
            .overrides
            .iter()
            .filter_map(|(_, o)| o.name.as_deref())
            .collect();
        for set in specialisations(kernel) {
            let given: BTreeSet<&str> = set.iter().map(|&(n, _)| n).collect();
            assert_eq!(given, declared, "{name}: overrides {set:?}");
        }
    }
}
