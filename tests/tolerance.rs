//! The default check scales: a bound derived from f32's forward error, which the f64 reference
//! computes beside its values (`reference::error_bound`). A correct f32 computation of a
//! BERT-sized layer with activations around 20 must pass it, where the fixed 1e-5 + 1e-4·|ref|
//! rule is only order-1 safe; and plausible bugs must not.

mod common;

use common::Rng;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, KernelChoice, Precision,
    Tensor, compare_bounded, reference,
};

/// A BERT-base-sized layer (d_model 768, 12 heads of 64, output projection) whose hidden states
/// are about 20 in size: x ~ N(0, 20²). Query and key weights keep the scores of order 1, as a
/// trained layer's do; value and output weights carry the size of x through.
fn bert_sized(seq: usize) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let mut rng = Rng::new(768);
    let (dm, heads, dk) = (768, 12, 64);
    let config = AttentionConfig::new(1, seq, dm, heads, dk)
        .causal()
        .with_output_projection(dm);
    let w = 1.0 / (dm as f32).sqrt();
    let weights = AttentionWeights::new(
        rng.tensor(&[dm, dm], w / 20.0),
        rng.tensor(&[dm, dm], w / 20.0),
        rng.tensor(&[dm, dm], w),
    )
    .with_qkv_bias(
        rng.tensor(&[dm], 0.1),
        rng.tensor(&[dm], 0.1),
        rng.tensor(&[dm], 0.1),
    )
    .with_output_projection(rng.tensor(&[dm, dm], w), Some(rng.tensor(&[dm], 0.1)));
    let inputs = AttentionInputs::new(rng.tensor(&[1, seq, dm], 20.0));
    (config, weights, inputs)
}

/// Mistakes a kernel could make that a loose check would let through.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bug {
    None,
    /// The last key a query may see is skipped (an off-by-one at a tile edge).
    DropLastKey,
    /// The scores are scaled 1% off (a rounded constant).
    ScaleOff,
    /// The weights are normalised over one key too many (a stale running sum).
    ExtraSumTerm,
    /// The values are kept with f16's 11 significant bits (a half-precision buffer).
    HalfValues,
}

/// The layer in plain f32 loops, sequential sums: an f32 computation independent of the crate.
/// With f16 `storage`, every value the GPU stores (Q, K, V, the heads, the output) is rounded
/// to f16 where the kernels would store it, the arithmetic staying f32; the caller passes inputs
/// already rounded to f16.
fn f32_layer(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    bug: Bug,
) -> Tensor {
    f32_layer_stored(config, weights, inputs, bug, Precision::F32)
}

fn f32_layer_stored(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    bug: Bug,
    storage: Precision,
) -> Tensor {
    let st = |x: f32| match storage {
        Precision::F32 => x,
        Precision::F16 => half::f16::from_f32(x).to_f32(),
    };
    let (n, dm, h, dk) = (
        config.seq_len,
        config.d_model,
        config.heads,
        config.head_dim,
    );
    let dv = config.head_dim_v;
    let x = inputs.x.data();
    let project = |w: &Tensor, b: &Option<Tensor>, t: usize| -> Vec<f32> {
        let cols = w.shape()[1];
        (0..cols)
            .map(|c| {
                let mut acc = 0.0f32;
                for k in 0..dm {
                    acc += x[t * dm + k] * w.data()[k * cols + c];
                }
                st(acc + b.as_ref().map_or(0.0, |b| b.data()[c]))
            })
            .collect()
    };
    let q: Vec<Vec<f32>> = (0..n)
        .map(|t| project(&weights.w_q, &weights.b_q, t))
        .collect();
    let k: Vec<Vec<f32>> = (0..n)
        .map(|t| project(&weights.w_k, &weights.b_k, t))
        .collect();
    let mut v: Vec<Vec<f32>> = (0..n)
        .map(|t| project(&weights.w_v, &weights.b_v, t))
        .collect();
    if bug == Bug::HalfValues {
        // Round to nearest at f16's 10 stored mantissa bits (f16's range is not the point).
        let half = |x: f32| f32::from_bits((x.to_bits() + 0x1000) & !0x1FFF);
        v.iter_mut().flatten().for_each(|x| *x = half(*x));
    }
    let scale = config.scale_value() * if bug == Bug::ScaleOff { 1.01 } else { 1.0 };
    let d_out = config.d_out();
    let mut out = Vec::with_capacity(n * d_out);
    for (i, query) in q.iter().enumerate() {
        let mut heads = vec![0.0f32; h * dv];
        for head in 0..h {
            let keys = if bug == Bug::DropLastKey && i > 0 {
                i
            } else {
                i + 1
            };
            let s: Vec<f32> = (0..keys)
                .map(|j| {
                    let mut dot = 0.0f32;
                    for d in 0..dk {
                        dot += query[head * dk + d] * k[j][head * dk + d];
                    }
                    scale * dot
                })
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|s| (s - max).exp()).collect();
            let mut sum: f32 = e.iter().sum();
            if bug == Bug::ExtraSumTerm {
                sum += e[0];
            }
            for (j, w) in e.iter().enumerate() {
                for d in 0..dv {
                    heads[head * dv + d] += w / sum * v[j][head * dv + d];
                }
            }
        }
        heads.iter_mut().for_each(|x| *x = st(*x));
        let w_o = weights.w_o.as_ref().unwrap();
        for c in 0..d_out {
            let mut acc = 0.0f32;
            for (e, a) in heads.iter().enumerate() {
                acc += a * w_o.data()[e * d_out + c];
            }
            out.push(st(acc + weights.b_o.as_ref().map_or(0.0, |b| b.data()[c])));
        }
    }
    Tensor::new(config.output_shape().to_vec(), out).unwrap()
}

