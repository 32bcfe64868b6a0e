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
mod combine;
mod config;
mod core;
mod decode;
mod kv_cache;
mod lengths;
mod tune;

pub use backward::{BackwardBindings, BackwardIo, OperatorGrads};
pub use combine::{CombineBindings, CombinePartials};
pub use config::{
    BiasShape, DECODE_MAX_Q_LEN, Lengths, OperatorConfig, OperatorInputs, OperatorPath, QkvLayout,
};
pub use kv_cache::KvCache;

use self::core::LengthTable;
pub(crate) use core::{Core, StagedCore};

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
    /// Queries, f32.
    pub q: &'a wgpu::Buffer,
    /// Keys, f32.
    pub k: &'a wgpu::Buffer,
    /// Values, f32.
    pub v: &'a wgpu::Buffer,
    /// Key-padding mask, u32 `[batch, kv_len]`, exactly when the configuration has one.
    pub key_mask: Option<&'a wgpu::Buffer>,
    /// Additive bias, f32, exactly when the configuration has one.
    pub bias: Option<&'a wgpu::Buffer>,
    /// Where the output goes, f32.
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
        let chosen = choose_kernel(config, &limits)?;
        if config.precision == Precision::F16 && chosen == KernelChoice::Staged {
            return Err(Error::F16NeedsFused {
                why: if config.kernel == KernelChoice::Staged {
                    "the operator's staged kernels were chosen".into()
                } else {
                    "this operator needs its staged kernels (intermediates kept, value heads \
                     wider than the fused kernel takes, or a device it does not fit)"
                        .into()
                },
            });
        }
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
        }
        .storage_buffers()
            <= limits.max_storage_buffers_per_shader_stage;
        // The backward kernels are f32 only.
        if config.precision == Precision::F16 && config.gradients {
            return Err(Error::F16NeedsFused {
                why: "gradients were asked for, and the backward kernels store f32".into(),
            });
        }
        // Split-K decode stores f32 only: f16 calls of any length run the fused kernel, and
        // asking for split-K in f16 is refused by name.
        if config.precision == Precision::F16
            && (config.path == OperatorPath::SplitK || config.row_lengths)
        {
            return Err(Error::F16NeedsFused {
                why: "split-K decode was asked for (OperatorPath::SplitK or per-row lengths), \
                      and its kernels store f32"
                    .into(),
            });
        }
        let decode = if config.has_decode()
            && config.precision == Precision::F32
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

    /// Makes the bind group that ties this operator to an application's buffers, checking
    /// each (usage, size for the maximum lengths). Call once per set of buffers and keep it.
    pub fn bind(&self, io: OperatorIo<'_>) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        pollster::block_on(self.bind_async(io))
    }

    /// The async form of [`AttentionOp::bind`].
    pub async fn bind_async(&self, io: OperatorIo<'_>) -> Result<OperatorBindings> {
        self.bind_checked(io, None).await
    }

    /// [`AttentionOp::bind`] for an operator built with gradients
    /// ([`OperatorConfig::with_gradients`]), whose forward also writes each query row's
    /// logsumexp to `lse` (f32 `[batch, heads, q_len]`, `STORAGE` usage; see
    /// [`AttentionOp::encode_backward`] for its units), which the backward reads.
    pub fn bind_with_lse(
        &self,
        io: OperatorIo<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        pollster::block_on(self.bind_checked(io, Some(lse)))
    }

    /// The async form of [`AttentionOp::bind_with_lse`].
    pub async fn bind_with_lse_async(
        &self,
        io: OperatorIo<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        self.bind_checked(io, Some(lse)).await
    }

    async fn bind_checked(
        &self,
        io: OperatorIo<'_>,
        lse: Option<&wgpu::Buffer>,
    ) -> Result<OperatorBindings> {
        let rows = (self.config.batch * self.config.heads * self.config.max_q_len) as u64;
        match (self.config.gradients, lse) {
            (true, Some(b)) => check_storage("lse", b, rows * 4, " (the maximum lengths)")?,
            (true, None) => {
                return Err(Error::BadBuffer {
                    name: "lse",
                    problem: "the operator was built with gradients, so its forward saves each \
                              row's logsumexp: bind with bind_with_lse"
                        .into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::BadBuffer {
                    name: "lse",
                    problem: "given, but the operator was built without gradients \
                              (OperatorConfig::with_gradients)"
                        .into(),
                });
            }
            (false, None) => {}
        }
        if self.config.row_lengths {
            return Err(Error::BadBuffer {
                name: "row_lengths",
                problem: "the configuration has per-row lengths: bind a KvCache with \
                          AttentionOp::bind_cache"
                    .into(),
            });
        }
        self.check_io(io)?;
        make_groups(
            self.ctx.device(),
            self.id,
            &self.path,
            self.decode.as_ref(),
            None,
            io,
            lse,
        )
        .await
    }

    /// Makes the bind group that ties this operator to a [`KvCache`] (its K, V and, with
    /// [`OperatorConfig::with_row_lengths`], its per-row lengths) and the application's query
    /// and output buffers. The cache must match the configuration: batch, kv heads, head
    /// widths, head-major, and a capacity equal to the configuration's `kv_capacity`.
    pub fn bind_cache(
        &self,
        q: &wgpu::Buffer,
        cache: &KvCache,
        out: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        let c = &self.config;
        let wanted = [
            ("batch", c.batch, cache.batch()),
            ("kv_heads", c.kv_heads, cache.kv_heads()),
            ("head_dim", c.head_dim, cache.head_dim()),
            ("head_dim_v", c.head_dim_v, cache.head_dim_v()),
            ("kv_capacity", c.kv_capacity.unwrap_or(0), cache.capacity()),
        ];
        for (what, config, given) in wanted {
            if config != given {
                return Err(Error::InvalidConfig(format!(
                    "the KV cache has {what} {given}, the operator {config} (build the operator \
                     with the cache's shape: KvCache::operator_config)"
                )));
            }
        }
        if c.layout != QkvLayout::HeadMajor {
            return Err(Error::InvalidConfig(
                "a KvCache is head-major; the operator is token-major".into(),
            ));
        }
        let io = OperatorIo {
            q,
            k: cache.k(),
            v: cache.v(),
            key_mask: None,
            bias: None,
            out,
        };
        if c.key_padding_mask || c.bias.is_some() {
            return Err(Error::InvalidConfig(
                "bind_cache binds no key mask or bias; use bind with the cache's buffers".into(),
            ));
        }
        self.check_io(io)?;
        let row_lengths = c.row_lengths.then(|| cache.row_lengths());
        pollster::block_on(make_groups(
            self.ctx.device(),
            self.id,
            &self.path,
            self.decode.as_ref(),
            row_lengths,
            io,
            None,
        ))
    }

    /// Checks each of an application's buffers (usage, size for the maximum lengths).
    fn check_io(&self, io: OperatorIo<'_>) -> Result<()> {
        let [q, k, v, out, mask, bias] = self.config.max_elements();
        // Q, K and V are read as vec4: their last elements need a whole vec4 to lie in.
        let e = self.config.precision.bytes();
        let sized_for = match self.config.precision {
            Precision::F32 => " (the maximum lengths)",
            Precision::F16 => " (the maximum lengths, f16 elements)",
        };
        for ((name, elements), buffer) in [(q, io.q), (k, io.k), (v, io.v)] {
            check_storage(
                name,
                buffer,
                (elements * e).next_multiple_of(4 * e),
                sized_for,
            )?;
        }
        check_storage(out.0, io.out, (out.1 * e).next_multiple_of(4), sized_for)?;
        for ((name, elements), wanted, given) in [
            (mask, self.config.key_padding_mask, io.key_mask),
            (bias, self.config.bias.is_some(), io.bias),
        ] {
            match (wanted, given) {
                (true, Some(b)) => check_storage(name, b, elements * 4, " (the maximum lengths)")?,
                (true, None) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "the configuration has one but no buffer was given".into(),
                    });
                }
                (false, Some(_)) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "given, but the configuration has none".into(),
                    });
                }
                (false, None) => {}
            }
        }
        Ok(())
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

    /// Uploads `inputs` (in the configuration's layout, lengths read from their shapes), runs
    /// the operator and reads the output back, blocking until the GPU is done. For tests and
    /// tools; an application records [`AttentionOp::encode`] on its own buffers.
    ///
    /// A large call runs as several submissions of about 0.1 s of work each at the rate the
    /// device showed before, each waited for (see `shaders/dispatch.wgsl` for why).
    pub fn run(&mut self, inputs: &OperatorInputs) -> Result<Tensor> {
        let budget = self.ctx.kernels().submission_budget();
        self.run_within(inputs, budget)
    }

    /// [`AttentionOp::run`] with submissions of at most about `budget` FLOPs each; for tests
    /// of the split.
    #[doc(hidden)]
    pub fn run_within(&mut self, inputs: &OperatorInputs, budget: f64) -> Result<Tensor> {
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        let start = std::time::Instant::now();
        if self.config.row_lengths {
            return Err(Error::InvalidConfig(
                "`run` has no per-row lengths: bind a KvCache with bind_cache and record encode"
                    .into(),
            ));
        }
        let lengths = inputs.validate(&self.config)?;
        let p = self.config.precision;
        if p == Precision::F16 {
            for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
                crate::precision::check_f16_range(name, t.shape(), t.data())?;
            }
        }
        let out_elements = self
            .config
            .output_shape(lengths.q_len)
            .iter()
            .product::<usize>();
        // Copies move whole 4-byte words: an odd number of f16 outputs takes one more.
        let out_bytes = (out_elements as u64 * p.bytes()).next_multiple_of(4);
        let steps = self.call_steps(lengths);
        let work: Vec<Option<Work>> = steps.iter().map(|s| s.map(|(_, w)| w)).collect();
        let flops: f64 = work.iter().flatten().map(|w| w.flops).sum();
        let subs = submissions(&work, 0..work.len(), budget, self.max_per_dim)?;
        let (device, queue) = (self.ctx.device().clone(), self.ctx.queue().clone());
        // Split-K decode reads K and V once and is short: one submission.
        let decode = self.uses_decode(lengths.q_len);
        let (q_len, kv_len) = (lengths.q_len as u32, lengths.kv_len as u32);
        let last_sub = if decode { 0 } else { subs.len() - 1 };
        for (n, pieces) in subs.iter().enumerate().take(last_sub + 1) {
            let last = n == last_sub;
            scoped(&device, "running the attention operator", || {
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("attention operator"),
                });
                if n == 0 {
                    self.upload(&mut encoder, inputs);
                }
                if decode && let (Some(d), Some(groups)) = (&self.decode, &self.own_bindings.decode)
                {
                    d.record(&mut encoder, groups, self.tables(), (q_len, kv_len), None)?;
                } else {
                    self.record(
                        &mut encoder,
                        &self.own_bindings.groups,
                        lengths,
                        &steps,
                        pieces,
                        None,
                    );
                }
                if last {
                    encoder.copy_buffer_to_buffer(
                        &self.own.out,
                        0,
                        &self.own.staging,
                        0,
                        out_bytes,
                    );
                }
                queue.submit([encoder.finish()]);
                if n == 0 {
                    self.own.belt.recall();
                }
                Ok::<(), Error>(())
            })??;
            if !last {
                device.poll(wgpu::PollType::wait_indefinitely())?;
            }
        }
        self.last = Some(lengths);
        let mut data = map_and_read(&device, &self.own.staging, |bytes| {
            p.decode(&bytes[..out_bytes as usize])
        })?;
        data.truncate(out_elements);
        self.ctx
            .kernels()
            .measured(flops, start.elapsed().as_secs_f64());
        let shape = self.config.output_shape(lengths.q_len);
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                index: Shape(unravel(&shape, at)),
                value: data[at],
                hint: match p {
                    Precision::F32 => {
                        "a score, bias or product passed f32's range (3.4e38): scale the \
                         inputs down"
                    }
                    Precision::F16 => {
                        "the output passed f16's range (65504; scores and sums are f32): \
                         scale V down, or use f32 precision"
                    }
                }
                .into(),
            });
        }
        Tensor::new(shape, data)
    }
}

