//! Decoding over a KV cache: every step of a decode equals the same rows of one causal
//! prefill (one token at a time and in chunks of 7, MHA, GQA and MQA, batch rows of different
//! lengths), split-K equals the single-pass fused kernel at the split boundaries, a step at
//! exactly the capacity works and one past it is a named error, and decode steps allocate
//! nothing.

mod common;

use common::{Rng, ctx};
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, CombinePartials, Error, GpuContext, KvCache, OperatorConfig, OperatorInputs,
    OperatorPath, Tensor, Tolerance, compare, reference,
};

/// Reads a buffer back the way an application would.
fn read(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
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
    let data: Vec<f32> = bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec();
    data[..len].to_vec()
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

/// Tokens `from .. from + n` of each row's head-major `[heads, total, w]` sequence, as one
/// `[batch, heads, n, w]` tensor (row b from `from[b]`).
fn tokens(seqs: &[Tensor], from: &[usize], n: usize) -> Tensor {
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

/// One decode over two batch rows of different lengths: row 0 starts with 2 tokens, row 1 with
/// 5 (row 0's next three places hold stale tokens that appends overwrite), then `chunk` tokens
/// a step until each row has at least `steps_tokens` more. Every step's output must equal the
/// rows of the final causal prefill of each row at the step's positions.
fn decode_equals_prefill(heads: usize, kv_heads: usize, chunk: usize, splits: Option<usize>) {
    let ctx = ctx();
    let (device, queue) = (ctx.device(), ctx.queue());
    let (batch, d, dv) = (2, 16, 12);
    let starts = [2usize, 5];
    let new_tokens = 64 + chunk - 64 % chunk;
    let capacity = starts[1] + new_tokens;
    let mut rng = Rng::new(heads as u64 * 100 + kv_heads as u64 * 10 + chunk as u64);
    let seq = |rng: &mut Rng, hs: usize, w: usize| -> Vec<Tensor> {
        (0..batch)
            .map(|_| rng.tensor(&[1, hs, capacity, w], 1.0))
            .collect()
    };
    let (qs, ks, vs) = (
        seq(&mut rng, heads, d),
        seq(&mut rng, kv_heads, d),
        seq(&mut rng, kv_heads, dv),
    );

    let mut cache = KvCache::new(ctx, batch, kv_heads, d, dv, capacity).unwrap();
    let mut config = cache.operator_config(heads, chunk).causal();
    if let Some(s) = splits {
        config = config.with_splits(s);
    }
    let op = AttentionOp::new(ctx, &config).unwrap();
    if let Some(s) = splits {
        assert_eq!(op.splits(), Some(s));
    }
    let q_buf = storage_buffer(device, batch * heads * chunk * d * 4);
    let out_buf = storage_buffer(device, batch * heads * chunk * dv * 4);
    let bindings = op.bind_cache(&q_buf, &cache, &out_buf).unwrap();

    // The prompt: five tokens in both rows, row 0's last three then forgotten (stale).
    let mut encoder = device.create_command_encoder(&Default::default());
    let k0 = tokens(&ks, &[0, 0], 5);
    let mut data = k0.data().to_vec();
    for kh in 0..kv_heads {
        for x in &mut data[(kh * 5 + starts[0]) * d..(kh + 1) * 5 * d] {
            *x = rng.normal();
        }
    }
    let k0 = Tensor::new(k0.shape().to_vec(), data).unwrap();
    cache
        .append_host(&mut encoder, &k0, &tokens(&vs, &[0, 0], 5))
        .unwrap();
    cache.set_lengths(&mut encoder, &starts).unwrap();
    queue.submit([encoder.finish()]);
    cache.recall();

    // The final causal prefill of each row: every step's rows must equal its rows.
    let prefill: Vec<Tensor> = (0..batch)
        .map(|b| {
            let n = starts[b] + new_tokens;
            let c = OperatorConfig::new(1, heads, kv_heads, d, n, n)
                .with_head_dim_v(dv)
                .causal();
            let cut = |t: &Tensor| tokens(std::slice::from_ref(t), &[0], n);
            reference::operator(
                &c,
                &OperatorInputs::new(cut(&qs[b]), cut(&ks[b]), cut(&vs[b])),
            )
            .unwrap()
        })
        .collect();

    let mut steps = 0;
    while cache.lens()[0] < starts[0] + new_tokens {
        let from: Vec<usize> = cache.lens().to_vec();
        let q = tokens(&qs, &from, chunk);
        queue.write_buffer(&q_buf, 0, bytemuck::cast_slice(q.data()));
        let mut encoder = device.create_command_encoder(&Default::default());
        cache
            .append_host(
                &mut encoder,
                &tokens(&ks, &from, chunk),
                &tokens(&vs, &from, chunk),
            )
            .unwrap();
        op.encode(&mut encoder, &bindings, cache.lengths(chunk).unwrap())
            .unwrap();
        queue.submit([encoder.finish()]);
        cache.recall();
        let gpu = Tensor::new(
            [batch, heads, chunk, dv],
            read(device, queue, &out_buf, batch * heads * chunk * dv),
        )
        .unwrap();
        let want = {
            let mut data = Vec::new();
            for (b, p) in prefill.iter().enumerate() {
                data.extend_from_slice(tokens(std::slice::from_ref(p), &[from[b]], chunk).data());
            }
            Tensor::new([batch, heads, chunk, dv], data).unwrap()
        };
        let cmp = compare(&gpu, &want, Tolerance::F32).unwrap();
        assert!(
            cmp.passed(),
            "{heads}/{kv_heads} heads, chunks of {chunk}, step {steps} (lengths {:?}): {cmp}",
            cache.lens()
        );
        steps += 1;
    }
    assert!(steps * chunk >= 64, "{steps} steps of {chunk}");
    assert_eq!(
        cache.lens(),
        [starts[0] + steps * chunk, starts[1] + steps * chunk]
    );
}

#[test]
fn decode_one_token_at_a_time_equals_the_causal_prefill() {
    decode_equals_prefill(4, 4, 1, None);
    decode_equals_prefill(4, 2, 1, Some(3));
    decode_equals_prefill(4, 1, 1, Some(5));
}

#[test]
fn decode_in_chunks_of_seven_equals_the_causal_prefill() {
    decode_equals_prefill(4, 4, 7, Some(2));
    decode_equals_prefill(4, 2, 7, None);
    decode_equals_prefill(4, 1, 7, Some(4));
}

#[test]
fn split_k_equals_the_single_pass_at_the_split_boundaries() {
    let mut rng = Rng::new(21);
    let (b, h, kvh, d, max_kv) = (1, 4, 2, 16, 520);
    let splits = 4;
    // One key (three splits empty); one key per split; exactly one 128-key block per split
    // (the kernel's block at these widths); a block and one key (a ragged tail); a ragged
    // last split.
    for kv_len in [1, 4, 512, 513, 519] {
        for q_len in [1, 3] {
            if q_len > kv_len {
                continue;
            }
            for causal in [false, true] {
                let mut base = OperatorConfig::new(b, h, kvh, d, 4, max_kv);
                if causal {
                    base = base.causal();
                }
                let inputs = OperatorInputs::new(
                    rng.tensor(&[b, h, q_len, d], 1.0),
                    rng.tensor(&[b, kvh, kv_len, d], 1.0),
                    rng.tensor(&[b, kvh, kv_len, d], 1.0),
                );
                let split = AttentionOp::new(
                    ctx(),
                    &base
                        .clone()
                        .with_path(OperatorPath::SplitK)
                        .with_splits(splits),
                )
                .unwrap()
                .run(&inputs)
                .unwrap();
                let single =
                    AttentionOp::new(ctx(), &base.clone().with_path(OperatorPath::Prefill))
                        .unwrap()
                        .run(&inputs)
                        .unwrap();
                let what = format!("kv_len {kv_len}, q_len {q_len}, causal {causal}");
                let cmp = compare(&split, &single, Tolerance::F32).unwrap();
                assert!(cmp.passed(), "split-K vs single pass, {what}: {cmp}");
                let cpu = reference::operator(&base, &inputs).unwrap();
                let cmp = compare(&split, &cpu, Tolerance::F32).unwrap();
                assert!(cmp.passed(), "split-K vs reference, {what}: {cmp}");
            }
        }
    }
}

#[test]
fn split_k_masks_padding_and_gives_zeros_to_rows_with_no_key() {
    let mut rng = Rng::new(22);
    let (h, kvh, d, kv_len) = (2, 1, 8, 130);
    let config = OperatorConfig::new(2, h, kvh, d, 2, kv_len)
        .with_key_padding_mask()
        .with_path(OperatorPath::SplitK)
        .with_splits(3);
    // Row 0 attends every third key; row 1 none at all.
    let mask: Vec<f32> = (0..2 * kv_len)
        .map(|j| (j < kv_len && j % 3 == 0) as u8 as f32)
        .collect();
    let inputs = OperatorInputs::new(
        rng.tensor(&[2, h, 2, d], 1.0),
        rng.tensor(&[2, kvh, kv_len, d], 1.0),
        rng.tensor(&[2, kvh, kv_len, d], 1.0),
    )
    .with_key_mask(Tensor::new([2, kv_len], mask).unwrap());
    // A mask is a fifth storage buffer: past a downlevel device's four (a named error there).
    let gpu = AttentionOp::new(common::op_ctx(&config), &config)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let cpu = reference::operator(&config, &inputs).unwrap();
    let cmp = compare(&gpu, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
    let half = gpu.data().len() / 2;
    assert!(gpu.data()[half..].iter().all(|&x| x == 0.0));
    assert!(gpu.data()[..half].iter().any(|&x| x != 0.0));
}

#[test]
fn a_step_at_exactly_capacity_works_and_one_past_is_a_named_error() {
    let ctx = ctx();
    let (device, queue) = (ctx.device(), ctx.queue());
    let mut rng = Rng::new(23);
    let (h, kvh, d, capacity) = (2, 1, 8, 9);
    let mut cache = KvCache::new(ctx, 1, kvh, d, d, capacity).unwrap();
    let config = cache.operator_config(h, 4);
    let op = AttentionOp::new(ctx, &config).unwrap();
    let q_buf = storage_buffer(device, h * 4 * d * 4);
    let out_buf = storage_buffer(device, h * 4 * d * 4);
    let bindings = op.bind_cache(&q_buf, &cache, &out_buf).unwrap();
    let k = rng.tensor(&[1, kvh, capacity, d], 1.0);
    let v = rng.tensor(&[1, kvh, capacity, d], 1.0);
    let q = rng.tensor(&[1, h, 4, d], 1.0);
    queue.write_buffer(&q_buf, 0, bytemuck::cast_slice(q.data()));
    let mut encoder = device.create_command_encoder(&Default::default());
    // 5 tokens, then 4: the cache is full.
    let part = |t: &Tensor, from: usize, n: usize| {
        Tensor::new([1, kvh, n, d], t.data()[from * d..(from + n) * d].to_vec()).unwrap()
    };
    cache
        .append_host(&mut encoder, &part(&k, 0, 5), &part(&v, 0, 5))
        .unwrap();
    cache
        .append_host(&mut encoder, &part(&k, 5, 4), &part(&v, 5, 4))
        .unwrap();
    op.encode(&mut encoder, &bindings, cache.lengths(4).unwrap())
        .unwrap();
    queue.submit([encoder.finish()]);
    cache.recall();
    let gpu = Tensor::new([1, h, 4, d], read(device, queue, &out_buf, h * 4 * d)).unwrap();
    let cpu = reference::cache_step(&config, &q, &k, &v, &[capacity]).unwrap();
    let cmp = compare(&gpu, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "at capacity: {cmp}");

    let mut encoder = device.create_command_encoder(&Default::default());
    let err = cache
        .append_host(&mut encoder, &part(&k, 0, 1), &part(&v, 0, 1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KvCacheFull {
                row: 0,
                len: 9,
                adding: 1,
                capacity: 9
            }
        ),
        "{err}"
    );
    assert_eq!(
        cache.lens(),
        [capacity],
        "a refused append changed the length"
    );
    let err = cache
        .set_lengths(&mut encoder, &[capacity + 1])
        .unwrap_err();
    assert!(matches!(err, Error::KvCacheFull { .. }), "{err}");
}

#[test]
fn decode_steps_allocate_nothing() {
    // A device of its own: tests running beside this one must not move its counters.
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let mut rng = Rng::new(24);
    let (batch, h, kvh, d, capacity, steps) = (2, 4, 2, 8, 40, 30);
    let mut cache = KvCache::new(&app, batch, kvh, d, d, capacity).unwrap();
    let config = cache.operator_config(h, 1).causal().with_splits(3);
    let op = AttentionOp::new(&app, &config).unwrap();
    let q = rng.tensor(&[batch, h, 1, d], 1.0);
    let new_k = rng.tensor(&[batch, kvh, 1, d], 1.0);
    let new_v = rng.tensor(&[batch, kvh, 1, d], 1.0);
    let init = |t: &Tensor| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(t.data()),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
    };
    let (q_buf, k_buf, v_buf) = (init(&q), init(&new_k), init(&new_v));
    let out_buf = storage_buffer(&device, batch * h * d * 4);
    let bindings = op.bind_cache(&q_buf, &cache, &out_buf).unwrap();
    let counters = || common::object_counts(&device);
    // Steps alternate between the app's buffers and host data (the belt's first chunk is made
    // by the first host append).
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
    queue.submit([]);
    let before = counters();
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "counters are not counting: {before:?}"
    );
    for i in 2..steps {
        step(i);
    }
    assert_eq!(counters(), before, "a decode step created wgpu objects");
    // Every step appended the same token, so the last step attends `steps` copies of it.
    let gpu = Tensor::new(
        [batch, h, 1, d],
        read(&device, &queue, &out_buf, batch * h * d),
    )
    .unwrap();
    let repeat = |t: &Tensor| {
        let mut data = vec![0f32; batch * kvh * capacity * d];
        for bh in 0..batch * kvh {
            for s in 0..steps {
                let at = (bh * capacity + s) * d;
                data[at..at + d].copy_from_slice(&t.data()[bh * d..(bh + 1) * d]);
            }
        }
        Tensor::new([batch, kvh, capacity, d], data).unwrap()
    };
    let cpu =
        reference::cache_step(&config, &q, &repeat(&new_k), &repeat(&new_v), &[steps; 2]).unwrap();
    let cmp = compare(&gpu, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
}

#[test]
fn combine_partials_merges_parts_made_elsewhere_into_the_full_attention() {
    // Partials of three parts of the keys made on the host, as another device would make
    // them (the documented layout), the third part empty; the GPU merge must equal attention
    // over all the keys.
    let ctx = ctx();
    let (device, queue) = (ctx.device(), ctx.queue());
    let mut rng = Rng::new(25);
    let (b, h, d, dv, q_len, kv) = (1, 2, 8, 6, 3, 50);
    let config = OperatorConfig::new(b, h, h, d, q_len, kv)
        .with_head_dim_v(dv)
        .with_scale(-0.7);
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, q_len, d], 1.0),
        rng.tensor(&[b, h, kv, d], 1.0),
        rng.tensor(&[b, h, kv, dv], 1.0),
    );
    let parts = [0..20, 20..50, 50..50];
    let entry = 4 + dv.div_ceil(4) * 4;
    let (q, k, v) = (inputs.q.data(), inputs.k.data(), inputs.v.data());
    let mut partials = Vec::new();
    for hh in 0..h {
        for i in 0..q_len {
            for part in &parts {
                let s: Vec<f64> = part
                    .clone()
                    .map(|j| {
                        -(0..d)
                            .map(|c| {
                                q[(hh * q_len + i) * d + c] as f64 * k[(hh * kv + j) * d + c] as f64
                            })
                            .sum::<f64>()
                    })
                    .collect();
                let mut e = vec![0f32; entry];
                if s.is_empty() {
                    e[0] = f32::MIN;
                } else {
                    let m = s.iter().copied().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (0.7 * (x - m)).exp()).collect();
                    e[0] = m as f32;
                    e[1] = w.iter().sum::<f64>() as f32;
                    for c in 0..dv {
                        e[4 + c] = part
                            .clone()
                            .zip(&w)
                            .map(|(j, w)| w * v[(hh * kv + j) * dv + c] as f64)
                            .sum::<f64>() as f32;
                    }
                }
                partials.extend(e);
            }
        }
    }
    let merge = CombinePartials::new(ctx, &config, parts.len()).unwrap();
    assert_eq!(merge.partials_bytes(q_len), partials.len() as u64 * 4);
    let partials_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&partials),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let out_buf = storage_buffer(device, b * h * q_len * dv * 4);
    let bindings = merge.bind(&partials_buf, &out_buf).unwrap();
    let mut encoder = device.create_command_encoder(&Default::default());
    merge.encode(&mut encoder, &bindings, q_len).unwrap();
    queue.submit([encoder.finish()]);
    let gpu = Tensor::new(
        [b, h, q_len, dv],
        read(device, queue, &out_buf, b * h * q_len * dv),
    )
    .unwrap();
    let cpu = reference::operator(&config, &inputs).unwrap();
    let cmp = compare(&gpu, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
    let mut encoder = device.create_command_encoder(&Default::default());
    assert!(matches!(
        merge.encode(&mut encoder, &bindings, q_len + 1),
        Err(Error::LengthPastMaximum { name: "q_len", .. })
    ));
}

