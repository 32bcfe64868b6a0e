//! The fused kernel beyond the shared generated cases: every head width from 16 to 256, a
//! 16384-token sequence inside wgpu's default limits, memory that grows linearly with the
//! sequence, and how `KernelChoice::Auto` decides.

mod common;

use common::cases::{Case, build};
use common::{Rng, contexts, ctx};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, Error, FUSED_MAX_HEAD_DIM_V,
    KernelChoice, Tensor, Tolerance, compare, reference,
};

fn fused_case(head_dim: usize, head_dim_v: usize, causal: bool, padding: Option<f64>) -> Case {
    Case {
        batch: 2,
        // Past 129, so the adapter's limits take 64-row query blocks where they fit.
        seq: 130,
        d_model: 24,
        heads: 2,
        head_dim,
        head_dim_v,
        causal,
        padding,
        qkv_bias: true,
        out: None,
        scale: None,
        intermediates: false,
        seed: head_dim as u64 * 1000 + head_dim_v as u64,
    }
}

/// Runs `c` with `kernel` on every test context and checks the output against the reference.
fn check_kernel(c: &Case, kernel: KernelChoice) {
    let (config, weights, inputs) = build(c);
    let config = config.with_kernel(kernel);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    for (limits, context) in contexts() {
        let mut plan = AttentionPlan::new(context, &config, &weights).unwrap();
        assert_eq!(plan.kernel(), kernel);
        let gpu = plan.run(&inputs).unwrap();
        let cmp = compare(&gpu, &cpu.output, Tolerance::F32).unwrap();
        assert!(
            cmp.passed(),
            "{kernel:?}, {limits}, head_dim {}, head_dim_v {}: {cmp}",
            c.head_dim,
            c.head_dim_v
        );
    }
}

/// Every head width through both kernels (the staged ones too, which have their own tiles
/// for wide heads), on the test profile's limits and the adapter's.
#[test]
fn every_head_width_from_16_to_256() {
    let widths = [
        (16, 16),
        (24, 24),
        (32, 32),
        (48, 48),
        (64, 64),
        (80, 80),
        (96, 96),
        (128, 128),
        (160, 160),
        (192, 192),
        (256, 256),
        (256, 40),
        (20, 256),
    ];
    for (i, &(d, dv)) in widths.iter().enumerate() {
        let c = fused_case(d, dv, i % 2 == 0, (i % 3 == 0).then_some(0.3));
        check_kernel(&c, KernelChoice::Fused);
        check_kernel(&c, KernelChoice::Staged);
    }
}

#[test]
fn head_dim_v_past_256_is_refused_with_a_way_out() {
    let c = fused_case(8, 260, false, Some(0.3));
    let (config, weights, _) = build(&c);
    let err = AttentionPlan::new(
        ctx(),
        &config.clone().with_kernel(KernelChoice::Fused),
        &weights,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: "fused kernel head_dim_v",
                max: 256,
                requested: 260,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .ends_with("use the staged kernels (KernelChoice::Staged)"),
        "{err}"
    );
    // The way out works: the staged kernels give the reference's answer.
    check_kernel(&c, KernelChoice::Staged);
}

