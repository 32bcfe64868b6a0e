//! The attention plan: for one configuration, the compiled pipelines, every buffer, the uniform
//! parameters and bind groups, built once; then recording, running and reading back.
//!
//! Data flows one way: [`AttentionConfig`] → [`AttentionPlan::new`] (pipelines, buffers) →
//! [`AttentionPlan::encode`] (dispatches) → read back ([`AttentionPlan::run`]) → compare
//! ([`crate::compare()`]).

use std::time::Instant;

use wgpu::util::DeviceExt;

use crate::config::{AttentionConfig, KernelChoice};
use crate::context::{GpuContext, scoped};
use crate::error::{Error, Result};
use crate::kernels::{self, DispatchSpec, Pipeline, fold_grid, gemm, pad4};
use crate::reference::Intermediates;
use crate::tensor::Tensor;
use crate::timing::{GpuTimer, StageTime, StageTimes, TimingSource, since};
use crate::weights::{AttentionInputs, AttentionWeights};

/// Sizes and offsets the kernels agree on, in f32 elements, checked to fit u32 indexing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub batch: u32,
    pub seq: u32,
    /// Row stride of the score and probability matrices: `seq` rounded up to a multiple of 4,
    /// so rows can be read as vec4.
    pub seq_pad: u32,
    pub d_model: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub head_dim_v: u32,
    /// `head_dim` and `head_dim_v` padded with zero columns to multiples of 4 (vec4 loads).
    pub dp: u32,
    pub dvp: u32,
    pub d_out: u32,
    /// `d_out` padded to a multiple of 4 in the output weights.
    pub d_out_pad: u32,
    /// Offsets of the Q, K and V sections in the qkv buffer.
    pub q_offset: u32,
    pub k_offset: u32,
    pub v_offset: u32,
    pub qkv_len: u64,
    pub scores_len: u64,
    pub scale: f32,
    pub causal: bool,
    pub has_mask: bool,
    /// The resolved path: `Staged` or `Fused`.
    pub kernel: KernelChoice,
}

impl Layout {
    fn new(config: &AttentionConfig) -> Result<Self> {
        let to_u32 = |name: &'static str, v: usize| -> Result<u32> {
            u32::try_from(v).map_err(|_| Error::LimitExceeded {
                limit: "u32 indexing",
                max: u32::MAX as u64,
                requested: v as u64,
                what: format!("`{name}`"),
                hint: String::new(),
            })
        };
        let batch = to_u32("batch", config.batch)?;
        let seq = to_u32("seq_len", config.seq_len)?;
        let heads = to_u32("heads", config.heads)?;
        let head_dim = to_u32("head_dim", config.head_dim)?;
        let head_dim_v = to_u32("head_dim_v", config.head_dim_v)?;
        let d_out = to_u32("d_out", config.d_out())?;
        let (dp, dvp) = (pad4(head_dim), pad4(head_dim_v));
        let rows = batch as u64 * heads as u64 * seq as u64;
        let q_len = rows * dp as u64;
        let v_len = rows * dvp as u64;
        let qkv_len = 2 * q_len + v_len;
        let seq_pad = pad4(seq);
        let scores_len = rows * seq_pad as u64;
        Ok(Layout {
            batch,
            seq,
            seq_pad,
            d_model: to_u32("d_model", config.d_model)?,
            heads,
            head_dim,
            head_dim_v,
            dp,
            dvp,
            d_out,
            d_out_pad: pad4(d_out),
            q_offset: 0,
            // Offsets are checked by the buffer-size checks (every length fits u32 there).
            k_offset: q_len.min(u32::MAX as u64) as u32,
            v_offset: (2 * q_len).min(u32::MAX as u64) as u32,
            qkv_len,
            scores_len,
            scale: config.scale_value(),
            causal: config.causal,
            has_mask: config.key_padding_mask,
            kernel: config.resolved_kernel(),
        })
    }

    /// Columns of the packed `[w_q | w_k | w_v]` weight, each head padded.
    fn qkv_width(&self) -> u32 {
        self.heads * (2 * self.dp + self.dvp)
    }

    fn tokens(&self) -> u64 {
        self.batch as u64 * self.seq as u64
    }
}