impl AttentionOp {
    /// The probabilities of the last [`AttentionOp::run`], `[batch, heads, q_len, kv_len]`:
    /// each query's softmax over the keys, 0 where a key is masked and a row of zeros where
    /// none is left (as [`crate::reference::operator_probs`]). Needs
    /// [`OperatorConfig::with_intermediates`], which runs the staged kernels. Allocates a
    /// read-back buffer: for tests and teaching, not hot loops.
    pub fn read_probabilities(&self) -> Result<Tensor> {
        let Path::Staged(core) = &self.path else {
            return Err(Error::InvalidConfig(
                "the fused kernel stores no probabilities: build the operator with \
                 OperatorConfig::with_intermediates()"
                    .into(),
            ));
        };
        if !self.config.keep_intermediates {
            return Err(Error::InvalidConfig(
                "probabilities were not kept: build the operator with \
                 OperatorConfig::with_intermediates()"
                    .into(),
            ));
        }
        let Some(lengths) = self.last else {
            return Err(Error::InvalidConfig(
                "no call has run yet: read the probabilities after AttentionOp::run".into(),
            ));
        };
        let _device = self.ctx.kernels().exclusive();
        let all = read_f32(self.ctx.device(), self.ctx.queue(), &core.probs)?;
        let (q_len, kv_len) = (lengths.q_len, lengths.kv_len);
        let kvp = pad4(kv_len as u32) as usize;
        let rows = self.config.batch * self.config.heads * q_len;
        let data = all
            .chunks_exact(kvp)
            .take(rows)
            .flat_map(|row| &row[..kv_len])
            .copied()
            .collect();
        Tensor::new([self.config.batch, self.config.heads, q_len, kv_len], data)
    }

