//! `wgpu-attention bench --decode`: one new token over a sweep of cached key counts, split-K
//! against the single-pass fused kernel, judged against the adapter's copy bandwidth and
//! streaming-read rate measured in the same run; and one chunked-prefill row. With
//! `--precision f16|both` the rows store Q, K, V and the output in f16 (half the K/V bytes
//! a step reads), and `both` gives each `kv_len` an f32 and an f16 row and their time ratio.

use std::time::Instant;

use clap::Args;
use serde::Serialize;
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, AttentionWeights, CachedAttention, CachedIo, CachedLayerConfig, DeviceLimits,
    GpuContext, Lengths, OperatorConfig, OperatorInputs, OperatorIo, OperatorPath, Precision,
    Random, Tensor, Tolerance, ceiling, compare, compare_bounded, reference,
};

use super::bench::BenchArgs;
use super::bench_precision::PrecisionArg;
use super::{AdapterArgs, CliError};

/// The decode sweep's own arguments (with `--heads`, `--head-dim`, `--batch`, `--warmup`,
/// `--repeats` and `--json` of `bench`).
#[derive(Debug, Clone, Default, Args)]
pub struct DecodeArgs {
    /// Time decoding instead of the layer: one new token (q_len 1) over a KV cache of each
    /// `--kv-len`, split-K against the single-pass fused kernel, beside the adapter's copy
    /// bandwidth and streaming-read rate; plus a chunked prefill (512 queries over 4096 keys).
    /// With `--precision f16` the rows store f16, with `both` each length is timed in both
    /// (the chunked prefill in f16 only for `f16`).
    #[arg(long)]
    pub decode: bool,
    /// Cached keys per row for `--decode` [default: 1024,4096].
    #[arg(long, value_delimiter = ',', num_args = 1.., value_parser = positive)]
    pub kv_len: Vec<usize>,
    /// Key/value heads for `--decode` [default: heads / 4].
    #[arg(long, value_parser = positive)]
    pub kv_heads: Option<usize>,
    /// Skip the chunked-prefill row of `--decode`.
    #[arg(long)]
    pub no_prefill: bool,
    /// Also time the whole cached layer's step at each `--kv-len` of `--decode`
    /// (CachedAttention: the projections writing K and V into the cache, split-K decode, the
    /// output projection; d_model = heads x head_dim), in each precision of `--precision`.
    #[arg(long)]
    pub layer: bool,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// One `kv_len` of the decode sweep, in one storage precision.
#[derive(Debug, Serialize)]
pub struct DecodeRow {
    /// Cached keys per row.
    pub kv_len: usize,
    /// How Q, K, V and the output are stored: `f32` or `f16` (arithmetic is f32 either way).
    pub precision: &'static str,
    /// Split-K: median milliseconds per token (one step: split and combine passes).
    pub ms_per_token: f64,
    /// Split-K: K and V bytes read per second.
    pub kv_bytes_per_s: f64,
    /// Key ranges split-K used.
    pub splits: usize,
    /// The single-pass fused kernel: median milliseconds per token.
    pub single_pass_ms_per_token: f64,
    /// The single-pass fused kernel: K and V bytes read per second.
    pub single_pass_kv_bytes_per_s: f64,
    /// Split-K's largest absolute error against the f64 reference.
    pub max_abs_error: f64,
    /// Whether split-K passed its check against the reference: the f32 tolerance, or in f16
    /// the f16 error bound (on the f16-rounded inputs).
    pub passed: bool,
    /// On an f16 row of `--precision both`: its split-K time per token over the f32 row's at
    /// the same `kv_len` (below 1: f16 is faster).
    pub f16_f32_time_ratio: Option<f64>,
    /// With `--layer`: the whole cached layer's step stored in the row's precision, median
    /// milliseconds per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_ms_per_token: Option<f64>,
}

/// The chunked-prefill row: `q_len` new tokens over `kv_len` keys, causal, as `Auto` runs it.
#[derive(Debug, Serialize)]
pub struct PrefillRow {
    /// New tokens.
    pub q_len: usize,
    /// Keys (cached and new).
    pub kv_len: usize,
    /// How Q, K, V and the output are stored.
    pub precision: &'static str,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Milliseconds per new token.
    pub ms_per_token: f64,
}

/// Everything `--decode` measured.
#[derive(Debug, Serialize)]
pub struct DecodeReport {
    /// The adapter's name.
    pub adapter: String,
    /// Its backend.
    pub backend: String,
    /// Its type (a CPU driver, a discrete GPU, ...).
    pub device_type: String,
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Timed steps per row (the median is reported).
    pub repeats: u32,
    /// `copy_buffer_to_buffer` bandwidth, bytes per second.
    pub copy_bytes_per_s: f64,
    /// A vec4 streaming-read kernel's rate, bytes per second.
    pub stream_bytes_per_s: f64,
    /// Bytes the two ceilings moved (the largest row's K and V).
    pub ceiling_bytes: u64,
    /// One row per `kv_len`.
    pub decode: Vec<DecodeRow>,
    /// The chunked-prefill row, unless skipped.
    pub chunked_prefill: Option<PrefillRow>,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The application's buffers of one shape, filled from host tensors.
struct Buffers {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl Buffers {
    /// Q, K and V stored in `precision` (padded to whole vec4), and room for the output.
    fn new(
        device: &wgpu::Device,
        inputs: &OperatorInputs,
        out_elements: usize,
        precision: Precision,
    ) -> Result<Self, CliError> {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let init = |name: &str, t: &Tensor| -> Result<wgpu::Buffer, CliError> {
            let mut bytes = precision.encode(name, t.shape(), t.data())?;
            bytes.resize(bytes.len().next_multiple_of(16), 0);
            Ok(
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: &bytes,
                    usage,
                }),
            )
        };
        let out_bytes = out_elements as u64 * precision.bytes();
        Ok(Buffers {
            q: init("q", &inputs.q)?,
            k: init("k", &inputs.k)?,
            v: init("v", &inputs.v)?,
            out: device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: out_bytes.next_multiple_of(16),
                usage,
                mapped_at_creation: false,
            }),
        })
    }

    fn io(&self) -> OperatorIo<'_> {
        OperatorIo {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            key_mask: None,
            bias: None,
            out: &self.out,
        }
    }
}

