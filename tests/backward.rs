//! The operator's backward pass on the GPU: dQ, dK and dV against the f64 reference gradients
//! (`reference::operator_backward`) over masks, biases, causal alignment, GQA/MQA, cross
//! attention and both layouts; against central differences of the reference forward on tiny
//! shapes; zero gradients (not NaN) for a query that sees no key; nothing allocated by
//! repeated calls; and a scratch that grows linearly with the lengths.
//!
//! Most tests feed the backward the f64 reference's output and logsumexp, so that they judge
//! the backward alone; the forward's saved logsumexp is checked on its own, and forward and
//! backward together.

mod common;

use common::{Rng, ctx};
use wgpu::util::DeviceExt;
use wgpu_attention::reference::{self, OperatorGrads};
use wgpu_attention::{
    AttentionOp, BackwardIo, BiasShape, Error, GpuContext, Lengths, OperatorConfig, OperatorInputs,
    Tensor,
};

/// Inputs of `config` at `nq` x `nk`: N(0, 1) tensors, a mask that drops every third key of
/// batch row 0 (and all of batch row 1's keys when `empty_row`), a bias with one key masked
/// by -inf.
fn inputs(config: &OperatorConfig, nq: usize, nk: usize, seed: u64) -> OperatorInputs {
    let mut rng = Rng::new(seed);
    let shape = |heads: usize, len: usize, w: usize| match config.layout {
        wgpu_attention::QkvLayout::HeadMajor => vec![config.batch, heads, len, w],
        wgpu_attention::QkvLayout::TokenMajor => vec![config.batch, len, heads * w],
    };
    let mut x = OperatorInputs::new(
        rng.tensor(&shape(config.heads, nq, config.head_dim), 1.0),
        rng.tensor(&shape(config.kv_heads, nk, config.head_dim), 1.0),
        rng.tensor(&shape(config.kv_heads, nk, config.head_dim_v), 1.0),
    );
    if config.key_padding_mask {
        let m = (0..config.batch * nk)
            .map(|e| (e >= nk || e % 3 != 1) as u8 as f32)
            .collect();
        x = x.with_key_mask(Tensor::new([config.batch, nk], m).unwrap());
    }
    if let Some(s) = config.bias {
        let [bb, hb] = s.dims(config.batch, config.heads);
        let mut data = rng.tensor(&[bb, hb, nq, nk], 1.0).into_data();
        data[nk.min(2) - 1] = f32::NEG_INFINITY;
        x = x.with_bias(Tensor::new([bb, hb, nq, nk], data).unwrap());
    }
    x
}

/// The backward on the GPU, fed the reference's output and logsumexp, for `grad_out`.
fn gpu_grads(
    op: &mut AttentionOp,
    x: &OperatorInputs,
    grad_out: &Tensor,
) -> Result<OperatorGrads, Error> {
    let config = op.config().clone();
    let out = reference::operator(&config, x)?;
    let lse = reference::operator_lse(&config, x)?;
    op.run_backward(x, &out, &lse, grad_out)
}

/// Every element within `1e-4 · max|reference| + 1e-5` of the reference (gradients sum many
/// f32 terms of both signs, so an element's own size says little of its error).
fn assert_close(what: &str, gpu: &Tensor, cpu: &Tensor) {
    assert_eq!(gpu.shape(), cpu.shape(), "{what}");
    let scale = cpu.data().iter().fold(0f32, |m, x| m.max(x.abs()));
    let allowed = 1e-4 * scale + 1e-5;
    for (i, (g, c)) in gpu.data().iter().zip(cpu.data()).enumerate() {
        assert!(
            g.is_finite() && (g - c).abs() <= allowed,
            "{what} at {:?}: gpu {g}, reference {c} (allowed {allowed})",
            cpu.unravel(i)
        );
    }
}

