//! The layer's backward on the GPU (`AttentionPlan` with gradients): dx and every weight and
//! bias gradient against the f64 reference (`reference::layer_backward`) with and without
//! biases and an output projection, causal and key-padding masked; zeros (not NaN) where a
//! sequence's keys are all masked; nothing allocated by repeated calls; memory linear in the
//! sequence; named refusals.

mod common;

use common::{Rng, ctx};
use wgpu_attention::reference::{self, LayerGrads};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, Error, GpuContext,
    KernelChoice, Precision, Tensor,
};

/// Every element within `1e-4 · max|reference| + 1e-5` of the reference: the rule of the
/// operator's backward (tests/backward.rs), whose gradients the layer's pass through its
/// GEMMs; those sum a few dozen f32 products per element here, far inside that bound.
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

fn assert_grads(what: &str, gpu: &LayerGrads, cpu: &LayerGrads) {
    let pairs = [
        ("x", Some(&gpu.x), Some(&cpu.x)),
        ("w_q", Some(&gpu.w_q), Some(&cpu.w_q)),
        ("w_k", Some(&gpu.w_k), Some(&cpu.w_k)),
        ("w_v", Some(&gpu.w_v), Some(&cpu.w_v)),
        ("b_q", gpu.b_q.as_ref(), cpu.b_q.as_ref()),
        ("b_k", gpu.b_k.as_ref(), cpu.b_k.as_ref()),
        ("b_v", gpu.b_v.as_ref(), cpu.b_v.as_ref()),
        ("w_o", gpu.w_o.as_ref(), cpu.w_o.as_ref()),
        ("b_o", gpu.b_o.as_ref(), cpu.b_o.as_ref()),
    ];
    for (name, g, c) in pairs {
        match (g, c) {
            (Some(g), Some(c)) => assert_close(&format!("d{name} of {what}"), g, c),
            (None, None) => {}
            _ => panic!("d{name} of {what}: present on one side only"),
        }
    }
}

/// Weights for `config`, N(0, 0.5); biases and `b_o` when asked.
fn weights(config: &AttentionConfig, bias: bool, b_o: bool, rng: &mut Rng) -> AttentionWeights {
    let (dm, h) = (config.d_model, config.heads);
    let (d, dv) = (config.head_dim, config.head_dim_v);
    let mut w = AttentionWeights::new(
        rng.tensor(&[dm, h * d], 0.5),
        rng.tensor(&[dm, h * d], 0.5),
        rng.tensor(&[dm, h * dv], 0.5),
    );
    if bias {
        w = w.with_qkv_bias(
            rng.tensor(&[h * d], 0.5),
            rng.tensor(&[h * d], 0.5),
            rng.tensor(&[h * dv], 0.5),
        );
    }
    if let Some(p) = config.output_projection {
        let b = b_o.then(|| rng.tensor(&[p.d_out], 0.5));
        w = w.with_output_projection(rng.tensor(&[h * dv, p.d_out], 0.5), b);
    }
    w
}