#[test]
fn a_correct_f32_bert_sized_result_passes_and_bugs_fail() {
    let (config, weights, inputs) = bert_sized(24);
    let exact = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    let largest = exact.data().iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        (10.0..100.0).contains(&largest),
        "activations must be about 20, reach {largest}"
    );
    let correct = f32_layer(&config, &weights, &inputs, Bug::None);
    let c = compare_bounded(&correct, &exact, &bound).unwrap();
    eprintln!("correct f32: {c}");
    assert!(c.passed(), "{c}");
    for bug in [
        Bug::DropLastKey,
        Bug::ScaleOff,
        Bug::ExtraSumTerm,
        Bug::HalfValues,
    ] {
        let wrong = f32_layer(&config, &weights, &inputs, bug);
        let c = compare_bounded(&wrong, &exact, &bound).unwrap();
        eprintln!("{bug:?}: {c}");
        assert!(!c.passed(), "{bug:?} passed the bound: {c}");
    }
}

/// f16 storage: the same layer computed in f32 with every stored value rounded to f16 (from
/// inputs rounded to f16) is within the f16 bound, which is wider than the f32 one by what the
/// roundings carry; and the bugs still fail it.
#[test]
fn a_correct_f16_stored_result_passes_the_f16_bound_and_bugs_fail() {
    let (config, weights, inputs) = bert_sized(24);
    let config = config.with_precision(Precision::F16);
    let exact = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    let f32_bound = reference::error_bound(
        &config.clone().with_precision(Precision::F32),
        &weights,
        &inputs,
    )
    .unwrap();
    let w16 = weights.rounded_to(Precision::F16).unwrap();
    let x16 = Precision::F16
        .round("x", inputs.x.shape(), inputs.x.data())
        .unwrap();
    let i16 = AttentionInputs::new(Tensor::new(inputs.x.shape(), x16).unwrap());
    let correct = f32_layer_stored(&config, &w16, &i16, Bug::None, Precision::F16);
    let c = compare_bounded(&correct, &exact, &bound).unwrap();
    eprintln!("correct f16-stored: {c}");
    assert!(c.passed(), "{c}");
    // The f16 roundings are far past the f32 bound: the f16 allowance is not slack.
    let c32 = compare_bounded(&correct, &exact, &f32_bound).unwrap();
    assert!(!c32.passed(), "f16 storage passed the f32 bound: {c32}");
    for bug in [Bug::DropLastKey, Bug::ScaleOff, Bug::ExtraSumTerm] {
        let wrong = f32_layer_stored(&config, &w16, &i16, bug, Precision::F16);
        let c = compare_bounded(&wrong, &exact, &bound).unwrap();
        eprintln!("{bug:?} in f16: {c}");
        assert!(!c.passed(), "{bug:?} passed the f16 bound: {c}");
    }
}

/// The same layer on the GPU, both kernels, with the shipped tiles (the adapter's limits) and
/// the test profile's: within the derived bound.
#[test]
fn bert_sized_gpu_results_are_within_the_bound() {
    let (config, weights, inputs) = bert_sized(130);
    let exact = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    for (limits, context) in common::contexts() {
        for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
            let config = config.clone().with_kernel(kernel);
            let mut plan = AttentionPlan::new(context, &config, &weights).unwrap();
            let gpu = plan.run(&inputs).unwrap();
            let c = compare_bounded(&gpu, &exact, &bound).unwrap();
            eprintln!("{kernel:?}, {limits}: {c}");
            assert!(c.passed(), "{kernel:?}, {limits}: {c}");
        }
    }
}

/// Scores of a million: f32 carries them to about 0.06, which can move the softmax weights by
/// several percent, past where first-order error terms hold. The bound must still cover both
/// kernels' results, and never exceed the spread of the values averaged (2000 here).
#[test]
fn scores_past_first_order_stay_within_the_bound() {
    let xs = [1000.0, 999.9, -1000.0, 999.95, 0.5, -999.97];
    let seq = xs.len();
    let config = AttentionConfig::new(1, seq, 1, 1, 1).with_scale(1.0);
    let one = || Tensor::new([1, 1], vec![1.0]).unwrap();
    let weights = AttentionWeights::new(one(), one(), one());
    let inputs = AttentionInputs::new(Tensor::new([1, seq, 1], xs.to_vec()).unwrap());
    let exact = reference::run(&config, &weights, &inputs).unwrap().output;
    let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
    assert!(
        bound.data().iter().all(|&b| b > 1e-3 && b < 2000.1),
        "{bound:?}"
    );
    for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
        let config = config.clone().with_kernel(kernel);
        let mut plan = AttentionPlan::new(common::ctx(), &config, &weights).unwrap();
        let c = compare_bounded(&plan.run(&inputs).unwrap(), &exact, &bound).unwrap();
        eprintln!("{kernel:?}: {c}");
        assert!(c.passed(), "{kernel:?}: {c}");
    }
}
