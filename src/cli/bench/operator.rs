//! The attention operator's rows: grouped-query attention as Llama 3 runs it (32 query heads
//! over 8 key/value heads of 128, causal) at several lengths, and cross-attention as Whisper's
//! decoder runs it (64 queries over the encoder's 1500 keys, 8 heads of 64).
//!
//! The operator runs on buffers made here as an application makes its own, bound once. Its
//! pass is timed with the application's own timestamp queries through
//! [`AttentionOp::encode_with`] where the device has them, else by the wall clock around a
//! submission waited for; `run` (upload, pass, read-back) is timed as a caller sees it. The
//! output is checked against the f64 reference on the query heads of the first and last
//! key/value heads (a reference of every head would take longer than the bench itself).

use std::time::Instant;

use serde::Serialize;
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, GpuContext, Lengths, OperatorConfig, OperatorInputs, OperatorIo, Random, Tensor,
    Tolerance, compare, reference,
};

use super::super::CliError;
use super::{BenchArgs, ErrorFigures, Stat};

/// How the operator's GFLOP/s are counted.
pub const FLOPS_OPERATOR: &str = "2*B*H*Lq*Lkv*(D+Dv) (causal counted dense)";

/// One shape the operator is timed at.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OperatorShape {
    /// `gqa` or `cross`.
    pub name: &'static str,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub causal: bool,
}

impl OperatorShape {
    fn config(&self) -> OperatorConfig {
        let config = OperatorConfig::new(
            self.batch,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.q_len,
            self.kv_len,
        );
        if self.causal { config.causal() } else { config }
    }

    fn flops(&self) -> f64 {
        2.0 * (self.batch * self.heads) as f64
            * self.q_len as f64
            * self.kv_len as f64
            * (2 * self.head_dim) as f64
    }
}

/// One operator shape's figures.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorRow {
    pub shape: OperatorShape,
    /// The operator's compute pass.
    pub gpu: Stat,
    /// `run`: upload, the pass, read-back, as a caller sees it.
    pub end_to_end: Stat,
    /// Counted as [`FLOPS_OPERATOR`], over the pass's median time.
    pub gflops: f64,
    /// Query heads checked against the f64 reference (all of two key/value groups).
    pub checked_heads: usize,
    pub error: ErrorFigures,
}

/// The shapes to time: GQA at `--op-len` (by default 256 on a software adapter, where a
/// longer one takes many seconds, and 256, 1024, 4096 on a GPU), then the cross-attention row.
pub fn shapes(args: &BenchArgs, software: bool) -> Vec<OperatorShape> {
    if args.no_op {
        return Vec::new();
    }
    let lengths = if !args.op_len.is_empty() {
        args.op_len.clone()
    } else if software {
        vec![256]
    } else {
        vec![256, 1024, 4096]
    };
    let gqa = lengths.into_iter().map(|n| OperatorShape {
        name: "gqa",
        batch: 1,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        q_len: n,
        kv_len: n,
        causal: true,
    });
    let cross = OperatorShape {
        name: "cross",
        batch: 1,
        heads: 8,
        kv_heads: 8,
        head_dim: 64,
        q_len: 64,
        kv_len: args.op_cross_kv_len,
        causal: false,
    };
    gqa.chain(std::iter::once(cross)).collect()
}

/// Times the operator at `shape` and checks its output.
pub fn measure(
    ctx: &GpuContext,
    shape: &OperatorShape,
    args: &BenchArgs,
) -> Result<OperatorRow, CliError> {
    let config = shape.config();
    let mut op = AttentionOp::new(ctx, &config)?;
    let (b, h, kvh, d) = (shape.batch, shape.heads, shape.kv_heads, shape.head_dim);
    // The seed is the shape, so each row is reproducible on its own.
    let mut random = Random::new((shape.q_len * 31 + shape.kv_len) as u64);
    let inputs = OperatorInputs::new(
        random.tensor([b, h, shape.q_len, d], 1.0)?,
        random.tensor([b, kvh, shape.kv_len, d], 1.0)?,
        random.tensor([b, kvh, shape.kv_len, d], 1.0)?,
    );
    let lengths = Lengths {
        q_len: shape.q_len,
        kv_len: shape.kv_len,
    };
    let gpu = time_pass(ctx, &op, &inputs, lengths, args)?;
    let mut end_to_end = Vec::new();
    let mut output = None;
    for _ in 0..args.repeats {
        let start = Instant::now();
        output = Some(op.run(&inputs)?);
        end_to_end.push(start.elapsed().as_secs_f64());
    }
    let output = output.ok_or_else(|| CliError::Usage("--repeats must be at least 1".into()))?;
    let (checked_heads, error) = check(&config, &inputs, &output)?;
    let gpu = Stat::of(&gpu);
    Ok(OperatorRow {
        shape: *shape,
        gpu,
        end_to_end: Stat::of(&end_to_end),
        gflops: shape.flops() / gpu.median / 1e9,
        checked_heads,
        error,
    })
}