/// The operator with gradients; `None` on a device with fewer storage buffers per shader
/// stage than the backward's dK/dV kernel binds (8; downlevel devices allow 4), where building
/// it must fail with that limit named.
fn grad_op(ctx: &GpuContext, config: &OperatorConfig) -> Option<AttentionOp> {
    let built = AttentionOp::new(ctx, config);
    if ctx.limits().max_storage_buffers_per_shader_stage < 8 {
        let err = built.expect_err("the backward binds 8 storage buffers: refused here");
        assert!(
            matches!(
                err,
                Error::LimitExceeded {
                    limit: "max_storage_buffers_per_shader_stage",
                    ..
                }
            ),
            "{err}"
        );
        return None;
    }
    Some(built.unwrap())
}

fn check(config: &OperatorConfig, nq: usize, nk: usize, seed: u64) -> Option<OperatorGrads> {
    let mut op = grad_op(ctx(), config)?;
    let x = inputs(config, nq, nk, seed);
    let out_shape = config.output_shape(nq);
    let grad_out = Rng::new(seed ^ 77).tensor(&out_shape, 1.0);
    let gpu = gpu_grads(&mut op, &x, &grad_out).unwrap();
    let cpu = reference::operator_backward(config, &x, &grad_out).unwrap();
    let what = format!("{config:?} at {nq}x{nk}");
    assert_close(&format!("dQ of {what}"), &gpu.q, &cpu.q);
    assert_close(&format!("dK of {what}"), &gpu.k, &cpu.k);
    assert_close(&format!("dV of {what}"), &gpu.v, &cpu.v);
    Some(gpu)
}

#[test]
fn gradients_match_the_reference_over_masks_bias_causal_and_gqa() {
    let base = |heads, kv_heads, d, q, kv| {
        OperatorConfig::new(2, heads, kv_heads, d, q, kv).with_gradients()
    };
    // MHA, cross-attention both ways, aligned causal with more keys and more queries.
    check(&base(2, 2, 8, 20, 20), 20, 20, 1);
    check(&base(2, 2, 8, 20, 40), 5, 37, 2);
    check(&base(2, 2, 8, 20, 40).causal(), 9, 33, 3);
    check(&base(2, 2, 8, 40, 20).causal(), 23, 11, 4);
    // GQA and MQA: dK and dV summed over each group's query heads.
    check(&base(4, 2, 16, 24, 24).causal(), 17, 24, 5);
    check(&base(3, 1, 12, 16, 16), 16, 13, 6);
    // Padding, and every bias broadcast.
    check(&base(2, 1, 8, 16, 16).with_key_padding_mask(), 10, 14, 7);
    for (per_batch, per_head) in [(false, false), (true, false), (false, true), (true, true)] {
        let bias = BiasShape {
            per_batch,
            per_head,
        };
        check(&base(2, 2, 8, 12, 12).with_bias(bias).causal(), 7, 12, 8);
    }
    // Widths that are not multiples of 4, other value widths, token-major, a custom scale.
    check(&base(2, 2, 5, 12, 12).with_head_dim_v(7), 9, 10, 9);
    check(
        &base(4, 2, 6, 16, 16)
            .with_head_dim_v(3)
            .token_major()
            .with_scale(-0.3),
        11,
        13,
        10,
    );
    // A head of 64, the common size, over a few blocks of keys and queries.
    check(&base(2, 1, 64, 40, 40).causal(), 40, 40, 11);
    // A head of 32: two invocations a row, each scoring eight walked rows (ROWS = 8) under
    // WebGPU's default limits; partial blocks and padding.
    check(
        &base(2, 2, 32, 24, 40).causal().with_key_padding_mask(),
        21,
        37,
        12,
    );
}

