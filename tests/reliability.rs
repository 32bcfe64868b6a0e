//! No silent wrong answers and no crashes where users were hurt before: two contexts used side
//! by side, a scale so large that scores overflow f32, and two threads sharing one OpenGL
//! device while one of them runs a long layer.

mod common;

use common::{Rng, ctx};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionIo, AttentionPlan, AttentionWeights, Error,
    GpuContext, KernelChoice, Tensor, Tolerance, compare, reference,
};

fn small_layer(rng: &mut Rng) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let config = AttentionConfig::new(1, 6, 8, 2, 4);
    let weights = AttentionWeights::new(
        rng.tensor(&[8, 8], 0.5),
        rng.tensor(&[8, 8], 0.5),
        rng.tensor(&[8, 8], 0.5),
    );
    let inputs = AttentionInputs::new(rng.tensor(&[1, 6, 8], 1.0));
    (config, weights, inputs)
}

fn storage(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Two contexts from the environment are two devices. Buffers of one handed to a plan of the
/// other, or bindings of one plan handed to another, are named errors: before, resource ids
/// repeated across contexts and the plan silently bound its own buffers instead.
#[test]
fn two_contexts_never_mix() {
    let a = GpuContext::from_env().unwrap();
    let b = GpuContext::from_env().unwrap();
    let (config, weights, inputs) = small_layer(&mut Rng::new(1));
    let plan_a = AttentionPlan::new(&a, &config, &weights).unwrap();
    let plan_b = AttentionPlan::new(&b, &config, &weights).unwrap();
    let (x_b, out_b) = (storage(&b, 6 * 8 * 4), storage(&b, 6 * 8 * 4));
    let foreign = plan_a.bind(AttentionIo {
        x: &x_b,
        key_mask: None,
        output: &out_b,
    });
    assert!(
        matches!(&foreign, Err(Error::Wgpu { .. })),
        "buffers of another device were bound: {foreign:?}"
    );
    let bindings_b = plan_b
        .bind(AttentionIo {
            x: &x_b,
            key_mask: None,
            output: &out_b,
        })
        .unwrap();
    let mut encoder = a.device().create_command_encoder(&Default::default());
    assert!(matches!(
        plan_a.encode(&mut encoder, &bindings_b),
        Err(Error::ForeignBindings)
    ));
    // Each context still computes its own layer right.
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    for mut plan in [plan_a, plan_b] {
        let out = plan.run(&inputs).unwrap();
        assert!(compare(&out, &cpu.output, Tolerance::F32).unwrap().passed());
    }
}

/// Bindings of one plan are refused by another plan on the same context, even one with the
/// same configuration.
#[test]
fn bindings_belong_to_their_plan() {
    let (config, weights, _) = small_layer(&mut Rng::new(2));
    let plan_a = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let plan_b = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let (x, out) = (storage(ctx(), 6 * 8 * 4), storage(ctx(), 6 * 8 * 4));
    let io = AttentionIo {
        x: &x,
        key_mask: None,
        output: &out,
    };
    let bindings_a = plan_a.bind(io).unwrap();
    let mut encoder = ctx().device().create_command_encoder(&Default::default());
    plan_a.encode(&mut encoder, &bindings_a).unwrap();
    assert!(matches!(
        plan_b.encode(&mut encoder, &bindings_a),
        Err(Error::ForeignBindings)
    ));
}

/// At scale f32::MAX every scaled score overflows f32. Both kernels take each row's maximum
/// over unscaled scores (the staged score kernel stores them unscaled; its softmax scales) and
/// apply the scale only to differences from it, so both give the reference's answer
/// (attention to the best key alone), never NaN.
#[test]
fn a_huge_scale_never_returns_nan() {
    let (config, weights, inputs) = small_layer(&mut Rng::new(3));
    let config = config.with_scale(f32::MAX);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    assert!(cpu.output.data().iter().all(|v| v.is_finite()));
    for kernel in [KernelChoice::Fused, KernelChoice::Staged] {
        let mut plan =
            AttentionPlan::new(ctx(), &config.clone().with_kernel(kernel), &weights).unwrap();
        let out = plan.run(&inputs).unwrap();
        let cmp = compare(&out, &cpu.output, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{kernel:?}: {cmp}");
    }
}

/// A negative scale is legal (softmax of negated scores), and scale 0 gives the plain mean of
/// the visible values: both kernels match the reference.
#[test]
fn negative_and_zero_scales_match_the_reference() {
    let (config, weights, inputs) = small_layer(&mut Rng::new(4));
    for scale in [-0.7f32, 0.0, -0.0] {
        let config = config.clone().with_scale(scale);
        let cpu = reference::run(&config, &weights, &inputs).unwrap();
        for kernel in [KernelChoice::Fused, KernelChoice::Staged] {
            let mut plan =
                AttentionPlan::new(ctx(), &config.clone().with_kernel(kernel), &weights).unwrap();
            let cmp = compare(&plan.run(&inputs).unwrap(), &cpu.output, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "scale {scale}, {kernel:?}: {cmp}");
        }
    }
}

/// One thread runs a 16384-token layer (seconds of work on a software driver) while another
/// compiles new pipelines and runs small layers on the same device. On OpenGL a submission
/// holds the device's context for its whole run, and a thread kept waiting for it for 6 s
/// aborts the process; `run` therefore cuts long work into short submissions.
#[test]
fn a_long_run_does_not_starve_another_thread() {
    let n = 16384;
    let mut rng = Rng::new(5);
    let config = AttentionConfig::new(1, n, 8, 1, 8);
    let weights = AttentionWeights::new(
        rng.tensor(&[8, 8], 0.35),
        rng.tensor(&[8, 8], 0.35),
        rng.tensor(&[8, 8], 0.35),
    );
    let inputs = AttentionInputs::new(rng.tensor(&[1, n, 8], 1.0));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let long = s.spawn(|| {
            let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
            let out = plan.run(&inputs).unwrap();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            out
        });
        let mut rng = Rng::new(6);
        let mut width = 4;
        while !done.load(std::sync::atomic::Ordering::Relaxed) && width <= 64 {
            // A new head width compiles new pipelines, which needs the device's context.
            let config = AttentionConfig::new(1, 5, 8, 1, width);
            let weights = AttentionWeights::new(
                rng.tensor(&[8, width], 0.5),
                rng.tensor(&[8, width], 0.5),
                rng.tensor(&[8, width], 0.5),
            );
            let inputs = AttentionInputs::new(rng.tensor(&[1, 5, 8], 1.0));
            let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
            let cpu = reference::run(&config, &weights, &inputs).unwrap();
            let cmp = compare(&plan.run(&inputs).unwrap(), &cpu.output, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "width {width}: {cmp}");
            width += 4;
        }
        let out = long.join().unwrap();
        let rows = [0, 1, 4097, n - 1];
        let asked: Vec<(usize, usize)> = rows.iter().map(|&i| (0, i)).collect();
        let expected = reference::output_rows(&config, &weights, &inputs, &asked).unwrap();
        for (&i, want) in rows.iter().zip(&expected) {
            let got = Tensor::new([8], out.data()[i * 8..(i + 1) * 8].to_vec()).unwrap();
            let want = Tensor::new([8], want.clone()).unwrap();
            let cmp = compare(&got, &want, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "row {i}: {cmp}");
        }
    });
}

