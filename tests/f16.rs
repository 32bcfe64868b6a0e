//! f16 storage (`Precision::F16`): on an adapter with shader-f16 (lavapipe has it), the layer
//! and the operator against the f64 reference under the f16 error bound, scores past f16's
//! range that must not overflow, and the named errors; on one without it (llvmpipe's OpenGL),
//! the named error that says so. Which of the two a run checks follows the adapter's features,
//! and the test first checks that the context asked for shader-f16 whenever the adapter has it.

mod common;

use common::{Rng, ctx, op_ctx};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionOp, AttentionPlan, AttentionWeights, BiasShape,
    Error, GpuContext, KernelChoice, OperatorConfig, OperatorInputs, Precision, QkvLayout, Tensor,
    Tolerance, compare, compare_bounded, reference,
};

/// Whether f16 runs here; panics if the adapter has shader-f16 and the context did not get it
/// (a context that silently drops the feature would turn every f16 test into an error check).
fn f16_here(ctx: &GpuContext) -> bool {
    let adapter = common::env_adapter().features();
    assert_eq!(
        ctx.has_f16(),
        adapter.contains(wgpu::Features::SHADER_F16),
        "the context must request SHADER_F16 exactly when the adapter has it"
    );
    ctx.has_f16()
}

/// The error on a device without shader-f16 names the adapter and the missing feature.
fn assert_no_shader_f16<T: std::fmt::Debug>(result: Result<T, Error>) {
    match result {
        Err(e @ Error::NoShaderF16 { .. }) => {
            let message = e.to_string();
            assert!(message.contains("lacks shader-f16"), "{message}");
            assert!(
                message.contains(&ctx().adapter_info().name),
                "{message} does not name the adapter"
            );
        }
        other => panic!("expected NoShaderF16, got {other:?}"),
    }
}

/// Every value is an f16 (the output really was stored in f16).
fn assert_f16_values(t: &Tensor) {
    for (i, &x) in t.data().iter().enumerate() {
        assert_eq!(
            half::f16::from_f32(x).to_f32(),
            x,
            "element {i} is not an f16"
        );
    }
}

/// Generated operator cases (GQA, causal, key mask, bias of each broadcast, token-major, a KV
/// cache, lengths below the maximum) against the f64 reference under the f16 bound; prints the
/// largest error and the largest share of the bound used.
#[test]
fn operator_in_f16_is_within_the_f16_bound_on_generated_cases() {
    let ctx = ctx();
    if !f16_here(ctx) {
        assert_no_shader_f16(AttentionOp::new(
            ctx,
            &OperatorConfig::new(1, 2, 1, 8, 4, 4).with_precision(Precision::F16),
        ));
        return;
    }
    let mut rng = Rng::new(11);
    let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.next_u64() % xs.len() as u64) as usize];
    let (mut worst, mut worst_abs, mut checked) = (0f64, 0f64, 0usize);
    // The fixed f16 rule too, for the record (it is meant for order-1 inputs; not asserted).
    let mut worst_fixed = 0f64;
    for case in 0..8 {
        let (heads, kv_heads) = [(1, 1), (4, 2), (8, 1), (3, 3)][case % 4];
        let batch = pick(&mut rng, &[1, 2]);
        let d = pick(&mut rng, &[4, 7, 16, 64]);
        let dv = pick(&mut rng, &[d, 8, 12]);
        let (max_q, max_kv) = (pick(&mut rng, &[1, 5, 17]), pick(&mut rng, &[9, 30, 70]));
        let mut config = OperatorConfig::new(batch, heads, kv_heads, d, max_q, max_kv)
            .with_head_dim_v(dv)
            .with_precision(Precision::F16);
        if case % 2 == 0 {
            config = config.causal();
        }
        if case % 3 != 2 {
            config = config.with_key_padding_mask();
        }
        if case % 4 != 3 {
            config = config.with_bias(BiasShape {
                per_batch: case % 2 == 1,
                per_head: case % 4 < 2,
            });
        }
        if case % 4 == 1 {
            config = config.token_major();
        } else if case % 4 == 2 {
            config = config.with_kv_capacity(max_kv + 5);
        }
        let mut op = AttentionOp::new(op_ctx(&config), &config).unwrap();
        for (nq, nk) in [(max_q, max_kv), (1 + max_q / 2, 1 + max_kv / 3)] {
            let shape = |heads: usize, n: usize, w: usize| match config.layout {
                QkvLayout::HeadMajor => vec![batch, heads, n, w],
                QkvLayout::TokenMajor => vec![batch, n, heads * w],
            };
            // Activations of a few units, as a trained layer's Q and K have.
            let mut inputs = OperatorInputs::new(
                rng.tensor(&shape(heads, nq, d), 2.0),
                rng.tensor(&shape(kv_heads, nk, d), 2.0),
                rng.tensor(&shape(kv_heads, nk, dv), 3.0),
            );
            if config.key_padding_mask {
                let m = (0..batch * nk)
                    .map(|_| !rng.next_u64().is_multiple_of(4) as u8 as f32)
                    .collect();
                inputs = inputs.with_key_mask(Tensor::new([batch, nk], m).unwrap());
            }
            if let Some(s) = config.bias {
                let [bb, hb] = s.dims(batch, heads);
                inputs = inputs.with_bias(rng.tensor(&[bb, hb, nq, nk], 1.0));
            }
            let gpu = op.run(&inputs).unwrap();
            assert_f16_values(&gpu);
            let cpu = reference::operator(&config, &inputs).unwrap();
            let bound = reference::operator_error_bound(&config, &inputs).unwrap();
            let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
            assert!(c.passed(), "case {case} {config:?} q {nq} kv {nk}:\n{c}");
            worst = worst.max(c.worst_ratio);
            worst_fixed = worst_fixed.max(compare(&gpu, &cpu, Tolerance::F16).unwrap().worst_ratio);
            worst_abs = worst_abs.max(c.max_abs);
            checked += gpu.len();
        }
    }
    eprintln!(
        "f16 operator, {checked} outputs of 16 calls: max abs error {worst_abs:.3e}, \
         at most {worst:.3} of the f16 bound, {worst_fixed:.3} of Tolerance::F16"
    );
}

