//! The softmax is stable (scores near ±1e4, where a naive exp overflows or underflows to 0/0),
//! on the staged kernels and on the fused one's online softmax,
//! fully masked rows give zeros rather than NaN, and non-finite inputs are refused with an error
//! naming the tensor and the index (the documented NaN policy: refuse, never propagate).

mod common;

use common::{contexts, ctx, t};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, Error, KernelChoice,
    Tolerance, compare, compare_bounded, reference,
};

/// One head of width 1 with unit weights and scale 1: score(i, j) = x_i * x_j, value_j = x_j.
fn scalar_layer(seq: usize) -> (AttentionConfig, AttentionWeights) {
    let config = AttentionConfig::new(1, seq, 1, 1, 1)
        .with_scale(1.0)
        .with_intermediates();
    let one = || t(&[1, 1], &[1.0]);
    (config, AttentionWeights::new(one(), one(), one()))
}

fn run_both(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
) -> (wgpu_attention::Intermediates, wgpu_attention::Intermediates) {
    let cpu = reference::run(config, weights, inputs).unwrap();
    let mut plan = AttentionPlan::new(ctx(), config, weights).unwrap();
    plan.run(inputs).unwrap();
    (plan.read_intermediates().unwrap(), cpu)
}

#[test]
fn scores_near_plus_and_minus_1e4() {
    // x = ±100 gives scores of ±1e4: exp(1e4) is inf in f32 and f64, exp(-1e4) is 0.
    let xs = [100.0, 99.9, -100.0, 99.95, -99.9, 0.5];
    let (config, weights) = scalar_layer(xs.len());
    let inputs = AttentionInputs::new(t(&[1, xs.len(), 1], &xs));
    let (gpu, cpu) = run_both(&config, &weights, &inputs);
    let max_score = cpu.scores.data().iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!(
        max_score >= 9999.0,
        "the test must reach 1e4, got {max_score}"
    );
    for (name, g, c) in [
        ("probs", &gpu.probs, &cpu.probs),
        ("output", &gpu.output, &cpu.output),
    ] {
        assert!(
            g.data().iter().all(|v| v.is_finite()),
            "{name}: {:?}",
            g.data()
        );
        // Scores of 1e4 carry an f32 rounding error of about 1e-3, which exp turns into a
        // relative error of 1e-3 in the weights; the rule scales with that.
        let cmp = compare(g, c, Tolerance::new(1e-5, 2e-3)).unwrap();
        assert!(cmp.passed(), "{name}: {cmp}");
    }
    // Query 0 (x = 100) weighs key 0 (x = 100) against key 3 (x = 99.95): scores differ by 5.
    let p = &gpu.probs.data()[..xs.len()];
    let expected = 1.0 / (1.0 + (-5.0f64).exp() + (-10.0f64).exp());
    assert!((p[0] as f64 - expected).abs() < 1e-3, "{p:?}");
    // Query 2 (x = -100) prefers the most negative key, -100 (score +1e4).
    assert!(gpu.probs.data()[2 * xs.len() + 2] > 0.99);
}