/// The forward of an operator built with gradients saves each row's logsumexp, in the units
/// the backward reads (natural log of the logits' exponentials), whatever the scale's sign,
/// with a bias or without, and -f32::MAX for a row that sees no key.
#[test]
fn the_forward_saves_the_reference_logsumexp() {
    let cases = [
        OperatorConfig::new(2, 4, 2, 8, 12, 12).causal(),
        OperatorConfig::new(1, 2, 2, 5, 9, 6)
            .causal()
            .with_scale(-0.7),
        OperatorConfig::new(2, 2, 1, 8, 8, 8)
            .with_key_padding_mask()
            .with_bias(BiasShape {
                per_batch: true,
                per_head: false,
            }),
        OperatorConfig::new(1, 3, 1, 6, 16, 16)
            .token_major()
            .with_scale(3.0),
    ];
    for (n, config) in cases.into_iter().enumerate() {
        let config = config.with_gradients();
        let (nq, nk) = (config.max_q_len, config.max_kv_len);
        let x = inputs(&config, nq, nk, 70 + n as u64);
        let Some(mut op) = grad_op(ctx(), &config) else {
            return;
        };
        let (out, lse) = op.run_saving_lse(&x).unwrap();
        let expected = reference::operator_lse(&config, &x).unwrap();
        assert_eq!(lse.shape(), expected.shape());
        for (i, (g, c)) in lse.data().iter().zip(expected.data()).enumerate() {
            let ok = if *c == reference::EMPTY_ROW_LSE {
                g == c
            } else {
                (g - c).abs() <= 1e-5 * (1.0 + c.abs())
            };
            assert!(ok, "{config:?}: lse[{i}] gpu {g}, reference {c}");
        }
        if config.causal && nq > nk {
            assert!(lse.data().contains(&reference::EMPTY_ROW_LSE));
        }
        assert_close("out", &out, &reference::operator(&config, &x).unwrap());
    }
}

#[test]
fn forward_then_backward_on_the_gpu_match_the_reference() {
    let config = OperatorConfig::new(2, 4, 2, 16, 20, 24)
        .causal()
        .with_key_padding_mask()
        .with_gradients();
    let (nq, nk) = (17, 24);
    let x = inputs(&config, nq, nk, 81);
    let g = Rng::new(82).tensor(&config.output_shape(nq), 1.0);
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let (_, gpu) = op.run_with_grad(&x, &g).unwrap();
    let cpu = reference::operator_backward(&config, &x, &g).unwrap();
    assert_close("dQ", &gpu.q, &cpu.q);
    assert_close("dK", &gpu.k, &cpu.k);
    assert_close("dV", &gpu.v, &cpu.v);
}

#[test]
fn only_a_forward_with_gradients_binds_the_logsumexp() {
    use wgpu_attention::kernels::{FusedIo, Kernel};
    let io = |lse| FusedIo {
        packed_qkv: false,
        mask: false,
        bias: false,
        lse,
        precision: wgpu_attention::Precision::F32,
    };
    assert_eq!(Kernel::Fused(io(false)).storage_buffers(), 4);
    assert_eq!(Kernel::Fused(io(true)).storage_buffers(), 5);
    let device = ctx().device();
    let buffer = |bytes| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (q, k, v, out, lse) = (
        buffer(256),
        buffer(256),
        buffer(256),
        buffer(256),
        buffer(64),
    );
    let io = wgpu_attention::OperatorIo {
        q: &q,
        k: &k,
        v: &v,
        key_mask: None,
        bias: None,
        out: &out,
    };
    let plain = OperatorConfig::new(1, 2, 2, 4, 4, 4);
    let op = AttentionOp::new(ctx(), &plain).unwrap();
    let err = op.bind_with_lse(io, &lse).unwrap_err();
    assert!(err.to_string().contains("lse"), "{err}");
    op.bind(io).unwrap();
    let Some(op) = grad_op(ctx(), &plain.with_gradients()) else {
        return;
    };
    let err = op.bind(io).unwrap_err();
    assert!(err.to_string().contains("bind_with_lse"), "{err}");
    op.bind_with_lse(io, &lse).unwrap();
}