/// Scores of ±3e4 and ±1.6e5 after scaling: past f16's 65504 for the larger. Q and K hold f16
/// values exactly, the scores are f32 in the kernel, so the softmax picks the right key and
/// nothing overflows.
#[test]
fn logits_past_f16_range_do_not_overflow() {
    let ctx = ctx();
    if !f16_here(ctx) {
        return assert_no_shader_f16(AttentionOp::new(
            ctx,
            &OperatorConfig::new(1, 1, 1, 4, 2, 3).with_precision(Precision::F16),
        ));
    }
    let config = OperatorConfig::new(1, 1, 1, 4, 2, 3)
        .with_scale(1.0)
        .with_precision(Precision::F16);
    let mut op = AttentionOp::new(ctx, &config).unwrap();
    // Query 0 · keys = 4 · 100 · (75, -75, 74) = (3e4, -3e4, 29600);
    // query 1 · keys = 4 · 200 · (200, -200, 199) = (1.6e5, -1.6e5, 159200).
    let q = Tensor::new([1, 1, 2, 4], [[100.0; 4], [200.0; 4]].concat()).unwrap();
    let k1 = Tensor::new([1, 1, 3, 4], [[75.0; 4], [-75.0; 4], [74.0; 4]].concat()).unwrap();
    let k2 = Tensor::new([1, 1, 3, 4], [[200.0; 4], [-200.0; 4], [199.0; 4]].concat()).unwrap();
    let v = Tensor::new(
        [1, 1, 3, 4],
        vec![1., 2., 3., 4., -5., -6., -7., -8., 10., 20., 30., 40.],
    )
    .unwrap();
    for k in [k1, k2] {
        let inputs = OperatorInputs::new(q.clone(), k, v.clone());
        let gpu = op.run(&inputs).unwrap();
        assert!(gpu.data().iter().all(|x| x.is_finite()), "{gpu:?}");
        let cpu = reference::operator(&config, &inputs).unwrap();
        let bound = reference::operator_error_bound(&config, &inputs).unwrap();
        let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
        assert!(c.passed(), "{c}");
        // Key 0 wins by 400 logits or more: exactly its value row.
        assert_eq!(&gpu.data()[..4], &[1., 2., 3., 4.]);
    }
    // Every key padded out: zeros, not NaN, in f16 as in f32.
    let masked = config.clone().with_key_padding_mask();
    let inputs = OperatorInputs::new(q, v.clone(), v).with_key_mask(Tensor::zeros([1, 3]));
    let gpu = AttentionOp::new(op_ctx(&masked), &masked)
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_eq!(gpu.data(), &[0.0; 8]);
}

