//! Every kernel parses and validates with naga and translates to SPIR-V (Vulkan), MSL (Metal),
//! HLSL (DX12) and GLSL (OpenGL), so the Metal and DX12 paths are checked without those GPUs.
//! Each is translated with its default override values and with other specialisations the
//! host picks, since overrides change workgroup array sizes.

use naga::back::pipeline_constants::process_overrides;
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use wgpu_attention::kernels::Kernel;

fn parse(kernel: Kernel) -> (naga::Module, ModuleInfo) {
    let src = kernel.source();
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| {
        panic!(
            "{} does not parse:\n{}",
            kernel.file_name(),
            e.emit_to_string(src)
        )
    });
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{} does not validate:\n{}",
                kernel.file_name(),
                e.emit_to_string(src)
            )
        });
    (module, info)
}

/// The override sets each kernel is compiled with by the host, plus the defaults.
fn specialisations(kernel: Kernel) -> Vec<Vec<(&'static str, f64)>> {
    match kernel {
        Kernel::Softmax => [32.0, 64.0, 256.0]
            .iter()
            .map(|&wg| vec![("WG", wg)])
            .collect(),
        Kernel::Gemm => vec![
            vec![],
            vec![
                ("TX", 1.0),
                ("TY", 8.0),
                ("NV", 1.0),
                ("TK", 16.0),
                ("HEAD_SPLIT", 1.0),
            ],
            vec![
                ("TX", 8.0),
                ("TY", 2.0),
                ("NV", 3.0),
                ("TK", 8.0),
                ("HEAD_SPLIT", 0.0),
            ],
        ],
        Kernel::Fused => vec![
            vec![],
            vec![
                ("TX", 16.0),
                ("TY", 4.0),
                ("NV", 1.0),
                ("DK", 8.0),
                ("VK", 8.0),
            ],
            vec![
                ("TX", 16.0),
                ("TY", 1.0),
                ("NV", 4.0),
                ("DK", 4.0),
                ("VK", 4.0),
            ],
            vec![
                ("TX", 8.0),
                ("TY", 2.0),
                ("NV", 3.0),
                ("DK", 16.0),
                ("VK", 16.0),
            ],
        ],
        Kernel::Scores => vec![vec![], vec![("TX", 2.0), ("TY", 4.0), ("DK", 8.0)]],
        Kernel::WeightedSum => vec![
            vec![],
            vec![("TX", 2.0), ("TY", 4.0), ("NV", 4.0), ("TK", 4.0)],
        ],
    }
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
    .unwrap_or_else(|e| panic!("{} with {overrides:?}: {e}", kernel.file_name()));
    (m.into_owned(), i.into_owned())
}

#[test]
fn every_kernel_validates_and_opens_with_a_comment() {
    for kernel in Kernel::ALL {
        let (module, _) = parse(kernel);
        assert_eq!(
            module.entry_points.len(),
            1,
            "{}: one kernel per file",
            kernel.file_name()
        );
        assert_eq!(module.entry_points[0].name, "main");
        let first = kernel.source().lines().next().unwrap_or("");
        assert!(
            first.starts_with("// "),
            "{} must open with a comment",
            kernel.file_name()
        );
        for word in ["Bindings", "binding(0)"] {
            assert!(
                kernel.source().contains(word),
                "{} lacks {word}",
                kernel.file_name()
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_spirv() {
    for kernel in Kernel::ALL {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let words =
                naga::back::spv::write_vec(&m, &i, &naga::back::spv::Options::default(), None)
                    .unwrap_or_else(|e| panic!("{} {o:?} to SPIR-V: {e}", kernel.file_name()));
            assert_eq!(words[0], 0x0723_0203, "SPIR-V magic number");
        }
    }
}

#[test]
fn every_kernel_translates_to_msl() {
    for kernel in Kernel::ALL {
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
                .unwrap_or_else(|e| panic!("{} {o:?} to MSL: {e:?}", kernel.file_name()));
            assert!(
                msl.contains("kernel void"),
                "{}: no MSL kernel",
                kernel.file_name()
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_hlsl() {
    for kernel in Kernel::ALL {
        let (module, info) = parse(kernel);
        for o in specialisations(kernel) {
            let (m, i) = specialise(kernel, &module, &info, &o);
            let options = naga::back::hlsl::Options {
                shader_model: naga::back::hlsl::ShaderModel::V5_1,
                fake_missing_bindings: true,
                ..Default::default()
            };
            let pipeline = naga::back::hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, "main".into())),
            };
            let mut hlsl = String::new();
            naga::back::hlsl::Writer::new(&mut hlsl, &options, &pipeline)
                .write(&m, &i, None)
                .unwrap_or_else(|e| panic!("{} {o:?} to HLSL: {e:?}", kernel.file_name()));
            assert!(
                hlsl.contains("[numthreads("),
                "{}: no HLSL compute entry",
                kernel.file_name()
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_glsl() {
    for kernel in Kernel::ALL {
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
            .unwrap_or_else(|e| panic!("{} {o:?} to GLSL: {e:?}", kernel.file_name()));
            assert!(
                glsl.contains("layout(local_size_x"),
                "{}: no GLSL compute layout",
                kernel.file_name()
            );
        }
    }
}
