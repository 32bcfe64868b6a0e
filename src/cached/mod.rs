//! A self-attention layer with a KV cache, for generating: prefill a prompt, then decode token
//! by token, one object serving every step.
//!
//! A step of `n` new tokens records, into the caller's encoder:
//! 1. the projection of the new tokens' `x`: Q into a scratch buffer, and K and V **straight
//!    into the cache** at each batch row's current length (`shaders/gemm.wgsl` with
//!    `shaders/gemm_rows_cache.wgsl`, which reads the lengths from the cache's uniform table on
//!    the GPU: nothing passes through the host);
//! 2. the advance of the cache's lengths (copies from a table, as [`KvCache`] appends do);
//! 3. the attention operator on the cache: split-K decode for steps of at most
//!    [`crate::DECODE_MAX_Q_LEN`] tokens (batch rows may hold different lengths), the prefill
//!    kernels for longer steps (rows of one length);
//! 4. the output projection, if the layer has one, reading the operator's head-major output as
//!    the concatenated heads.
//!
//! Every pipeline, buffer and bind group is made when the layer is built (and by
//! [`CachedAttention::bind`]); a step's size picks its parameters from tables made then, so a
//! step writes, allocates and compiles nothing.
//!
//! Storage is f32 or f16 ([`CachedLayerConfig::with_precision`]): with f16, x, the weights, Q,
//! the cache and the output hold f16 values (the arithmetic stays f32), so a decoding step reads
//! half the bytes of cache.

mod config;
mod host;
mod projection;

pub use config::CachedLayerConfig;

use std::sync::atomic::{AtomicU64, Ordering};

use host::OwnIo;
use projection::{Projection, scratch};

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{buffer, check_storage, scoped, scoped_async};
use crate::kernels::gemm::{Load, Store};
use crate::kernels::{ChunkTable, pad4};
use crate::operator::{
    AttentionOp, DECODE_MAX_Q_LEN, KvCache, Lengths, OperatorBindings, OperatorConfig, OperatorIo,
    OperatorPath,
};
use crate::precision::Precision;
use crate::weights::AttentionWeights;

/// The application's buffers for a cached layer's steps; each needs `STORAGE` usage and room
/// for the layer's largest step (a step's tensors are packed at its own size, from the start).
/// Their elements are of the layer's precision ([`CachedLayerConfig::precision`]): f32, or
/// f16 (two bytes each).
#[derive(Debug, Clone, Copy)]
pub struct CachedIo<'a> {
    /// The new tokens, `[batch, n, d_model]`.
    pub x: &'a wgpu::Buffer,
    /// Where the step's output goes, in [`CachedLayerConfig::output_shape`].
    pub output: &'a wgpu::Buffer,
}

/// Bind groups tying a [`CachedAttention`] to one [`CachedIo`]; made once by
/// [`CachedAttention::bind`], reused by every step.
#[derive(Debug)]
pub struct CachedBindings {
    layer: u64,
    /// Q, K and V's projections.
    projections: [wgpu::BindGroup; 3],
    output: Option<wgpu::BindGroup>,
    decode: OperatorBindings,
    prefill: Option<OperatorBindings>,
}

/// A self-attention layer with its KV cache (see the [module documentation](self)): each step
/// projects its new tokens, writes their keys and values into the cache, attends everything the
/// cache holds and projects the heads out.
///
/// ```no_run
/// use wgpu_attention::{AttentionWeights, CachedAttention, CachedLayerConfig, GpuContext, Tensor};
/// let ctx = GpuContext::from_env()?;
/// // 4 query heads over 2 kv heads of 8, tokens 32 wide, 128 tokens of context, steps of up
/// // to 32 tokens.
/// let config = CachedLayerConfig::new(1, 32, 4, 2, 8, 128, 32).with_output_projection(32);
/// let weights = AttentionWeights::new(
///     Tensor::zeros([32, 32]),
///     Tensor::zeros([32, 16]),
///     Tensor::zeros([32, 16]),
/// )
/// .with_output_projection(Tensor::zeros([32, 32]), None);
/// let mut layer = CachedAttention::new(&ctx, &config, &weights)?;
/// let prompt = layer.step(&Tensor::zeros([1, 20, 32]))?; // prefill: [1, 20, 32]
/// let next = layer.step(&Tensor::zeros([1, 1, 32]))?; // one token: [1, 1, 32]
/// assert_eq!(layer.cache().lens(), [21]);
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Debug)]
pub struct CachedAttention {
    ctx: GpuContext,
    config: CachedLayerConfig,
    id: u64,
    cache: KvCache,
    /// Q, K and V.
    projections: [Projection; 3],
    output: Option<Projection>,
    /// Split-K decode on the cache, each row's length its own.
    decode: AttentionOp,
    /// The prefill kernels on the cache, for steps longer than decode takes.
    prefill: Option<AttentionOp>,
    /// Q of the step's tokens, `[batch, heads, n, head_dim]`.
    q: wgpu::Buffer,
    /// The attention's heads `[batch, heads, n, head_dim_v]`, when a projection follows.
    heads: Option<wgpu::Buffer>,
    chunks: ChunkTable,
    own: OwnIo,
    own_bindings: Option<CachedBindings>,
}