/// Median seconds of one call of `op` at `lengths` on `buffers`, each submission waited for.
fn time_op(
    ctx: &GpuContext,
    op: &AttentionOp,
    buffers: &Buffers,
    lengths: Lengths,
    warmup: usize,
    repeats: u32,
) -> Result<f64, CliError> {
    let bindings = op.bind(buffers.io())?;
    let (device, queue) = (ctx.device(), ctx.queue());
    let mut samples = Vec::new();
    for r in 0..warmup + repeats as usize {
        let start = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        op.encode(&mut encoder, &bindings, lengths)?;
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(wgpu_attention::Error::from)?;
        if r >= warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(samples))
}

/// Median seconds of one step of one token of a cached layer (d_model = heads x head_dim,
/// output projection, random weights, stored in `precision`) whose rows hold `kv - 1` tokens:
/// each timed submission resets the lengths, then runs the step. Its results are checked by
/// tests/cached_layer.rs and tests/f16_cached_layer.rs, not here (the reference of a
/// 4096-token layer forward is minutes of f64 on the CPU).
fn time_layer(
    ctx: &GpuContext,
    rng: &mut Random,
    (batch, heads, kv_heads, d): (usize, usize, usize, usize),
    (kv, precision): (usize, Precision),
    warmup: usize,
    repeats: u32,
) -> Result<f64, CliError> {
    let d_model = heads * d;
    let config = CachedLayerConfig::new(batch, d_model, heads, kv_heads, d, kv, 1)
        .with_output_projection(d_model)
        .with_precision(precision);
    let s = 1.0 / (d_model as f32).sqrt();
    let weights = AttentionWeights::new(
        rng.tensor([d_model, heads * d], s)?,
        rng.tensor([d_model, kv_heads * d], s)?,
        rng.tensor([d_model, kv_heads * d], s)?,
    )
    .with_output_projection(rng.tensor([heads * d, d_model], s)?, None);
    let mut layer = CachedAttention::new(ctx, &config, &weights)?;
    let (x, output) = layer.io_buffers();
    let token = rng.tensor([batch, d_model], 1.0)?;
    ctx.queue()
        .write_buffer(&x, 0, &precision.encode("x", token.shape(), token.data())?);
    let bindings = layer.bind(CachedIo {
        x: &x,
        output: &output,
    })?;
    let (device, queue) = (ctx.device(), ctx.queue());
    let before = vec![kv - 1; batch];
    let mut samples = Vec::new();
    for r in 0..warmup + repeats as usize {
        let start = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        layer.cache_mut().set_lengths(&mut encoder, &before)?;
        layer.encode_step(&mut encoder, &bindings, 1)?;
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(wgpu_attention::Error::from)?;
        if r >= warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(samples))
}