    /// Records the upload of `inputs` (checked) into the operator's own buffers through its
    /// staging belt; the caller recalls the belt after submitting.
    fn upload(&mut self, encoder: &mut wgpu::CommandEncoder, inputs: &OperatorInputs) {
        let mask_words: Option<Vec<u32>> = inputs
            .key_mask
            .as_ref()
            .map(|m| m.data().iter().map(|&x| (x != 0.0) as u32).collect());
        let p = self.config.precision;
        // K and V in blocks of kv_len token rows (a head, head-major; a batch row,
        // token-major), packed, or with a capacity each at its place in the cache.
        let kv = inputs.k.shape()[if self.config.layout == QkvLayout::HeadMajor {
            2
        } else {
            1
        }];
        let rows = self.config.kv_capacity.unwrap_or(kv);
        // Q, K and V as stored: f32 as they are; f16 as whole images of the buffers (an f16
        // block need not fill whole 4-byte words, the unit of a copy), K and V at their places.
        let image = |t: &Tensor, placed: bool| -> Vec<u8> {
            let width = t.shape().last().copied().unwrap_or(0);
            let (block, stride) = if placed {
                ((kv * width).max(1), rows * width)
            } else {
                (t.data().len().max(1), t.data().len().max(1))
            };
            let blocks = t.data().len().div_ceil(block);
            let mut out = vec![0u8; (blocks * stride * 2).next_multiple_of(4)];
            for (n, src) in t.data().chunks(block).enumerate() {
                for (i, &x) in src.iter().enumerate() {
                    let at = 2 * (n * stride + i);
                    out[at..at + 2].copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            }
            out
        };
        let halves = (p == Precision::F16).then(|| {
            [
                image(&inputs.q, false),
                image(&inputs.k, true),
                image(&inputs.v, true),
            ]
        });
        let own = &mut self.own;
        let q: &[u8] = match &halves {
            Some([q, _, _]) => q,
            None => bytemuck::cast_slice(inputs.q.data()),
        };
        let mut uploads: Vec<(&wgpu::Buffer, u64, Option<&[u8]>)> = vec![
            (&own.q, 0, Some(q)),
            (
                &own.key_mask,
                0,
                mask_words.as_deref().map(bytemuck::cast_slice),
            ),
            (
                &own.bias,
                0,
                inputs.bias.as_ref().map(|b| bytemuck::cast_slice(b.data())),
            ),
        ];
        match &halves {
            Some([_, k, v]) => {
                uploads.push((&own.k, 0, Some(k)));
                uploads.push((&own.v, 0, Some(v)));
            }
            None => {
                for (target, t) in [(&own.k, &inputs.k), (&own.v, &inputs.v)] {
                    let width = t.shape().last().copied().unwrap_or(0);
                    let block = kv * width;
                    for (n, src) in t.data().chunks_exact(block.max(1)).enumerate() {
                        let at = (n * rows * width * 4) as u64;
                        uploads.push((target, at, Some(bytemuck::cast_slice(src))));
                    }
                }
            }
        }
        for (target, at, bytes) in uploads {
            if let Some(bytes) = bytes
                && let Some(size) = wgpu::BufferSize::new(bytes.len() as u64)
            {
                own.belt
                    .write_buffer(encoder, target, at, size)
                    .copy_from_slice(bytes);
            }
        }
        own.belt.finish();
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

/// A bind group per kernel of `path` on `io`.
async fn make_groups(
    device: &wgpu::Device,
    op: u64,
    path: &Path,
    decode: Option<&decode::DecodeCore>,
    row_lengths: Option<&wgpu::Buffer>,
    io: OperatorIo<'_>,
    lse: Option<&wgpu::Buffer>,
) -> Result<OperatorBindings> {
    let (groups, decode) = scoped_async(device, "binding the operator's buffers", || {
        let decode = decode.map(|d| {
            d.groups(
                device,
                path.lengths(),
                [io.q, io.k, io.v, io.out],
                io.key_mask,
                row_lengths,
            )
        });
        // Each buffer at its binding in the pipeline's group 0, then the two lengths.
        let group = |pipeline: &Pipeline, buffers: &[&wgpu::Buffer], lengths: &LengthTable| {
            let resources = buffers
                .iter()
                .map(|b| b.as_entire_binding())
                .chain([lengths.binding(), lengths.binding()]);
            let entries: Vec<wgpu::BindGroupEntry> = pipeline
                .kernel
                .group0()
                .into_iter()
                .zip(resources)
                .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("attention operator"),
                layout: &pipeline.layout,
                entries: &entries,
            })
        };
        let groups = match path {
            Path::Fused(core) => {
                // The variant binds a mask and a bias only when the operator has them (`bind`
                // checked that the buffers match the configuration).
                let buffers: Vec<&wgpu::Buffer> = [&core.params, io.q, io.k, io.v]
                    .into_iter()
                    .chain(io.key_mask)
                    .chain(io.bias)
                    .chain([io.out])
                    .chain(lse)
                    .collect();
                vec![group(&core.pipeline, &buffers, &core.lengths)]
            }
            Path::Staged(core) => {
                let [scores, softmax, sum] = &core.pipelines;
                vec![
                    group(
                        scores,
                        &[&core.params, io.q, io.k, &core.scores],
                        &core.lengths,
                    ),
                    group(
                        softmax,
                        &[
                            &core.params,
                            io.key_mask.unwrap_or(&core.absent),
                            io.bias.unwrap_or(&core.absent),
                            &core.probs,
                        ],
                        &core.lengths,
                    ),
                    group(
                        sum,
                        &[&core.params, &core.probs, io.v, io.out],
                        &core.lengths,
                    ),
                ]
            }
        };
        (groups, decode)
    })
    .await?;
    Ok(OperatorBindings { op, groups, decode })
}