/// A small layer (two heads, key mask, biases, output projection) in f16 storage against the
/// reference under the f16 bound; and the same layer passes the f32 bound in f32, which the f16
/// result does not (the f16 path really stored in f16).
#[test]
fn layer_in_f16_is_within_the_f16_bound() {
    let ctx = ctx();
    let mut rng = Rng::new(16);
    let (b, n, dm, h, d) = (2, 13, 24, 2, 8);
    let config = AttentionConfig::new(b, n, dm, h, d)
        .with_key_padding_mask()
        .with_output_projection(20)
        .with_precision(Precision::F16);
    let w = 1.0 / (dm as f32).sqrt();
    let weights = AttentionWeights::new(
        rng.tensor(&[dm, h * d], w),
        rng.tensor(&[dm, h * d], w),
        rng.tensor(&[dm, h * d], w),
    )
    .with_qkv_bias(
        rng.tensor(&[h * d], 0.1),
        rng.tensor(&[h * d], 0.1),
        rng.tensor(&[h * d], 0.1),
    )
    .with_output_projection(rng.tensor(&[h * d, 20], w), Some(rng.tensor(&[20], 0.1)));
    let mask: Vec<f32> = (0..b * n).map(|i| (i % 5 != 4) as u8 as f32).collect();
    let inputs = AttentionInputs::new(rng.tensor(&[b, n, dm], 3.0))
        .with_key_mask(Tensor::new([b, n], mask).unwrap());
    if !f16_here(ctx) {
        return assert_no_shader_f16(AttentionPlan::new(ctx, &config, &weights));
    }
    let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
    assert_eq!(plan.kernel(), KernelChoice::Fused);
    let gpu = plan.run(&inputs).unwrap();
    assert_f16_values(&gpu);
    let cpu = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
    eprintln!("f16 layer: {c}");
    assert!(c.passed(), "{c}");
    let f32_config = config.clone().with_precision(Precision::F32);
    let f32_bound = reference::error_bound(&f32_config, &weights, &inputs).unwrap();
    let f32_cpu = reference::run(&f32_config, &weights, &inputs)
        .unwrap()
        .output;
    assert!(
        !compare_bounded(&gpu, &f32_cpu, &f32_bound)
            .unwrap()
            .passed()
    );
    let f32_gpu = AttentionPlan::new(ctx, &f32_config, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let c32 = compare_bounded(&f32_gpu, &f32_cpu, &f32_bound).unwrap();
    assert!(c32.passed(), "{c32}");
}

/// What f16 cannot take is refused by name: a value past 65504 (naming the tensor and index),
/// gradients (the backward stores f32), and, on a device without shader-f16, f16 itself.
#[test]
fn f16_refusals_are_named() {
    let ctx = ctx();
    let config = AttentionConfig::new(1, 3, 4, 1, 4).with_precision(Precision::F16);
    let mut w = vec![0.5f32; 16];
    w[6] = 7e4;
    let weights = AttentionWeights::new(
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
        Tensor::new([4, 4], w).unwrap(),
    );
    if !f16_here(ctx) {
        return assert_no_shader_f16(AttentionPlan::new(ctx, &config, &weights));
    }
    match AttentionPlan::new(ctx, &config, &weights) {
        Err(Error::OutsideF16Range { name, index, value }) => {
            assert_eq!((name.as_str(), index.0, value), ("w_v", vec![1, 2], 7e4));
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
    let fine = AttentionWeights::new(
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
    );
    let mut plan = AttentionPlan::new(ctx, &config, &fine).unwrap();
    let mut x = vec![1.0f32; 12];
    x[9] = -1e5;
    match plan.run(&AttentionInputs::new(Tensor::new([1, 3, 4], x).unwrap())) {
        Err(Error::OutsideF16Range { name, index, .. }) => {
            assert_eq!((name.as_str(), index.0), ("x", vec![0, 2, 1]));
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
    // Q = x W_q = 4 · 200 · 100 = 80000 is past f16's range where the projection stores it:
    // an error that says so, never a silently wrong output.
    let big = AttentionWeights::new(
        Tensor::new([4, 4], vec![100.0; 16]).unwrap(),
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
        Tensor::new([4, 4], vec![0.5; 16]).unwrap(),
    );
    let x = AttentionInputs::new(Tensor::new([1, 3, 4], vec![200.0; 12]).unwrap());
    match AttentionPlan::new(ctx, &config, &big).unwrap().run(&x) {
        Err(e @ Error::NonFiniteOutput { .. }) => {
            assert!(e.to_string().contains("f16's range"), "{e}")
        }
        other => panic!("expected NonFiniteOutput, got {other:?}"),
    }
    // Split-K decode has f16 storage (tests/f16_decode.rs); the backward does not.
    let mut grads = OperatorConfig::new(1, 1, 1, 4, 2, 2).with_precision(Precision::F16);
    grads.gradients = true;
    match AttentionOp::new(ctx, &grads) {
        Err(e @ Error::F16NeedsFused { .. }) => {
            assert!(e.to_string().contains("backward"), "{e}")
        }
        other => panic!("expected F16NeedsFused, got {other:?}"),
    }
    let op_config = OperatorConfig::new(1, 1, 1, 4, 2, 2).with_precision(Precision::F16);
    let mut op = AttentionOp::new(ctx, &op_config).unwrap();
    let mut k = vec![0.0f32; 8];
    k[5] = 1e6;
    let inputs = OperatorInputs::new(
        Tensor::zeros([1, 1, 2, 4]),
        Tensor::new([1, 1, 2, 4], k).unwrap(),
        Tensor::zeros([1, 1, 2, 4]),
    );
    match op.run(&inputs) {
        Err(Error::OutsideF16Range { name, index, .. }) => {
            assert_eq!((name.as_str(), index.0), ("k", vec![0, 0, 1, 1]));
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
}

/// A second f16 run uploads (converting x to f16 straight into the staging memory), runs and
/// reads back without creating a wgpu object, and gives the same bits.
#[test]
fn a_second_f16_call_allocates_nothing() {
    // A device of its own: tests running beside this one must not move its counters.
    let own = GpuContext::from_env().expect("an adapter");
    let mut rng = Rng::new(21);
    let config = AttentionConfig::new(1, 7, 5, 1, 3).with_precision(Precision::F16);
    let weights = AttentionWeights::new(
        rng.tensor(&[5, 3], 0.4),
        rng.tensor(&[5, 3], 0.4),
        rng.tensor(&[5, 3], 0.4),
    );
    // Odd element counts (x 35, output 21): the f16 upload and read-back are padded to whole
    // 4-byte words.
    let inputs = AttentionInputs::new(rng.tensor(&[1, 7, 5], 1.0));
    if !f16_here(&own) {
        return assert_no_shader_f16(AttentionPlan::new(&own, &config, &weights));
    }
    let mut plan = AttentionPlan::new(&own, &config, &weights).unwrap();
    let counters = || common::object_counts(own.device());
    let first = plan.run(&inputs).unwrap();
    let cpu = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    let c = compare_bounded(&first, &cpu, &bound).unwrap();
    assert!(c.passed(), "{c}");
    let after_first = counters();
    assert!(after_first.iter().all(|(_, n)| *n > 0), "{after_first:?}");
    for _ in 0..2 {
        assert_eq!(plan.run(&inputs).unwrap(), first);
        assert_eq!(
            counters(),
            after_first,
            "a repeated f16 call created wgpu objects"
        );
    }
}

/// The staged kernels in f16 storage (Q, K, V and the output f16; scores and probabilities
/// f32): the operator (GQA, causal, key mask, per-head bias, unaligned head widths) and the layer,
/// each chosen by name and with intermediates kept, within the f16 bound; the kept
/// probabilities (f32) within the f32 tolerance of the reference's on the f16-rounded inputs.
#[test]
fn staged_kernels_in_f16_are_within_the_f16_bound() {
    let ctx = ctx();
    let base = OperatorConfig::new(2, 4, 2, 6, 5, 33)
        .with_head_dim_v(10)
        .causal()
        .with_key_padding_mask()
        .with_bias(BiasShape {
            per_batch: false,
            per_head: true,
        })
        .with_precision(Precision::F16);
    if !f16_here(ctx) {
        return assert_no_shader_f16(AttentionOp::new(
            ctx,
            &base.clone().with_kernel(KernelChoice::Staged),
        ));
    }
    let mut rng = Rng::new(41);
    let (mut worst, mut worst_probs) = (0f64, 0f64);
    for config in [
        base.clone().with_kernel(KernelChoice::Staged),
        base.clone().with_intermediates(),
    ] {
        let mut op = AttentionOp::new(ctx, &config).unwrap();
        assert_eq!(op.kernel(), KernelChoice::Staged);
        let mask: Vec<f32> = (0..2 * 33).map(|j| (j % 7 != 3) as u8 as f32).collect();
        let inputs = OperatorInputs::new(
            rng.tensor(&[2, 4, 5, 6], 2.0),
            rng.tensor(&[2, 2, 33, 6], 2.0),
            rng.tensor(&[2, 2, 33, 10], 3.0),
        )
        .with_key_mask(Tensor::new([2, 33], mask).unwrap())
        .with_bias(rng.tensor(&[1, 4, 5, 33], 1.0));
        let gpu = op.run(&inputs).unwrap();
        assert_f16_values(&gpu);
        let cpu = reference::operator(&config, &inputs).unwrap();
        let bound = reference::operator_error_bound(&config, &inputs).unwrap();
        let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
        assert!(c.passed(), "{config:?}:\n{c}");
        worst = worst.max(c.worst_ratio);
        if config.keep_intermediates {
            let probs = op.read_probabilities().unwrap();
            let cpu = reference::operator_probs(&config, &inputs).unwrap();
            let c = compare(&probs, &cpu, Tolerance::F32).unwrap();
            assert!(c.passed(), "probabilities: {c}");
            worst_probs = c.worst_ratio;
        }
    }
    // The layer's staged path reads the f16 projection's Q|K|V buffer and writes f16 heads.
    let mut rng = Rng::new(42);
    let (b, n, dm, h, d) = (1, 9, 16, 2, 8);
    let w = 1.0 / (dm as f32).sqrt();
    let weights = AttentionWeights::new(
        rng.tensor(&[dm, h * d], w),
        rng.tensor(&[dm, h * d], w),
        rng.tensor(&[dm, h * d], w),
    );
    let inputs = AttentionInputs::new(rng.tensor(&[b, n, dm], 3.0));
    for config in [
        AttentionConfig::new(b, n, dm, h, d)
            .with_kernel(KernelChoice::Staged)
            .with_precision(Precision::F16),
        AttentionConfig::new(b, n, dm, h, d)
            .with_intermediates()
            .with_precision(Precision::F16),
    ] {
        let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
        assert_eq!(plan.kernel(), KernelChoice::Staged);
        let gpu = plan.run(&inputs).unwrap();
        assert_f16_values(&gpu);
        let cpu = reference::run(&config, &weights, &inputs).unwrap().output;
        let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
        let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
        assert!(c.passed(), "layer {config:?}:\n{c}");
        worst = worst.max(c.worst_ratio);
        if config.keep_intermediates {
            // Read back as stored: the f16 output widened, and Q, V and the probabilities
            // (computed in f32 from f16 Q and K) within f16's rounding of the reference's.
            let kept = plan.read_intermediates().unwrap();
            assert_eq!(kept.output, gpu);
            let want = reference::run(&config, &weights, &inputs).unwrap();
            for (name, got, want) in [
                ("q", &kept.q, &want.q),
                ("v", &kept.v, &want.v),
                ("probs", &kept.probs, &want.probs),
            ] {
                let c = compare(got, want, Tolerance::F16).unwrap();
                assert!(c.passed(), "kept {name}: {c}");
            }
        }
    }
    eprintln!(
        "f16 staged kernels: at most {worst:.3} of the f16 bound; kept probabilities at most \
         {worst_probs:.3} of Tolerance::F32"
    );
}