/// A buffer a stage binds, resolved when bind groups are made.
#[derive(Debug, Clone)]
enum Res {
    X,
    KeyMask,
    Output,
    Own(wgpu::Buffer),
}

#[derive(Debug)]
struct Stage {
    label: &'static str,
    pipeline: Pipeline,
    params: wgpu::Buffer,
    grid: [u32; 3],
    /// Bindings 1.. in order (binding 0 is always `params`).
    resources: Vec<Res>,
}

#[derive(Debug)]
enum Step {
    Dispatch(Stage),
    Copy {
        from: wgpu::Buffer,
        to: wgpu::Buffer,
        bytes: u64,
    },
}

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
/// [`AttentionPlan::bind`] and reused by every [`AttentionPlan::encode`].
#[derive(Debug)]
pub struct AttentionBindings {
    owner: wgpu::Buffer,
    groups: Vec<Option<wgpu::BindGroup>>,
}

#[derive(Debug)]
struct WeightBuffers {
    w_qkv: wgpu::Buffer,
    b_qkv: wgpu::Buffer,
    w_o: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

/// Buffers for [`AttentionPlan::run`], which uploads host data itself.
#[derive(Debug)]
struct OwnIo {
    x: wgpu::Buffer,
    /// The mask, or a 4-byte stand-in bound where the layer has none.
    key_mask: wgpu::Buffer,
    output: wgpu::Buffer,
    staging: wgpu::Buffer,
    bindings: AttentionBindings,
    /// Mapped upload buffers, reused once the GPU has copied out of them: `queue.write_buffer`
    /// would create a staging buffer on every call.
    belt: wgpu::util::StagingBelt,
    /// The mask as the u32 words the kernels read, converted without allocating per call.
    mask_words: Vec<u32>,
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
    weights: WeightBuffers,
    qkv: wgpu::Buffer,
    /// The staged path's score matrix and its probabilities: two buffers when intermediates
    /// are kept, else the same buffer twice (the softmax runs in place). `None` when fused.
    scores: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// The concatenated heads, when an output projection follows them.
    attention: Option<wgpu::Buffer>,
    steps: Vec<Step>,
    own: OwnIo,
    memory_bytes: u64,
    /// Timestamp queries, made by the first [`AttentionPlan::time_stages`].
    timer: Option<GpuTimer>,
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl AttentionPlan {
    /// Builds the plan: checks `config` and `weights`, checks every buffer against the
    /// device's limits, uploads the weights, compiles (or reuses) the pipelines and makes every
    /// bind group.
    pub fn new(
        ctx: &GpuContext,
        config: &AttentionConfig,
        weights: &AttentionWeights,
    ) -> Result<Self> {
        weights.validate(config)?;
        let limits = ctx.limits();
        let layout = Layout::new(config)?;
        check_sizes(config, &layout, &limits)?;
        let device = ctx.device();
        let (weight_buffers, qkv, scores, attention, own) =
            scoped(device, "creating the plan's buffers", || {
                let w_qkv = {
                    let (w, b) = pack_qkv(config, &layout, weights);
                    (
                        init_buffer(device, "w_qkv", &w),
                        init_buffer(device, "b_qkv", &b),
                    )
                };
                let w_o = weights.w_o.as_ref().map(|w_o| {
                    let (w, b) = pack_out(&layout, w_o, weights.b_o.as_ref());
                    (
                        init_buffer(device, "w_o", &w),
                        init_buffer(device, "b_o", &b),
                    )
                });
                let weight_buffers = WeightBuffers {
                    w_qkv: w_qkv.0,
                    b_qkv: w_qkv.1,
                    w_o,
                };
                let qkv = buffer(device, "qkv", layout.qkv_len * 4, STORAGE);
                let scores = (layout.kernel == KernelChoice::Staged).then(|| {
                    let scores = buffer(device, "scores", layout.scores_len * 4, STORAGE);
                    let probs = if config.keep_intermediates {
                        buffer(device, "probs", layout.scores_len * 4, STORAGE)
                    } else {
                        scores.clone()
                    };
                    (scores, probs)
                });
                let attention = config.output_projection.map(|_| {
                    let len = layout.tokens() * (layout.heads * layout.head_dim_v) as u64;
                    buffer(device, "attention", len * 4, STORAGE)
                });
                (
                    weight_buffers,
                    qkv,
                    scores,
                    attention,
                    own_io_buffers(device, &layout),
                )
            })?;
        let steps = build_steps(
            ctx,
            config,
            &layout,
            &weight_buffers,
            &qkv,
            scores.as_ref(),
            attention.as_ref(),
        )?;
        let (x, key_mask, output, staging) = own;
        let upload_bytes = x.size() + if layout.has_mask { key_mask.size() } else { 0 };
        let belt = wgpu::util::StagingBelt::new(device.clone(), upload_bytes.next_multiple_of(256));
        let mask_words = vec![
            0;
            if layout.has_mask {
                layout.tokens() as usize
            } else {
                0
            }
        ];
        let mut plan = AttentionPlan {
            ctx: ctx.clone(),
            config: config.clone(),
            layout,
            weights: weight_buffers,
            qkv: qkv.clone(),
            scores,
            attention,
            steps,
            own: OwnIo {
                bindings: AttentionBindings {
                    owner: qkv,
                    groups: Vec::new(),
                },
                x,
                key_mask,
                output,
                staging,
                belt,
                mask_words,
            },
            memory_bytes: 0,
            timer: None,
        };
        plan.memory_bytes = plan.buffers().iter().map(|b| b.size()).sum();
        let (x, mask, out) = (
            plan.own.x.clone(),
            plan.own.key_mask.clone(),
            plan.own.output.clone(),
        );
        plan.own.bindings = plan.make_bindings(&x, &mask, &out)?;
        Ok(plan)
    }

    /// Every buffer the plan owns, each once.
    fn buffers(&self) -> Vec<&wgpu::Buffer> {
        let mut all = vec![&self.weights.w_qkv, &self.weights.b_qkv, &self.qkv];
        if let Some((w, b)) = &self.weights.w_o {
            all.extend([w, b]);
        }
        if let Some((scores, probs)) = &self.scores {
            all.extend([scores, probs]);
        }
        all.extend(&self.attention);
        all.extend([
            &self.own.x,
            &self.own.key_mask,
            &self.own.output,
            &self.own.staging,
        ]);
        all.extend(self.steps.iter().filter_map(|s| match s {
            Step::Dispatch(stage) => Some(&stage.params),
            Step::Copy { .. } => None,
        }));
        let mut unique: Vec<&wgpu::Buffer> = Vec::with_capacity(all.len());
        for b in all {
            if !unique.contains(&b) {
                unique.push(b);
            }
        }
        unique
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

    /// Replaces the weights (same shapes) without rebuilding anything.
    pub fn write_weights(&self, weights: &AttentionWeights) -> Result<()> {
        weights.validate(&self.config)?;
        let queue = self.ctx.queue();
        let (w, b) = pack_qkv(&self.config, &self.layout, weights);
        scoped(self.ctx.device(), "uploading weights", || {
            queue.write_buffer(&self.weights.w_qkv, 0, bytemuck::cast_slice(&w));
            queue.write_buffer(&self.weights.b_qkv, 0, bytemuck::cast_slice(&b));
            if let (Some((wb, bb)), Some(w_o)) = (&self.weights.w_o, &weights.w_o) {
                let (w, b) = pack_out(&self.layout, w_o, weights.b_o.as_ref());
                queue.write_buffer(wb, 0, bytemuck::cast_slice(&w));
                queue.write_buffer(bb, 0, bytemuck::cast_slice(&b));
            }
        })
    }

    /// Makes the bind groups that tie this plan to an application's buffers. Call once per set
    /// of buffers and keep the result; [`AttentionPlan::encode`] then allocates nothing.
    pub fn bind(&self, io: AttentionIo<'_>) -> Result<AttentionBindings> {
        let l = &self.layout;
        check_io_buffer("x", io.x, l.tokens() * l.d_model as u64 * 4)?;
        check_io_buffer("output", io.output, l.tokens() * l.d_out as u64 * 4)?;
        let mask = match (l.has_mask, io.key_mask) {
            (true, Some(m)) => {
                check_io_buffer("key_mask", m, l.tokens() * 4)?;
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
        self.make_bindings(io.x, mask, io.output)
    }

    fn make_bindings(
        &self,
        x: &wgpu::Buffer,
        key_mask: &wgpu::Buffer,
        output: &wgpu::Buffer,
    ) -> Result<AttentionBindings> {
        let device = self.ctx.device();
        let groups = scoped(device, "binding buffers", || {
            self.steps
                .iter()
                .map(|step| {
                    let Step::Dispatch(stage) = step else {
                        return None;
                    };
                    let buffers: Vec<&wgpu::Buffer> = std::iter::once(&stage.params)
                        .chain(stage.resources.iter().map(|r| match r {
                            Res::X => x,
                            Res::KeyMask => key_mask,
                            Res::Output => output,
                            Res::Own(b) => b,
                        }))
                        .collect();
                    let entries: Vec<wgpu::BindGroupEntry> = buffers
                        .iter()
                        .enumerate()
                        .map(|(i, b)| wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: b.as_entire_binding(),
                        })
                        .collect();
                    Some(device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(stage.label),
                        layout: &stage.pipeline.layout,
                        entries: &entries,
                    }))
                })
                .collect()
        })?;
        Ok(AttentionBindings {
            owner: self.qkv.clone(),
            groups,
        })
    }

    /// Records the layer into `encoder`: every dispatch, reading and writing the buffers of
    /// `bindings`. Nothing is allocated; submit the encoder when the application is ready.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &AttentionBindings,
    ) -> Result<()> {
        self.check_owner(bindings)?;
        // Runs of dispatches share one compute pass: wgpu orders them with barriers inside it,
        // and each pass begun and ended costs time on every backend. Copies split the runs.
        let steps: Vec<(&Step, &Option<wgpu::BindGroup>)> =
            self.steps.iter().zip(&bindings.groups).collect();
        for run in steps
            .chunk_by(|a, b| matches!(a.0, Step::Dispatch(_)) && matches!(b.0, Step::Dispatch(_)))
        {
            if let [(Step::Copy { from, to, bytes }, _)] = run {
                encoder.copy_buffer_to_buffer(from, 0, to, 0, *bytes);
                continue;
            }
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("attention"),
                timestamp_writes: None,
            });
            for (step, group) in run {
                match (step, group) {
                    (Step::Dispatch(stage), Some(group)) => dispatch(&mut pass, stage, group),
                    _ => return Err(Error::ForeignBindings),
                }
            }
        }
        Ok(())
    }

    fn check_owner(&self, bindings: &AttentionBindings) -> Result<()> {
        if bindings.owner != self.qkv || bindings.groups.len() != self.steps.len() {
            return Err(Error::ForeignBindings);
        }
        Ok(())
    }

    /// Records step `i` alone; a dispatch gets a compute pass of its own, timed if
    /// `timestamps` is given.
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &AttentionBindings,
        i: usize,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        match (&self.steps[i], &bindings.groups[i]) {
            (Step::Dispatch(stage), Some(group)) => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(stage.label),
                    timestamp_writes: timestamps,
                });
                dispatch(&mut pass, stage, group);
            }
            (Step::Copy { from, to, bytes }, _) => {
                encoder.copy_buffer_to_buffer(from, 0, to, 0, *bytes);
            }
            // check_owner pairs every dispatch with a bind group.
            (Step::Dispatch(_), None) => {}
        }
    }

    /// The stages this plan dispatches, in order.
    pub fn stages(&self) -> Vec<&'static str> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Dispatch(stage) => Some(stage.label),
                Step::Copy { .. } => None,
            })
            .collect()
    }

    /// Uploads `inputs` and runs the layer once more, timing each stage on the GPU: with
    /// timestamp queries where the device has them (their buffers are made on the first call
    /// and reused), else with the wall clock around each stage submitted alone. The output is
    /// left in the plan's output buffer, not read back.
    pub fn time_stages(&mut self, inputs: &AttentionInputs) -> Result<StageTimes> {
        inputs.validate(&self.config)?;
        let (device, queue) = (self.ctx.device().clone(), self.ctx.queue().clone());
        let dispatches: Vec<usize> = (0..self.steps.len())
            .filter(|&i| matches!(self.steps[i], Step::Dispatch(_)))
            .collect();
        let labels = self.stages();
        if self.ctx.has_timestamps() && self.timer.is_none() {
            let timer = scoped(&device, "creating timestamp queries", || {
                GpuTimer::new(&device, dispatches.len() as u32)
            })?;
            self.timer = Some(timer);
        }
        // Taken out while recording, which needs the plan mutably for the upload.
        if let Some(timer) = self.timer.take() {
            let recorded = scoped(&device, "timing the layer", || {
                let mut encoder = device.create_command_encoder(&Default::default());
                self.upload(&mut encoder, inputs);
                let mut timed = 0;
                for i in 0..self.steps.len() {
                    let writes = dispatches.contains(&i).then(|| {
                        timed += 1;
                        timer.writes(timed - 1)
                    });
                    self.record(&mut encoder, &self.own.bindings, i, writes);
                }
                timer.resolve(&mut encoder);
                queue.submit([encoder.finish()]);
                self.own.belt.recall();
            });
            let seconds = recorded.and_then(|()| timer.read(&device, &queue));
            self.timer = Some(timer);
            let seconds = seconds?;
            return Ok(StageTimes {
                source: TimingSource::Timestamps,
                stages: labels
                    .into_iter()
                    .zip(seconds)
                    .map(|(stage, seconds)| StageTime { stage, seconds })
                    .collect(),
            });
        }
        scoped(&device, "uploading inputs", || {
            let mut encoder = device.create_command_encoder(&Default::default());
            self.upload(&mut encoder, inputs);
            queue.submit([encoder.finish()]);
            self.own.belt.recall();
        })?;
        device.poll(wgpu::PollType::wait_indefinitely())?;
        let mut stages = Vec::with_capacity(labels.len());
        for i in 0..self.steps.len() {
            let start = Instant::now();
            scoped(&device, "timing a stage", || {
                let mut encoder = device.create_command_encoder(&Default::default());
                self.record(&mut encoder, &self.own.bindings, i, None);
                queue.submit([encoder.finish()]);
            })?;
            device.poll(wgpu::PollType::wait_indefinitely())?;
            if let Step::Dispatch(stage) = &self.steps[i] {
                stages.push(StageTime {
                    stage: stage.label,
                    seconds: since(start),
                });
            }
        }
        Ok(StageTimes {
            source: TimingSource::WallClock,
            stages,
        })
    }

    /// Uploads `inputs`, runs the layer and reads the output back, blocking until the GPU is
    /// done. The second and later calls create no pipelines, buffers or bind groups.
    pub fn run(&mut self, inputs: &AttentionInputs) -> Result<Tensor> {
        self.submit(inputs)?;
        let data = map_and_read(self.ctx.device(), &self.own.staging, |bytes| {
            bytemuck::cast_slice::<u8, f32>(bytes).to_vec()
        })?;
        Tensor::new(self.config.output_shape().to_vec(), data)
    }

    /// The async form of [`AttentionPlan::run`]. It waits for the read-back without blocking, so
    /// on native backends something must poll the device meanwhile (an application's event
    /// loop calling `device.poll`, or a thread); on the web the browser does.
    pub async fn run_async(&mut self, inputs: &AttentionInputs) -> Result<Tensor> {
        self.submit(inputs)?;
        let (tx, rx) = futures_channel::oneshot::channel();
        self.own
            .staging
            .map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
        let mapped = rx.await.map_err(|_| wgpu::BufferAsyncError)?;
        mapped?;
        let data = read_mapped(&self.own.staging, |bytes| {
            bytemuck::cast_slice::<u8, f32>(bytes).to_vec()
        })?;
        Tensor::new(self.config.output_shape().to_vec(), data)
    }

    /// Records the upload of `inputs` (checked by the caller) into the plan's own buffers,
    /// through the staging belt; call [`wgpu::util::StagingBelt::recall`] after submitting.
    fn upload(&mut self, encoder: &mut wgpu::CommandEncoder, inputs: &AttentionInputs) {
        let own = &mut self.own;
        let x: &[u8] = bytemuck::cast_slice(inputs.x.data());
        if let Some(size) = wgpu::BufferSize::new(x.len() as u64) {
            own.belt
                .write_buffer(encoder, &own.x, 0, size)
                .copy_from_slice(x);
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

    fn submit(&mut self, inputs: &AttentionInputs) -> Result<()> {
        inputs.validate(&self.config)?;
        let (device, queue) = (self.ctx.device().clone(), self.ctx.queue().clone());
        scoped(&device, "running the layer", || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("attention"),
            });
            self.upload(&mut encoder, inputs);
            let encoded = self.encode(&mut encoder, &self.own.bindings);
            encoder.copy_buffer_to_buffer(
                &self.own.output,
                0,
                &self.own.staging,
                0,
                self.own.staging.size(),
            );
            queue.submit([encoder.finish()]);
            self.own.belt.recall();
            encoded
        })?
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
        let l = &self.layout;
        let (b, h, n) = (l.batch as usize, l.heads as usize, l.seq as usize);
        let (dk, dv) = (l.head_dim as usize, l.head_dim_v as usize);
        let qkv = self.read_buffer(&self.qkv)?;
        let rows = b * h * n;
        let (dp, dvp) = (l.dp as usize, l.dvp as usize);
        let q = unpad_rows(&qkv[..rows * dp], dp, dk);
        let k = unpad_rows(&qkv[rows * dp..2 * rows * dp], dp, dk);
        let v = unpad_rows(&qkv[2 * rows * dp..], dvp, dv);
        // keep_intermediates always resolves to the staged path, which has score buffers.
        let (scores, probs) = self.scores.as_ref().ok_or_else(|| {
            Error::InvalidConfig("the fused kernel stores no scores or probabilities".into())
        })?;
        let scores = unpad_rows(&self.read_buffer(scores)?, l.seq_pad as usize, n);
        let probs = unpad_rows(&self.read_buffer(probs)?, l.seq_pad as usize, n);
        let output = self.read_buffer(&self.own.output)?;
        let attention = match &self.attention {
            Some(a) => self.read_buffer(a)?,
            None => output.clone(),
        };
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

    fn read_buffer(&self, source: &wgpu::Buffer) -> Result<Vec<f32>> {
        let device = self.ctx.device();
        let size = source.size();
        let staging = scoped(device, "reading an intermediate", || {
            let staging = buffer(
                device,
                "intermediate read-back",
                size,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let mut encoder = device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(source, 0, &staging, 0, size);
            self.ctx.queue().submit([encoder.finish()]);
            staging
        })?;
        map_and_read(device, &staging, |bytes| {
            bytemuck::cast_slice::<u8, f32>(bytes).to_vec()
        })
    }
}

