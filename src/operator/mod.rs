//! The attention operator on an application's own Q, K and V: cross-attention (`q_len` other
//! than `kv_len`), grouped-query and multi-query attention (`kv_heads` dividing `heads`, no K/V
//! copies), causal masking aligned to the end of the keys, key padding, an additive bias, and
//! lengths that change per call up to the maxima the operator was built for.
//!
//! The layer ([`crate::AttentionPlan`]) runs the same core: its projection writes Q, K and V,
//! the core attends, its output projection reads the heads.
//!
//! # Kernels
//!
//! The core is the fused kernel (one pass, an online softmax, memory linear in the lengths) or
//! the staged kernels (scores, softmax, weighted sum through a score matrix
//! `[batch, heads, q_len, kv_len]` sized for the maxima, which can be read back with
//! [`OperatorConfig::with_intermediates`] and [`AttentionOp::read_probabilities`]; three
//! storage buffers per kernel, so they run on downlevel devices). [`OperatorConfig::with_kernel`]
//! picks; `Auto` takes the fused kernel unless it cannot run on the device or intermediates are
//! kept. Both compute the same function, checked against [`crate::reference::operator`].
//!
//! # Layouts
//!
//! With [`QkvLayout::HeadMajor`] (the default):
//! - Q `[batch, heads, q_len, head_dim]`
//! - K `[batch, kv_heads, kv_len, head_dim]`
//! - V `[batch, kv_heads, kv_len, head_dim_v]`
//! - out `[batch, heads, q_len, head_dim_v]`
//!
//! With [`QkvLayout::TokenMajor`], the layout projections produce: Q `[batch, q_len,
//! heads * head_dim]`, K `[batch, kv_len, kv_heads * head_dim]`, V `[batch, kv_len,
//! kv_heads * head_dim_v]`, out `[batch, q_len, heads * head_dim_v]`.
//!
//! Each call's tensors are packed at that call's lengths, from the start of their buffers (a
//! buffer sized for the maxima serves every call). The key mask is `[batch, kv_len]` u32,
//! nonzero = attend; the bias is f32 `[batch or 1, heads or 1, q_len, kv_len]`.
//!
//! # Causal masking
//!
//! Query `i` attends key `j` iff `j <= i + kv_len - q_len`: the queries are the LAST `q_len`
//! positions of the keys' sequence (FlashAttention-2's convention, the one a KV cache needs).
//! PyTorch's `is_causal=True` aligns to the top left instead when the lengths differ; the same
//! numbers come from
//! `F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(q_len, kv_len,
//! dtype=torch.bool).tril(kv_len - q_len), enable_gqa=True)`.
//! A query with no key to attend (all masked) gets zeros.

mod backward;
mod backward_host;
mod bind;
mod combine;
mod config;
mod core;
mod decode;
pub(crate) mod grad_kernels;
mod inputs;
mod kv_cache;
mod lengths;
mod memory;
mod run;
mod tune;

pub use backward::{BackwardBindings, BackwardIo, OperatorGrads};
pub use combine::{CombineBindings, CombinePartials};
pub use config::{BiasShape, DECODE_MAX_Q_LEN, Lengths, OperatorConfig, OperatorPath, QkvLayout};
pub use inputs::OperatorInputs;
pub use kv_cache::KvCache;

use self::core::LengthTable;
pub(crate) use core::{Core, StagedCore};

use bind::make_groups;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::KernelChoice;
use crate::context::GpuContext;
use crate::error::{Error, Result, Shape};
use crate::gpu::{STORAGE, buffer, check_storage, map_and_read, read_f32, scoped, scoped_async};
use crate::kernels::fused::MAX_HEAD_DIM_V;
use crate::kernels::{ChunkTable, Kernel, Piece, Pipeline, Work, fold_grid, pad4, submissions};
use crate::precision::Precision;
use crate::tensor::{Tensor, unravel};

