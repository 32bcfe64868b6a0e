//! Split-K decode and the KV cache in f16 storage (`Precision::F16`): every decode step over an
//! f16 cache (MHA, GQA, MQA; batch rows of different lengths; causal; several splits; host
//! appends and copies from f16 buffers) against the f64 reference under the f16 error bound,
//! split-K against the single-pass fused kernel (key mask, causal) in f16, scores past f16's
//! range that must not overflow in decode, f16 decode steps that allocate nothing,
//! `CombinePartials` storing f16, and the named refusals. On an adapter without shader-f16
//! (llvmpipe's OpenGL) each test checks the named error instead.

mod common;

use common::{Rng, ctx, op_ctx};
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, Comparison, Error, GpuContext, KvCache, OperatorConfig, OperatorInputs,
    OperatorPath, Precision, Tensor, Tolerance, compare, compare_bounded, reference,
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

/// On a device without shader-f16 an f16 cache and an f16 split-K operator are both
/// `NoShaderF16`, naming the adapter.
fn assert_refused_without_f16(ctx: &GpuContext) {
    let cache = KvCache::with_precision(ctx, Precision::F16, 1, 1, 8, 8, 16);
    let op = AttentionOp::new(
        ctx,
        &OperatorConfig::new(1, 2, 1, 8, 1, 16)
            .with_precision(Precision::F16)
            .with_path(OperatorPath::SplitK),
    );
    for result in [cache.map(|_| ()), op.map(|_| ())] {
        match result {
            Err(e @ Error::NoShaderF16 { .. }) => {
                let message = e.to_string();
                assert!(message.contains("lacks shader-f16"), "{message}");
                assert!(message.contains(&ctx.adapter_info().name), "{message}");
            }
            other => panic!("expected NoShaderF16, got {other:?}"),
        }
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

/// An f16 buffer read back as f32 values (`len` of them).
fn read_f16(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    queue.submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let bytes = staging.get_mapped_range(..).unwrap();
    Precision::F16.decode(&bytes[..2 * len])
}

fn storage_buffer(device: &wgpu::Device, bytes: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes.next_multiple_of(16) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn rows(t: &[Tensor]) -> Vec<&Tensor> {
    t.iter().collect()
}

/// Tokens `from[b] .. from[b] + n` of each row's head-major `[1, heads, total, w]` sequence,
/// as one `[rows, heads, n, w]` tensor.
fn tokens(seqs: &[&Tensor], from: &[usize], n: usize) -> Tensor {
    let [_, heads, total, w]: [usize; 4] = seqs[0].shape().try_into().unwrap();
    let mut data = Vec::new();
    for (seq, &f) in seqs.iter().zip(from) {
        for h in 0..heads {
            let at = (h * total + f) * w;
            data.extend_from_slice(&seq.data()[at..at + n * w]);
        }
    }
    Tensor::new([seqs.len(), heads, n, w], data).unwrap()
}

/// Worst share of the bound used, worst absolute error, outputs checked.
#[derive(Default)]
struct Worst(f64, f64, usize);

impl Worst {
    fn add(&mut self, c: &Comparison) {
        self.0 = self.0.max(c.worst_ratio);
        self.1 = self.1.max(c.max_abs);
        self.2 += c.count;
    }
}

/// One decode over an f16 cache of two batch rows holding 3 and 9 tokens, `chunk` new tokens a
/// step for `steps` steps; each step's output (f16) against the reference of each row alone
/// (the f16-rounded tokens so far, causal aligned to the row's end) under the f16 bound.
fn f16_cache_decode(
    heads: usize,
    kv_heads: usize,
    chunk: usize,
    splits: Option<usize>,
    worst: &mut Worst,
) {
    let ctx = ctx();
    let (device, queue) = (ctx.device(), ctx.queue());
    let (batch, d, dv, steps) = (2, 16, 12, 6);
    let starts = [3usize, 9];
    let capacity = starts[1] + steps * chunk;
    let mut rng = Rng::new(500 + heads as u64 * 10 + kv_heads as u64 + chunk as u64);
    // Activations of a few units, as a trained layer's Q and K have.
    let seq = |rng: &mut Rng, hs: usize, w: usize, std: f32| -> Vec<Tensor> {
        (0..batch)
            .map(|_| rng.tensor(&[1, hs, capacity, w], std))
            .collect()
    };
    let (qs, ks, vs) = (
        seq(&mut rng, heads, d, 2.0),
        seq(&mut rng, kv_heads, d, 2.0),
        seq(&mut rng, kv_heads, dv, 3.0),
    );

    let mut cache =
        KvCache::with_precision(ctx, Precision::F16, batch, kv_heads, d, dv, capacity).unwrap();
    assert_eq!(cache.precision(), Precision::F16);
    // Half the bytes of an f32 cache (rounded up to 16).
    assert_eq!(
        cache.k().size(),
        (batch * kv_heads * capacity * d * 2) as u64
    );
    let mut config = cache.operator_config(heads, chunk).causal();
    assert_eq!(config.precision, Precision::F16);
    if let Some(s) = splits {
        config = config.with_splits(s);
    }
    let op = AttentionOp::new(ctx, &config).unwrap();
    if let Some(s) = splits {
        assert_eq!(op.splits(), Some(s));
    }
    let q_buf = storage_buffer(device, batch * heads * chunk * d * 2);
    let out_buf = storage_buffer(device, batch * heads * chunk * dv * 2);
    let bindings = op.bind_cache(&q_buf, &cache, &out_buf).unwrap();

    // The prompt: nine tokens in both rows, then row 0 cut back to three.
    let mut encoder = device.create_command_encoder(&Default::default());
    let prompt = [0, 0];
    cache
        .append_host(
            &mut encoder,
            &tokens(&rows(&ks), &prompt, starts[1]),
            &tokens(&rows(&vs), &prompt, starts[1]),
        )
        .unwrap();
    cache.set_lengths(&mut encoder, &starts).unwrap();
    queue.submit([encoder.finish()]);
    cache.recall();

    for step in 0..steps {
        let from = cache.lens().to_vec();
        let q = tokens(&rows(&qs), &from, chunk);
        let q_bytes = Precision::F16.encode("q", q.shape(), q.data()).unwrap();
        queue.write_buffer(&q_buf, 0, &q_bytes);
        let mut encoder = device.create_command_encoder(&Default::default());
        let (k, v) = (
            tokens(&rows(&ks), &from, chunk),
            tokens(&rows(&vs), &from, chunk),
        );
        // Odd steps copy from the application's f16 buffers, even ones upload host values.
        let app: Vec<wgpu::Buffer> = [("k", &k), ("v", &v)]
            .iter()
            .map(|(name, t)| {
                let bytes = Precision::F16.encode(name, t.shape(), t.data()).unwrap();
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: &bytes,
                    usage: wgpu::BufferUsages::COPY_SRC,
                })
            })
            .collect();
        if step % 2 == 1 {
            cache
                .append_buffers(&mut encoder, &app[0], &app[1], chunk)
                .unwrap();
        } else {
            cache.append_host(&mut encoder, &k, &v).unwrap();
        }
        op.encode(&mut encoder, &bindings, cache.lengths(chunk).unwrap())
            .unwrap();
        queue.submit([encoder.finish()]);
        cache.recall();
        let n_out = batch * heads * chunk * dv;
        let gpu = Tensor::new([batch, heads, chunk, dv], read_f16(ctx, &out_buf, n_out)).unwrap();
        assert_f16_values(&gpu);
        // Each row alone: its queries are the last `chunk` of its `len` tokens.
        let (mut want, mut bound) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let len = cache.lens()[b];
            let row = OperatorConfig::new(1, heads, kv_heads, d, chunk, len)
                .with_head_dim_v(dv)
                .causal()
                .with_precision(Precision::F16);
            let inputs = OperatorInputs::new(
                tokens(&[&qs[b]], &[from[b]], chunk),
                tokens(&[&ks[b]], &[0], len),
                tokens(&[&vs[b]], &[0], len),
            );
            want.extend_from_slice(reference::operator(&row, &inputs).unwrap().data());
            bound.extend_from_slice(
                reference::operator_error_bound(&row, &inputs)
                    .unwrap()
                    .data(),
            );
        }
        let shape = [batch, heads, chunk, dv];
        let c = compare_bounded(
            &gpu,
            &Tensor::new(shape, want).unwrap(),
            &Tensor::new(shape, bound).unwrap(),
        )
        .unwrap();
        assert!(
            c.passed(),
            "{heads}/{kv_heads} heads, chunks of {chunk}, splits {splits:?}, step {step} \
             (lengths {:?}): {c}",
            cache.lens()
        );
        worst.add(&c);
    }
    assert_eq!(
        cache.lens(),
        [starts[0] + steps * chunk, starts[1] + steps * chunk]
    );
}