/// Maps `buffer` (after the work that fills it was submitted), waits for the device, hands the
/// bytes to `read` and unmaps.
pub(crate) fn map_and_read<T>(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv().map_err(|_| wgpu::BufferAsyncError)??;
    read_mapped(buffer, read)
}

/// Hands the bytes of a mapped `buffer` to `read`, then unmaps it.
fn read_mapped<T>(buffer: &wgpu::Buffer, read: impl FnOnce(&[u8]) -> T) -> Result<T> {
    let value = {
        let view = buffer.get_mapped_range(..).map_err(|e| Error::Wgpu {
            stage: "reading results back".into(),
            message: e.to_string(),
        })?;
        read(&view)
    };
    buffer.unmap();
    Ok(value)
}

fn dispatch(pass: &mut wgpu::ComputePass<'_>, stage: &Stage, group: &wgpu::BindGroup) {
    pass.set_pipeline(&stage.pipeline.pipeline);
    pass.set_bind_group(0, group, &[]);
    let [x, y, z] = stage.grid;
    pass.dispatch_workgroups(x, y, z);
}

/// Every dispatch of the plan, in order: the projection, the attention (staged or fused), the
/// output projection.
fn build_steps(
    ctx: &GpuContext,
    config: &AttentionConfig,
    l: &Layout,
    weights: &WeightBuffers,
    qkv: &wgpu::Buffer,
    scores: Option<&(wgpu::Buffer, wgpu::Buffer)>,
    attention: Option<&wgpu::Buffer>,
) -> Result<Vec<Step>> {
    let limits = ctx.limits();
    let own = |b: &wgpu::Buffer| Res::Own(b.clone());
    let stage = |label: &'static str, spec: DispatchSpec, resources: Vec<Res>| -> Result<Step> {
        let pipeline = ctx.kernels().pipeline(spec.kernel, &spec.overrides)?;
        let grid = fold_grid(
            spec.workgroups,
            limits.max_compute_workgroups_per_dimension,
            label,
        )?;
        let params = scoped(ctx.device(), "creating uniform parameters", || {
            init_uniform(ctx.device(), label, &spec.params)
        })?;
        Ok(Step::Dispatch(Stage {
            label,
            pipeline,
            params,
            grid,
            resources,
        }))
    };
    // The heads go straight to the output unless a projection follows.
    let heads_out = || match attention {
        Some(a) => own(a),
        None => Res::Output,
    };
    let mut steps = vec![stage(
        "project q, k, v",
        gemm::spec(
            l.batch * l.seq,
            l.qkv_width(),
            l.d_model,
            gemm::Store::HeadSplit {
                seq: l.seq,
                heads: l.heads,
                width_qk: l.dp,
                width_v: l.dvp,
                k_offset: l.k_offset,
                v_offset: l.v_offset,
            },
            &limits,
        ),
        vec![Res::X, own(&weights.w_qkv), own(&weights.b_qkv), own(qkv)],
    )?];
    match scores {
        None => steps.push(stage(
            "fused attention",
            kernels::fused::spec(l, &limits)?,
            vec![own(qkv), Res::KeyMask, heads_out()],
        )?),
        Some((scores, probs)) => {
            steps.push(stage(
                "scores",
                kernels::scores::spec(l, &limits),
                vec![own(qkv), Res::KeyMask, own(scores)],
            )?);
            if config.keep_intermediates {
                steps.push(Step::Copy {
                    from: scores.clone(),
                    to: probs.clone(),
                    bytes: scores.size(),
                });
            }
            steps.push(stage(
                "softmax",
                kernels::softmax::spec(l, &limits),
                vec![Res::KeyMask, own(probs)],
            )?);
            steps.push(stage(
                "weighted sum",
                kernels::weighted_sum::spec(l, &limits),
                vec![own(probs), own(qkv), heads_out()],
            )?);
        }
    }
    if let (Some(a), Some((w_o, b_o))) = (attention, &weights.w_o) {
        steps.push(stage(
            "output projection",
            gemm::spec(
                l.batch * l.seq,
                l.d_out_pad,
                l.heads * l.head_dim_v,
                gemm::Store::RowMajor {
                    ldc: l.d_out,
                    n_store: l.d_out,
                },
                &limits,
            ),
            vec![own(a), own(w_o), own(b_o), Res::Output],
        )?);
    }
    Ok(steps)
}

