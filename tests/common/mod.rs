//! Helpers shared by the integration tests: one GPU context per test binary, the worked
//! example's tensors, and seeded N(0,1)-like data.
#![allow(dead_code)]

pub mod cases;

use std::sync::OnceLock;

use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionWeights, GpuContext, Random, Tensor,
};

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

/// Seeded test data: a thin wrapper over the library's generator, so a seed printed by a failing
/// test reproduces the same data in a benchmark or the program.
pub struct Rng(Random);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(Random::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f32 {
        self.0.normal()
    }

    /// N(0, std²) elements of `shape`.
    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor {
        self.0
            .tensor(shape, std)
            .unwrap_or_else(|e| panic!("random tensor {shape:?}: {e}"))
    }
}