/// The plan with gradients; `None` on a device with fewer storage buffers per shader stage
/// than the backward's dK/dV kernel binds (8; downlevel devices allow 4), where building it
/// must fail with that limit named.
fn grad_plan(
    ctx: &GpuContext,
    config: &AttentionConfig,
    w: &AttentionWeights,
) -> Option<AttentionPlan> {
    let built = AttentionPlan::new(ctx, config, w);
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

/// Runs forward and backward on the GPU and checks every gradient against the reference;
/// `masked` drops every third key of batch row 0 and (if `empty`) every key of batch row 1.
fn check(
    config: &AttentionConfig,
    bias: bool,
    b_o: bool,
    empty: bool,
    seed: u64,
) -> Option<LayerGrads> {
    let mut rng = Rng::new(seed);
    let w = weights(config, bias, b_o, &mut rng);
    let mut plan = grad_plan(ctx(), config, &w)?;
    let mut x = AttentionInputs::new(rng.tensor(&config.x_shape(), 1.0));
    if config.key_padding_mask {
        let n = config.seq_len;
        let m = (0..config.batch * n)
            .map(|e| !(e % 3 == 1 || (empty && e / n == 1)) as u8 as f32)
            .collect();
        x = x.with_key_mask(Tensor::new(config.key_mask_shape(), m).unwrap());
    }
    let grad_out = rng.tensor(&config.output_shape(), 1.0);
    let (out, gpu) = plan.run_with_grad(&x, &grad_out).unwrap();
    let cpu_out = reference::run(config, &w, &x).unwrap().output;
    assert_close("forward output", &out, &cpu_out);
    let cpu = reference::layer_backward(config, &w, &x, &grad_out).unwrap();
    assert_grads(&format!("{config:?}"), &gpu, &cpu);
    Some(gpu)
}

#[test]
fn gradients_match_the_reference_with_and_without_biases_projection_causal_and_mask() {
    let base = |seq, dm, h, d| AttentionConfig::new(2, seq, dm, h, d).with_gradients();
    // No bias, no output projection: dA is dY itself.
    check(&base(9, 12, 2, 4), false, false, false, 1);
    // Biases and an output projection with its bias, causal; widths off the vec4 grid (head
    // 5 wide, padded to 8; d_model and d_out odd).
    check(
        &base(11, 7, 2, 5).causal().with_output_projection(9),
        true,
        true,
        false,
        2,
    );
    // Key-padding mask, an output projection without bias, value heads of their own width.
    check(
        &base(10, 8, 3, 4)
            .with_head_dim_v(6)
            .with_key_padding_mask()
            .with_output_projection(5),
        true,
        false,
        false,
        3,
    );
}

#[test]
fn a_sequence_whose_keys_are_all_masked_gets_zero_gradients_not_nan() {
    let config = AttentionConfig::new(2, 6, 8, 2, 4)
        .with_key_padding_mask()
        .causal()
        .with_gradients();
    let Some(g) = check(&config, true, false, true, 4) else {
        return;
    };
    // Batch row 1 attends nothing: its attention output is zero whatever x is, so its dx is
    // exactly zero (and check() found every gradient finite and equal to the reference's).
    let row = 6 * 8;
    let dx1 = &g.x.data()[row..];
    assert!(
        dx1.iter().all(|&v| v == 0.0),
        "dx of the empty row: {dx1:?}"
    );
    assert!(g.x.data()[..row].iter().any(|&v| v != 0.0));
}

#[test]
fn repeated_backward_calls_on_the_apps_buffers_allocate_nothing() {
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let config = AttentionConfig::new(2, 8, 8, 2, 4)
        .with_key_padding_mask()
        .with_output_projection(6)
        .with_gradients();
    let mut rng = Rng::new(5);
    let w = weights(&config, true, true, &mut rng);
    let mut plan = AttentionPlan::new(&app, &config, &w).unwrap();
    let mask = Tensor::new(
        config.key_mask_shape(),
        (0..16).map(|e| (e % 5 != 2) as u8 as f32).collect(),
    )
    .unwrap();
    let x = AttentionInputs::new(rng.tensor(&config.x_shape(), 1.0)).with_key_mask(mask.clone());
    let g = rng.tensor(&config.output_shape(), 1.0);
    let (out, host) = plan.run_with_grad(&x, &g).unwrap();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buffer = |bytes: &[u8], size: usize| {
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.next_multiple_of(16) as u64,
            usage,
            mapped_at_creation: false,
        });
        queue.write_buffer(&b, 0, bytes);
        b
    };
    let f32s = |t: &Tensor| buffer(bytemuck::cast_slice(t.data()), 4 * t.len());
    let words: Vec<u32> = mask.data().iter().map(|&m| m as u32).collect();
    let hv = config.heads * config.head_dim_v;
    let (xb, mb, ob, gb) = (
        f32s(&x.x),
        buffer(bytemuck::cast_slice(&words), 4 * words.len()),
        buffer(&[], 4 * out.len()),
        f32s(&g),
    );
    let dx = buffer(&[], 4 * x.x.len());
    let dw = buffer(&[], 4 * (config.d_model + 1) * plan.qkv_width());
    let dwo = buffer(&[], 4 * (hv + 1) * 6);
    let forward = plan
        .bind(wgpu_attention::AttentionIo {
            x: &xb,
            key_mask: Some(&mb),
            output: &ob,
        })
        .unwrap();
    let backward = plan
        .bind_backward(wgpu_attention::LayerBackwardIo {
            x: &xb,
            key_mask: Some(&mb),
            output: &ob,
            grad_out: &gb,
            grad_x: &dx,
            grad_w_qkv: &dw,
            grad_w_o: Some(&dwo),
        })
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
        plan.encode(&mut encoder, &forward).unwrap();
        plan.encode_backward(&mut encoder, &backward).unwrap();
        queue.submit([encoder.finish()]);
    }
    assert_eq!(
        counters(),
        before,
        "a forward and backward call on the app's buffers created wgpu objects"
    );
    let read = |b: &wgpu::Buffer| -> Vec<f32> {
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: b.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(b, 0, &staging, 0, b.size());
        queue.submit([encoder.finish()]);
        staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec()
    };
    let encoded = plan
        .unpack_grads(&read(&dx), &read(&dw), Some(&read(&dwo)))
        .unwrap();
    // The same kernels on the same values: the app's buffers give the host path's gradients.
    assert_eq!(encoded, host);
    // The plan's own run_with_grad: after the first call, none creates anything.
    let after = counters();
    for _ in 0..2 {
        assert_eq!(plan.run_with_grad(&x, &g).unwrap().1, host);
        assert_eq!(counters(), after, "run_with_grad created wgpu objects");
    }
}