#[test]
fn f16_cache_decode_is_within_the_f16_bound_every_step() {
    let ctx = ctx();
    if !f16_here(ctx) {
        return assert_refused_without_f16(ctx);
    }
    let mut worst = Worst::default();
    f16_cache_decode(4, 4, 1, None, &mut worst);
    f16_cache_decode(4, 2, 3, Some(3), &mut worst);
    f16_cache_decode(4, 1, 1, Some(4), &mut worst);
    eprintln!(
        "f16 cache decode, {} outputs of 18 steps: max abs error {:.3e}, at most {:.3} of the \
         f16 bound",
        worst.2, worst.1, worst.0
    );
}

/// Split-K in f16 (MHA, GQA, MQA; key mask and causal; a head width that is not a multiple of
/// 4, so loads straddle vec4) against the single-pass fused kernel in f16 and both against the
/// reference under the f16 bound.
#[test]
fn f16_split_k_equals_the_single_pass_and_the_reference() {
    let ctx = ctx();
    if !f16_here(ctx) {
        return assert_refused_without_f16(ctx);
    }
    let mut rng = Rng::new(31);
    let (batch, kv_len) = (2, 150);
    let (mut worst, mut worst_pair) = (Worst::default(), 0f64);
    for (case, (heads, kv_heads, d)) in [(4, 4, 8), (4, 2, 6), (4, 1, 16)].into_iter().enumerate() {
        for q_len in [1, 3] {
            let mut base = OperatorConfig::new(batch, heads, kv_heads, d, q_len, kv_len)
                .with_precision(Precision::F16)
                .with_key_padding_mask();
            if case != 1 || q_len == 3 {
                base = base.causal();
            }
            let mask: Vec<f32> = (0..batch * kv_len)
                .map(|_| !rng.next_u64().is_multiple_of(4) as u8 as f32)
                .collect();
            let inputs = OperatorInputs::new(
                rng.tensor(&[batch, heads, q_len, d], 2.0),
                rng.tensor(&[batch, kv_heads, kv_len, d], 2.0),
                rng.tensor(&[batch, kv_heads, kv_len, d], 3.0),
            )
            .with_key_mask(Tensor::new([batch, kv_len], mask).unwrap());
            let split_config = base.clone().with_path(OperatorPath::SplitK).with_splits(3);
            let mut split_op = AttentionOp::new(op_ctx(&split_config), &split_config).unwrap();
            assert_eq!(split_op.splits(), Some(3));
            let split = split_op.run(&inputs).unwrap();
            // Auto takes split-K for these short calls in f16 as in f32, where the device
            // allows its five storage buffers (the context split-K runs on).
            assert!(
                AttentionOp::new(op_ctx(&split_config), &base)
                    .unwrap()
                    .splits()
                    .is_some()
            );
            let single_config = base.clone().with_path(OperatorPath::Prefill);
            let single = AttentionOp::new(op_ctx(&single_config), &single_config)
                .unwrap()
                .run(&inputs)
                .unwrap();
            assert_f16_values(&split);
            let what = format!("{heads}/{kv_heads} heads of {d}, q_len {q_len}");
            let cpu = reference::operator(&base, &inputs).unwrap();
            let bound = reference::operator_error_bound(&base, &inputs).unwrap();
            for (name, gpu) in [("split-K", &split), ("single pass", &single)] {
                let c = compare_bounded(gpu, &cpu, &bound).unwrap();
                assert!(c.passed(), "{name} vs reference, {what}: {c}");
                worst.add(&c);
            }
            let pair = compare(&split, &single, Tolerance::F16).unwrap();
            assert!(pair.passed(), "split-K vs single pass, {what}: {pair}");
            worst_pair = worst_pair.max(pair.worst_ratio);
        }
    }
    eprintln!(
        "f16 split-K and single pass, {} outputs: max abs error {:.3e}, at most {:.3} of the f16 \
         bound; split-K vs single pass at most {worst_pair:.3} of Tolerance::F16",
        worst.2, worst.1, worst.0
    );
}

