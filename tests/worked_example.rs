//! The worked example of ../shared/worked-example.md, step by step, on the CPU reference and on
//! the GPU's staged kernels and its fused kernel: every intermediate (and the fused output) must
//! equal the exact numbers to 1e-6.

// The constants keep every digit worked-example.md prints, trailing zeros included.
#![allow(clippy::excessive_precision)]

mod common;

use common::{ctx, worked_example};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, Intermediates, KernelChoice,
    Tensor, Tolerance, compare, reference,
};

const EXACT: Tolerance = Tolerance::new(1e-6, 0.0);

const KEYS: [f32; 9] = [0., 1., 1., 4., 4., 0., 2., 3., 1.];
const QUERIES: [f32; 9] = [1., 0., 2., 2., 2., 2., 2., 1., 3.];
const VALUES: [f32; 9] = [1., 2., 3., 2., 8., 0., 2., 6., 3.];
const SCORES: [f32; 9] = [2., 4., 4., 4., 16., 12., 4., 12., 10.];
const SOFTMAX: [f32; 9] = [
    0.0633789, 0.4683105, 0.4683105, 0.0000060, 0.9820079, 0.0179861, 0.0002954, 0.8805369,
    0.1191677,
];
const OUTPUTS: [f32; 9] = [
    1.9366211, 6.6831053, 1.5950684, 1.9999940, 7.9639916, 0.0539764, 1.9997046, 7.7598923,
    0.3583893,
];
const OUTPUTS_SCALED: [f32; 9] = [
    1.8638742, 6.3193710, 1.7041887, 1.9991096, 7.8141235, 0.2734721, 1.9925551, 7.4796356,
    0.7358773,
];

fn assert_close(what: &str, actual: &Tensor, expected: &[f32], tol: Tolerance) {
    let expected = Tensor::new(actual.shape().to_vec(), expected.to_vec()).unwrap();
    let c = compare(actual, &expected, tol).unwrap();
    assert!(c.passed(), "{what}: {c}\nactual {:?}", actual.data());
}

fn assert_steps(who: &str, r: &Intermediates) {
    assert_close(&format!("{who} keys"), &r.k, &KEYS, EXACT);
    assert_close(&format!("{who} queries"), &r.q, &QUERIES, EXACT);
    assert_close(&format!("{who} values"), &r.v, &VALUES, EXACT);
    assert_close(&format!("{who} scores"), &r.scores, &SCORES, EXACT);
    assert_close(&format!("{who} softmax"), &r.probs, &SOFTMAX, EXACT);
    assert_close(&format!("{who} outputs"), &r.output, &OUTPUTS, EXACT);
    // Each softmax row sums to one.
    for row in r.probs.data().chunks(3) {
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-6,
            "{who}: row {row:?}"
        );
    }
}

#[test]
fn cpu_reference_matches_every_step() {
    let (config, weights, inputs) = worked_example(Some(1.0));
    let r = reference::run(&config, &weights, &inputs).unwrap();
    assert_steps("cpu", &r);
}

#[test]
fn gpu_matches_every_step() {
    let (config, weights, inputs) = worked_example(Some(1.0));
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let out = plan.run(&inputs).unwrap();
    assert_close("gpu run output", &out, &OUTPUTS, EXACT);
    let r = plan.read_intermediates().unwrap();
    assert_steps("gpu", &r);
}

#[test]
fn fused_kernel_matches_the_outputs() {
    for scale in [Some(1.0), None] {
        let (mut config, weights, inputs) = worked_example(scale);
        config.keep_intermediates = false;
        let config = config.with_kernel(KernelChoice::Fused);
        let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
        assert_eq!(plan.kernel(), KernelChoice::Fused);
        let expected = if scale.is_some() {
            &OUTPUTS
        } else {
            &OUTPUTS_SCALED
        };
        assert_close("gpu fused", &plan.run(&inputs).unwrap(), expected, EXACT);
    }
}

/// The default scale is 1/sqrt(head_dim), the query/key width, not the value width: written
/// out by hand, not through `scale_value()`. Two tokens x = [1, 0] of width 1, head_dim 4 with
/// unit query and key weights, one value column equal to x: query 0 scores the keys
/// [4·scale, 0], so its output is the weight of key 0, 1/(1 + e^(-4·scale)). With scale 1/2
/// that is 1/(1 + e^-2) = 0.8807971; 1/sqrt(head_dim_v) = 1 would give 0.9820138.
#[test]
fn default_scale_uses_head_dim_not_head_dim_v() {
    let config = AttentionConfig::new(1, 2, 1, 1, 4).with_head_dim_v(1);
    let weights = AttentionWeights::new(
        Tensor::new([1, 4], vec![1.0; 4]).unwrap(),
        Tensor::new([1, 4], vec![1.0; 4]).unwrap(),
        Tensor::new([1, 1], vec![1.0]).unwrap(),
    );
    let inputs = AttentionInputs::new(Tensor::new([1, 2, 1], vec![1.0, 0.0]).unwrap());
    // Query 1 (x = 0) scores both keys 0 and weighs their values 1 and 0 equally.
    let expected = [0.880_797_1, 0.5];
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    assert_close("cpu", &cpu.output, &expected, EXACT);
    for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
        let config = config.clone().with_kernel(kernel);
        let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
        let gpu = plan.run(&inputs).unwrap();
        assert_close(&format!("{kernel:?}"), &gpu, &expected, EXACT);
    }
}

#[test]
fn scaled_by_one_over_sqrt_dk_on_cpu_and_gpu() {
    let (config, weights, inputs) = worked_example(None);
    assert!((config.scale_value() - 1.0 / 3f32.sqrt()).abs() < 1e-7);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    assert_close("cpu scaled", &cpu.output, &OUTPUTS_SCALED, EXACT);
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let gpu = plan.run(&inputs).unwrap();
    assert_close("gpu scaled", &gpu, &OUTPUTS_SCALED, EXACT);
}

#[test]
fn tutorial_rounding_is_not_what_we_compute() {
    // The tutorial printed softmax([2, 4, 4]) as [0.0, 0.5, 0.5]; the exact first weight is
    // 0.0634, far outside any tolerance.
    let (config, weights, inputs) = worked_example(Some(1.0));
    let r = reference::run(&config, &weights, &inputs).unwrap();
    let row0 = &r.probs.data()[..3];
    assert!((row0[0] - 0.0633789).abs() < 1e-6 && row0[0] > 0.06);
    assert!(
        (r.output.data()[0] - 2.0).abs() > 0.06,
        "rounded weights gave 2.0, exact is 1.9366"
    );
}