/// The same extremes on the fused kernel, the default path, where the online softmax meets
/// them tile by tile: 130 tokens make three key tiles of 64 (0..64, 64..128, 128..130), the
/// ±1e4 scores come in the 2nd and 3rd so the running max is raised from ordinary scores to 1e4
/// and everything before rescaled by exp2(-1e4) = 0, and batch row 1 pads the whole first key
/// tile, so its queries start on a tile with no key at all.
#[test]
fn scores_near_1e4_in_later_key_tiles_on_the_fused_kernel() {
    let seq = 130;
    let mut xs: Vec<f32> = (0..seq).map(|j| 0.5 * (j as f32 * 0.7).sin()).collect();
    for (j, x) in [(70, 100.0), (100, -100.0), (128, -99.9), (129, 99.95)] {
        xs[j] = x;
    }
    let config = AttentionConfig::new(2, seq, 1, 1, 1)
        .with_scale(1.0)
        .causal()
        .with_key_padding_mask()
        .with_kernel(KernelChoice::Fused);
    let one = || t(&[1, 1], &[1.0]);
    let weights = AttentionWeights::new(one(), one(), one());
    let mask: Vec<f32> = (0..2 * seq)
        .map(|i| {
            let (b, j) = (i / seq, i % seq);
            if b == 1 && (j < 64 || j == 129) {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let x: Vec<f32> = xs.iter().chain(&xs).copied().collect();
    let inputs = AttentionInputs::new(t(&[2, seq, 1], &x)).with_key_mask(t(&[2, seq], &mask));
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    assert!(cpu.scores.data().iter().any(|&s| s >= 9999.0));
    assert!(
        cpu.scores
            .data()
            .iter()
            .any(|&s| s <= -9999.0 && s.is_finite())
    );
    let exact = cpu.output.data();
    // Query 129 of row 0 weighs key 70 (score 9995) against itself (9990.0025): mostly 100.
    assert!((exact[129] - 99.9997).abs() < 1e-3, "{}", exact[129]);
    // Row 1's first 64 queries see only padding.
    assert!(exact[seq..seq + 64].iter().all(|&o| o == 0.0));
    for (limits, context) in contexts() {
        let mut plan = AttentionPlan::new(context, &config, &weights).unwrap();
        assert_eq!(plan.kernel(), KernelChoice::Fused);
        let gpu = plan.run(&inputs).unwrap();
        assert!(
            gpu.data().iter().all(|v| v.is_finite()),
            "{limits}: {gpu:?}"
        );
        let cmp = compare_bounded(&gpu, &cpu.output, &bound).unwrap();
        assert!(cmp.passed(), "{limits}: {cmp}");
        let cmp = compare(&gpu, &cpu.output, Tolerance::new(1e-5, 2e-3)).unwrap();
        assert!(cmp.passed(), "{limits}: {cmp}");
        assert!(gpu.data()[seq..seq + 64].iter().all(|&o| o == 0.0));
    }
}

#[test]
fn fully_masked_rows_give_zeros_not_nan() {
    // Batch row 0 is wholly padding; in batch row 1 only the first key is padding, so with
    // causal masking query 0 there sees no key at all.
    let seq = 5;
    let config = AttentionConfig::new(2, seq, 3, 2, 2)
        .causal()
        .with_key_padding_mask()
        .with_intermediates()
        .with_output_projection(3);
    let mut rng = common::Rng::new(3);
    let weights = AttentionWeights::new(
        rng.tensor(&[3, 4], 0.5),
        rng.tensor(&[3, 4], 0.5),
        rng.tensor(&[3, 4], 0.5),
    )
    .with_output_projection(rng.tensor(&[4, 3], 0.5), Some(t(&[3], &[0.25, -0.5, 1.0])));
    let mask = t(&[2, seq], &[0., 0., 0., 0., 0., 0., 1., 1., 1., 1.]);
    let inputs = AttentionInputs::new(rng.tensor(&[2, seq, 3], 1.0)).with_key_mask(mask);
    let (gpu, cpu) = run_both(&config, &weights, &inputs);
    for (name, g, c) in [
        ("probs", &gpu.probs, &cpu.probs),
        ("attention", &gpu.attention, &cpu.attention),
        ("output", &gpu.output, &cpu.output),
    ] {
        assert!(
            g.data().iter().all(|v| v.is_finite()),
            "{name} has NaN/inf: {:?}",
            g.data()
        );
        let cmp = compare(g, c, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{name}: {cmp}");
    }
    // Every head of batch row 0 and query 0 of batch row 1: all-zero weights and outputs.
    let probs = gpu.probs.data();
    let per_head = seq * seq;
    assert!(probs[..2 * per_head].iter().all(|&p| p == 0.0));
    for head in 0..2 {
        let row = &probs[(2 + head) * per_head..(2 + head) * per_head + seq];
        assert!(
            row.iter().all(|&p| p == 0.0),
            "batch 1 head {head} query 0: {row:?}"
        );
    }
    let attention = gpu.attention.data();
    assert!(attention[..seq * 4].iter().all(|&a| a == 0.0));
    // With nothing to attend the layer outputs its bias.
    assert_eq!(&gpu.output.data()[..3], &[0.25, -0.5, 1.0]);
    // Masked scores read back as -inf, exactly as the reference has them.
    assert!(
        gpu.scores.data()[..2 * per_head]
            .iter()
            .all(|&s| s == f32::NEG_INFINITY)
    );
}

#[test]
fn non_finite_inputs_are_refused_with_their_index() {
    let (config, weights) = scalar_layer(3);
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    for (bad, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let inputs = AttentionInputs::new(t(&[1, 3, 1], &[0.5, bad, 1.0]));
        let err = plan.run(&inputs).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { name, .. } if name == "x"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("tensor `x` holds {shown} at index [0, 1, 0]: inputs must be finite")
        );
        let err = reference::run(&config, &weights, &inputs).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }));
    }
    // The plan is still usable after a refused call, and computes: not zeros from zeros.
    let good = AttentionInputs::new(t(&[1, 3, 1], &[0.5, -1.0, 2.0]));
    let out = plan.run(&good).unwrap();
    let expected = reference::run(&config, &weights, &good).unwrap().output;
    assert!(
        expected.data().iter().all(|&v| v.abs() > 0.1),
        "{expected:?}"
    );
    let cmp = compare(&out, &expected, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");

    let nan_weight = AttentionWeights::new(
        t(&[1, 1], &[1.0]),
        t(&[1, 1], &[f32::NAN]),
        t(&[1, 1], &[1.0]),
    );
    let err = AttentionPlan::new(ctx(), &config, &nan_weight).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `w_k` holds NaN at index [0, 0]: inputs must be finite"
    );
}
