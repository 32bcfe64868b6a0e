//! Helpers shared by the integration tests: one GPU context per test binary, the worked
//! example's tensors, and seeded N(0,1)-like data.
#![allow(dead_code)]

pub mod cached;
pub mod cases;

use std::sync::OnceLock;

use wgpu_attention::{
    AdapterOptions, AttentionConfig, AttentionInputs, AttentionWeights, DeviceLimits, GpuContext,
    Random, Tensor,
};

/// Which device limits the suite's shared context ([`ctx`]) is made with, from
/// `WGPU_ATTENTION_TEST_LIMITS`:
/// - `webgpu` (the default): exactly `wgpu::Limits::default()`, which are WebGPU's defaults, so
///   the suite shows the crate runs where a browser's WebGPU does;
/// - `downlevel`: exactly `wgpu::Limits::downlevel_defaults()` (WebGL2-class devices);
/// - `adapter`: everything the adapter offers, as the program's `run` and `bench` ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    WebGpu,
    Downlevel,
    Adapter,
}

impl Profile {
    pub fn from_env() -> Profile {
        match std::env::var("WGPU_ATTENTION_TEST_LIMITS").as_deref() {
            Err(_) | Ok("") | Ok("webgpu") => Profile::WebGpu,
            Ok("downlevel") => Profile::Downlevel,
            Ok("adapter") => Profile::Adapter,
            Ok(other) => {
                panic!("WGPU_ATTENTION_TEST_LIMITS={other:?}: use webgpu, downlevel or adapter")
            }
        }
    }
}

/// The context every GPU test shares, with the limits of [`Profile::from_env`]. A machine
/// without an adapter fails here, loudly: CI must never report GPU tests as passed without
/// running them.
pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let profile = Profile::from_env();
        let ctx = match profile {
            Profile::WebGpu => exact_limits(wgpu::Limits::default()),
            Profile::Downlevel => exact_limits(wgpu::Limits::downlevel_defaults()),
            Profile::Adapter => adapter_ctx().clone(),
        };
        let info = ctx.adapter_info();
        eprintln!(
            "GPU tests run on {} ({:?}, {:?}) with the {profile:?} limits profile",
            info.name, info.backend, info.device_type
        );
        ctx
    })
}

/// A context with the adapter's own limits, made the way the program makes it: the tile
/// choices `run` and `bench` ship (on lavapipe, 32 KiB of workgroup memory where WebGPU's
/// defaults give 16).
pub fn adapter_ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let options = AdapterOptions {
            limits: DeviceLimits::Adapter,
            ..AdapterOptions::from_env()
        };
        let ctx = GpuContext::from_options(&options)
            .unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"));
        // Tests pin the rule's tiles: results are then the same on every run (tests/autotune.rs
        // runs every candidate).
        ctx.set_autotune(wgpu_attention::Autotune::Off);
        ctx
    })
}

/// The context an operator test runs on: the profile's, unless its limits refuse the operator's
/// bindings (a mask or a bias on a downlevel device, which tests/reliability.rs checks is a
/// named error); then one with exactly WebGPU's default limits.
pub fn op_ctx(config: &wgpu_attention::OperatorConfig) -> &'static GpuContext {
    static WEBGPU: OnceLock<GpuContext> = OnceLock::new();
    match wgpu_attention::AttentionOp::new(ctx(), config) {
        Err(wgpu_attention::Error::LimitExceeded {
            limit: "max_storage_buffers_per_shader_stage",
            ..
        }) => WEBGPU.get_or_init(|| exact_limits(wgpu::Limits::default())),
        _ => ctx(),
    }
}

/// The contexts a test of tile choices runs on: the suite's profile and the adapter's limits,
/// each named; one when they are the same.
pub fn contexts() -> Vec<(&'static str, &'static GpuContext)> {
    let mut all = vec![("test profile", ctx())];
    if Profile::from_env() != Profile::Adapter && adapter_ctx().limits() != ctx().limits() {
        all.push(("adapter limits", adapter_ctx()));
    }
    all
}

/// A context on a device requested with exactly `limits`, and the optional features the
/// library itself asks for, so the kernels take the same paths.
fn exact_limits(limits: wgpu::Limits) -> GpuContext {
    let adapter = env_adapter();
    let wanted =
        wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("wgpu-attention tests"),
        required_features: adapter.features() & wanted,
        required_limits: limits,
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("the adapter refuses the test limits profile: {e}"));
    let ctx = GpuContext::from_device(device, queue);
    ctx.set_autotune(wgpu_attention::Autotune::Off);
    ctx
}

/// The adapter the library chose for [`adapter_ctx`], as the very object the library holds:
/// on OpenGL a second adapter object would lock the instance's one EGL context under a lock of
/// its own (see `enumerate_adapters`).
pub fn env_adapter() -> wgpu::Adapter {
    let info = adapter_ctx().adapter_info();
    // The backend set the library enumerated: the one asked for, or the one it fell back to.
    let backends = AdapterOptions::from_env().backends.unwrap_or(
        if wgpu::Backends::PRIMARY.contains(info.backend.into()) {
            wgpu::Backends::PRIMARY
        } else {
            wgpu::Backends::SECONDARY
        },
    );
    wgpu_attention::enumerate_adapters(backends)
        .into_iter()
        .find(|a| a.get_info() == *info)
        .unwrap_or_else(|| panic!("the library's adapter {info:?} is not among its adapters"))
}

/// A device of the application's own, made with wgpu directly (not through this crate), with
/// wgpu's default limits as `adjust` changes them.
pub fn app_device(adjust: impl FnOnce(&mut wgpu::Limits)) -> (wgpu::Device, wgpu::Queue) {
    let adapter = env_adapter();
    let mut limits = wgpu::Limits::default().or_worse_values_from(&adapter.limits());
    adjust(&mut limits);
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device")
}

/// Copies `buffer` to a mappable one and reads it as f32, the way an application would.
pub fn read_buffer(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer) -> Vec<f32> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app read-back"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    queue.submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec()
}

/// The wgpu objects a device has made so far (after waiting for its work), by kind: what the
/// no-allocation tests compare before and after a call.
pub fn object_counts(device: &wgpu::Device) -> [(&'static str, isize); 5] {
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let c = device.get_internal_counters().hal;
    [
        ("buffers", c.buffers.read()),
        ("bind groups", c.bind_groups.read()),
        ("compute pipelines", c.compute_pipelines.read()),
        ("shader modules", c.shader_modules.read()),
        ("bind group layouts", c.bind_group_layouts.read()),
    ]
}

/// Repeats each of the `kv_heads` heads of a head-major `[b, kv_heads, n, d]` tensor for the
/// `heads / kv_heads` query heads it serves: the MHA equivalent of a GQA call.
pub fn repeat_heads(t: &Tensor, heads: usize) -> Tensor {
    let [b, kv_heads, n, d] = t.shape().try_into().unwrap();
    let group = heads / kv_heads;
    let mut data = Vec::with_capacity(b * heads * n * d);
    for bi in 0..b {
        for h in 0..heads {
            let at = (bi * kv_heads + h / group) * n * d;
            data.extend_from_slice(&t.data()[at..at + n * d]);
        }
    }
    Tensor::new([b, heads, n, d], data).unwrap()
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
