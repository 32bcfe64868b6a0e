//! Transformer self-attention in WGSL compute shaders, on any GPU that wgpu reaches (Vulkan,
//! Metal, DX12, OpenGL), with every GPU result checkable against a CPU reference.
//!
//! The layer, per batch row and head `h`:
//!
//! ```text
//! Q = x W_q + b_q,  K = x W_k + b_k,  V = x W_v + b_v          (split into heads)
//! S_h = scale · Q_h K_hᵀ, masked (causal, key padding)
//! P_h = softmax(S_h) over keys (stable: subtract the row max; a fully masked row gives zeros)
//! out = concat_h(P_h V_h) W_o + b_o                           (W_o optional)
//! ```
//!
//! # Quick start
//!
//! ```no_run
//! use wgpu_attention::{
//!     compare, reference, AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights,
//!     GpuContext, Tensor, Tolerance,
//! };
//! # fn main() -> Result<(), wgpu_attention::Error> {
//! let ctx = GpuContext::from_env()?; // honours WGPU_BACKEND, WGPU_ADAPTER_NAME, WGPU_POWER_PREF
//! // The worked example: 3 tokens of width 4, one head of width 3, unscaled.
//! let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
//! let weights = AttentionWeights::new(
//!     Tensor::new([4, 3], vec![1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.])?, // w_query
//!     Tensor::new([4, 3], vec![0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.])?, // w_key
//!     Tensor::new([4, 3], vec![0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.])?, // w_value
//! );
//! let x = Tensor::new([1, 3, 4], vec![1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.])?;
//! let inputs = AttentionInputs::new(x);
//!
//! let mut plan = AttentionPlan::new(&ctx, &config, &weights)?;
//! let gpu = plan.run(&inputs)?;
//! let cpu = reference::run(&config, &weights, &inputs)?;
//! let report = compare(&gpu, &cpu.output, Tolerance::F32)?;
//! assert!(report.passed(), "{report}");
//! // gpu.data() starts with [1.9366211, 6.6831053, 1.5950684]
//! # Ok(()) }
//! ```
//!
//! # Inside an application's wgpu code
//!
//! Hand over the application's device and queue, bind its buffers once, then record into its
//! own command encoder as often as it likes:
//!
//! ```no_run
//! # use wgpu_attention::*;
//! # fn demo(device: wgpu::Device, queue: wgpu::Queue, weights: AttentionWeights,
//! #         x: wgpu::Buffer, out: wgpu::Buffer) -> Result<(), Error> {
//! let ctx = GpuContext::from_device(device.clone(), queue.clone());
//! let config = AttentionConfig::new(1, 128, 64, 4, 16).causal();
//! let plan = AttentionPlan::new(&ctx, &config, &weights)?;
//! let bindings = plan.bind(AttentionIo { x: &x, key_mask: None, output: &out })?;
//! let mut encoder = device.create_command_encoder(&Default::default());
//! // ... the application's own passes ...
//! plan.encode(&mut encoder, &bindings)?;
//! queue.submit([encoder.finish()]);
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `cpu` (default): the fast multi-threaded CPU path, `CpuAttention` (pulls in `gemm` and
//!   `rayon`). Turn default features off to embed the GPU path alone.
//! - `random`: seeded random layers and tensors, `Random`, `AttentionWeights::random`,
//!   `AttentionInputs::random`, `Tensor::random`, for tests and benchmarks.
//! - `cli` (default): the `wgpu-attention` program; enables `cpu` and `random`.

#![warn(missing_docs)]

pub mod cached;
pub mod ceiling;
pub mod compare;
pub mod config;
pub mod context;
#[cfg(feature = "cpu")]
pub mod cpu;
pub mod error;
mod gpu;
pub mod kernels;
pub mod operator;
pub mod plan;
pub mod precision;
#[cfg(feature = "random")]
pub mod random;
pub mod reference;
pub mod stage;
pub mod tensor;
pub mod timing;
pub mod weights;

pub use cached::{CachedAttention, CachedBindings, CachedIo, CachedLayerConfig};
pub use compare::{Comparison, Rule, Tolerance, compare, compare_bounded};
pub use config::{AttentionConfig, FUSED_MAX_HEAD_DIM_V, KernelChoice, OutputProjection};
pub use context::{AdapterOptions, DeviceLimits, GpuContext, enumerate_adapters};
#[cfg(feature = "cpu")]
pub use cpu::{AttentionShape, CpuAttention};
pub use error::{Error, Result, Shape};
pub use kernels::Autotune;
pub use operator::{
    AttentionOp, BackwardBindings, BackwardIo, BiasShape, CombineBindings, CombinePartials,
    DECODE_MAX_Q_LEN, KvCache, Lengths, OperatorBindings, OperatorConfig, OperatorGrads,
    OperatorInputs, OperatorIo, OperatorPath, QkvLayout,
};
pub use plan::{
    AttentionBindings, AttentionIo, AttentionPlan, LayerBackwardBindings, LayerBackwardIo,
    TimestampWrites,
};
pub use precision::Precision;
#[cfg(feature = "random")]
pub use random::Random;
pub use reference::Intermediates;
pub use stage::Stage;
pub use tensor::{Tensor, unravel};
pub use timing::{StageTime, StageTimes, TimingSource};
pub use weights::{AttentionInputs, AttentionWeights};

// The README's examples compile as doctests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