/// The pass's time, `--repeats` times after `--warmup` untimed calls, on buffers bound as an
/// application binds its own.
fn time_pass(
    ctx: &GpuContext,
    op: &AttentionOp,
    inputs: &OperatorInputs,
    lengths: Lengths,
    args: &BenchArgs,
) -> Result<Vec<f64>, CliError> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let buffer = |data: &[f32]| {
        // Q, K and V are read as vec4: sizes rounded up to 16 bytes.
        let mut contents = data.to_vec();
        contents.resize(data.len().next_multiple_of(4), 0.0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench operator tensor"),
            contents: bytemuck::cast_slice(&contents),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let (q, k, v) = (
        buffer(inputs.q.data()),
        buffer(inputs.k.data()),
        buffer(inputs.v.data()),
    );
    let out_len = op
        .config()
        .output_shape(lengths.q_len)
        .iter()
        .product::<usize>();
    let out = buffer(&vec![0.0; out_len]);
    let bindings = op.bind(OperatorIo {
        q: &q,
        k: &k,
        v: &v,
        key_mask: None,
        bias: None,
        out: &out,
    })?;
    let timer = ctx.has_timestamps().then(|| Timer::new(device));
    let mut samples = Vec::new();
    for i in 0..args.warmup + args.repeats as usize {
        let mut encoder = device.create_command_encoder(&Default::default());
        let writes = timer.as_ref().map(|t| wgpu::ComputePassTimestampWrites {
            query_set: &t.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        });
        op.encode_with(&mut encoder, &bindings, lengths, writes)?;
        if let Some(t) = &timer {
            t.resolve(&mut encoder);
        }
        let start = Instant::now();
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(wgpu_attention::Error::from)?;
        let wall = start.elapsed().as_secs_f64();
        let seconds = match &timer {
            Some(t) => t.read(device, queue)?,
            None => wall,
        };
        if i >= args.warmup {
            samples.push(seconds);
        }
    }
    Ok(samples)
}

/// One pair of timestamp queries and the buffers to read them.
struct Timer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    read: wgpu::Buffer,
}

impl Timer {
    fn new(device: &wgpu::Device) -> Self {
        let buffer = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench operator timestamps"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Timer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench operator timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            read: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
        }
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.read, 0, 16);
    }

    /// The pass's seconds, once the submission that resolved them is done.
    fn read(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<f64, CliError> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.read.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = sender.send(r);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(wgpu_attention::Error::from)?;
        receiver
            .recv()
            .map_err(|_| read_error("the read-back was dropped"))?
            .map_err(wgpu_attention::Error::from)?;
        let stamps: Vec<u64> = {
            let mapped = self
                .read
                .get_mapped_range(..)
                .map_err(|e| read_error(&e.to_string()))?;
            bytemuck::cast_slice(&mapped).to_vec()
        };
        self.read.unmap();
        let ticks = stamps[1].saturating_sub(stamps[0]);
        Ok(ticks as f64 * f64::from(queue.get_timestamp_period()) / 1e9)
    }
}

fn read_error(message: &str) -> CliError {
    CliError::Attention(wgpu_attention::Error::Wgpu {
        stage: "reading the operator's timestamps".into(),
        message: message.into(),
    })
}

/// The output's error on the query heads of the first and last key/value heads, each group
/// run through the reference alone (GQA groups are independent).
fn check(
    config: &OperatorConfig,
    inputs: &OperatorInputs,
    output: &Tensor,
) -> Result<(usize, ErrorFigures), CliError> {
    let group = config.heads / config.kv_heads;
    let mut groups = vec![0, config.kv_heads - 1];
    groups.dedup();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &kh in &groups {
        let heads = kh * group..(kh + 1) * group;
        let sub = OperatorConfig {
            heads: group,
            kv_heads: 1,
            ..config.clone()
        };
        let sub_inputs = OperatorInputs::new(
            heads_of(&inputs.q, heads.clone())?,
            heads_of(&inputs.k, kh..kh + 1)?,
            heads_of(&inputs.v, kh..kh + 1)?,
        );
        want.extend_from_slice(reference::operator(&sub, &sub_inputs)?.data());
        got.extend_from_slice(heads_of(output, heads)?.data());
    }
    let shape = [got.len()];
    let c = compare(
        &Tensor::new(shape, got)?,
        &Tensor::new(shape, want)?,
        Tolerance::F32,
    )?;
    Ok((
        groups.len() * group,
        ErrorFigures {
            max_abs: c.max_abs,
            tolerance_used: c.worst_ratio,
            passed: c.passed(),
        },
    ))
}

/// Heads `heads` of a head-major `[batch, heads, len, dim]` tensor.
fn heads_of(t: &Tensor, heads: std::ops::Range<usize>) -> Result<Tensor, CliError> {
    let [batch, all, len, dim]: [usize; 4] = t
        .shape()
        .try_into()
        .map_err(|_| CliError::Usage(format!("a rank-4 tensor, not {:?}", t.shape())))?;
    let block = len * dim;
    let data = (0..batch)
        .flat_map(|b| {
            let start = (b * all + heads.start) * block;
            t.data()[start..start + heads.len() * block].iter().copied()
        })
        .collect();
    Ok(Tensor::new([batch, heads.len(), len, dim], data)?)
}