#[test]
fn a_kv_cache_layout_and_a_split_call_give_the_reference_gradients() {
    // K and V laid out for 32 keys, 13 of them in this call: dK and dV come back in that
    // layout too; and a budget of one FLOP puts every workgroup in a submission of its own.
    let config = OperatorConfig::new(2, 4, 2, 8, 8, 16)
        .with_kv_capacity(32)
        .causal()
        .with_gradients();
    let (nq, nk) = (6, 13);
    let x = inputs(&config, nq, nk, 61);
    let g = Rng::new(62).tensor(&config.output_shape(nq), 1.0);
    let out = reference::operator(&config, &x).unwrap();
    let lse = reference::operator_lse(&config, &x).unwrap();
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let whole = op
        .run_backward_within(&x, &out, &lse, &g, f64::INFINITY)
        .unwrap();
    let cpu = reference::operator_backward(&config, &x, &g).unwrap();
    assert_close("dQ", &whole.q, &cpu.q);
    assert_close("dK", &whole.k, &cpu.k);
    assert_close("dV", &whole.v, &cpu.v);
    let split = op.run_backward_within(&x, &out, &lse, &g, 1.0).unwrap();
    assert_eq!(split, whole, "the split changed the bits");
}

/// Under GQA, dK and dV of a key/value head are the sums, over the query heads of its group,
/// of MHA's dK and dV with K and V repeated per query head: a second route, GPU against GPU.
#[test]
fn gqa_gradients_equal_mha_gradients_summed_over_each_group() {
    let (heads, d, n) = (4, 8, 13);
    for kv_heads in [2, 1] {
        let group = heads / kv_heads;
        let gqa = OperatorConfig::new(1, heads, kv_heads, d, n, n)
            .causal()
            .with_gradients();
        let x = inputs(&gqa, n, n, 100 + kv_heads as u64);
        let g = Rng::new(101).tensor(&gqa.output_shape(n), 1.0);
        let Some(mut op) = grad_op(ctx(), &gqa) else {
            return;
        };
        let (_, grouped) = op.run_with_grad(&x, &g).unwrap();
        let repeat = |t: &Tensor| {
            let data = (0..heads)
                .flat_map(|h| t.data()[(h / group) * n * d..][..n * d].to_vec())
                .collect();
            Tensor::new([1, heads, n, d], data).unwrap()
        };
        let mha = OperatorConfig::new(1, heads, heads, d, n, n)
            .causal()
            .with_gradients();
        let y = OperatorInputs::new(x.q.clone(), repeat(&x.k), repeat(&x.v));
        let mut op = grad_op(ctx(), &mha).unwrap();
        let (_, full) = op.run_with_grad(&y, &g).unwrap();
        let summed = |t: &Tensor| {
            let mut data = vec![0f32; kv_heads * n * d];
            for h in 0..heads {
                for (e, x) in t.data()[h * n * d..][..n * d].iter().enumerate() {
                    data[(h / group) * n * d + e] += x;
                }
            }
            Tensor::new([1, kv_heads, n, d], data).unwrap()
        };
        assert_close("dQ", &grouped.q, &full.q);
        assert_close("dK", &grouped.k, &summed(&full.k));
        assert_close("dV", &grouped.v, &summed(&full.v));
    }
}

#[test]
fn gradients_match_finite_differences_of_the_forward() {
    // L = Σ g ∘ O, differentiated by central differences of the f64 reference forward (read
    // back as f32, so the step is large and the tolerance wide).
    let config = OperatorConfig::new(1, 2, 1, 3, 3, 4)
        .causal()
        .with_gradients();
    let (nq, nk) = (3, 4);
    let x = inputs(&config, nq, nk, 21);
    let g = Rng::new(22).tensor(&config.output_shape(nq), 1.0);
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let gpu = gpu_grads(&mut op, &x, &g).unwrap();
    let loss = |x: &OperatorInputs| -> f64 {
        let out = reference::operator(&config, x).unwrap();
        out.data()
            .iter()
            .zip(g.data())
            .map(|(&o, &w)| o as f64 * w as f64)
            .sum()
    };
    let eps = 1e-2f32;
    for (name, grads) in [("q", &gpu.q), ("k", &gpu.k), ("v", &gpu.v)] {
        for e in 0..grads.len() {
            let nudged = |by: f32| {
                let mut y = x.clone();
                let t = match name {
                    "q" => &mut y.q,
                    "k" => &mut y.k,
                    _ => &mut y.v,
                };
                let mut data = t.data().to_vec();
                data[e] += by;
                *t = Tensor::new(t.shape().to_vec(), data).unwrap();
                loss(&y)
            };
            let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * eps as f64);
            let analytic = grads.data()[e] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "d{name}[{e}]: central difference {numeric}, GPU {analytic}"
            );
        }
    }
}