/// Scores of ±3e4 and ±1.6e5 (past f16's 65504) in split-K decode: the scores, maxima, sums and
/// partials are f32, so the winning key (in the second split) gives exactly its value row,
/// nothing overflows, and a row with every key padded out gives zeros.
#[test]
fn f16_decode_logits_past_f16_range_do_not_overflow() {
    let ctx = ctx();
    if !f16_here(ctx) {
        return assert_refused_without_f16(ctx);
    }
    let config = OperatorConfig::new(1, 1, 1, 4, 2, 3)
        .with_scale(1.0)
        .with_precision(Precision::F16)
        .with_path(OperatorPath::SplitK)
        .with_splits(2);
    let mut op = AttentionOp::new(ctx, &config).unwrap();
    // Two splits: keys 0-1 and key 2. Query 0 · keys = 4 · 100 · (74, -75, 75) = (29600,
    // -3e4, 3e4); query 1 · keys = 4 · 200 · (199, -200, 200) = (159200, -1.6e5, 1.6e5).
    let q = Tensor::new([1, 1, 2, 4], [[100.0; 4], [200.0; 4]].concat()).unwrap();
    let k1 = Tensor::new([1, 1, 3, 4], [[74.0; 4], [-75.0; 4], [75.0; 4]].concat()).unwrap();
    let k2 = Tensor::new([1, 1, 3, 4], [[199.0; 4], [-200.0; 4], [200.0; 4]].concat()).unwrap();
    let v = Tensor::new(
        [1, 1, 3, 4],
        vec![10., 20., 30., 40., -5., -6., -7., -8., 1., 2., 3., 4.],
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
        // Key 2 wins by 400 logits or more: exactly its value row, for both queries.
        assert_eq!(gpu.data(), &[1., 2., 3., 4., 1., 2., 3., 4.]);
    }
    let masked = config.clone().with_key_padding_mask();
    let inputs = OperatorInputs::new(q, v.clone(), v).with_key_mask(Tensor::zeros([1, 3]));
    let gpu = AttentionOp::new(op_ctx(&masked), &masked)
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_eq!(gpu.data(), &[0.0; 8]);
}

