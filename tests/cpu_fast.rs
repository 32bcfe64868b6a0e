//! The fast CPU path (`CpuAttention`, `cpu::attention`) against the f64 reference: the worked
//! example exactly, then odd sizes, masks, biases, projections, extreme scores and random shapes
//! within `Tolerance::F32`. No GPU needed.

// The constants keep every digit worked-example.md prints.
#![allow(clippy::excessive_precision)]

mod common;

use common::{Rng, t, worked_example};
use proptest::prelude::*;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionShape, AttentionWeights, CpuAttention, Error,
    Intermediates, Tensor, Tolerance, compare, cpu, reference,
};

/// A layer's tensors: N(0, 1) inputs, N(0, 1/fan_in) weights, N(0, 0.25) biases.
struct Layer {
    config: AttentionConfig,
    weights: AttentionWeights,
    inputs: AttentionInputs,
}

#[derive(Clone, Copy, Debug)]
struct Spec {
    batch: usize,
    seq: usize,
    d_model: usize,
    heads: usize,
    head_dim: usize,
    head_dim_v: usize,
    causal: bool,
    /// Probability that a key is padding (0 = no mask at all).
    padding: f64,
    bias: bool,
    d_out: Option<usize>,
    scale: Option<f32>,
}

impl Spec {
    fn new(batch: usize, seq: usize, d_model: usize, heads: usize, head_dim: usize) -> Self {
        Spec {
            batch,
            seq,
            d_model,
            heads,
            head_dim,
            head_dim_v: head_dim,
            causal: false,
            padding: 0.0,
            bias: false,
            d_out: None,
            scale: None,
        }
    }