/// The plan's own input, mask, output and read-back buffers for [`AttentionPlan::run`].
fn own_io_buffers(
    device: &wgpu::Device,
    l: &Layout,
) -> (wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer) {
    let out_bytes = l.tokens() * l.d_out as u64 * 4;
    // Without a mask the kernels still bind one: four bytes they never read.
    let mask_bytes = if l.has_mask { l.tokens() * 4 } else { 4 };
    (
        buffer(device, "x", l.tokens() * l.d_model as u64 * 4, STORAGE),
        buffer(device, "key_mask", mask_bytes, STORAGE),
        buffer(device, "output", out_bytes, STORAGE),
        buffer(
            device,
            "staging",
            out_bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        ),
    )
}

/// Checks every buffer the plan will bind against the device's limits, naming the tensor.
fn check_sizes(config: &AttentionConfig, l: &Layout, limits: &wgpu::Limits) -> Result<()> {
    let rows = format!(
        "batch {} x heads {} x seq {}",
        config.batch, config.heads, config.seq_len
    );
    let mut tensors = vec![
        ("the input x", l.tokens() * l.d_model as u64, String::new()),
        (
            "the packed q|k|v weights",
            l.d_model as u64 * l.qkv_width() as u64,
            String::new(),
        ),
        (
            "the q, k and v buffer",
            l.qkv_len,
            format!(" ({rows} x {} padded widths)", 2 * l.dp + l.dvp),
        ),
        ("the output", l.tokens() * l.d_out as u64, String::new()),
        (
            "the concatenated heads",
            l.tokens() * (l.heads * l.head_dim_v) as u64,
            String::new(),
        ),
    ];
    if l.kernel == KernelChoice::Staged {
        tensors.push((
            "the score matrix",
            l.scores_len,
            format!(
                " ({rows} x {} keys, padded to {})",
                config.seq_len, l.seq_pad
            ),
        ));
    }
    for (what, elements, detail) in tensors {
        let bytes = elements * 4;
        let hint = if what == "the score matrix" {
            "; the staged path stores a [seq, seq] score matrix per head: use the fused kernel \
             (KernelChoice::Fused, or Auto), whose memory grows linearly with seq"
        } else {
            ""
        };
        let what = format!("{what}{detail} at {bytes} bytes");
        if bytes > limits.max_storage_buffer_binding_size {
            return Err(Error::LimitExceeded {
                limit: "max_storage_buffer_binding_size",
                max: limits.max_storage_buffer_binding_size,
                requested: bytes,
                what,
                hint: hint.into(),
            });
        }
        if bytes > limits.max_buffer_size {
            return Err(Error::LimitExceeded {
                limit: "max_buffer_size",
                max: limits.max_buffer_size,
                requested: bytes,
                what,
                hint: hint.into(),
            });
        }
        if elements > u32::MAX as u64 {
            return Err(Error::LimitExceeded {
                limit: "u32 indexing",
                max: u32::MAX as u64,
                requested: elements,
                what,
                hint: "; the kernels index buffers with 32-bit integers".into(),
            });
        }
    }
    Ok(())
}