#[test]
fn a_query_that_sees_no_key_gets_zero_gradients_not_nan() {
    // Batch row 1 has every key masked; with causal alignment and more queries than keys the
    // first queries of batch row 0 see nothing either.
    let config = OperatorConfig::new(2, 2, 2, 8, 6, 4)
        .causal()
        .with_key_padding_mask()
        .with_gradients();
    let (nq, nk) = (6, 4);
    let mut x = inputs(&config, nq, nk, 31);
    let mask = (0..2 * nk).map(|e| (e < nk) as u8 as f32).collect();
    x.key_mask = Some(Tensor::new([2, nk], mask).unwrap());
    let g = Rng::new(32).tensor(&config.output_shape(nq), 1.0);
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let gpu = gpu_grads(&mut op, &x, &g).unwrap();
    let cpu = reference::operator_backward(&config, &x, &g).unwrap();
    for (name, t) in [("dQ", &gpu.q), ("dK", &gpu.k), ("dV", &gpu.v)] {
        assert!(t.data().iter().all(|v| v.is_finite()), "{name} has NaN");
        // Everything of batch row 1 is zero.
        let half = t.len() / 2;
        assert!(t.data()[half..].iter().all(|&v| v == 0.0), "{name}");
    }
    // Queries 0 and 1 of batch row 0 see no key (query i sees keys j <= i - 2).
    for h in 0..2 {
        for i in 0..2 {
            for c in 0..8 {
                assert_eq!(gpu.q.get(&[0, h, i, c]), Some(0.0));
            }
        }
    }
    assert_close("dQ", &gpu.q, &cpu.q);
    assert_close("dK", &gpu.k, &cpu.k);
    assert_close("dV", &gpu.v, &cpu.v);
    assert!(
        gpu.k.data().iter().any(|&v| v != 0.0),
        "batch row 0 has gradients"
    );
}

#[test]
fn the_backward_needs_an_operator_built_with_gradients_and_right_shapes() {
    let config = OperatorConfig::new(1, 2, 2, 4, 4, 4);
    let mut op = AttentionOp::new(ctx(), &config).unwrap();
    let x = inputs(&config, 4, 4, 41);
    let g = Tensor::zeros(config.output_shape(4));
    let err = gpu_grads(&mut op, &x, &g).unwrap_err();
    assert!(err.to_string().contains("with_gradients"), "{err}");
    assert_eq!(op.backward_scratch_bytes(), None);

    let config = config.with_gradients();
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let err = gpu_grads(&mut op, &x, &Tensor::zeros([1, 2, 3, 4])).unwrap_err();
    assert!(err.to_string().contains("grad_out"), "{err}");
    let out = reference::operator(&config, &x).unwrap();
    let err = op
        .run_backward(&x, &out, &Tensor::zeros([1, 2, 5]), &g)
        .unwrap_err();
    assert!(err.to_string().contains("lse"), "{err}");
}

#[test]
fn a_long_sequence_runs_within_the_default_limits() {
    // 4096 tokens under the suite's limits (WebGPU's defaults unless asked otherwise): nothing
    // of size q_len x kv_len is stored, so only the tensors themselves grow.
    let n = 4096;
    let config = OperatorConfig::new(1, 1, 1, 8, n, n)
        .causal()
        .with_gradients();
    let x = inputs(&config, n, n, 91);
    let g = Rng::new(92).tensor(&config.output_shape(n), 1.0);
    let Some(mut op) = grad_op(ctx(), &config) else {
        return;
    };
    let (_, gpu) = op.run_with_grad(&x, &g).unwrap();
    let cpu = reference::operator_backward(&config, &x, &g).unwrap();
    assert_close("dQ", &gpu.q, &cpu.q);
    assert_close("dK", &gpu.k, &cpu.k);
    assert_close("dV", &gpu.v, &cpu.v);
}