    fn layer(self, seed: u64) -> Layer {
        let mut rng = Rng::new(seed);
        let mut config = AttentionConfig::new(
            self.batch,
            self.seq,
            self.d_model,
            self.heads,
            self.head_dim,
        )
        .with_head_dim_v(self.head_dim_v);
        config.scale = self.scale;
        config.causal = self.causal;
        let (qk, hv) = (self.heads * self.head_dim, self.heads * self.head_dim_v);
        let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
        let dm = self.d_model;
        let mut weights = AttentionWeights::new(
            rng.tensor(&[dm, qk], fan_in(dm)),
            rng.tensor(&[dm, qk], fan_in(dm)),
            rng.tensor(&[dm, hv], fan_in(dm)),
        );
        if self.bias {
            weights = weights.with_qkv_bias(
                rng.tensor(&[qk], 0.5),
                rng.tensor(&[qk], 0.5),
                rng.tensor(&[hv], 0.5),
            );
        }
        if let Some(d_out) = self.d_out {
            config = config.with_output_projection(d_out);
            let b_o = self.bias.then(|| rng.tensor(&[d_out], 0.5));
            weights = weights.with_output_projection(rng.tensor(&[hv, d_out], fan_in(hv)), b_o);
        }
        let mut inputs = AttentionInputs::new(rng.tensor(&[self.batch, self.seq, dm], 1.0));
        if self.padding > 0.0 {
            config = config.with_key_padding_mask();
            let mask = (0..self.batch * self.seq)
                .map(|_| {
                    if rng.uniform() < self.padding {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            inputs = inputs.with_key_mask(Tensor::new([self.batch, self.seq], mask).unwrap());
        }
        Layer {
            config,
            weights,
            inputs,
        }
    }
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: Tolerance) {
    let c = compare(actual, expected, tol).unwrap();
    assert!(c.passed(), "{what}: {c}");
}

/// The core alone on the reference's own projections.
fn core_on(layer: &Layer, r: &Intermediates) -> Tensor {
    let mask = layer.inputs.key_mask.as_ref().map(|m| m.data());
    let shape = AttentionShape::of(&layer.config);
    let out = cpu::attention(&shape, r.q.data(), r.k.data(), r.v.data(), mask).unwrap();
    Tensor::new(r.attention.shape().to_vec(), out).unwrap()
}

/// Runs both fast entry points and checks them against the reference; returns the layer's
/// output and the reference.
fn check(layer: &Layer) -> (Tensor, Intermediates) {
    let Layer {
        config,
        weights,
        inputs,
    } = layer;
    let r = reference::run(config, weights, inputs).unwrap();
    let fast = CpuAttention::new(config, weights).unwrap();
    let out = fast.run(inputs).unwrap();
    assert_eq!(out.shape(), config.output_shape());
    assert_close(
        &format!("layer {config:?}"),
        &out,
        &r.output,
        Tolerance::F32,
    );
    let core = core_on(layer, &r);
    assert_close(
        &format!("core {config:?}"),
        &core,
        &r.attention,
        Tolerance::F32,
    );
    (out, r)
}

const EXACT: Tolerance = Tolerance::new(1e-6, 0.0);

#[test]
fn worked_example_exactly() {
    let (config, weights, inputs) = worked_example(Some(1.0));
    let out = CpuAttention::new(&config, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let expected = t(
        &[1, 3, 3],
        &[
            1.9366211, 6.6831053, 1.5950684, 1.9999940, 7.9639916, 0.0539764, 1.9997046, 7.7598923,
            0.3583893,
        ],
    );
    assert_close("layer", &out, &expected, EXACT);
    // The core alone on the example's queries, keys and values.
    let shape = AttentionShape::of(&config);
    let q = [1., 0., 2., 2., 2., 2., 2., 1., 3.];
    let k = [0., 1., 1., 4., 4., 0., 2., 3., 1.];
    let v = [1., 2., 3., 2., 8., 0., 2., 6., 3.];
    let core = cpu::attention(&shape, &q, &k, &v, None).unwrap();
    assert_close("core", &t(&[1, 3, 3], &core), &expected, EXACT);
}

#[test]
fn odd_sizes() {
    // (batch, seq, d_model, heads, head_dim): sequences around the 128-query block and the
    // 512-key chunk, head widths 1, 5 and 64, 1 to 8 heads.
    let cases = [
        (1, 1, 3, 1, 1),
        (2, 1, 8, 3, 5),
        (1, 63, 16, 2, 5),
        (3, 65, 7, 1, 64),
        (1, 127, 32, 8, 1),
        (2, 129, 24, 4, 5),
        (1, 200, 64, 8, 64),
        (2, 257, 12, 5, 5),
        (1, 257, 32, 3, 64),
        (1, 513, 8, 2, 5),
        (1, 1100, 16, 1, 5),
    ];
    for (i, &(b, n, dm, h, d)) in cases.iter().enumerate() {
        check(&Spec::new(b, n, dm, h, d).layer(i as u64));
    }
}

#[test]
fn value_width_differs_from_key_width() {
    for (i, (d, dv)) in [(5, 3), (1, 7), (64, 5), (3, 64)].into_iter().enumerate() {
        let mut spec = Spec::new(2, 70, 9, 3, d);
        spec.head_dim_v = dv;
        check(&spec.layer(100 + i as u64));
    }
}

#[test]
fn causal() {
    for (i, &(b, n, h, d)) in [
        (1, 1, 1, 1),
        (2, 63, 2, 5),
        (1, 129, 4, 64),
        (3, 257, 3, 5),
        (1, 600, 2, 5),
        (1, 1100, 1, 8),
    ]
    .iter()
    .enumerate()
    {
        let mut spec = Spec::new(b, n, 12, h, d);
        spec.causal = true;
        check(&spec.layer(200 + i as u64));
    }
}

#[test]
fn key_padding_random() {
    for (i, &(n, causal, padding)) in [
        (17, false, 0.3),
        (130, false, 0.5),
        (257, true, 0.3),
        (700, false, 0.9),
        (700, true, 0.5),
    ]
    .iter()
    .enumerate()
    {
        let mut spec = Spec::new(3, n, 10, 2, 5);
        spec.causal = causal;
        spec.padding = padding;
        check(&spec.layer(300 + i as u64));
    }
}

/// Sets the key mask of `layer` and returns it checked.
fn with_mask(mut layer: Layer, mask: Vec<f32>) -> (Tensor, Intermediates) {
    let shape = layer.config.key_mask_shape();
    layer.inputs.key_mask = Some(Tensor::new(shape, mask).unwrap());
    check(&layer)
}

#[test]
fn wholly_padded_batch_row_gives_zeros() {
    let (b, n, h, dv) = (3, 300, 2, 5);
    let mut spec = Spec::new(b, n, 10, h, dv);
    spec.padding = 0.5;
    spec.bias = true;
    let mut mask = vec![1.0; b * n];
    mask[n..2 * n].fill(0.0);
    mask[5] = 0.0;
    let (out, _) = with_mask(spec.layer(400), mask);
    let row = &out.data()[n * h * dv..2 * n * h * dv];
    assert!(row.iter().all(|&x| x == 0.0));
    // The rows either side are real attention, not zeros.
    assert!(out.data()[..n * h * dv].iter().any(|&x| x != 0.0));
    assert!(out.data()[2 * n * h * dv..].iter().any(|&x| x != 0.0));
}

#[test]
fn padding_fills_whole_key_chunks() {
    // The first 512-key chunk is all padding for every query, so the online softmax starts
    // from rows with no maximum; with causal masking too, the queries before the first real key
    // see nothing at all and must give zeros.
    let (n, h, dv) = (700, 2, 5);
    for causal in [false, true] {
        let mut spec = Spec::new(1, n, 10, h, dv);
        spec.padding = 0.5;
        spec.causal = causal;
        let mut mask = vec![1.0; n];
        mask[..600].fill(0.0);
        let (out, r) = with_mask(spec.layer(500), mask);
        let width = h * dv;
        let zeros = if causal { 600 } else { 0 };
        assert!(out.data()[..zeros * width].iter().all(|&x| x == 0.0));
        assert!(out.data()[zeros * width..].iter().all(|&x| x != 0.0));
        assert!(r.output.data()[zeros * width..].iter().all(|&x| x != 0.0));
    }
}

#[test]
fn biases_and_output_projection() {
    for (i, &(bias, d_out, causal, padding)) in [
        (true, None, false, 0.0),
        (false, Some(7), false, 0.0),
        (true, Some(16), true, 0.0),
        (true, Some(1), false, 0.3),
        (true, Some(40), true, 0.3),
    ]
    .iter()
    .enumerate()
    {
        let mut spec = Spec::new(2, 150, 16, 4, 8);
        spec.bias = bias;
        spec.d_out = d_out;
        spec.causal = causal;
        spec.padding = padding;
        check(&spec.layer(600 + i as u64));
    }
}

#[test]
fn realistic_layer() {
    // 8 heads of 64 over d_model 512 with an output projection, as the benchmark runs it.
    let mut spec = Spec::new(1, 200, 512, 8, 64);
    spec.d_out = Some(512);
    spec.bias = true;
    check(&spec.layer(700));
    spec.causal = true;
    check(&spec.layer(701));
}

#[test]
fn scales() {
    for (i, scale) in [1.0, 0.01, -0.5, 0.0, 3.0].into_iter().enumerate() {
        let mut spec = Spec::new(2, 40, 8, 2, 4);
        spec.scale = Some(scale);
        spec.causal = i % 2 == 0;
        check(&spec.layer(800 + i as u64));
    }
}

#[test]
fn scores_near_ten_thousand_stay_stable() {
    // W_q = W_k = 100·I: scores are 1e4 · x_i · x_j, up to several 1e4 either way; softmax
    // rows are nearly one-hot and must not overflow to NaN.
    let (n, d) = (150, 4);
    let eye = |s: f32| {
        let mut w = vec![0.0; d * d];
        (0..d).for_each(|i| w[i * d + i] = s);
        t(&[d, d], &w)
    };
    let mut rng = Rng::new(900);
    for causal in [false, true] {
        let mut config = AttentionConfig::new(2, n, d, 1, d).with_scale(1.0);
        config.causal = causal;
        let weights = AttentionWeights::new(eye(100.0), eye(100.0), rng.tensor(&[d, d], 0.5));
        let inputs = AttentionInputs::new(rng.tensor(&[2, n, d], 1.0));
        let layer = Layer {
            config,
            weights,
            inputs,
        };
        let (out, r) = check(&layer);
        assert!(out.data().iter().all(|x| x.is_finite()));
        let top = r.scores.data().iter().copied().filter(|s| s.is_finite());
        assert!(top.fold(0.0f32, |m, s| m.max(s.abs())) > 1e4);
    }
    // Directly: one query against keys scoring +1e4, -1e4 and 1e4 - 1 (all exact in f32).
    let shape = AttentionShape {
        batch: 1,
        heads: 1,
        seq: 3,
        head_dim: 1,
        head_dim_v: 1,
        scale: 1.0,
        causal: false,
    };
    let q = [128.0, 0.0, -128.0];
    let k = [78.125, -78.125, 78.117_187_5];
    let v = [1.0, 2.0, 4.0];
    let out = cpu::attention(&shape, &q, &k, &v, None).unwrap();
    let e = (-1.0f64).exp();
    let want0 = ((1.0 + 4.0 * e) / (1.0 + e)) as f32;
    assert!((out[0] - want0).abs() < 1e-5, "{out:?} vs {want0}");
    assert!((out[1] - 7.0 / 3.0).abs() < 1e-5, "{out:?}");
    assert!((out[2] - 2.0).abs() < 1e-5, "{out:?}");
}

#[test]
fn runs_are_deterministic_and_reusable() {
    let mut spec = Spec::new(2, 300, 16, 4, 8);
    spec.causal = true;
    spec.d_out = Some(12);
    let layer = spec.layer(1000);
    let fast = CpuAttention::new(&layer.config, &layer.weights).unwrap();
    assert_eq!(fast.config(), &layer.config);
    let first = fast.run(&layer.inputs).unwrap();
    for _ in 0..3 {
        assert_eq!(fast.run(&layer.inputs).unwrap(), first);
    }
    // Another input through the same prepared layer.
    let other = AttentionInputs::new(Rng::new(1001).tensor(&[2, 300, 16], 1.0));
    let r = reference::run(&layer.config, &layer.weights, &other).unwrap();
    assert_close(
        "reuse",
        &fast.run(&other).unwrap(),
        &r.output,
        Tolerance::F32,
    );
}

#[test]
fn layer_errors() {
    let layer = Spec::new(1, 4, 6, 2, 3).layer(1100);
    let (config, weights) = (&layer.config, &layer.weights);
    // Weights are checked up front.
    let mut bad = weights.clone();
    bad.w_k = Tensor::zeros([6, 5]);
    assert!(matches!(
        CpuAttention::new(config, &bad),
        Err(Error::ShapeMismatch { ref name, .. }) if name == "w_k"
    ));
    let mut bad = weights.clone();
    bad.b_q = Some(t(&[6], &[0., 0., f32::NAN, 0., 0., 0.]));
    bad.b_k = Some(Tensor::zeros([6]));
    bad.b_v = Some(Tensor::zeros([6]));
    assert!(matches!(
        CpuAttention::new(config, &bad),
        Err(Error::NonFinite { ref name, .. }) if name == "b_q"
    ));
    assert!(matches!(
        CpuAttention::new(&config.clone().with_output_projection(3), weights),
        Err(Error::MissingTensor { .. })
    ));
    let mut zero = config.clone();
    zero.heads = 0;
    assert!(matches!(
        CpuAttention::new(&zero, weights),
        Err(Error::ZeroSize { name: "heads" })
    ));
    // Inputs on every run.
    let fast = CpuAttention::new(config, weights).unwrap();
    let mut x = vec![0.0; 24];
    x[7] = f32::INFINITY;
    assert!(matches!(
        fast.run(&AttentionInputs::new(t(&[1, 4, 6], &x))),
        Err(Error::NonFinite { ref name, .. }) if name == "x"
    ));
    assert!(matches!(
        fast.run(&AttentionInputs::new(Tensor::zeros([1, 5, 6]))),
        Err(Error::ShapeMismatch { .. })
    ));
    let masked =
        AttentionInputs::new(Tensor::zeros([1, 4, 6])).with_key_mask(Tensor::zeros([1, 4]));
    assert!(matches!(
        fast.run(&masked),
        Err(Error::UnexpectedTensor { .. })
    ));
}

#[test]
fn core_errors() {
    let shape = AttentionShape {
        batch: 2,
        heads: 3,
        seq: 4,
        head_dim: 5,
        head_dim_v: 6,
        scale: 1.0,
        causal: false,
    };
    let (qk, v) = (vec![0.5; 2 * 3 * 4 * 5], vec![0.5; 2 * 3 * 4 * 6]);
    assert_eq!(
        cpu::attention(&shape, &qk, &qk, &v, None).unwrap().len(),
        shape.output_len()
    );
    match cpu::attention(&shape, &qk, &qk[1..], &v, None) {
        Err(Error::DataLength {
            name,
            expected,
            actual,
            ..
        }) => assert_eq!((name.as_str(), expected, actual), ("k", 120, 119)),
        other => panic!("{other:?}"),
    }
    // v has head_dim_v = 6, so the key width is the wrong length for it.
    assert!(matches!(
        cpu::attention(&shape, &qk, &qk, &qk, None),
        Err(Error::DataLength { ref name, .. }) if name == "v"
    ));
    let mut nan = v.clone();
    nan[2 * 4 * 6 + 6 + 1] = f32::NAN;
    match cpu::attention(&shape, &qk, &qk, &nan, None) {
        Err(Error::NonFinite { name, index, .. }) => {
            assert_eq!(name, "v");
            assert_eq!(index.0, vec![0, 2, 1, 1]);
        }
        other => panic!("{other:?}"),
    }
    let mut mask = vec![1.0; 8];
    assert!(matches!(
        cpu::attention(&shape, &qk, &qk, &v, Some(&mask[1..])),
        Err(Error::DataLength { ref name, .. }) if name == "key_mask"
    ));
    mask[6] = 0.5;
    match cpu::attention(&shape, &qk, &qk, &v, Some(&mask)) {
        Err(Error::InvalidMask { index, value }) => {
            assert_eq!((index.0, value), (vec![1, 2], 0.5));
        }
        other => panic!("{other:?}"),
    }
    let zero = AttentionShape { seq: 0, ..shape };
    assert!(matches!(
        cpu::attention(&zero, &[], &[], &[], None),
        Err(Error::ZeroSize { name: "seq" })
    ));
    let inf = AttentionShape {
        scale: f32::INFINITY,
        ..shape
    };
    assert!(matches!(
        cpu::attention(&inf, &qk, &qk, &v, None),
        Err(Error::InvalidConfig(_))
    ));
    let huge = AttentionShape {
        batch: usize::MAX / 2,
        ..shape
    };
    assert!(matches!(
        cpu::attention(&huge, &qk, &qk, &v, None),
        Err(Error::InvalidConfig(_))
    ));
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        (1usize..=3, 1usize..=150, 1usize..=16, 1usize..=4),
        (1usize..=9, 1usize..=9, any::<bool>(), 0usize..3),
        (
            any::<bool>(),
            proptest::option::of(1usize..=10),
            proptest::option::of(-2.0f32..2.0),
        ),
    )
        .prop_map(
            |(
                (batch, seq, d_model, heads),
                (head_dim, head_dim_v, causal, padding),
                (bias, d_out, scale),
            )| Spec {
                batch,
                seq,
                d_model,
                heads,
                head_dim,
                head_dim_v,
                causal,
                padding: [0.0, 0.2, 0.7][padding],
                bias,
                d_out,
                scale,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_shapes_match_the_reference(spec in spec_strategy(), seed in any::<u64>()) {
        check(&spec.layer(seed));
    }
}