fn check_io_buffer(name: &'static str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::BadBuffer {
            name,
            problem: format!("needs STORAGE usage, has {:?}", buffer.usage()),
        });
    }
    if buffer.size() < bytes {
        return Err(Error::BadBuffer {
            name,
            problem: format!("is {} bytes, needs at least {bytes}", buffer.size()),
        });
    }
    Ok(())
}

/// `[w_q | w_k | w_v]` side by side as `[d_model, heads * (2 dp + dvp)]`, each head's columns
/// padded with zeros to a multiple of 4, and the matching bias.
fn pack_qkv(
    config: &AttentionConfig,
    l: &Layout,
    weights: &AttentionWeights,
) -> (Vec<f32>, Vec<f32>) {
    let (h, dm) = (config.heads, config.d_model);
    let sections = [
        (&weights.w_q, &weights.b_q, config.head_dim, l.dp as usize),
        (&weights.w_k, &weights.b_k, config.head_dim, l.dp as usize),
        (
            &weights.w_v,
            &weights.b_v,
            config.head_dim_v,
            l.dvp as usize,
        ),
    ];
    let width = l.qkv_width() as usize;
    let mut w = vec![0.0f32; dm * width];
    let mut bias = vec![0.0f32; width];
    let mut col0 = 0;
    for (wt, bt, d, dpad) in sections {
        let cols = h * d;
        for head in 0..h {
            for c in 0..d {
                let src = head * d + c;
                let dst = col0 + head * dpad + c;
                for k in 0..dm {
                    w[k * width + dst] = wt.data()[k * cols + src];
                }
                if let Some(b) = bt {
                    bias[dst] = b.data()[src];
                }
            }
        }
        col0 += h * dpad;
    }
    (w, bias)
}