impl CachedAttention {
    /// Builds the layer and its empty cache: checks `config` and `weights`, uploads the
    /// weights, compiles (or reuses) every pipeline and makes the tables of every step size.
    /// Blocks until done.
    ///
    /// With [`crate::Precision::F16`] storage a device without shader-f16 is
    /// [`Error::NoShaderF16`] (no emulation), an odd head width is the f16 cache's
    /// [`Error::InvalidConfig`], and a weight past f16's range is [`Error::OutsideF16Range`]
    /// naming the tensor and the index.
    pub fn new(
        ctx: &GpuContext,
        config: &CachedLayerConfig,
        weights: &AttentionWeights,
    ) -> Result<Self> {
        let mut layer = {
            let _device = ctx.kernels().exclusive();
            pollster::block_on(Self::build(ctx, config, weights))?
        };
        // Bound outside the device lock, which the operator's binding takes itself.
        let own = layer.bind(CachedIo {
            x: &layer.own.x,
            output: &layer.own.output,
        })?;
        layer.own_bindings = Some(own);
        Ok(layer)
    }

    async fn build(
        ctx: &GpuContext,
        config: &CachedLayerConfig,
        weights: &AttentionWeights,
    ) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        config.check_weights(weights)?;
        let c = config;
        let p = c.precision;
        p.check_device(ctx)?;
        // Rounded once here, so a value past f16's range is named before anything is built.
        let rounded = weights.rounded_to(p)?;
        let cache = KvCache::with_precision(
            ctx,
            p,
            c.batch,
            c.kv_heads,
            c.head_dim,
            c.head_dim_v,
            c.capacity,
        )?;
        let (d, dv) = (c.head_dim as u32, c.head_dim_v as u32);
        let (dp, dvp) = (pad4(d), pad4(dv));
        let (heads, kv_heads) = (c.heads as u32, c.kv_heads as u32);
        let capacity = c.capacity as u32;
        let q_shape = |n| {
            let store = Store::Heads {
                seq: n,
                heads,
                width: dp,
                stored: d,
                seq_stride: n,
            };
            (Load::RowMajor, store)
        };
        let kv_shape = |width, stored| {
            move |n| {
                let store = Store::Heads {
                    seq: n,
                    heads: kv_heads,
                    width,
                    stored,
                    seq_stride: capacity,
                };
                (Load::RowMajor, store)
            }
        };
        let (k_shape, v_shape) = (kv_shape(dp, d), kv_shape(dvp, dv));
        let w = &rounded;
        let (b, step) = (c.batch, c.max_step);
        let projections = [
            Projection::new(
                ctx,
                "w_q",
                &w.w_q,
                w.b_q.as_ref(),
                c.head_dim,
                b,
                step,
                false,
                p,
                &q_shape,
            )
            .await?,
            Projection::new(
                ctx,
                "w_k",
                &w.w_k,
                w.b_k.as_ref(),
                c.head_dim,
                b,
                step,
                true,
                p,
                &k_shape,
            )
            .await?,
            Projection::new(
                ctx,
                "w_v",
                &w.w_v,
                w.b_v.as_ref(),
                c.head_dim_v,
                b,
                step,
                true,
                p,
                &v_shape,
            )
            .await?,
        ];
        let output = match (&w.w_o, c.d_out) {
            (Some(w_o), Some(d_out)) => {
                let o_shape = |n| {
                    let load = Load::HeadMajor {
                        seq: n,
                        heads,
                        width: dv,
                    };
                    let d_out = d_out as u32;
                    let store = Store::RowMajor {
                        ldc: d_out,
                        n_store: d_out,
                    };
                    (load, store)
                };
                Some(
                    Projection::new(
                        ctx,
                        "w_o",
                        w_o,
                        w.b_o.as_ref(),
                        d_out,
                        b,
                        step,
                        false,
                        p,
                        &o_shape,
                    )
                    .await?,
                )
            }
            _ => None,
        };
        let with_scale = |o: OperatorConfig| {
            let o = o.with_scale(c.scale_value());
            if c.causal { o.causal() } else { o }
        };
        let decode = AttentionOp::new_async(
            ctx,
            &with_scale(cache.operator_config(c.heads, step.min(DECODE_MAX_Q_LEN))),
        )
        .await?;
        let prefill = if step > DECODE_MAX_Q_LEN {
            let o = OperatorConfig::new(c.batch, c.heads, c.kv_heads, c.head_dim, step, c.capacity)
                .with_head_dim_v(c.head_dim_v)
                .with_kv_capacity(c.capacity)
                .with_precision(p)
                .with_path(OperatorPath::Prefill);
            Some(AttentionOp::new_async(ctx, &with_scale(o)).await?)
        } else {
            None
        };
        let device = ctx.device();
        let rows = c.batch * step;
        let out_elements = c.output_shape(step).iter().product();
        let (q, heads_buf, own) =
            scoped_async(device, "creating the cached layer's buffers", || {
                let output = scratch(device, "cached layer output", out_elements, p);
                let x = scratch(device, "cached layer x", rows * c.d_model, p);
                (
                    scratch(device, "cached layer q", rows * c.heads * c.head_dim, p),
                    c.d_out.map(|_| {
                        scratch(
                            device,
                            "cached layer heads",
                            rows * c.heads * c.head_dim_v,
                            p,
                        )
                    }),
                    OwnIo {
                        staging: buffer(
                            device,
                            "cached layer read-back",
                            output.size(),
                            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        ),
                        belt: wgpu::util::StagingBelt::new(
                            device.clone(),
                            x.size().next_multiple_of(256),
                        ),
                        x,
                        output,
                    },
                )
            })
            .await?;
        Ok(CachedAttention {
            ctx: ctx.clone(),
            config: config.clone(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cache,
            projections,
            output,
            decode,
            prefill,
            q,
            heads: heads_buf,
            chunks: ctx.kernels().chunks().await?,
            own,
            own_bindings: None,
        })
    }