#[test]
fn the_backward_scratch_grows_linearly_with_the_lengths() {
    let (b, h, kvh, d) = (1, 4, 2, 16);
    let bytes = |n: usize| {
        let config = OperatorConfig::new(b, h, kvh, d, n, n).with_gradients();
        grad_op(ctx(), &config).map(|op| op.backward_scratch_bytes().unwrap())
    };
    let (Some(small), Some(large)) = (bytes(1024), bytes(4096)) else {
        return;
    };
    eprintln!("backward scratch: {small} bytes at 1024 tokens, {large} bytes at 4096");
    // lse and D per query row, and the key mask: nothing of size q_len x kv_len.
    assert_eq!(small, 4 * (2 * b * h * 1024 + b * 1024) as u64);
    assert_eq!(large, 4 * small);
}

#[test]
fn repeated_backward_calls_on_the_apps_buffers_allocate_nothing() {
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let (b, h, kvh, d) = (1, 4, 2, 8);
    let (max_q, max_kv) = (10, 24);
    let config = OperatorConfig::new(b, h, kvh, d, max_q, max_kv)
        .causal()
        .with_key_padding_mask()
        .with_gradients();
    let mut op = AttentionOp::new(&app, &config).unwrap();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let (nq, nk) = (7, 19);
    let x = inputs(&config, nq, nk, 51);
    let g = Rng::new(52).tensor(&config.output_shape(nq), 1.0);
    let out = reference::operator(&config, &x).unwrap();
    let lse = reference::operator_lse(&config, &x).unwrap();
    let buffer = |data: &[f32], elements: usize| {
        let mut contents = data.to_vec();
        contents.resize(elements.next_multiple_of(4), 0.0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&contents),
            usage,
        })
    };
    let mask: Vec<f32> = x
        .key_mask
        .as_ref()
        .unwrap()
        .data()
        .iter()
        .map(|&m| f32::from_bits(m as u32))
        .collect();
    let (qn, kn, on) = (b * h * max_q * d, b * kvh * max_kv * d, b * h * max_q * d);
    let q = buffer(x.q.data(), qn);
    let k = buffer(x.k.data(), kn);
    let v = buffer(x.v.data(), kn);
    let m = buffer(&mask, b * max_kv);
    // The forward writes O and the logsumexp that the backward reads: they start as zeros.
    let o = buffer(&[], on);
    let l = buffer(&[], b * h * max_q);
    let go = buffer(g.data(), on);
    let (dq, dk, dv) = (buffer(&[], qn), buffer(&[], kn), buffer(&[], kn));
    let bindings = op
        .bind_backward(BackwardIo {
            q: &q,
            k: &k,
            v: &v,
            key_mask: Some(&m),
            bias: None,
            out: &o,
            lse: &l,
            grad_out: &go,
            grad_q: &dq,
            grad_k: &dk,
            grad_v: &dv,
        })
        .unwrap();
    let forward = op
        .bind_with_lse(
            wgpu_attention::OperatorIo {
                q: &q,
                k: &k,
                v: &v,
                key_mask: Some(&m),
                bias: None,
                out: &o,
            },
            &l,
        )
        .unwrap();
    let counters = || common::object_counts(&device);
    queue.submit([]);
    let before = counters();
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "not counting: {before:?}"
    );
    for _ in 0..3 {
        let mut encoder = device.create_command_encoder(&Default::default());
        let lengths = Lengths {
            q_len: nq,
            kv_len: nk,
        };
        op.encode(&mut encoder, &forward, lengths).unwrap();
        op.encode_backward(
            &mut encoder,
            &bindings,
            Lengths {
                q_len: nq,
                kv_len: nk,
            },
        )
        .unwrap();
        queue.submit([encoder.finish()]);
    }
    assert_eq!(
        counters(),
        before,
        "a forward and backward call created wgpu objects"
    );
    let read = |buffer: &wgpu::Buffer, shape: &[usize]| {
        let n: usize = shape.iter().product();
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
        Tensor::new(shape.to_vec(), data[..n].to_vec()).unwrap()
    };
    let cpu = reference::operator_backward(&config, &x, &g).unwrap();
    assert_close("dQ", &read(&dq, x.q.shape()), &cpu.q);
    assert_close("dK", &read(&dk, x.k.shape()), &cpu.k);
    assert_close("dV", &read(&dv, x.v.shape()), &cpu.v);

    // The operator's own run_backward: after the first call, none creates anything.
    let first = op.run_backward(&x, &out, &lse, &g).unwrap();
    let after_first = counters();
    for _ in 0..2 {
        assert_eq!(op.run_backward(&x, &out, &lse, &g).unwrap(), first);
        assert_eq!(counters(), after_first, "run_backward created wgpu objects");
    }
}