/// `w_o` with its columns padded to a multiple of 4, and the matching bias.
fn pack_out(l: &Layout, w_o: &Tensor, b_o: Option<&Tensor>) -> (Vec<f32>, Vec<f32>) {
    let (rows, d_out, pad) = (
        (l.heads * l.head_dim_v) as usize,
        l.d_out as usize,
        l.d_out_pad as usize,
    );
    let mut w = vec![0.0f32; rows * pad];
    for r in 0..rows {
        w[r * pad..r * pad + d_out].copy_from_slice(&w_o.data()[r * d_out..(r + 1) * d_out]);
    }
    let mut b = vec![0.0f32; pad];
    if let Some(b_o) = b_o {
        b[..d_out].copy_from_slice(b_o.data());
    }
    (w, b)
}

/// Drops the padding columns of row-major data with row stride `stride`.
fn unpad_rows(data: &[f32], stride: usize, width: usize) -> Vec<f32> {
    data.chunks_exact(stride)
        .flat_map(|row| &row[..width])
        .copied()
        .collect()
}

fn buffer(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        // Zero-sized buffers cannot be bound; four bytes stand in.
        size: bytes.max(4).div_ceil(4) * 4,
        usage,
        mapped_at_creation: false,
    })
}

fn init_buffer(device: &wgpu::Device, label: &str, data: &[f32]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(data),
        usage: STORAGE,
    })
}

fn init_uniform(device: &wgpu::Device, label: &str, data: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: data,
        usage: wgpu::BufferUsages::UNIFORM,
    })
}