    /// The configuration this layer runs.
    pub fn config(&self) -> &CachedLayerConfig {
        &self.config
    }

    /// The layer's KV cache: each row's length ([`KvCache::lens`]), its buffers.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The cache, to set its lengths ([`KvCache::set_lengths`]: a new sequence, a rewind) or
    /// append keys and values made elsewhere. The layer keeps its bindings: they hold the
    /// cache's buffers, which never change.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The number of key ranges split-K decode cuts the keys into.
    pub fn splits(&self) -> Option<usize> {
        self.decode.splits()
    }

    /// Makes the bind groups that tie the layer to an application's buffers, checking each
    /// (usage, size for the largest step). Call once per set of buffers and keep the result.
    pub fn bind(&self, io: CachedIo<'_>) -> Result<CachedBindings> {
        let c = &self.config;
        let rows = (c.batch * c.max_step) as u64;
        let out_elements = self
            .config
            .output_shape(c.max_step)
            .iter()
            .product::<usize>();
        let (e, sized_for) = match c.precision {
            Precision::F32 => (4, " (the largest step)"),
            Precision::F16 => (2, " (the largest step, f16 elements)"),
        };
        check_storage("x", io.x, rows * c.d_model as u64 * e, sized_for)?;
        check_storage("output", io.output, out_elements as u64 * e, sized_for)?;
        // The operator writes the heads where the output projection reads them, or, without
        // one, straight into the output.
        let heads = self.heads.as_ref().unwrap_or(io.output);
        let decode = self.decode.bind_cache(&self.q, &self.cache, heads)?;
        let prefill = match &self.prefill {
            Some(op) => Some(op.bind(OperatorIo {
                q: &self.q,
                k: self.cache.k(),
                v: self.cache.v(),
                key_mask: None,
                bias: None,
                out: heads,
            })?),
            None => None,
        };
        let device = self.ctx.device();
        let [pq, pk, pv] = &self.projections;
        let rows = Some(self.cache.row_lengths());
        let (projections, output) = scoped(device, "binding the cached layer's buffers", || {
            (
                [
                    pq.bind(device, io.x, &self.q, None),
                    pk.bind(device, io.x, self.cache.k(), rows),
                    pv.bind(device, io.x, self.cache.v(), rows),
                ],
                self.output
                    .as_ref()
                    .map(|o| o.bind(device, heads, io.output, None)),
            )
        })?;
        Ok(CachedBindings {
            layer: self.id,
            projections,
            output,
            decode,
            prefill,
        })
    }

