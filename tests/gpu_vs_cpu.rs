//! GPU against the f64 CPU reference over many generated layers.
//!
//! Shapes: seq 1..=70 (so 1, tile edges 63/64/65 and odd lengths all occur), heads 1..=8, batch
//! 1..=3, widths that are multiples of nothing, with and without causal masking, key padding
//! (including wholly padded batch rows), biases, output projection and a custom scale.
//! Data: x ~ N(0, 1); weights ~ N(0, 1/fan_in) as a trained layer's are; biases ~ N(0, 0.1).
//!
//! Tolerance rule, for every element of every tensor compared:
//!     |gpu - ref| <= 1e-5 + 1e-4 * |ref|          (Tolerance::F32)

mod common;

use common::{Rng, ctx};
use proptest::prelude::*;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, Tensor, Tolerance, compare,
    reference,
};

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    seq: usize,
    d_model: usize,
    heads: usize,
    head_dim: usize,
    head_dim_v: usize,
    causal: bool,
    /// None: no mask; Some(p): each key is padding with probability p, and batch row 0 is
    /// wholly padded when p > 0.5.
    padding: Option<f64>,
    qkv_bias: bool,
    out: Option<(usize, bool)>,
    scale: Option<f32>,
    intermediates: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            1usize..=3,
            prop_oneof![1usize..=70, Just(1), Just(64), Just(65)],
            1usize..=40,
        ),
        (
            1usize..=8,
            1usize..=20,
            prop::option::weighted(0.3, 1usize..=20),
        ),
        (any::<bool>(), prop::option::of(0.0f64..0.9), any::<bool>()),
        (
            prop::option::of((1usize..=24, any::<bool>())),
            prop::option::of(0.05f32..2.0),
            any::<bool>(),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, seq, d_model),
                (heads, head_dim, dv),
                (causal, padding, qkv_bias),
                (out, scale, intermediates),
                seed,
            )| Case {
                batch,
                seq,
                d_model,
                heads,
                head_dim,
                head_dim_v: dv.unwrap_or(head_dim),
                causal,
                padding,
                qkv_bias,
                out,
                scale,
                intermediates,
                seed,
            },
        )
}