#[test]
fn auto_builds_split_k_for_short_queries_unless_there_is_a_bias() {
    use wgpu_attention::BiasShape;
    let base = OperatorConfig::new(1, 4, 2, 8, 32, 64);
    let auto = AttentionOp::new(ctx(), &base).unwrap();
    assert!(auto.splits().is_some(), "Auto has the split-K path");
    let fused = AttentionOp::new(ctx(), &base.clone().with_path(OperatorPath::Prefill)).unwrap();
    assert_eq!(fused.splits(), None);
    let bias = base.clone().with_bias(BiasShape::default());
    let with_bias = AttentionOp::new(common::op_ctx(&bias), &bias).unwrap();
    assert_eq!(with_bias.splits(), None, "split-K takes no bias");
    assert_eq!(
        AttentionOp::new(ctx(), &base.clone().with_splits(7))
            .unwrap()
            .splits(),
        Some(7)
    );
    // Split-K alone cannot take 32 queries; row lengths need split-K; a zero split count.
    for bad in [
        base.clone().with_path(OperatorPath::SplitK),
        base.clone().with_row_lengths(),
        base.clone().with_splits(0),
    ] {
        let err = AttentionOp::new(ctx(), &bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig(_) | Error::ZeroSize { name: "splits" }
            ),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn split_k_survives_scales_that_would_overflow_a_scaled_score() {
    // Scores times 1e30 or -3e38 pass f32's range; the kernels take maxima of unscaled scores
    // and scale only differences, so the answer is the hard (arg)max the reference gives.
    let mut rng = Rng::new(26);
    for scale in [1e30f32, -3e38, 0.0] {
        let config = OperatorConfig::new(1, 2, 1, 8, 2, 200)
            .with_scale(scale)
            .causal()
            .with_path(OperatorPath::SplitK)
            .with_splits(3);
        let inputs = OperatorInputs::new(
            rng.tensor(&[1, 2, 2, 8], 1.0),
            rng.tensor(&[1, 1, 200, 8], 1.0),
            rng.tensor(&[1, 1, 200, 8], 1.0),
        );
        let gpu = AttentionOp::new(ctx(), &config)
            .unwrap()
            .run(&inputs)
            .unwrap();
        let cpu = reference::operator(&config, &inputs).unwrap();
        let cmp = compare(&gpu, &cpu, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "scale {scale}: {cmp}");
    }
}
