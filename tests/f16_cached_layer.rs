//! The cached layer (`CachedAttention`) in f16 storage (`CachedLayerConfig::with_precision`):
//! a prompt, then single-token steps and chunks, MHA and GQA, with and without an output
//! projection, batch rows at different lengths, a prompt long enough for the prefill kernels;
//! every step's output is f16 and within the f16 error bound of the f64 reference of the whole
//! sequence (`reference::cached_layer_error_bound`, the layer's bound); f16 steps allocate
//! nothing; values past f16's range, odd head widths and foreign-precision buffers are named
//! errors. On an adapter without shader-f16 (llvmpipe's OpenGL) each test checks the named
//! error `NoShaderF16` instead.

mod common;

use common::cached::{D_MODEL, tokens, weights};
use common::{Rng, ctx};
use wgpu_attention::{
    AttentionWeights, CachedAttention, CachedIo, CachedLayerConfig, Error, GpuContext, Precision,
    Tensor, compare_bounded, reference,
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

/// A small f16 cached layer, refused on a device without shader-f16, naming the adapter.
fn assert_refused_without_f16(ctx: &GpuContext) {
    let mut rng = Rng::new(60);
    let config = CachedLayerConfig::new(1, D_MODEL, 2, 1, 4, 16, 4).with_precision(Precision::F16);
    let w = weights(&mut rng, &config, true);
    match CachedAttention::new(ctx, &config, &w) {
        Err(e @ Error::NoShaderF16 { .. }) => {
            let message = e.to_string();
            assert!(message.contains("lacks shader-f16"), "{message}");
            assert!(message.contains(&ctx.adapter_info().name), "{message}");
        }
        other => panic!("expected NoShaderF16, got {other:?}"),
    }
}

/// Output rows `from .. from + n` of batch row `b`, in either output layout (`[batch, seq,
/// d_out]` or head-major `[batch, heads, seq, dv]`), flat.
fn rows(out: &Tensor, b: usize, from: usize, n: usize) -> Tensor {
    let data: Vec<f32> = match *out.shape() {
        [_, seq, w] => out.data()[(b * seq + from) * w..(b * seq + from + n) * w].to_vec(),
        [_, h, seq, w] => (0..h)
            .flat_map(|head| {
                let at = ((b * h + head) * seq + from) * w;
                out.data()[at..at + n * w].to_vec()
            })
            .collect(),
        _ => panic!("output of shape {:?}", out.shape()),
    };
    Tensor::new([data.len()], data).unwrap()
}

/// Every value is an f16 (the output really was stored in f16).
fn assert_f16_values(what: &str, t: &Tensor) {
    for (i, &x) in t.data().iter().enumerate() {
        assert_eq!(
            half::f16::from_f32(x).to_f32(),
            x,
            "{what}: element {i} is not an f16"
        );
    }
}

/// Each batch row's whole-sequence reference and f16 bound, and the largest share of the bound
/// any step used.
struct Expected {
    want: Vec<Tensor>,
    bound: Vec<Tensor>,
    worst: f64,
    worst_abs: f64,
}

impl Expected {
    fn new(config: &CachedLayerConfig, w: &AttentionWeights, seqs: &[Tensor]) -> Self {
        let one_row = CachedLayerConfig {
            batch: 1,
            ..config.clone()
        };
        Expected {
            want: seqs
                .iter()
                .map(|x| reference::cached_layer(&one_row, w, x).unwrap())
                .collect(),
            bound: seqs
                .iter()
                .map(|x| reference::cached_layer_error_bound(&one_row, w, x).unwrap())
                .collect(),
            worst: 0.0,
            worst_abs: 0.0,
        }
    }

    /// The step's rows of batch row `b` (the first `check[b]` of `n`) against the reference's
    /// rows at `from[b]`, under the f16 bound.
    fn check(&mut self, what: &str, got: &Tensor, from: &[usize], check: &[usize], n: usize) {
        assert_f16_values(what, got);
        for (b, (&at, &len)) in from.iter().zip(check).enumerate() {
            let g = rows(got, b, 0, n);
            // Only the first `len` tokens of each head's rows: cut per head.
            let per_token = g.len() / n;
            let keep = |t: &Tensor| -> Tensor {
                let width = if got.shape().len() == 4 {
                    got.shape()[3]
                } else {
                    per_token
                };
                let data: Vec<f32> = t
                    .data()
                    .chunks(n * width)
                    .flat_map(|head| head[..len * width].to_vec())
                    .collect();
                Tensor::new([data.len()], data).unwrap()
            };
            let (want, bound) = (
                rows(&self.want[b], 0, at, n),
                rows(&self.bound[b], 0, at, n),
            );
            let c = compare_bounded(&keep(&g), &keep(&want), &keep(&bound)).unwrap();
            assert!(c.passed(), "{what}, batch row {b} at {at}: {c}");
            self.worst = self.worst.max(c.worst_ratio);
            self.worst_abs = self.worst_abs.max(c.max_abs);
        }
    }
}

/// A prompt of `prompt` tokens in both batch rows; row 1 then rewinds 4 tokens (its last 4
/// prompt tokens were junk) so that the rows differ in length; then steps of `chunk` tokens
/// until each row has at least 16 more. Returns the largest share of the f16 bound used.
fn f16_steps_within_the_bound(
    (heads, kv_heads): (usize, usize),
    prompt: usize,
    chunk: usize,
    projection: bool,
    (d, dv): (usize, usize),
) -> f64 {
    let what = format!(
        "f16, {heads}/{kv_heads} heads of {d}/{dv}, prompt {prompt}, chunks of {chunk}, \
         projection {projection}"
    );
    let mut rng = Rng::new((heads * 1000 + kv_heads * 100 + chunk * 10 + prompt) as u64);
    let (batch, rewind) = (2, 4);
    let new_tokens = 16usize.next_multiple_of(chunk);
    let capacity = prompt + new_tokens;
    let mut config = CachedLayerConfig::new(
        batch,
        D_MODEL,
        heads,
        kv_heads,
        d,
        capacity,
        prompt.max(chunk),
    )
    .with_head_dim_v(dv)
    .with_precision(Precision::F16);
    if projection {
        config = config.with_output_projection(16);
    }
    let w = weights(&mut rng, &config, true);
    let mut layer = CachedAttention::new(ctx(), &config, &w).unwrap();
    assert_eq!(layer.cache().precision(), Precision::F16);
    let seqs: Vec<Tensor> = (0..batch)
        .map(|_| rng.tensor(&[1, capacity, D_MODEL], 1.0))
        .collect();
    let mut expected = Expected::new(&config, &w, &seqs);

    let mut x = tokens(&seqs[0], 0, prompt);
    x.extend(tokens(&seqs[1], 0, prompt - rewind));
    x.extend(rng.tensor(&[rewind, D_MODEL], 1.0).data());
    let out = layer
        .step(&Tensor::new([batch, prompt, D_MODEL], x).unwrap())
        .unwrap();
    assert_eq!(out.shape(), config.output_shape(prompt));
    expected.check(
        &format!("{what}, prompt"),
        &out,
        &[0, 0],
        &[prompt, prompt - rewind],
        prompt,
    );
    let mut encoder = ctx().device().create_command_encoder(&Default::default());
    layer
        .cache_mut()
        .set_lengths(&mut encoder, &[prompt, prompt - rewind])
        .unwrap();
    ctx().queue().submit([encoder.finish()]);

    let mut steps = 0;
    while layer.cache().lens()[1] < prompt - rewind + new_tokens {
        let from = layer.cache().lens().to_vec();
        let x: Vec<f32> = (0..batch)
            .flat_map(|b| tokens(&seqs[b], from[b], chunk))
            .collect();
        let out = layer
            .step(&Tensor::new([batch, chunk, D_MODEL], x).unwrap())
            .unwrap();
        expected.check(
            &format!("{what}, step {steps}"),
            &out,
            &from,
            &[chunk; 2],
            chunk,
        );
        steps += 1;
    }
    assert_eq!(
        layer.cache().lens(),
        [prompt + steps * chunk, prompt - rewind + steps * chunk]
    );
    eprintln!(
        "{what}: max abs error {:.3e}, at most {:.3} of the f16 bound",
        expected.worst_abs, expected.worst
    );
    expected.worst
}

#[test]
fn f16_single_token_steps_are_within_the_f16_bound() {
    if !f16_here(ctx()) {
        return assert_refused_without_f16(ctx());
    }
    f16_steps_within_the_bound((4, 4), 9, 1, true, (8, 12));
    f16_steps_within_the_bound((4, 2), 9, 1, false, (8, 12));
}

#[test]
fn f16_chunks_and_a_prefill_prompt_are_within_the_f16_bound() {
    if !f16_here(ctx()) {
        return assert_refused_without_f16(ctx());
    }
    f16_steps_within_the_bound((6, 2), 9, 7, true, (8, 6));
    // 20 tokens: past split-K decode's 16, so the prompt runs the prefill kernels in f16.
    f16_steps_within_the_bound((4, 1), 20, 3, true, (6, 10));
}

#[test]
fn f16_refusals_are_named() {
    let c = ctx();
    if !f16_here(c) {
        return assert_refused_without_f16(c);
    }
    let mut rng = Rng::new(61);
    let config = CachedLayerConfig::new(1, D_MODEL, 2, 1, 4, 16, 4)
        .with_output_projection(8)
        .with_precision(Precision::F16);
    let w = weights(&mut rng, &config, true);
    // An odd head width: the f16 cache's rule, named.
    let odd = CachedLayerConfig {
        head_dim_v: 5,
        ..config.clone()
    };
    let odd_w = weights(&mut rng, &odd, true);
    let err = CachedAttention::new(c, &odd, &odd_w).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("even head_dim_v")),
        "{err}"
    );
    // A weight past f16's range, named with its index.
    let mut big = w.w_k.data().to_vec();
    big[5] = 7e4;
    let big_w = AttentionWeights {
        w_k: Tensor::new(w.w_k.shape().to_vec(), big).unwrap(),
        ..w.clone()
    };
    match CachedAttention::new(c, &config, &big_w) {
        Err(Error::OutsideF16Range { name, index, .. }) => {
            assert_eq!((name.as_str(), index.0), ("w_k", vec![1, 1]))
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
    let mut layer = CachedAttention::new(c, &config, &w).unwrap();
    // An input past f16's range: named, and nothing runs.
    let mut x = rng.tensor(&[1, 2, D_MODEL], 1.0).data().to_vec();
    x[D_MODEL + 3] = -1e5;
    match layer.step(&Tensor::new([1, 2, D_MODEL], x).unwrap()) {
        Err(Error::OutsideF16Range { name, index, .. }) => {
            assert_eq!((name.as_str(), index.0), ("x", vec![0, 1, 3]))
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
    assert_eq!(layer.cache().lens(), [0], "a refused step moved the cache");
    // Buffers sized for f16 pass; one f16 element short of the largest step does not.
    let (x_buf, out_buf) = layer.io_buffers();
    assert_eq!(x_buf.size(), (4 * D_MODEL * 2) as u64);
    layer
        .bind(CachedIo {
            x: &x_buf,
            output: &out_buf,
        })
        .unwrap();
    let short = c.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (4 * D_MODEL * 2 - 4) as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let err = layer
        .bind(CachedIo {
            x: &short,
            output: &out_buf,
        })
        .unwrap_err();
    assert!(matches!(err, Error::BadBuffer { name: "x", .. }), "{err}");
}

#[test]
fn f16_steps_allocate_nothing() {
    if !f16_here(ctx()) {
        return assert_refused_without_f16(ctx());
    }
    // A device of its own (tests running beside this one must not move its counters), with
    // shader-f16.
    let adapter = common::env_adapter();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: wgpu::Features::SHADER_F16,
        required_limits: wgpu::Limits::default().or_worse_values_from(&adapter.limits()),
        ..Default::default()
    }))
    .expect("a device with shader-f16");
    let config = CachedLayerConfig::new(2, D_MODEL, 4, 2, 8, 40, 9)
        .with_output_projection(8)
        .with_precision(Precision::F16);
    let (w, token, last) = common::cached::steps_allocate_nothing(&device, &queue, &config, 62, 20);
    // Every step fed the same token: the last output is the forward's last row over 21
    // copies of it.
    let seqs: Vec<Tensor> = (0..2)
        .map(|b| {
            let row = token.data()[b * D_MODEL..(b + 1) * D_MODEL].to_vec();
            let all = std::iter::repeat_n(row, 21).flatten().collect();
            Tensor::new([1, 21, D_MODEL], all).unwrap()
        })
        .collect();
    let mut expected = Expected::new(&config, &w, &seqs);
    expected.check("after 21 steps", &last, &[20, 20], &[1, 1], 1);
}
