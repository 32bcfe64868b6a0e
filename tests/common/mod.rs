//! Helpers shared by the integration tests: one GPU context per test binary, the worked
//! example's tensors, and seeded N(0,1)-like data.
#![allow(dead_code)]

pub mod cases;

use std::sync::OnceLock;

use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionWeights, GpuContext, Tensor};

/// The context every GPU test shares. A machine without an adapter fails here, loudly: CI must
/// never report GPU tests as passed without running them.
pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx =
            GpuContext::from_env().unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"));
        let info = ctx.adapter_info();
        eprintln!(
            "GPU tests run on {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        );
        ctx
    })
}

/// A device of the application's own, made with wgpu directly (not through this crate), with
/// wgpu's default limits as `adjust` changes them.
pub fn app_device(adjust: impl FnOnce(&mut wgpu::Limits)) -> (wgpu::Device, wgpu::Queue) {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&Default::default())).expect("an adapter");
    let mut limits = wgpu::Limits::default().or_worse_values_from(&adapter.limits());
    adjust(&mut limits);
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device")
}

pub fn t(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
}

/// The worked example of ../shared/worked-example.md.
pub fn worked_example(scale: Option<f32>) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let mut config = AttentionConfig::new(1, 3, 4, 1, 3).with_intermediates();
    config.scale = scale;
    let x = t(
        &[1, 3, 4],
        &[1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.],
    );
    let w_key = t(&[4, 3], &[0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.]);
    let w_query = t(&[4, 3], &[1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.]);
    let w_value = t(&[4, 3], &[0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.]);
    (
        config,
        AttentionWeights::new(w_query, w_key, w_value),
        AttentionInputs::new(x),
    )
}

/// A small deterministic generator (SplitMix64) for test data that a seed reproduces.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|_| self.normal() * std).collect(),
        )
        .unwrap()
    }
}
