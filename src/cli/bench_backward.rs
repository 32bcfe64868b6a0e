//! `wgpu-attention bench --backward`: the attention operator's backward beside its forward,
//! per sequence length, on an application's buffers: wall-clock time of each (submission to
//! completion, median of the repeats), their ratio (FlashAttention-2's backward costs about
//! 2.5x its forward), GFLOP/s and the memory the backward adds.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, BackwardIo, DeviceLimits, GpuContext, Lengths, OperatorConfig, OperatorIo, Random,
};

use super::bench::{BenchArgs, Stat};
use super::{AdapterArgs, CliError};

/// The FLOP counts the GFLOP/s columns use: the useful work, causal counted dense, as the
/// layer rows count it. The backward is FlashAttention-2's five `N x N x D` products (S, dP,
/// dV, dK, dQ); ours forms S and dP twice (once per gradient kernel), seven in all.
const FLOPS: &str = "forward 2*B*H*N*N*(D+Dv); backward 2.5x forward (S, dP, dV, dK, dQ); \
                     causal counted dense";

/// One sequence length.
#[derive(Debug, Clone, Serialize)]
pub struct BackwardRow {
    pub seq: usize,
    pub forward: Stat,
    pub backward: Stat,
    /// Median backward time over median forward time.
    pub ratio: f64,
    pub forward_gflops: f64,
    pub backward_gflops: f64,
    /// What gradients add to a forward: its saved logsumexp, f32 per query row.
    pub lse_bytes: u64,
    /// The backward's own scratch (D and the logsumexp per row, the key mask).
    pub scratch_bytes: u64,
}

/// Everything one `bench --backward` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BackwardReport {
    pub adapter: String,
    pub backend: String,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub warmup: usize,
    pub repeats: u32,
    pub timing: &'static str,
    pub flops: &'static str,
    pub rows: Vec<BackwardRow>,
}

/// Times `record` (recorded into a fresh encoder, submitted, waited for): `warmup` untimed
/// runs, then `repeats` timed.
fn time(
    ctx: &GpuContext,
    warmup: usize,
    repeats: u32,
    record: impl Fn(&mut wgpu::CommandEncoder) -> Result<(), CliError>,
) -> Result<Stat, CliError> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let mut samples = Vec::new();
    for n in 0..warmup + repeats as usize {
        let mut encoder = device.create_command_encoder(&Default::default());
        record(&mut encoder)?;
        let start = Instant::now();
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(wgpu_attention::Error::from)?;
        if n >= warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(Stat::of(&samples))
}

fn row(ctx: &GpuContext, args: &BenchArgs, seq: usize) -> Result<BackwardRow, CliError> {
    let (b, h, d) = (args.batch, args.heads(), args.head_dim());
    let mut config = OperatorConfig::new(b, h, h, d, seq, seq).with_gradients();
    config.causal = args.causal;
    let op = AttentionOp::new(ctx, &config)?;
    let device = ctx.device();
    let mut rng = Random::new(seq as u64);
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let elements = b * h * seq * d;
    let mut filled = |std: f32| -> Result<wgpu::Buffer, CliError> {
        let t = rng_tensor(&mut rng, elements, std)?;
        Ok(
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bench"),
                contents: bytemuck::cast_slice(&t),
                usage,
            }),
        )
    };
    let (q, k, v, grad_out) = (filled(1.0)?, filled(1.0)?, filled(1.0)?, filled(1.0)?);
    let empty = |n: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench"),
            size: (n * 4).next_multiple_of(16) as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    let (out, lse) = (empty(elements), empty(b * h * seq));
    let (dq, dk, dv) = (empty(elements), empty(elements), empty(elements));
    let forward = op.bind_with_lse(
        OperatorIo {
            q: &q,
            k: &k,
            v: &v,
            key_mask: None,
            bias: None,
            out: &out,
        },
        &lse,
    )?;
    let backward = op.bind_backward(BackwardIo {
        q: &q,
        k: &k,
        v: &v,
        key_mask: None,
        bias: None,
        out: &out,
        lse: &lse,
        grad_out: &grad_out,
        grad_q: &dq,
        grad_k: &dk,
        grad_v: &dv,
    })?;
    let lengths = Lengths {
        q_len: seq,
        kv_len: seq,
    };
    let fwd = time(ctx, args.warmup, args.repeats, |e| {
        Ok(op.encode(e, &forward, lengths)?)
    })?;
    let bwd = time(ctx, args.warmup, args.repeats, |e| {
        Ok(op.encode_backward(e, &backward, lengths)?)
    })?;
    let flops = 2.0 * (b * h) as f64 * (seq as f64).powi(2) * (2 * d) as f64;
    Ok(BackwardRow {
        seq,
        forward: fwd,
        backward: bwd,
        ratio: bwd.median / fwd.median,
        forward_gflops: flops / fwd.median / 1e9,
        backward_gflops: 2.5 * flops / bwd.median / 1e9,
        lse_bytes: (b * h * seq * 4) as u64,
        scratch_bytes: op.backward_scratch_bytes().unwrap_or(0),
    })
}

fn rng_tensor(rng: &mut Random, n: usize, std: f32) -> Result<Vec<f32>, CliError> {
    Ok(rng.tensor([n], std)?.into_data())
}

/// Runs the sweep of `args` (its batch, heads, head width, lengths, causal flag, warm-up and
/// repeats) and prints the table; `--json` writes every figure.
pub fn main(adapter: &AdapterArgs, args: &BenchArgs, lengths: &[usize]) -> Result<(), CliError> {
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    let info = ctx.adapter_info().clone();
    let mut report = BackwardReport {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        batch: args.batch,
        heads: args.heads(),
        head_dim: args.head_dim(),
        causal: args.causal,
        warmup: args.warmup,
        repeats: args.repeats,
        timing: "wall clock, submission to completion",
        flops: FLOPS,
        rows: Vec::new(),
    };
    println!(
        "attention backward beside forward on {} ({:?}): batch {}, heads {}, head_dim {}{}",
        info.name,
        info.backend,
        args.batch,
        args.heads(),
        args.head_dim(),
        if args.causal { ", causal" } else { "" }
    );
    println!(
        "{:>7} {:>12} {:>12} {:>8} {:>11} {:>11} {:>12} {:>14}",
        "seq",
        "forward ms",
        "backward ms",
        "bwd/fwd",
        "fwd GFLOP/s",
        "bwd GFLOP/s",
        "lse bytes",
        "scratch bytes"
    );
    for &seq in lengths {
        let r = row(&ctx, args, seq)?;
        println!(
            "{:>7} {:>12.3} {:>12.3} {:>8.2} {:>11.2} {:>11.2} {:>12} {:>14}",
            r.seq,
            r.forward.median * 1e3,
            r.backward.median * 1e3,
            r.ratio,
            r.forward_gflops,
            r.backward_gflops,
            r.lse_bytes,
            r.scratch_bytes
        );
        report.rows.push(r);
    }
    println!("FLOPs: {FLOPS}");
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

fn write_json(path: &Path, report: &BackwardReport) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(report).map_err(|e| CliError::File {
        path: path.into(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| CliError::Io {
        path: path.into(),
        source,
    })
}