pub fn main(adapter: &AdapterArgs, args: &BenchArgs) -> Result<(), CliError> {
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    let info = ctx.adapter_info().clone();
    let (batch, heads, d) = (args.batch, args.heads(), args.head_dim());
    let kv_heads = args.decode.kv_heads.unwrap_or((heads / 4).max(1));
    let kv_lens = if args.decode.kv_len.is_empty() {
        vec![1024, 4096]
    } else {
        args.decode.kv_len.clone()
    };
    let precisions: &[Precision] = match args.precision {
        PrecisionArg::F32 => &[Precision::F32],
        PrecisionArg::F16 => &[Precision::F16],
        PrecisionArg::Both => &[Precision::F32, Precision::F16],
    };
    // Bytes of K and V a step reads: half as many in f16.
    let kv_bytes = |kv: usize, p: Precision| (batch * kv_heads * kv * 2 * d) as u64 * p.bytes();
    let largest = kv_lens.iter().copied().max().unwrap_or(1);
    // The ceilings move the largest f32 row's bytes (an f16 row's are half of them).
    let ceiling_bytes = kv_bytes(largest, Precision::F32);
    let repeats = args.repeats as usize;
    eprintln!("measuring the copy and streaming-read ceilings on {ceiling_bytes} bytes...");
    let copy = ceiling::copy_bytes_per_s(&ctx, ceiling_bytes, repeats)?;
    let stream = ceiling::stream_bytes_per_s(&ctx, ceiling_bytes, repeats)?;
    let mut rng = Random::new(1);
    let mut rows = Vec::new();
    for &kv in &kv_lens {
        let inputs = OperatorInputs::new(
            rng.tensor([batch, heads, 1, d], 1.0)?,
            rng.tensor([batch, kv_heads, kv, d], 1.0)?,
            rng.tensor([batch, kv_heads, kv, d], 1.0)?,
        );
        let mut f32_ms = None;
        for &precision in precisions {
            eprintln!("kv_len {kv}, {precision}...");
            let buffers = Buffers::new(ctx.device(), &inputs, batch * heads * d, precision)?;
            let base = OperatorConfig::new(batch, heads, kv_heads, d, 1, kv)
                .causal()
                .with_precision(precision);
            let split = AttentionOp::new(&ctx, &base.clone().with_path(OperatorPath::SplitK))?;
            let single = AttentionOp::new(&ctx, &base.clone().with_path(OperatorPath::Prefill))?;
            let lengths = Lengths {
                q_len: 1,
                kv_len: kv,
            };
            let t_split = time_op(&ctx, &split, &buffers, lengths, args.warmup, args.repeats)?;
            let t_single = time_op(&ctx, &single, &buffers, lengths, args.warmup, args.repeats)?;
            // The figures count only if the answer is right: split-K's output against the f64
            // reference (the op's own run, on its own copies of the same inputs); in f16
            // under the f16 bound, the reference starting from the f16-rounded inputs.
            let mut check = AttentionOp::new(&ctx, &base.clone().with_path(OperatorPath::SplitK))?;
            let gpu = check.run(&inputs)?;
            let cpu = reference::operator(&base, &inputs)?;
            let cmp = match precision {
                Precision::F32 => compare(&gpu, &cpu, Tolerance::F32)?,
                Precision::F16 => compare_bounded(
                    &gpu,
                    &cpu,
                    &reference::operator_error_bound(&base, &inputs)?,
                )?,
            };
            let ms = t_split * 1e3;
            if precision == Precision::F32 {
                f32_ms = Some(ms);
            }
            // The cached layer, in the row's precision.
            let layer_ms_per_token = if args.decode.layer {
                let shape = (batch, heads, kv_heads, d);
                let at = (kv, precision);
                let t = time_layer(&ctx, &mut rng, shape, at, args.warmup, args.repeats)?;
                Some(t * 1e3)
            } else {
                None
            };
            rows.push(DecodeRow {
                kv_len: kv,
                precision: precision.name(),
                ms_per_token: ms,
                kv_bytes_per_s: kv_bytes(kv, precision) as f64 / t_split,
                splits: split.splits().unwrap_or(1),
                single_pass_ms_per_token: t_single * 1e3,
                single_pass_kv_bytes_per_s: kv_bytes(kv, precision) as f64 / t_single,
                max_abs_error: cmp.max_abs,
                passed: cmp.passed(),
                f16_f32_time_ratio: f32_ms
                    .filter(|_| precision == Precision::F16)
                    .map(|f| ms / f),
                layer_ms_per_token,
            });
        }
    }
    let chunked_prefill = if args.decode.no_prefill {
        None
    } else {
        let (q_len, kv) = (512, 4096);
        let precision = match args.precision {
            PrecisionArg::F16 => Precision::F16,
            _ => Precision::F32,
        };
        eprintln!("chunked prefill: {q_len} queries over {kv} keys, {precision}...");
        let inputs = OperatorInputs::new(
            rng.tensor([batch, heads, q_len, d], 1.0)?,
            rng.tensor([batch, kv_heads, kv, d], 1.0)?,
            rng.tensor([batch, kv_heads, kv, d], 1.0)?,
        );
        let buffers = Buffers::new(ctx.device(), &inputs, batch * heads * q_len * d, precision)?;
        let config = OperatorConfig::new(batch, heads, kv_heads, d, q_len, kv)
            .causal()
            .with_precision(precision);
        let op = AttentionOp::new(&ctx, &config)?;
        let t = time_op(
            &ctx,
            &op,
            &buffers,
            Lengths { q_len, kv_len: kv },
            1,
            args.repeats.min(3),
        )?;
        Some(PrefillRow {
            q_len,
            kv_len: kv,
            precision: precision.name(),
            ms: t * 1e3,
            ms_per_token: t * 1e3 / q_len as f64,
        })
    };
    let report = DecodeReport {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        batch,
        heads,
        kv_heads,
        head_dim: d,
        repeats: args.repeats,
        copy_bytes_per_s: copy,
        stream_bytes_per_s: stream,
        ceiling_bytes,
        decode: rows,
        chunked_prefill,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let file = std::fs::File::create(path).map_err(|e| CliError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report).map_err(|e| {
            CliError::File {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    }
    if let Some(bad) = report.decode.iter().find(|r| !r.passed) {
        return Err(CliError::Mismatch(format!(
            "split-K decode at kv_len {} ({}) is off the f64 reference by {:e}: the timings \
             above are of a wrong answer",
            bad.kv_len, bad.precision, bad.max_abs_error
        )));
    }
    Ok(())
}

fn print_table(r: &DecodeReport) {
    let gb = |x: f64| x / 1e9;
    println!(
        "decode on {} ({}, {}): batch {}, {} query heads over {} kv heads of {}, q_len 1, \
         median of {}",
        r.adapter, r.backend, r.device_type, r.batch, r.heads, r.kv_heads, r.head_dim, r.repeats
    );
    println!(
        "ceilings ({} MB): copy_buffer_to_buffer {:.2} GB/s, streaming read (vec4) {:.2} GB/s",
        r.ceiling_bytes / 1_000_000,
        gb(r.copy_bytes_per_s),
        gb(r.stream_bytes_per_s)
    );
    println!(
        "{:>8} {:>5} {:>7} {:>12} {:>9} {:>8} {:>8} {:>14} {:>9} {:>8} {:>10} {:>8}",
        "kv_len",
        "prec",
        "splits",
        "split ms/tok",
        "K/V GB/s",
        "/stream",
        "/copy",
        "single ms/tok",
        "K/V GB/s",
        "speedup",
        "max err",
        "f16/f32"
    );
    for row in &r.decode {
        let ratio = row
            .f16_f32_time_ratio
            .map_or(String::new(), |x| format!("{x:.2}"));
        println!(
            "{:>8} {:>5} {:>7} {:>12.3} {:>9.2} {:>8.2} {:>8.2} {:>14.3} {:>9.2} {:>8.2} {:>10.2e} \
             {:>8}",
            row.kv_len,
            row.precision,
            row.splits,
            row.ms_per_token,
            gb(row.kv_bytes_per_s),
            row.kv_bytes_per_s / r.stream_bytes_per_s,
            row.kv_bytes_per_s / r.copy_bytes_per_s,
            row.single_pass_ms_per_token,
            gb(row.single_pass_kv_bytes_per_s),
            row.single_pass_ms_per_token / row.ms_per_token,
            row.max_abs_error,
            ratio
        );
    }
    for row in &r.decode {
        let Some(ms) = row.layer_ms_per_token else {
            continue;
        };
        // Beside the f32 layer's time at the same length, when both were timed.
        let ratio = r
            .decode
            .iter()
            .find(|f| f.kv_len == row.kv_len && f.precision == "f32" && row.precision == "f16")
            .and_then(|f| f.layer_ms_per_token)
            .map_or(String::new(), |f| format!(" (f16/f32 {:.2})", ms / f));
        println!(
            "cached layer step at kv_len {} in {} (d_model {}: projections into the cache, \
             split-K decode, output projection): {:.3} ms per token{ratio}",
            row.kv_len,
            row.precision,
            r.heads * r.head_dim,
            ms
        );
    }
    if let Some(p) = &r.chunked_prefill {
        println!(
            "chunked prefill: {} queries over {} keys (causal, Auto = fused, {}): {:.1} ms, {:.3} \
             ms per token",
            p.q_len, p.kv_len, p.precision, p.ms, p.ms_per_token
        );
    }
}
