//! Generated layers for the GPU-against-reference tests, shared by the staged and fused
//! kernels' tests.
//!
//! Data: x ~ N(0, 1); weights ~ N(0, 1/fan_in) as a trained layer's are; biases ~ N(0, 0.1).

use proptest::prelude::*;
use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionWeights, Tensor};

use super::Rng;

#[derive(Debug, Clone)]
pub struct Case {
    pub batch: usize,
    pub seq: usize,
    pub d_model: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub causal: bool,
    /// None: no mask; Some(p): each key is padding with probability p, and batch row 0 is
    /// wholly padded when p > 0.5.
    pub padding: Option<f64>,
    pub qkv_bias: bool,
    pub out: Option<(usize, bool)>,
    pub scale: Option<f32>,
    pub intermediates: bool,
    pub seed: u64,
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        (
            1usize..=3,
            prop_oneof![
                3 => 1usize..=70,
                1 => Just(1),
                1 => prop_oneof![Just(64), Just(65)],
                2 => 127usize..=130,
                1 => 255usize..=257,
            ],
            1usize..=40,
        ),
        (
            1usize..=4,
            head_width(),
            prop::option::weighted(0.3, head_width()),
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

/// Head widths 1..=130: small ones often (cheap, and every remainder mod 4 and 8), the odd
/// widths past the vec4 and tile boundaries always in reach.
fn head_width() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..=20,
        2 => 1usize..=130,
        1 => prop_oneof![Just(33), Just(65), Just(127)],
    ]
}

pub fn build(c: &Case) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
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
