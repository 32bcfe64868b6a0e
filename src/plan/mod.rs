//! The attention plan: for one configuration, the compiled pipelines, every buffer, the uniform
//! parameters and bind groups, built once; then recording, running and reading back.
//!
//! Data flows one way: [`AttentionConfig`] → [`AttentionPlan::new`] (pipelines, buffers) →
//! [`AttentionPlan::encode`] (dispatches) → read back ([`AttentionPlan::run`]) → compare
//! ([`crate::compare()`]).

mod backward;
mod bind;
mod buffers;
mod grads;
mod pack;
mod steps;
mod timed;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use backward::{LayerBackwardBindings, LayerBackwardIo};
use bind::{make_bindings, warm_up};
use buffers::{OwnIo, PlanBuffers};
use steps::{Piece, Stamps, Step};

use crate::config::{AttentionConfig, KernelChoice};
use crate::context::GpuContext;
use crate::error::{Error, Result, Shape};
use crate::gpu::{check_storage, map_and_read, read_f32, read_mapped, scoped, scoped_async};
use crate::kernels::fused::FusedGeometry;
use crate::kernels::{ChunkTable, Kernel, Layout, check_sizes};
use crate::precision::Precision;
use crate::reference::Intermediates;
use crate::stage::Stage;
use crate::tensor::{Tensor, unravel};
use crate::timing::GpuTimer;
use crate::weights::{AttentionInputs, AttentionWeights};

/// The application's buffers for one layer call (the embedding path).
///
/// All are f32 except the mask; each needs `STORAGE` usage:
/// - `x`: `[batch, seq, d_model]` f32, read.
/// - `key_mask`: `[batch, seq]` u32 (1 = real token, 0 = padding), read; exactly when the
///   configuration has a key-padding mask.
/// - `output`: `[batch, seq, d_out]` f32, written.
#[derive(Debug, Clone, Copy)]
pub struct AttentionIo<'a> {
    /// The input sequence.
    pub x: &'a wgpu::Buffer,
    /// The key-padding mask, if the configuration has one.
    pub key_mask: Option<&'a wgpu::Buffer>,
    /// Where the output goes.
    pub output: &'a wgpu::Buffer,
}

/// Bind groups tying a plan's kernels to one set of application buffers; made once by
/// [`AttentionPlan::bind`] and reused by every [`AttentionPlan::encode`] of that plan.
#[derive(Debug)]
pub struct AttentionBindings {
    /// The plan that made them: every plan has its own number.
    plan: u64,
    groups: Vec<Option<wgpu::BindGroup>>,
}

/// Timestamps an application asks [`AttentionPlan::encode_with`] to write into its own query
/// set: at the beginning of the plan's first compute pass and at the end of its last, so that
/// the application's profiler times the whole layer.
#[derive(Debug, Clone, Copy)]
pub struct TimestampWrites<'a> {
    /// The application's timestamp query set.
    pub query_set: &'a wgpu::QuerySet,
    /// The query written when the first pass begins.
    pub beginning: Option<u32>,
    /// The query written when the last pass ends.
    pub end: Option<u32>,
}

/// One attention layer on the GPU: pipelines, weights, intermediate buffers and bind groups,
/// built once for a configuration and reused by every call.
///
/// Two ways to use it:
/// - [`AttentionPlan::run`] takes host tensors, uploads, runs and reads back;
/// - [`AttentionPlan::bind`] + [`AttentionPlan::encode`] record into an application's own
///   command encoder, reading and writing the application's buffers.
///
/// ```no_run
/// use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, GpuContext, Tensor};
/// let ctx = GpuContext::from_env()?;
/// let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
/// let w = Tensor::new([4, 3], vec![0.5; 12])?;
/// let weights = AttentionWeights::new(w.clone(), w.clone(), w);
/// let mut plan = AttentionPlan::new(&ctx, &config, &weights)?;
/// let x = Tensor::new([1, 3, 4], vec![1.0; 12])?;
/// let out = plan.run(&AttentionInputs::new(x))?;
/// assert_eq!(out.shape(), &[1, 3, 3]);
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Debug)]
pub struct AttentionPlan {
    ctx: GpuContext,
    config: AttentionConfig,
    layout: Layout,
    id: u64,
    bufs: PlanBuffers,
    /// The staged path's score matrix and its probabilities: two buffers when intermediates
    /// are kept, else the same buffer twice (the softmax runs in place). `None` when fused.
    scores: Option<(wgpu::Buffer, wgpu::Buffer)>,
    steps: Vec<Step>,
    /// Every step whole, as [`AttentionPlan::encode`] records them (made once, so that
    /// encoding allocates nothing).
    whole: Vec<Piece>,
    chunks: ChunkTable,
    own: OwnIo,
    /// Bind groups on the plan's own buffers, for [`AttentionPlan::run`].
    own_bindings: AttentionBindings,
    memory_bytes: u64,
    /// Timestamp queries, made by the first [`AttentionPlan::time_stages`].
    timer: Option<GpuTimer>,
    /// The backward's steps and buffers, with gradients.
    backward: Option<backward::LayerBackward>,
    /// Whether the weights have q/k/v biases and an output bias (which gradients to give).
    has_qkv_bias: bool,
    has_b_o: bool,
}