#[test]
fn sixteen_thousand_tokens_within_default_limits() {
    // The staged path would need a 1 GiB score matrix here (past the 128 MiB binding limit);
    // Auto picks the fused kernel, whose buffers are all linear in seq.
    let n = 16384;
    let mut rng = Rng::new(16384);
    let config = AttentionConfig::new(1, n, 8, 1, 8)
        .causal()
        .with_key_padding_mask();
    assert_eq!(config.resolved_kernel(), KernelChoice::Fused);
    let weights = AttentionWeights::new(
        rng.tensor(&[8, 8], 0.35),
        rng.tensor(&[8, 8], 0.35),
        rng.tensor(&[8, 8], 0.35),
    );
    let mask: Vec<f32> = (0..n)
        .map(|j| if j % 7 == 3 || j == 0 { 0.0 } else { 1.0 })
        .collect();
    let inputs = AttentionInputs::new(rng.tensor(&[1, n, 8], 1.0))
        .with_key_mask(Tensor::new([1, n], mask).unwrap());
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    assert_eq!(plan.kernel(), KernelChoice::Fused);
    assert!(
        plan.gpu_memory_bytes() < 8 << 20,
        "{} bytes",
        plan.gpu_memory_bytes()
    );
    let out = plan.run(&inputs).unwrap();
    // Row 0 sees only key 0, which is padding: zeros. The others against f64 rows computed
    // without the 16384 x 16384 matrices.
    let rows = [
        0, 1, 2, 3, 4, 63, 64, 65, 1000, 4097, 8191, 12345, 16382, 16383,
    ];
    let asked: Vec<(usize, usize)> = rows.iter().map(|&i| (0, i)).collect();
    let expected = reference::output_rows(&config, &weights, &inputs, &asked).unwrap();
    assert!(expected[0].iter().all(|&v| v == 0.0));
    for (&i, want) in rows.iter().zip(&expected) {
        let got = Tensor::new([8], out.data()[i * 8..(i + 1) * 8].to_vec()).unwrap();
        let cmp = compare(
            &got,
            &Tensor::new([8], want.clone()).unwrap(),
            Tolerance::F32,
        )
        .unwrap();
        assert!(cmp.passed(), "row {i}: {cmp}");
    }
    // Head width 64 at the same length fits the default limits too.
    let wide = AttentionConfig::new(1, n, 64, 1, 64);
    let w = || Tensor::zeros([64, 64]);
    let plan = AttentionPlan::new(ctx(), &wide, &AttentionWeights::new(w(), w(), w())).unwrap();
    assert_eq!(plan.kernel(), KernelChoice::Fused);
}

#[test]
fn fused_memory_grows_linearly_staged_quadratically() {
    let bytes = |n: usize, kernel: KernelChoice| {
        let config = AttentionConfig::new(1, n, 64, 1, 64).with_kernel(kernel);
        let w = || Tensor::zeros([64, 64]);
        AttentionPlan::new(ctx(), &config, &AttentionWeights::new(w(), w(), w()))
            .unwrap()
            .gpu_memory_bytes() as f64
    };
    let fused = bytes(8192, KernelChoice::Fused) / bytes(4096, KernelChoice::Fused);
    assert!(
        (1.9..=2.05).contains(&fused),
        "fused 4096 -> 8192 grew {fused}x"
    );
    // What the staged path holds beyond the fused one is its score matrix (and two small
    // uniform buffers, which cancel in the difference): it grows by exactly 4 (2048² - 1024²).
    let extra = |n: usize| bytes(n, KernelChoice::Staged) - bytes(n, KernelChoice::Fused);
    assert_eq!(
        extra(2048) - extra(1024),
        (4 * (2048 * 2048 - 1024 * 1024)) as f64
    );
    assert!(extra(2048) / extra(1024) > 3.99);
}

#[test]
fn auto_takes_fused_unless_intermediates_or_a_wide_value_head() {
    let small = AttentionConfig::new(1, 3, 4, 1, 3);
    assert_eq!(small.resolved_kernel(), KernelChoice::Fused);
    assert_eq!(
        AttentionConfig::new(1, 16384, 8, 1, 8).resolved_kernel(),
        KernelChoice::Fused
    );
    assert_eq!(
        small.clone().with_intermediates().resolved_kernel(),
        KernelChoice::Staged
    );
    let wide = AttentionConfig::new(1, 64, 8, 1, 8).with_head_dim_v(FUSED_MAX_HEAD_DIM_V + 1);
    assert_eq!(wide.resolved_kernel(), KernelChoice::Staged);
    let widest = AttentionConfig::new(1, 64, 8, 1, 8).with_head_dim_v(FUSED_MAX_HEAD_DIM_V);
    assert_eq!(widest.resolved_kernel(), KernelChoice::Fused);
    assert_eq!(
        small
            .clone()
            .with_kernel(KernelChoice::Staged)
            .resolved_kernel(),
        KernelChoice::Staged
    );

    let err = small
        .with_kernel(KernelChoice::Fused)
        .with_intermediates()
        .validate()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)));
    assert!(
        err.to_string()
            .contains("use KernelChoice::Staged (or Auto) to read them back"),
        "{err}"
    );
}