/// The application's buffers for an [`AttentionOp`]; each needs `STORAGE` usage and room for
/// the operator's maximum lengths. Q, K and V are read as vec4, so their sizes must also be
/// rounded up to a multiple of 16 bytes.
#[derive(Debug, Clone, Copy)]
pub struct OperatorIo<'a> {
    /// Queries, in the configuration's precision (f32 or f16).
    pub q: &'a wgpu::Buffer,
    /// Keys, in the configuration's precision.
    pub k: &'a wgpu::Buffer,
    /// Values, in the configuration's precision.
    pub v: &'a wgpu::Buffer,
    /// Key-padding mask, u32 `[batch, kv_len]`, exactly when the configuration has one.
    pub key_mask: Option<&'a wgpu::Buffer>,
    /// Additive bias, f32, exactly when the configuration has one.
    pub bias: Option<&'a wgpu::Buffer>,
    /// Where the output goes, in the configuration's precision.
    pub out: &'a wgpu::Buffer,
}

/// A bind group tying an [`AttentionOp`] to one set of application buffers; made once by
/// [`AttentionOp::bind`], reused by every [`AttentionOp::encode`].
#[derive(Debug)]
pub struct OperatorBindings {
    op: u64,
    /// One per kernel of the prefill path, in dispatch order.
    groups: Vec<wgpu::BindGroup>,
    /// The split-K decode pass's and its combine's, where the operator has that path.
    decode: Option<[wgpu::BindGroup; 2]>,
}

/// The kernels an operator runs.
#[derive(Debug)]
enum Path {
    Fused(Core),
    Staged(StagedCore),
}

impl Path {
    /// The table of lengths the path's kernels, and split-K decode beside them, read.
    fn lengths(&self) -> &LengthTable {
        match self {
            Path::Fused(core) => &core.lengths,
            Path::Staged(core) => &core.lengths,
        }
    }
}

/// One step of a call: a kernel's dispatch (its index in the path and its work), or `None` for
/// the copy of the scores aside before the softmax (intermediates kept).
type CallStep = Option<(usize, Work)>;

/// The operator's own buffers, for [`AttentionOp::run`].
#[derive(Debug)]
struct OwnIo {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    key_mask: wgpu::Buffer,
    bias: wgpu::Buffer,
    out: wgpu::Buffer,
    staging: wgpu::Buffer,
    belt: wgpu::util::StagingBelt,
}

/// The attention operator on an application's Q, K and V, built once for an
/// [`OperatorConfig`]: every call of up to its maximum lengths then allocates and compiles
/// nothing.
///
/// ```no_run
/// use wgpu_attention::{AttentionOp, GpuContext, OperatorConfig, OperatorInputs, Tensor};
/// let ctx = GpuContext::from_env()?;
/// // 8 query heads over 2 key/value heads of width 64; up to 16 queries over 512 keys.
/// let config = OperatorConfig::new(1, 8, 2, 64, 16, 512).causal();
/// let mut op = AttentionOp::new(&ctx, &config)?;
/// let q = Tensor::zeros([1, 8, 4, 64]);
/// let (k, v) = (Tensor::zeros([1, 2, 300, 64]), Tensor::zeros([1, 2, 300, 64]));
/// let out = op.run(&OperatorInputs::new(q, k, v))?;
/// assert_eq!(out.shape(), &[1, 8, 4, 64]);
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Debug)]
pub struct AttentionOp {
    ctx: GpuContext,
    config: OperatorConfig,
    id: u64,
    path: Path,
    decode: Option<decode::DecodeCore>,
    chunks: ChunkTable,
    /// The lengths of the last [`AttentionOp::run`], for reading its probabilities back.
    last: Option<Lengths>,
    max_per_dim: u32,
    own: OwnIo,
    own_bindings: OperatorBindings,
    /// The backward's kernels and scratch, when built with gradients.
    backward: Option<backward::Backward>,
}

impl AttentionOp {
    /// Builds the operator: checks the configuration and every buffer size against the device,
    /// compiles (or reuses) the kernel and makes its parameters. Blocks until done.
    pub fn new(ctx: &GpuContext, config: &OperatorConfig) -> Result<Self> {
        let _device = ctx.kernels().exclusive();
        pollster::block_on(Self::new_async(ctx, config))
    }