/// What an f16 cache cannot take is refused by name: odd head widths, a value past f16's range
/// (naming the tensor and index, recording nothing), and an operator of the other precision.
#[test]
fn f16_cache_refusals_are_named() {
    let ctx = ctx();
    if !f16_here(ctx) {
        return assert_refused_without_f16(ctx);
    }
    match KvCache::with_precision(ctx, Precision::F16, 1, 2, 7, 8, 16) {
        Err(Error::InvalidConfig(m)) => assert!(m.contains("even head_dim"), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let mut cache = KvCache::with_precision(ctx, Precision::F16, 1, 2, 8, 8, 16).unwrap();
    let k = Tensor::zeros([1, 2, 3, 8]);
    let mut v = vec![0.5f32; 48];
    v[8 * 4 + 3] = -7e4;
    let v = Tensor::new([1, 2, 3, 8], v).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    match cache.append_host(&mut encoder, &k, &v) {
        Err(Error::OutsideF16Range { name, index, value }) => {
            assert_eq!(
                (name.as_str(), index.0, value),
                ("v", vec![0, 1, 1, 3], -7e4)
            );
        }
        other => panic!("expected OutsideF16Range, got {other:?}"),
    }
    assert_eq!(cache.lens(), [0], "a refused append changed the length");
    let f32_op = AttentionOp::new(
        ctx,
        &cache.operator_config(4, 1).with_precision(Precision::F32),
    )
    .unwrap();
    let buf = storage_buffer(ctx.device(), 4 * 8 * 4);
    match f32_op.bind_cache(&buf, &cache, &buf) {
        Err(Error::InvalidConfig(m)) => assert!(m.contains("stores f16"), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// f16 decode steps (host appends rounded to f16 into the cache's staging memory, appends from
/// f16 buffers, split-K with its combine) create no wgpu object after the first two.
#[test]
fn f16_decode_steps_allocate_nothing() {
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
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let mut rng = Rng::new(51);
    let (batch, h, kvh, d, capacity, steps) = (2, 4, 2, 8, 24, 16);
    let mut cache =
        KvCache::with_precision(&app, Precision::F16, batch, kvh, d, d, capacity).unwrap();
    let op = AttentionOp::new(&app, &cache.operator_config(h, 1).with_splits(3)).unwrap();
    let (new_k, new_v) = (
        rng.tensor(&[batch, kvh, 1, d], 1.0),
        rng.tensor(&[batch, kvh, 1, d], 1.0),
    );
    let f16_buffer = |t: &Tensor, usage| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &Precision::F16.encode("t", t.shape(), t.data()).unwrap(),
            usage,
        })
    };
    let q_buf = f16_buffer(
        &rng.tensor(&[batch, h, 1, d], 1.0),
        wgpu::BufferUsages::STORAGE,
    );
    let (k_buf, v_buf) = (
        f16_buffer(&new_k, wgpu::BufferUsages::COPY_SRC),
        f16_buffer(&new_v, wgpu::BufferUsages::COPY_SRC),
    );
    let out_buf = storage_buffer(&device, batch * h * d * 2);
    let bindings = op.bind_cache(&q_buf, &cache, &out_buf).unwrap();
    let counters = || common::object_counts(&device);
    let mut step = |i: usize| {
        let mut encoder = device.create_command_encoder(&Default::default());
        if i.is_multiple_of(2) {
            cache
                .append_buffers(&mut encoder, &k_buf, &v_buf, 1)
                .unwrap();
        } else {
            cache.append_host(&mut encoder, &new_k, &new_v).unwrap();
        }
        op.encode(&mut encoder, &bindings, cache.lengths(1).unwrap())
            .unwrap();
        queue.submit([encoder.finish()]);
        cache.recall();
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    };
    step(0);
    step(1);
    let before = counters();
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "counters are not counting: {before:?}"
    );
    for i in 2..steps {
        step(i);
    }
    assert_eq!(
        counters(),
        before,
        "an f16 decode step created wgpu objects"
    );
    // Every step appended the same token: the output is its value row, to f16's rounding.
    let out = read_f16(&app, &out_buf, batch * h * d);
    let v = Precision::F16
        .round("v", new_v.shape(), new_v.data())
        .unwrap();
    for (r, row) in out.chunks(d).enumerate() {
        let (b, kh) = (r / h, r % h / (h / kvh));
        let want = &v[(b * kvh + kh) * d..(b * kvh + kh + 1) * d];
        for (x, w) in row.iter().zip(want) {
            assert!(
                (x - w).abs() <= 2e-3 * w.abs() + 1e-6,
                "row {r}: {row:?} vs {want:?}"
            );
        }
    }
}

/// `CombinePartials` of an f16 configuration reads f32 partials and stores the merged output
/// in f16, into a buffer sized for f16 (half the f32 bytes).
#[test]
fn combine_partials_stores_an_f16_output() {
    let ctx = ctx();
    let config = OperatorConfig::new(1, 1, 1, 4, 1, 8)
        .with_head_dim_v(3)
        .with_scale(1.0)
        .with_precision(Precision::F16);
    if !f16_here(ctx) {
        return assert_refused_without_f16(ctx);
    }
    // Two parts of keys, as (m, l, 0, 0, o0, o1, o2, 0): part 0's maximum 2.0 over weights
    // summing to 1.5, part 1's 3.0 over 2.0; the merge is (e⁻¹ o₀ + o₁) / (1.5 e⁻¹ + 2).
    let (o0, o1) = ([1.0f32, -2.0, 0.5], [4.0f32, 0.25, -1.0]);
    let partials: Vec<f32> = [
        [2.0, 1.5, 0.0, 0.0, o0[0], o0[1], o0[2], 0.0],
        [3.0, 2.0, 0.0, 0.0, o1[0], o1[1], o1[2], 0.0],
    ]
    .concat();
    let merge = wgpu_attention::CombinePartials::new(ctx, &config, 2).unwrap();
    assert_eq!(merge.partials_bytes(1), 64);
    let partials_buf = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&partials),
            usage: wgpu::BufferUsages::STORAGE,
        });
    // Three f16 outputs: 6 bytes, a whole 8 with the padding word.
    let out_buf = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 8,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let bindings = merge.bind(&partials_buf, &out_buf).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    merge.encode(&mut encoder, &bindings, 1).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let gpu = read_f16(ctx, &out_buf, 3);
    let w = (-1f64).exp();
    for c in 0..3 {
        let want = (w * o0[c] as f64 + o1[c] as f64) / (1.5 * w + 2.0);
        assert!(
            (gpu[c] as f64 - want).abs() <= want.abs() * 2f64.powi(-10) + 1e-6,
            "column {c}: {} vs {want}",
            gpu[c]
        );
        assert_eq!(half::f16::from_f32(gpu[c]).to_f32(), gpu[c]);
    }
}