impl AttentionPlan {
    /// Builds the plan: checks `config` and `weights`, checks every buffer against the
    /// device's limits, uploads the weights, compiles (or reuses) the pipelines and makes every
    /// bind group. Blocks until done; [`AttentionPlan::new_async`] does not.
    pub fn new(
        ctx: &GpuContext,
        config: &AttentionConfig,
        weights: &AttentionWeights,
    ) -> Result<Self> {
        let _device = ctx.kernels().exclusive();
        pollster::block_on(Self::new_async(ctx, config, weights))
    }

    /// The async form of [`AttentionPlan::new`]: it never blocks, so it runs on the web, where
    /// the browser resolves wgpu's futures.
    pub async fn new_async(
        ctx: &GpuContext,
        config: &AttentionConfig,
        weights: &AttentionWeights,
    ) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        weights.validate(config)?;
        // The backward kernels are f32 only: refused before anything of the device is asked.
        if config.precision == Precision::F16 && config.gradients {
            return Err(Error::F16NeedsFused {
                why: "gradients were asked for, and the backward kernels store f32".into(),
            });
        }
        config.precision.check_device(ctx)?;
        // Rounded (and range-checked, by tensor and index) before packing, so that storing
        // the packed weights in f16 cannot fail or produce an infinity.
        let weights = &match config.precision {
            Precision::F32 => std::borrow::Cow::Borrowed(weights),
            Precision::F16 => std::borrow::Cow::Owned(weights.rounded_to(Precision::F16)?),
        };
        let limits = ctx.limits();
        let mut layout = Layout::new(config)?;
        // The layer's fused kernel binds at most three storage buffers (packed Q/K/V, mask,
        // output), within every device's limit; the check stays so that a kernel that grows
        // one is refused by name. `Auto` then takes the staged kernels, which bind at most four.
        if layout.kernel == KernelChoice::Fused
            && let Err(e) = Kernel::Fused(FusedGeometry::for_plan(&layout, config).io()).check_storage_buffers(
                &limits,
                "; use the staged kernels (KernelChoice::Staged, or Auto), which bind at most 4",
            )
        {
            // Gradients need the fused kernel's logsumexp: no staged fallback.
            if config.kernel != KernelChoice::Auto || config.gradients {
                return Err(e);
            }
            layout.kernel = KernelChoice::Staged;
        }
        check_sizes(config, &layout, &limits)?;
        let device = ctx.device();
        let (bufs, own) = scoped_async(device, "creating the plan's buffers", || {
            (
                PlanBuffers::new(device, config, &layout, weights),
                OwnIo::new(device, &layout, config.precision),
            )
        })
        .await?;
        let steps::Built {
            steps,
            scores,
            core,
        } = steps::build(ctx, config, &layout, &bufs).await?;
        let backward = match &core {
            Some(core) => Some(backward::LayerBackward::new(ctx, &layout, &bufs, core).await?),
            None => None,
        };
        let chunks = ctx.kernels().chunks().await?;
        let own_bindings = make_bindings(
            device,
            NEXT_ID.fetch_add(1, Ordering::Relaxed),
            &steps,
            [&own.x, &own.key_mask, &own.output],
        )
        .await?;
        warm_up(ctx, &steps, &own_bindings, &chunks).await?;
        let memory_bytes = {
            let mut all: Vec<&wgpu::Buffer> = bufs.all();
            all.extend(own.all());
            if let Some((s, p)) = &scores {
                all.push(s);
                all.push(p);
            }
            all.extend(steps.iter().filter_map(|s| match s {
                Step::Dispatch(d) => Some(&d.params),
                Step::Copy { .. } => None,
            }));
            // The staged kernels share one parameter buffer; in place, scores and
            // probabilities are one buffer.
            all.sort();
            all.dedup();
            let lse = bufs.lse.as_ref().map_or(0, |b| b.size());
            all.iter().map(|b| b.size()).sum::<u64>()
                + backward.as_ref().map_or(0, |b| b.memory_bytes - lse)
        };
        Ok(AttentionPlan {
            ctx: ctx.clone(),
            config: config.clone(),
            layout,
            id: own_bindings.plan,
            bufs,
            scores,
            whole: steps::whole(&steps),
            steps,
            chunks,
            own,
            own_bindings,
            memory_bytes,
            timer: None,
            backward,
            has_qkv_bias: weights.b_q.is_some(),
            has_b_o: weights.b_o.is_some(),
        })
    }

    /// The configuration this plan runs.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// The kernels this plan runs: [`KernelChoice::Staged`] or [`KernelChoice::Fused`] (an
    /// `Auto` configuration resolved for this device).
    pub fn kernel(&self) -> KernelChoice {
        self.layout.kernel
    }

    /// The context the plan lives on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Bytes of GPU memory the plan allocated: weights, intermediates, its own input, output
    /// and read-back buffers, and uniform parameters.
    pub fn gpu_memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The stages this plan dispatches, in order.
    pub fn stages(&self) -> Vec<Stage> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Dispatch(d) => Some(d.stage),
                Step::Copy { .. } => None,
            })
            .collect()
    }

    /// Replaces the weights (same shapes) without rebuilding anything.
    pub fn write_weights(&self, weights: &AttentionWeights) -> Result<()> {
        weights.validate(&self.config)?;
        let queue = self.ctx.queue();
        let _device = self.ctx.kernels().exclusive();
        let p = self.config.precision;
        let weights = &weights.rounded_to(p)?;
        let (w, b) = pack::pack_qkv(&self.config, &self.layout, weights);
        scoped(self.ctx.device(), "uploading weights", || {
            queue.write_buffer(&self.bufs.w_qkv, 0, &buffers::stored(p, &w));
            queue.write_buffer(&self.bufs.b_qkv, 0, &buffers::stored(p, &b));
            if let (Some((wb, bb)), Some(w_o)) = (&self.bufs.w_o, &weights.w_o) {
                let (w, b) = pack::pack_out(&self.layout, w_o, weights.b_o.as_ref());
                queue.write_buffer(wb, 0, &buffers::stored(p, &w));
                queue.write_buffer(bb, 0, &buffers::stored(p, &b));
            }
        })
    }

    /// Makes the bind groups that tie this plan to an application's buffers. Call once per set
    /// of buffers and keep the result; [`AttentionPlan::encode`] then allocates nothing.
    ///
    /// Buffers must come from this plan's device. A buffer of another device is refused by
    /// wgpu's validation, returned as [`Error::Wgpu`].
    pub fn bind(&self, io: AttentionIo<'_>) -> Result<AttentionBindings> {
        let _device = self.ctx.kernels().exclusive();
        pollster::block_on(self.bind_async(io))
    }

    /// The async form of [`AttentionPlan::bind`], which never blocks (for the web).
    pub async fn bind_async(&self, io: AttentionIo<'_>) -> Result<AttentionBindings> {
        let l = &self.layout;
        let (e, sized_for) = match self.config.precision {
            Precision::F32 => (4, ""),
            Precision::F16 => (2, " (f16 elements)"),
        };
        check_storage("x", io.x, l.tokens() * l.d_model as u64 * e, sized_for)?;
        check_storage(
            "output",
            io.output,
            l.tokens() * l.d_out as u64 * e,
            sized_for,
        )?;
        let mask = match (l.has_mask, io.key_mask) {
            (true, Some(m)) => {
                check_storage("key_mask", m, l.tokens() * 4, "")?;
                m
            }
            (true, None) => {
                return Err(Error::BadBuffer {
                    name: "key_mask",
                    problem: "the configuration has a key-padding mask but no buffer was given"
                        .into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::BadBuffer {
                    name: "key_mask",
                    problem: "given, but the configuration has no key-padding mask".into(),
                });
            }
            (false, None) => &self.own.key_mask,
        };
        make_bindings(
            self.ctx.device(),
            self.id,
            &self.steps,
            [io.x, mask, io.output],
        )
        .await
    }

    /// Records the layer into `encoder`: every dispatch, reading and writing the buffers of
    /// `bindings`. Nothing is allocated; submit the encoder when the application is ready.
    ///
    /// Everything goes into the application's encoder, so into one submission. For very large
    /// layers on OpenGL, where one submission holds the device for its whole run, prefer
    /// [`AttentionPlan::run`], which cuts its work into submissions of bounded length.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &AttentionBindings,
    ) -> Result<()> {
        self.encode_with(encoder, bindings, None)
    }

    /// [`AttentionPlan::encode`], with timestamps written into the application's query set at
    /// the beginning of the first and the end of the last compute pass.
    pub fn encode_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &AttentionBindings,
        timestamps: Option<TimestampWrites<'_>>,
    ) -> Result<()> {
        self.check_owner(bindings)?;
        let stamps = timestamps.map(|t| Stamps {
            query_set: t.query_set,
            beginning: t.beginning,
            end: t.end,
        });
        self.record(encoder, bindings, &self.whole, stamps)
    }

    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &AttentionBindings,
        pieces: &[Piece],
        stamps: Option<Stamps<'_>>,
    ) -> Result<()> {
        steps::record(
            encoder,
            &self.steps,
            &bindings.groups,
            &self.chunks,
            pieces,
            stamps,
        )
    }

    fn check_owner(&self, bindings: &AttentionBindings) -> Result<()> {
        if bindings.plan != self.id || bindings.groups.len() != self.steps.len() {
            return Err(Error::ForeignBindings);
        }
        Ok(())
    }

    /// The steps `range` cut into submissions of bounded length at the device's measured rate.
    fn submissions(&self, range: std::ops::Range<usize>) -> Result<Vec<Vec<Piece>>> {
        let work: Vec<_> = self.steps.iter().map(Step::work).collect();
        steps::submissions(
            &work,
            range,
            self.ctx.kernels().submission_budget(),
            self.ctx.limits().max_compute_workgroups_per_dimension,
        )
    }

    /// FLOPs of every dispatch.
    fn flops(&self) -> f64 {
        self.steps
            .iter()
            .filter_map(Step::work)
            .map(|w| w.flops)
            .sum()
    }

    /// Uploads `inputs`, runs the layer and reads the output back, blocking until the GPU is
    /// done. The second and later calls create no pipelines, buffers or bind groups.
    ///
    /// Large layers run as several submissions, each about 0.1 s of work at the rate the device
    /// showed on earlier calls, waited for in turn (see `shaders/dispatch.wgsl` for why).
    ///
    /// An output holding NaN or infinity is an error, not a result: the inputs are checked to
    /// be finite, so such a value means a product or sum passed f32's range.
    pub fn run(&mut self, inputs: &AttentionInputs) -> Result<Tensor> {
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        let start = Instant::now();
        self.submit(inputs)?;
        let p = self.config.precision;
        let data = map_and_read(self.ctx.device(), &self.own.staging, |bytes| {
            p.decode(bytes)
        })?;
        self.ctx
            .kernels()
            .measured(self.flops(), start.elapsed().as_secs_f64());
        self.output_tensor(data)
    }

    /// The async form of [`AttentionPlan::run`]. It waits for the read-back without blocking, so
    /// on native backends something must poll the device meanwhile (an application's event
    /// loop calling `device.poll`, or a thread); on the web the browser does.
    pub async fn run_async(&mut self, inputs: &AttentionInputs) -> Result<Tensor> {
        {
            let ctx = self.ctx.clone();
            let _device = ctx.kernels().exclusive();
            self.submit(inputs)?;
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        self.own
            .staging
            .map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
        let mapped = rx.await.map_err(|_| wgpu::BufferAsyncError)?;
        mapped?;
        let p = self.config.precision;
        let data = read_mapped(&self.own.staging, |bytes| p.decode(bytes))?;
        self.output_tensor(data)
    }

    fn output_tensor(&self, mut data: Vec<f32>) -> Result<Tensor> {
        let shape = self.config.output_shape();
        // f16 read-back rounds up to whole 4-byte words: one element past the end at most.
        data.truncate(shape.iter().product());
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                index: Shape(unravel(&shape, at)),
                value: data[at],
                hint: if self.config.precision == Precision::F16 {
                    "with f16 storage, Q, K, V and the outputs must stay within f16's range \
                     (65504); the arithmetic is f32. Scale the inputs or weights down, or use \
                     f32 precision"
                } else {
                    "a product of the inputs and weights passed f32's range (3.4e38): scale the \
                     inputs or weights down"
                }
                .into(),
            });
        }
        Tensor::new(shape.to_vec(), data)
    }

    /// Records the upload of `inputs` (checked by the caller) into the plan's own buffers,
    /// through the staging belt; call [`wgpu::util::StagingBelt::recall`] after submitting.
    fn upload(&mut self, encoder: &mut wgpu::CommandEncoder, inputs: &AttentionInputs) {
        let own = &mut self.own;
        let values = inputs.x.data();
        match self.config.precision {
            Precision::F32 => {
                let x: &[u8] = bytemuck::cast_slice(values);
                if let Some(size) = wgpu::BufferSize::new(x.len() as u64) {
                    own.belt
                        .write_buffer(encoder, &own.x, 0, size)
                        .copy_from_slice(x);
                }
            }
            Precision::F16 => {
                // Converted straight into the mapped staging memory (no buffer per call),
                // after `submit` checked every value fits f16; padded to whole 4-byte words.
                let bytes = (values.len() as u64 * 2).next_multiple_of(4);
                if let Some(size) = wgpu::BufferSize::new(bytes) {
                    let mut view = own.belt.write_buffer(encoder, &own.x, 0, size);
                    crate::precision::write_f16(values, |at, bytes| {
                        view.slice(at..at + bytes.len()).copy_from_slice(bytes)
                    });
                }
            }
        }
        if let Some(mask) = &inputs.key_mask {
            for (w, &m) in own.mask_words.iter_mut().zip(mask.data()) {
                *w = (m != 0.0) as u32;
            }
            let words: &[u8] = bytemuck::cast_slice(&own.mask_words);
            if let Some(size) = wgpu::BufferSize::new(words.len() as u64) {
                own.belt
                    .write_buffer(encoder, &own.key_mask, 0, size)
                    .copy_from_slice(words);
            }
        }
        own.belt.finish();
    }

    /// Uploads, then submits every step in bounded submissions, each but the last waited for,
    /// the last one ending with the copy of the output to the read-back buffer.
    fn submit(&mut self, inputs: &AttentionInputs) -> Result<()> {
        inputs.validate(&self.config)?;
        if self.config.precision == Precision::F16 {
            crate::precision::check_f16_range("x", inputs.x.shape(), inputs.x.data())?;
        }
        let subs = self.submissions(0..self.steps.len())?;
        self.submit_pieces(&subs, Some(inputs), true, None)
    }

    /// Submits `subs` one after the other (each waited for before the next), uploading
    /// `inputs` first and copying the output to the read-back buffer last if asked, with
    /// timestamps around the whole stream if given.
    fn submit_pieces(
        &mut self,
        subs: &[Vec<Piece>],
        inputs: Option<&AttentionInputs>,
        read_back: bool,
        stamps: Option<Stamps<'_>>,
    ) -> Result<()> {
        let (device, queue) = (self.ctx.device().clone(), self.ctx.queue().clone());
        let last = subs.len().saturating_sub(1);
        for (k, pieces) in subs.iter().enumerate() {
            let stamps = stamps.map(|s| Stamps {
                query_set: s.query_set,
                beginning: s.beginning.filter(|_| k == 0),
                end: s.end.filter(|_| k == last),
            });
            scoped(&device, "running the layer", || {
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("attention"),
                });
                if k == 0
                    && let Some(inputs) = inputs
                {
                    self.upload(&mut encoder, inputs);
                }
                let recorded = self.record(&mut encoder, &self.own_bindings, pieces, stamps);
                if k == last && read_back {
                    encoder.copy_buffer_to_buffer(
                        &self.own.output,
                        0,
                        &self.own.staging,
                        0,
                        self.own.staging.size(),
                    );
                }
                queue.submit([encoder.finish()]);
                if k == 0 && inputs.is_some() {
                    self.own.belt.recall();
                }
                recorded
            })??;
            if k != last {
                device.poll(wgpu::PollType::wait_indefinitely())?;
            }
        }
        Ok(())
    }

    /// Reads back every intermediate of the last [`AttentionPlan::run`] (Q, K, V, scores,
    /// probabilities, heads concatenated, output) in the reference's layouts, for checking.
    ///
    /// Needs [`AttentionConfig::keep_intermediates`]: otherwise the softmax overwrites the scores.
    /// Allocates a read-back buffer per tensor; meant for tests and teaching, not hot loops.
    pub fn read_intermediates(&self) -> Result<Intermediates> {
        if !self.config.keep_intermediates {
            return Err(Error::InvalidConfig(
                "intermediates were not kept: build the plan with AttentionConfig::with_intermediates()".into(),
            ));
        }
        let _device = self.ctx.kernels().exclusive();
        let l = &self.layout;
        let (b, h, n) = (l.batch as usize, l.heads as usize, l.seq as usize);
        let (dk, dv) = (l.head_dim as usize, l.head_dim_v as usize);
        let read = |buffer| read_f32(self.ctx.device(), self.ctx.queue(), buffer);
        // Q/K/V, the heads and the output are stored in the plan's precision (the scores and
        // probabilities are f32 in either): f16 words are widened, two per 4 bytes read.
        let stored = |buffer| -> Result<Vec<f32>> {
            let words = read(buffer)?;
            Ok(match self.config.precision {
                Precision::F32 => words,
                Precision::F16 => Precision::F16.decode(bytemuck::cast_slice(&words)),
            })
        };
        let qkv = stored(&self.bufs.qkv)?;
        let rows = b * h * n;
        let (dp, dvp) = (l.dp as usize, l.dvp as usize);
        let (ko, vo) = (l.k_offset as usize, l.v_offset as usize);
        let q = pack::unpad_rows(&qkv[..rows * dp], dp, dk);
        let k = pack::unpad_rows(&qkv[ko..ko + rows * dp], dp, dk);
        let v = pack::unpad_rows(&qkv[vo..vo + rows * dvp], dvp, dv);
        // keep_intermediates always resolves to the staged path, which has score buffers.
        let (scores, probs) = self.scores.as_ref().ok_or_else(|| {
            Error::InvalidConfig("the fused kernel stores no scores or probabilities".into())
        })?;
        // The score kernel stores Q Kᵀ unscaled (the softmax scales after subtracting each
        // row's maximum, so no scale overflows); shown here as the reference defines them:
        // scaled, and -inf where a key is masked.
        let mut scores = pack::unpad_rows(&read(scores)?, l.seq_pad as usize, n);
        for (at, s) in scores.iter_mut().enumerate() {
            let (j, i, bi) = (at % n, at / n % n, at / (n * n * h));
            let padded = l.has_mask && self.own.mask_words[bi * n + j] == 0;
            *s = if (l.causal && j > i) || padded {
                f32::NEG_INFINITY
            } else {
                l.scale * *s
            };
        }
        let probs = pack::unpad_rows(&read(probs)?, l.seq_pad as usize, n);
        let mut output = stored(&self.own.output)?;
        // An odd number of f16 values fills a last 4-byte word with one more.
        output.truncate(self.config.output_shape().iter().product());
        let mut attention = match &self.bufs.attention {
            Some(a) => stored(a)?,
            None => output.clone(),
        };
        attention.truncate(b * n * h * dv);
        Ok(Intermediates {
            q: Tensor::new([b, h, n, dk], q)?,
            k: Tensor::new([b, h, n, dk], k)?,
            v: Tensor::new([b, h, n, dv], v)?,
            scores: Tensor::new([b, h, n, n], scores)?,
            probs: Tensor::new([b, h, n, n], probs)?,
            attention: Tensor::new([b, n, h * dv], attention)?,
            output: Tensor::new(self.config.output_shape().to_vec(), output)?,
        })
    }
}