    /// The async form of [`AttentionOp::new`], which never blocks (for the web).
    pub async fn new_async(ctx: &GpuContext, config: &OperatorConfig) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        config.validate()?;
        config.precision.check_device(ctx)?;
        let limits = ctx.limits();
        for (name, elements) in config.max_elements() {
            let bytes = elements * config.element_bytes(name);
            let what = format!("tensor `{name}` at the maximum lengths ({bytes} bytes)");
            for (limit, max) in [
                (
                    "max_storage_buffer_binding_size",
                    limits.max_storage_buffer_binding_size,
                ),
                ("max_buffer_size", limits.max_buffer_size),
                ("u32 indexing", u32::MAX as u64),
            ] {
                let requested = if limit == "u32 indexing" {
                    elements
                } else {
                    bytes
                };
                if requested > max {
                    return Err(Error::LimitExceeded {
                        limit,
                        max,
                        requested,
                        what: what.clone(),
                        hint: "; build the operator with smaller maximum lengths".into(),
                    });
                }
            }
        }
        let (max_q, max_kv) = (config.max_q_len as u32, config.max_kv_len as u32);
        let geometry = config.geometry();
        // What f16 cannot run anywhere is refused before what this device cannot.
        // The backward kernels are f32 only.
        if config.precision == Precision::F16 && config.gradients {
            return Err(Error::F16NeedsFused {
                why: "gradients were asked for, and the backward kernels store f32".into(),
            });
        }
        let chosen = choose_kernel(config, &limits)?;
        let path = match chosen {
            KernelChoice::Fused => Path::Fused(Core::new(ctx, geometry, 0, max_q, max_kv).await?),
            _ => Path::Staged(
                StagedCore::new(ctx, geometry, 0, max_q, max_kv, config.keep_intermediates).await?,
            ),
        };
        // Auto takes split-K only where the device allows its storage buffers (4, 5 with a
        // mask); asked for by name (SplitK, row lengths), it is refused by name there.
        let decode_fits = crate::kernels::Kernel::DecodeSplit {
            mask: config.key_padding_mask,
            precision: config.precision,
        }
        .storage_buffers()
            <= limits.max_storage_buffers_per_shader_stage;
        let decode = if config.has_decode()
            && (decode_fits || config.path == OperatorPath::SplitK || config.row_lengths)
        {
            let max_q = max_q.min(DECODE_MAX_Q_LEN as u32);
            Some(decode::DecodeCore::new(ctx, config, max_q, max_kv).await?)
        } else {
            None
        };
        // An operator with gradients runs the fused kernel for every call (see choose_kernel
        // and OperatorConfig::has_decode): its forward saves the logsumexp.
        let backward = if config.gradients {
            Some(backward::Backward::new(ctx, config).await?)
        } else {
            None
        };
        let device = ctx.device();
        let own = scoped_async(device, "creating the operator's buffers", || {
            let [q, k, v, out, mask, bias] = config.max_elements().map(|(name, n)| {
                let bytes = (n * config.element_bytes(name)).next_multiple_of(16);
                buffer(device, name, bytes, STORAGE)
            });
            let upload = [&q, &k, &v, &mask, &bias]
                .iter()
                .map(|b| b.size())
                .sum::<u64>();
            OwnIo {
                staging: buffer(
                    device,
                    "operator read-back",
                    out.size(),
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                ),
                belt: wgpu::util::StagingBelt::new(device.clone(), upload.next_multiple_of(256)),
                q,
                k,
                v,
                key_mask: mask,
                bias,
                out,
            }
        })
        .await?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let own_bindings = make_groups(
            device,
            id,
            &path,
            decode.as_ref(),
            None,
            OperatorIo {
                q: &own.q,
                k: &own.k,
                v: &own.v,
                key_mask: config.key_padding_mask.then_some(&own.key_mask),
                bias: config.bias.is_some().then_some(&own.bias),
                out: &own.out,
            },
            backward.as_ref().map(|b| b.own_lse()),
        )
        .await?;
        Ok(AttentionOp {
            ctx: ctx.clone(),
            config: config.clone(),
            id,
            path,
            decode,
            chunks: ctx.kernels().chunks().await?,
            last: None,
            max_per_dim: limits.max_compute_workgroups_per_dimension,
            own,
            own_bindings,
            backward,
        })
    }

    /// The configuration this operator runs.
    pub fn config(&self) -> &OperatorConfig {
        &self.config
    }

    /// The fused kernel's tiles this operator runs, as the autotune file writes them; `None`
    /// on the staged path.
    pub fn tiles(&self) -> Option<String> {
        match &self.path {
            Path::Fused(core) => Some(crate::kernels::tune::tiles_text(&core.tiles)),
            Path::Staged(_) => None,
        }
    }

    /// The shape class `config` tunes as, and the tiles the autotuner would time for it on
    /// `ctx` (the rule's first), in the autotune file's text: for tests that run each.
    #[doc(hidden)]
    pub fn tile_candidates(ctx: &GpuContext, config: &OperatorConfig) -> (String, Vec<String>) {
        let g = config.geometry();
        let (q, kv) = (config.max_q_len as u32, config.max_kv_len as u32);
        (
            tune::class(&g, q, kv).to_string(),
            tune::candidates(&g, q, kv, &ctx.limits())
                .iter()
                .map(crate::kernels::tune::tiles_text)
                .collect(),
        )
    }

    /// The kernels this operator runs: [`KernelChoice::Fused`] or [`KernelChoice::Staged`]
    /// (an `Auto` configuration resolved for this device).
    pub fn kernel(&self) -> KernelChoice {
        match self.path {
            Path::Fused(_) => KernelChoice::Fused,
            Path::Staged(_) => KernelChoice::Staged,
        }
    }

    /// The tables split-K decode's record reads.
    fn tables(&self) -> decode::Tables<'_> {
        decode::Tables {
            lengths: self.path.lengths(),
            chunks: &self.chunks,
            max_per_dim: self.max_per_dim,
        }
    }

    /// Whether a call of `q_len` queries runs split-K decode.
    fn uses_decode(&self, q_len: usize) -> bool {
        self.decode.is_some()
            && match self.config.path {
                OperatorPath::Auto => q_len <= DECODE_MAX_Q_LEN,
                OperatorPath::SplitK => true,
                OperatorPath::Prefill => false,
            }
    }

    /// The number of key ranges split-K decode cuts the keys into (`None` where the operator
    /// has no decode path: a bias, kept intermediates, or [`OperatorPath::Prefill`]).
    pub fn splits(&self) -> Option<usize> {
        self.decode.as_ref().map(|d| d.geometry.splits as usize)
    }

    /// Records one call into `encoder`: `lengths.q_len` queries over `lengths.kv_len` keys,
    /// each at most the configured maximum, reading and writing the buffers of `bindings`
    /// (tensors packed at these lengths). Allocates, writes and compiles nothing: the lengths
    /// are picked from a table made with the operator, so calls of different lengths may share
    /// one encoder.
    ///
    /// ```no_run
    /// # use wgpu_attention::*;
    /// # fn demo(device: wgpu::Device, queue: wgpu::Queue, q: wgpu::Buffer, k: wgpu::Buffer,
    /// #         v: wgpu::Buffer, out: wgpu::Buffer) -> Result<(), Error> {
    /// let ctx = GpuContext::from_device(device.clone(), queue.clone());
    /// // GQA as in Llama 3: 32 query heads over 8 key/value heads of width 128; up to 16 new
    /// // tokens over up to 4096 keys.
    /// let config = OperatorConfig::new(1, 32, 8, 128, 16, 4096).causal();
    /// let op = AttentionOp::new(&ctx, &config)?;
    /// let io = OperatorIo { q: &q, k: &k, v: &v, key_mask: None, bias: None, out: &out };
    /// let bindings = op.bind(io)?;
    /// let mut encoder = device.create_command_encoder(&Default::default());
    /// op.encode(&mut encoder, &bindings, Lengths { q_len: 1, kv_len: 1337 })?;
    /// queue.submit([encoder.finish()]);
    /// # Ok(()) }
    /// ```
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &OperatorBindings,
        lengths: Lengths,
    ) -> Result<()> {
        self.encode_with(encoder, bindings, lengths, None)
    }

    /// [`AttentionOp::encode`], with the one compute pass it records writing `timestamps`
    /// (the application's query set and indices), so that an application's own profiler times
    /// the operator: what `wgpu_profiler`'s `GpuProfilerQuery::compute_pass_timestamp_writes`
    /// gives can be handed over as it is. Needs a device created with
    /// `Features::TIMESTAMP_QUERY`; without it, giving timestamps is an error.
    ///
    /// ```no_run
    /// # use wgpu_attention::*;
    /// # fn demo(device: wgpu::Device, op: AttentionOp, bindings: OperatorBindings,
    /// #         queries: wgpu::QuerySet, resolve_buffer: wgpu::Buffer) -> Result<(), Error> {
    /// // `queries`: the application's timestamp query set; `resolve_buffer`: QUERY_RESOLVE.
    /// let mut encoder = device.create_command_encoder(&Default::default());
    /// let timestamps = wgpu::ComputePassTimestampWrites {
    ///     query_set: &queries,
    ///     beginning_of_pass_write_index: Some(0),
    ///     end_of_pass_write_index: Some(1),
    /// };
    /// let lengths = Lengths { q_len: 1, kv_len: 1337 };
    /// op.encode_with(&mut encoder, &bindings, lengths, Some(timestamps))?;
    /// encoder.resolve_query_set(&queries, 0..2, &resolve_buffer, 0);
    /// # Ok(()) }
    /// ```
    pub fn encode_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &OperatorBindings,
        lengths: Lengths,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        if bindings.op != self.id {
            return Err(Error::ForeignBindings);
        }
        self.config.check_lengths(lengths)?;
        // Checked here: wgpu would report it only as a validation error when the encoder is
        // finished, far from its cause.
        if timestamps.is_some() && !self.ctx.has_timestamps() {
            return Err(Error::InvalidConfig(
                "timestamp writes need a device created with Features::TIMESTAMP_QUERY, which \
                 this one was not (GpuContext::has_timestamps is false)"
                    .into(),
            ));
        }
        if self.uses_decode(lengths.q_len)
            && let (Some(decode), Some(groups)) = (&self.decode, &bindings.decode)
        {
            return decode.record(
                encoder,
                groups,
                self.tables(),
                (lengths.q_len as u32, lengths.kv_len as u32),
                timestamps,
            );
        }
        let steps = self.call_steps(lengths);
        let pieces = steps
            .iter()
            .enumerate()
            .map(|(step, s)| {
                Ok(Piece {
                    step,
                    grid: match s {
                        Some((_, w)) => {
                            fold_grid(w.workgroups, self.max_per_dim, "the attention operator")?
                        }
                        None => [0; 3],
                    },
                    chunks: 0..s.is_some() as u32,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.record(
            encoder,
            &bindings.groups,
            lengths,
            &steps,
            &pieces,
            timestamps,
        );
        Ok(())
    }

    /// The steps of a call of `lengths`.
    fn call_steps(&self, lengths: Lengths) -> Vec<CallStep> {
        let (q_len, kv_len) = (lengths.q_len as u32, lengths.kv_len as u32);
        match &self.path {
            Path::Fused(core) => vec![Some((
                0,
                Work {
                    workgroups: core.workgroups(q_len),
                    flops: core.geometry.flops(q_len, kv_len),
                },
            ))],
            Path::Staged(core) => {
                let workgroups = core.workgroups(q_len, kv_len);
                let flops = core.flops(q_len, kv_len);
                let mut steps: Vec<CallStep> = (0..3)
                    .map(|k| {
                        Some((
                            k,
                            Work {
                                workgroups: workgroups[k],
                                flops: flops[k],
                            },
                        ))
                    })
                    .collect();
                if core.keeps_scores() {
                    steps.insert(1, None);
                }
                steps
            }
        }
    }

    /// Records `pieces` of a call's `steps` (see `shaders/dispatch.wgsl` for chunks): runs of
    /// dispatches in one compute pass, split where the scores are copied aside.
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        groups: &[wgpu::BindGroup],
        lengths: Lengths,
        steps: &[CallStep],
        pieces: &[Piece],
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        let (q_len, kv_len) = (lengths.q_len as u32, lengths.kv_len as u32);
        let (pipelines, offsets) = match &self.path {
            Path::Fused(core) => (
                std::slice::from_ref(&core.pipeline),
                core.offsets(q_len, kv_len),
            ),
            Path::Staged(core) => (&core.pipelines[..], core.offsets(q_len, kv_len)),
        };
        // The application's timestamps go at the beginning of the first pass and the end of
        // the last (the staged path with intermediates has two, around the copy of scores).
        let is_copy = |p: &Piece| steps[p.step].is_none();
        let last_copy = pieces.iter().rposition(is_copy);
        let last_dispatch = pieces.iter().rposition(|p| !is_copy(p));
        let mut first = true;
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        for (i, piece) in pieces.iter().enumerate() {
            let Some((k, _)) = steps[piece.step] else {
                drop(pass.take());
                if let Path::Staged(core) = &self.path {
                    encoder.copy_buffer_to_buffer(
                        &core.scores,
                        0,
                        &core.probs,
                        0,
                        core.call_bytes(q_len, kv_len),
                    );
                }
                continue;
            };
            let pass = pass.get_or_insert_with(|| {
                let last = last_copy.is_none_or(|c| c < i || Some(c) > last_dispatch);
                let timestamp_writes =
                    timestamps
                        .as_ref()
                        .map(|t| wgpu::ComputePassTimestampWrites {
                            query_set: t.query_set,
                            beginning_of_pass_write_index: t
                                .beginning_of_pass_write_index
                                .filter(|_| first),
                            end_of_pass_write_index: t.end_of_pass_write_index.filter(|_| last),
                        });
                first = false;
                encoder
                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("attention operator"),
                        timestamp_writes,
                    })
                    .forget_lifetime()
            });
            pass.push_debug_group(STAGES[self.kernel_index(k)]);
            pass.set_pipeline(&pipelines[k].pipeline);
            pass.set_bind_group(0, &groups[k], &offsets);
            let [x, y, z] = piece.grid;
            for c in piece.chunks.clone() {
                pass.set_bind_group(1, &self.chunks.group, &[c * self.chunks.stride]);
                pass.dispatch_workgroups(x, y, z);
            }
            pass.pop_debug_group();
        }
    }

    /// Kernel `k` of the path as an index into [`STAGES`].
    fn kernel_index(&self, k: usize) -> usize {
        match self.path {
            Path::Fused(_) => 0,
            Path::Staged(_) => 1 + k,
        }
    }
}