    /// Records one step of `n` new tokens (read from the bound `x`, packed `[batch, n,
    /// d_model]`) into `encoder`: the projections (K and V into the cache at each row's
    /// length), the attention over each row's tokens, the output projection into the bound
    /// output. Advances the cache's lengths by `n`. Allocates, writes and compiles nothing.
    ///
    /// Errors, before anything is recorded: `n` is 0 or past `max_step`, a row would pass the
    /// cache's capacity ([`Error::KvCacheFull`]), or a step longer than
    /// [`crate::DECODE_MAX_Q_LEN`] over rows of different lengths.
    ///
    /// ```no_run
    /// # use wgpu_attention::*;
    /// # fn demo(ctx: &GpuContext, weights: &AttentionWeights, x: &wgpu::Buffer,
    /// #         out: &wgpu::Buffer) -> Result<(), Error> {
    /// // 32 query heads over 8 key/value heads of 128 (w_k, w_v: [4096, 8 * 128]), 4096 tokens
    /// // of context, prompts in steps of up to 512 tokens, an output projection to 4096.
    /// let config = CachedLayerConfig::new(1, 4096, 32, 8, 128, 4096, 512)
    ///     .with_output_projection(4096);
    /// let mut layer = CachedAttention::new(ctx, &config, weights)?;
    /// let bindings = layer.bind(CachedIo { x, output: out })?;
    /// // The prompt (x holds its 300 tokens), then a token a step (x holds the new one).
    /// for n in std::iter::once(300).chain(std::iter::repeat_n(1, 64)) {
    ///     let mut encoder = ctx.device().create_command_encoder(&Default::default());
    ///     layer.encode_step(&mut encoder, &bindings, n)?;
    ///     ctx.queue().submit([encoder.finish()]);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn encode_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &CachedBindings,
        n: usize,
    ) -> Result<()> {
        if bindings.layer != self.id {
            return Err(Error::ForeignBindings);
        }
        let prefill = match self.check_step(n)? {
            Some(kv_len) => match (&self.prefill, &bindings.prefill) {
                (Some(op), Some(b)) => Some((op, b, kv_len)),
                _ => unreachable!("a layer with steps past decode's has the prefill kernels"),
            },
            None => None,
        };
        for p in self.projections.iter().chain(&self.output) {
            p.set_step(encoder, n);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("cached layer projection"),
                timestamp_writes: None,
            });
            for (p, group) in self.projections.iter().zip(&bindings.projections) {
                p.dispatch(&mut pass, group, &self.chunks, n);
            }
        }
        // The projections read the lengths before the step: the new tokens' places.
        self.cache.advance(encoder, n);
        match prefill {
            Some((op, b, kv_len)) => op.encode(encoder, b, Lengths { q_len: n, kv_len })?,
            None => self
                .decode
                .encode(encoder, &bindings.decode, self.cache.lengths(n)?)?,
        }
        if let (Some(p), Some(group)) = (&self.output, &bindings.output) {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("cached layer output projection"),
                timestamp_writes: None,
            });
            p.dispatch(&mut pass, group, &self.chunks, n);
        }
        Ok(())
    }

    /// Checks that a step of `n` tokens can run, before anything is recorded; returns the
    /// keys' count after it when it runs the prefill kernels (rows of one length), `None` when
    /// split-K decode (each row its own length).
    fn check_step(&self, n: usize) -> Result<Option<usize>> {
        self.config.check_step(n)?;
        self.cache.check_room(n)?;
        if n <= DECODE_MAX_Q_LEN {
            return Ok(None);
        }
        let lens = self.cache.lens();
        if lens.iter().any(|&l| l != lens[0]) {
            return Err(Error::InvalidConfig(format!(
                "a step of {n} tokens (more than the {DECODE_MAX_Q_LEN} of split-K decode) runs \
                 the prefill kernels, which need every batch row at one length; the rows hold \
                 {lens:?}: feed such rows at most {DECODE_MAX_Q_LEN} tokens a step"
            )));
        }
        Ok(Some(lens[0] + n))
    }

    /// New buffers an application can bind as a [`CachedIo`] (x, output): `STORAGE |
    /// COPY_DST | COPY_SRC`, sized for the largest step. Made once, before the steps.
    pub fn io_buffers(&self) -> (wgpu::Buffer, wgpu::Buffer) {
        let c = &self.config;
        let out = c.output_shape(c.max_step).iter().product::<usize>();
        let device = self.ctx.device();
        (
            scratch(
                device,
                "cached layer x",
                c.batch * c.max_step * c.d_model,
                c.precision,
            ),
            scratch(device, "cached layer output", out, c.precision),
        )
    }

    /// Bytes of GPU memory the layer allocated: the cache, weights, scratch, its own input,
    /// output and read-back buffers and the parameter tables (not the operators' own).
    pub fn gpu_memory_bytes(&self) -> u64 {
        let mut all: Vec<&wgpu::Buffer> = vec![
            self.cache.k(),
            self.cache.v(),
            &self.q,
            &self.own.x,
            &self.own.output,
            &self.own.staging,
        ];
        all.extend(&self.heads);
        for p in self.projections.iter().chain(&self.output) {
            all.extend(p.buffers());
        }
        all.iter().map(|b| b.size()).sum()
    }
}