fn build(c: &Case) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let mut rng = Rng::new(c.seed);
    let mut config = AttentionConfig::new(c.batch, c.seq, c.d_model, c.heads, c.head_dim)
        .with_head_dim_v(c.head_dim_v);
    config.scale = c.scale;
    config.causal = c.causal;
    config.key_padding_mask = c.padding.is_some();
    config.keep_intermediates = c.intermediates;
    let (qk, v) = (c.heads * c.head_dim, c.heads * c.head_dim_v);
    let w_std = 1.0 / (c.d_model as f32).sqrt();
    let mut weights = AttentionWeights::new(
        rng.tensor(&[c.d_model, qk], w_std),
        rng.tensor(&[c.d_model, qk], w_std),
        rng.tensor(&[c.d_model, v], w_std),
    );
    if c.qkv_bias {
        weights = weights.with_qkv_bias(
            rng.tensor(&[qk], 0.1),
            rng.tensor(&[qk], 0.1),
            rng.tensor(&[v], 0.1),
        );
    }
    if let Some((d_out, bias)) = c.out {
        config = config.with_output_projection(d_out);
        let b_o = bias.then(|| rng.tensor(&[d_out], 0.1));
        weights =
            weights.with_output_projection(rng.tensor(&[v, d_out], 1.0 / (v as f32).sqrt()), b_o);
    }
    let mut inputs = AttentionInputs::new(rng.tensor(&[c.batch, c.seq, c.d_model], 1.0));
    if let Some(p) = c.padding {
        let mask: Vec<f32> = (0..c.batch * c.seq)
            .map(|i| {
                let whole_row_padded = p > 0.5 && i < c.seq;
                if whole_row_padded || rng.uniform() < p {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        inputs = inputs.with_key_mask(Tensor::new([c.batch, c.seq], mask).unwrap());
    }
    (config, weights, inputs)
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let (config, weights, inputs) = build(c);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let out = plan.run(&inputs).unwrap();
    let tol = Tolerance::F32;
    let mut tensors = vec![("output", out, cpu.output.clone())];
    if c.intermediates {
        let gpu = plan.read_intermediates().unwrap();
        tensors.extend([
            ("q", gpu.q, cpu.q.clone()),
            ("k", gpu.k, cpu.k.clone()),
            ("v", gpu.v, cpu.v.clone()),
            ("scores", gpu.scores, cpu.scores.clone()),
            ("probs", gpu.probs, cpu.probs.clone()),
            ("attention", gpu.attention, cpu.attention.clone()),
            ("output (intermediates)", gpu.output, cpu.output.clone()),
        ]);
    }
    for (name, gpu, reference) in &tensors {
        let cmp = compare(gpu, reference, tol).unwrap();
        prop_assert!(cmp.passed(), "{name}: {cmp}\ncase {c:?}");
        prop_assert!(gpu.data().iter().all(|v| !v.is_nan()), "{name} has NaN");
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_reference(c in case()) {
        check(&c)?;
    }
}

/// Hand-picked shapes at the edges of the tiles, always run.
#[test]
fn tile_edges() {
    let base = Case {
        batch: 1,
        seq: 1,
        d_model: 1,
        heads: 1,
        head_dim: 1,
        head_dim_v: 1,
        causal: false,
        padding: None,
        qkv_bias: false,
        out: None,
        scale: None,
        intermediates: true,
        seed: 7,
    };
    let cases = [
        Case { ..base.clone() },
        Case {
            seq: 64,
            d_model: 64,
            head_dim: 64,
            head_dim_v: 64,
            ..base.clone()
        },
        Case {
            seq: 65,
            d_model: 17,
            heads: 3,
            head_dim: 5,
            head_dim_v: 7,
            causal: true,
            ..base.clone()
        },
        Case {
            batch: 3,
            seq: 129,
            d_model: 33,
            heads: 2,
            head_dim: 16,
            head_dim_v: 16,
            padding: Some(0.3),
            ..base.clone()
        },
        Case {
            batch: 2,
            seq: 100,
            d_model: 70,
            heads: 8,
            head_dim: 8,
            head_dim_v: 8,
            causal: true,
            padding: Some(0.7),
            qkv_bias: true,
            out: Some((70, true)),
            ..base.clone()
        },
        Case {
            seq: 3,
            d_model: 4,
            head_dim: 3,
            head_dim_v: 3,
            scale: Some(1.0),
            out: Some((1, false)),
            ..base
        },
    ];
    for c in &cases {
        check(c).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A device that allows only 5 workgroups per dimension forces every dispatch to fold into a
/// 2D or 3D grid; the results must not change.
#[test]
fn grids_fold_past_max_workgroups_per_dimension() {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&Default::default())).expect("an adapter");
    let limits = wgpu::Limits {
        max_compute_workgroups_per_dimension: 5,
        ..wgpu::Limits::default().or_worse_values_from(&adapter.limits())
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device");
    let small = wgpu_attention::GpuContext::from_device(device, queue);
    // 1 x 3 x 40 = 120 softmax rows, one workgroup each: a 5 x 5 x 5 grid.
    let c = Case {
        batch: 1,
        seq: 40,
        d_model: 12,
        heads: 3,
        head_dim: 5,
        head_dim_v: 6,
        causal: true,
        padding: Some(0.2),
        qkv_bias: true,
        out: Some((7, true)),
        scale: None,
        intermediates: true,
        seed: 21,
    };
    let (config, weights, inputs) = build(&c);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let mut plan = AttentionPlan::new(&small, &config, &weights).unwrap();
    let out = plan.run(&inputs).unwrap();
    let cmp = compare(&out, &cpu.output, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
    let probs = compare(
        &plan.read_intermediates().unwrap().probs,
        &cpu.probs,
        Tolerance::F32,
    )
    .unwrap();
    assert!(probs.passed(), "{probs}");

    // 240 softmax rows need 240 workgroups, more than 5³ = 125: a clear error, not a bad launch.
    let (config, weights, _) = build(&Case {
        batch: 2,
        ..c.clone()
    });
    assert_eq!(config.batch * config.heads * config.seq_len, 240);
    let err = AttentionPlan::new(&small, &config, &weights).unwrap_err();
    assert!(
        err.to_string()
            .contains("max_compute_workgroups_per_dimension"),
        "{err}"
    );
}
