//! What the cached layer's tests share: its random weights, the tokens of a sequence, and the
//! no-allocation run both precisions' tests make.

use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionWeights, CachedAttention, CachedIo, CachedLayerConfig, GpuContext, Tensor,
};

use super::{Rng, object_counts};

/// The width of the test layers' tokens.
pub const D_MODEL: usize = 20;

/// Random weights for `config`: scaled so that projections stay of order 1.
pub fn weights(rng: &mut Rng, c: &CachedLayerConfig, biases: bool) -> AttentionWeights {
    let s = 1.0 / (c.d_model as f32).sqrt();
    let (q, k, v) = (
        c.heads * c.head_dim,
        c.kv_heads * c.head_dim,
        c.kv_heads * c.head_dim_v,
    );
    let mut w = AttentionWeights::new(
        rng.tensor(&[c.d_model, q], s),
        rng.tensor(&[c.d_model, k], s),
        rng.tensor(&[c.d_model, v], s),
    );
    if biases {
        w = w.with_qkv_bias(
            rng.tensor(&[q], 0.5),
            rng.tensor(&[k], 0.5),
            rng.tensor(&[v], 0.5),
        );
    }
    if let Some(d_out) = c.d_out {
        let heads = c.heads * c.head_dim_v;
        let b_o = biases.then(|| rng.tensor(&[d_out], 0.5));
        w = w.with_output_projection(
            rng.tensor(&[heads, d_out], 1.0 / (heads as f32).sqrt()),
            b_o,
        );
    }
    w
}

/// Tokens `from .. from + n` of a `[1, seq, d]` sequence, as `[1, n, d]` data.
pub fn tokens(x: &Tensor, from: usize, n: usize) -> Vec<f32> {
    let d = x.shape()[2];
    x.data()[from * d..(from + n) * d].to_vec()
}

/// Runs `steps` one-token steps of `config` (batch 2, up to 9 tokens a step) on the
/// application's `device`, alternating between the application's own buffers and host data
/// through the layer's, all fed one random token per row, and asserts that after the first two
/// (the host belt's first chunk is made by the first host step) no step creates a wgpu object.
/// Returns the weights, the token, and the output of one more host step (`steps + 1` tokens
/// in the cache).
pub fn steps_allocate_nothing(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    config: &CachedLayerConfig,
    seed: u64,
    steps: usize,
) -> (AttentionWeights, Tensor, Tensor) {
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let mut rng = Rng::new(seed);
    let w = weights(&mut rng, config, true);
    let mut layer = CachedAttention::new(&app, config, &w).unwrap();
    let token = rng.tensor(&[2, 1, D_MODEL], 1.0);
    // The application's x in the layer's precision, sized for the largest step, as binding
    // checks; each step reads its first token per row.
    let mut padded = token.data().to_vec();
    padded.resize(2 * 9 * D_MODEL, 0.0);
    let x = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &config
            .precision
            .encode("x", &[padded.len()], &padded)
            .unwrap(),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let (_, out) = layer.io_buffers();
    let bindings = layer
        .bind(CachedIo {
            x: &x,
            output: &out,
        })
        .unwrap();
    let step = |layer: &mut CachedAttention, i: usize| {
        if i.is_multiple_of(2) {
            let mut encoder = device.create_command_encoder(&Default::default());
            layer.encode_step(&mut encoder, &bindings, 1).unwrap();
            queue.submit([encoder.finish()]);
        } else {
            layer.step(&token).unwrap();
        }
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    };
    step(&mut layer, 0);
    step(&mut layer, 1);
    let before = object_counts(device);
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "counters are not counting: {before:?}"
    );
    for i in 2..steps {
        step(&mut layer, i);
    }
    assert_eq!(
        object_counts(device),
        before,
        "a cached layer step ({:?}) created wgpu objects",
        config.precision
    );
    let last = layer.step(&token).unwrap();
    (w, token, last)
}