/// A device that allows four storage buffers per shader stage (wgpu's downlevel limits, GLES
/// 3.1-class hardware) runs the layer's fused kernel, which binds Q, K and V as one buffer
/// (three in all with its mask), the staged kernels, and the operator's fused kernel without a
/// mask or bias (four); with them `Auto` runs the operator's staged kernels (three each), and
/// an explicit fused choice that would bind five or six is refused, naming the limit.
#[test]
fn four_storage_buffers_per_stage_run_every_variant_that_fits() {
    use wgpu_attention::{AttentionOp, BiasShape, OperatorConfig, OperatorInputs};
    let (device, queue) = common::app_device(|l| l.max_storage_buffers_per_shader_stage = 4);
    let small = GpuContext::from_device(device, queue);
    let mut rng = Rng::new(7);
    let (config, weights, inputs) = small_layer(&mut rng);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    for kernel in [KernelChoice::Auto, KernelChoice::Staged] {
        let mut plan =
            AttentionPlan::new(&small, &config.clone().with_kernel(kernel), &weights).unwrap();
        let want = if kernel == KernelChoice::Auto {
            KernelChoice::Fused
        } else {
            kernel
        };
        assert_eq!(plan.kernel(), want);
        let cmp = compare(&plan.run(&inputs).unwrap(), &cpu.output, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{kernel:?}: {cmp}");
    }

    let plain = OperatorConfig::new(1, 2, 1, 4, 6, 6).causal();
    let mut op = AttentionOp::new(&small, &plain).unwrap();
    assert_eq!(op.kernel(), KernelChoice::Fused);
    let q = rng.tensor(&[1, 2, 6, 4], 1.0);
    let (k, v) = (
        rng.tensor(&[1, 1, 6, 4], 1.0),
        rng.tensor(&[1, 1, 6, 4], 1.0),
    );
    let io = OperatorInputs::new(q, k, v);
    let want = wgpu_attention::reference::operator(&plain, &io).unwrap();
    let cmp = compare(&op.run(&io).unwrap(), &want, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "operator: {cmp}");

    let bias = BiasShape {
        per_batch: false,
        per_head: true,
    };
    for (config, binds) in [
        (plain.clone().with_key_padding_mask(), 5),
        (plain.clone().with_bias(bias), 5),
        (plain.with_key_padding_mask().with_bias(bias), 6),
    ] {
        let op = AttentionOp::new(&small, &config).unwrap();
        assert_eq!(op.kernel(), KernelChoice::Staged, "{config:?}");
        let fused = config.with_kernel(KernelChoice::Fused);
        let e = AttentionOp::new(&small, &fused).unwrap_err().to_string();
        assert!(
            e.contains("max_storage_buffers_per_shader_stage")
                && e.contains(&format!("{binds}"))
                && e.contains("KernelChoice::Staged"),
            "{e}"
        );
    }
}