#[test]
fn gradients_are_refused_by_name_where_they_cannot_run() {
    let config = AttentionConfig::new(1, 4, 8, 2, 4);
    let w = weights(&config, false, false, &mut Rng::new(6));
    // f16 layers: the backward kernels are f32.
    let f16 = config
        .clone()
        .with_gradients()
        .with_precision(Precision::F16);
    let err = AttentionPlan::new(ctx(), &f16, &w).unwrap_err();
    assert!(matches!(err, Error::F16NeedsFused { .. }), "{err}");
    // The staged kernels save no logsumexp.
    let staged = config
        .clone()
        .with_gradients()
        .with_kernel(KernelChoice::Staged);
    let err = AttentionPlan::new(ctx(), &staged, &w).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("fused")),
        "{err}"
    );
    // A plan built without gradients has no backward.
    let mut plan = AttentionPlan::new(ctx(), &config, &w).unwrap();
    let x = AttentionInputs::new(Rng::new(7).tensor(&config.x_shape(), 1.0));
    let g = Rng::new(8).tensor(&config.output_shape(), 1.0);
    let err = plan.run_with_grad(&x, &g).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("with_gradients")),
        "{err}"
    );
    // grad_out shaped unlike the output.
    if let Some(mut plan) = grad_plan(ctx(), &config.clone().with_gradients(), &w) {
        let wrong = Rng::new(9).tensor(&[1, 4, 3], 1.0);
        let err = plan.run_with_grad(&x, &wrong).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }
}

#[test]
fn the_backwards_memory_grows_linearly_with_the_sequence() {
    // What gradients add to a plan (logsumexp, scratch, dQKV, dA, the gradient buffers) at
    // three lengths: linear in seq (nothing seq x seq), up to the 256-byte section alignment.
    let added = |seq: usize| -> Option<f64> {
        let config = AttentionConfig::new(1, seq, 16, 2, 8)
            .causal()
            .with_output_projection(16);
        let w = weights(&config, true, true, &mut Rng::new(10));
        let plain = AttentionPlan::new(ctx(), &config, &w).unwrap();
        let grads = grad_plan(ctx(), &config.clone().with_gradients(), &w)?;
        Some((grads.gpu_memory_bytes() - plain.gpu_memory_bytes()) as f64)
    };
    let (Some(a), Some(b), Some(c)) = (added(256), added(512), added(1024)) else {
        return;
    };
    let (step1, step2) = (b - a, c - b);
    assert!(step1 > 0.0, "{a} {b} {c}");
    assert!(
        (step2 / step1 - 2.0).abs() < 0.01,
        "doubling the sequence twice added {step1} then {step2} bytes: not linear"
    );
}