/// The debug group of each kernel, as GPU captures show it.
const STAGES: [&str; 4] = [
    "fused attention",
    "attention scores",
    "attention softmax",
    "attention weighted sum",
];

/// Picks the kernels for `config` on a device with `limits`: as asked, or for `Auto` the fused
/// kernel unless intermediates are kept or it cannot run here. An explicit fused choice that
/// cannot run is refused by name.
fn choose_kernel(config: &OperatorConfig, limits: &wgpu::Limits) -> Result<KernelChoice> {
    let geometry = config.geometry();
    let fused_runs = || -> Result<()> {
        Kernel::Fused(geometry.io()).check_storage_buffers(
            limits,
            "; use the staged kernels (KernelChoice::Staged, or Auto), which bind at most 4",
        )?;
        geometry.tiles(config.max_q_len as u32, config.max_kv_len as u32, limits)?;
        Ok(())
    };
    if config.gradients {
        // The backward reads the logsumexp only the fused kernel's forward saves.
        if config.kernel == KernelChoice::Staged || config.keep_intermediates {
            return Err(Error::InvalidConfig(
                "gradients need the fused kernel, whose forward saves each row's logsumexp; \
                 the staged kernels (and kept intermediates) do not"
                    .into(),
            ));
        }
        fused_runs()?;
        return Ok(KernelChoice::Fused);
    }
    Ok(match config.kernel {
        KernelChoice::Fused => {
            fused_runs()?;
            KernelChoice::Fused
        }
        KernelChoice::Staged => KernelChoice::Staged,
        KernelChoice::Auto
            if config.keep_intermediates
                || pad4(geometry.head_dim_v) > MAX_HEAD_DIM_V
                || fused_runs().is_err() =>
        {
            KernelChoice::Staged
        }
        KernelChoice::Auto => KernelChoice::Fused,
    })
}