/// Sequences of 4096 (8 heads of 64 over 2 key/value heads) and 16384 (one head of 16) are
/// accepted under WebGPU's default limits, bound to an application's buffers and recorded
/// (not run: the 16384 backward takes minutes on a software adapter), and the memory a
/// backward call binds grows as the sequence does: four times the tokens, four times the bytes.
#[test]
fn long_sequences_fit_webgpus_default_limits_in_memory_linear_in_the_length() {
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device.clone(), queue);
    assert_eq!(
        app.limits(),
        wgpu::Limits::default(),
        "the adapter lacks WebGPU's defaults"
    );
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let accepted = |heads: usize, kv_heads: usize, d: usize, n: usize| -> u64 {
        let config = OperatorConfig::new(1, heads, kv_heads, d, n, n)
            .causal()
            .with_key_padding_mask()
            .with_gradients();
        let op = AttentionOp::new(&app, &config).unwrap();
        let buffer = |elements: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (elements * 4).next_multiple_of(16) as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        let (q, out) = (buffer(heads * n * d), buffer(heads * n * d));
        let (k, v) = (buffer(kv_heads * n * d), buffer(kv_heads * n * d));
        let (grad_out, grad_q) = (buffer(heads * n * d), buffer(heads * n * d));
        let (grad_k, grad_v) = (buffer(kv_heads * n * d), buffer(kv_heads * n * d));
        let (mask, lse) = (buffer(n), buffer(heads * n));
        let bindings = op
            .bind_backward(BackwardIo {
                q: &q,
                k: &k,
                v: &v,
                key_mask: Some(&mask),
                bias: None,
                out: &out,
                lse: &lse,
                grad_out: &grad_out,
                grad_q: &grad_q,
                grad_k: &grad_k,
                grad_v: &grad_v,
            })
            .unwrap();
        let mut encoder = device.create_command_encoder(&Default::default());
        let lengths = Lengths {
            q_len: n,
            kv_len: n,
        };
        op.encode_backward(&mut encoder, &bindings, lengths)
            .unwrap();
        drop(encoder);
        let bytes = op.backward_memory_bytes().unwrap();
        // Exactly the buffers bound above and the scratch.
        let bound: u64 = [
            &q, &k, &v, &out, &lse, &grad_out, &grad_q, &grad_k, &grad_v, &mask,
        ]
        .iter()
        .map(|b| b.size())
        .sum();
        assert_eq!(bytes, bound + op.backward_scratch_bytes().unwrap());
        bytes
    };
    let (small, large) = (accepted(8, 2, 64, 1024), accepted(8, 2, 64, 4096));
    eprintln!("backward memory, 8 heads of 64: {small} bytes at 1024 tokens, {large} at 4096");
    assert_eq!(large, 4 * small);
    let (small, large) = (accepted(1, 1, 16, 4096), accepted(1, 1, 16, 16384));
    eprintln!("backward memory, 1 head of 16: {small} bytes at 4096 tokens, {large} at 16384");
    assert_eq!(large, 4 * small);
    // One f32 score matrix would take 4 · 16384² bytes, a GiB: all of it is under 1% of that.
    assert!(large * 100 < 4 * 16384 * 16384, "{large}");
}
