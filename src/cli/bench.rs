//! `wgpu-attention bench`: a sweep of sequence lengths, timing every GPU stage, the whole layer
//! end to end and the fast CPU path, with each result's error against the f64 reference.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use wgpu_attention::cpu;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionShape, AttentionWeights,
    CpuAttention, DeviceLimits, Error, GpuContext, KernelChoice, Random, Stage, Tensor,
    TimingSource, Tolerance, compare, reference,
};

use super::bench_precision::PrecisionArg;
use super::report;
use super::{AdapterArgs, CliError};

/// Arguments of `wgpu-attention bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Batch rows.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub batch: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub heads: usize,
    /// Width of each head (queries, keys and values).
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub head_dim: usize,
    /// Width of the tokens and of the output projection [default: heads * head_dim].
    #[arg(long, value_parser = positive)]
    pub d_model: Option<usize>,
    /// First sequence length of the sweep; each next one doubles it.
    #[arg(long, default_value_t = 64)]
    pub seq_start: usize,
    /// Last sequence length [default: 1024 on a software (CPU) adapter, 8192 on a GPU].
    #[arg(long)]
    pub seq_max: Option<usize>,
    /// Exact sequence lengths instead of the doubling sweep, e.g. `--seq 128,512,1024`.
    #[arg(long, value_delimiter = ',', num_args = 1.., value_parser = positive)]
    pub seq: Vec<usize>,
    /// Causal masking (query i attends keys j <= i).
    #[arg(long)]
    pub causal: bool,
    /// GPU kernels to time, in one run so that their ratio is fair, e.g. `--kernel fused`
    /// (`auto` is timed as the kernel it resolves to).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        num_args = 1..,
        default_values_t = [KernelChoice::Staged, KernelChoice::Fused]
    )]
    pub kernel: Vec<KernelChoice>,
    /// Untimed runs before measuring each shape.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs per shape; the table shows the median, files the minimum too. The CPU path
    /// takes at most 5 (it is the slow side).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,
    /// Skip the CPU side.
    #[arg(long)]
    pub no_cpu: bool,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every figure as CSV, one row per shape and path.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw time and GFLOP/s against sequence length as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Storage precision: f32 (this sweep), f16 (f16 storage, f32 arithmetic, on the fused
    /// kernel) or both side by side with the f16/f32 time ratio per length; the f16 and both
    /// sweeps print their own table and take --seq*, --batch, --heads, --head-dim, --d-model,
    /// --causal, --warmup and --repeats.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

impl BenchArgs {
    /// The short sweep `cargo run --release` shows after the walkthrough.
    pub fn quick_default() -> Self {
        BenchArgs {
            batch: 1,
            heads: 8,
            head_dim: 64,
            d_model: None,
            seq_start: 64,
            seq_max: Some(512),
            seq: Vec::new(),
            causal: false,
            kernel: vec![KernelChoice::Staged, KernelChoice::Fused],
            warmup: 1,
            repeats: 3,
            no_cpu: false,
            json: None,
            csv: None,
            plot: None,
            precision: PrecisionArg::F32,
        }
    }

    /// Refuses, before any data is made, a length whose input alone exceeds the adapter's
    /// largest buffer: `--seq 4294967297` used to abort allocating 68 GB on the CPU.
    fn check_sizes(&self, lengths: &[usize], limits: &wgpu::Limits) -> Result<(), CliError> {
        let d_model = self.d_model.unwrap_or(self.heads * self.head_dim);
        let largest = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        for &seq in lengths {
            let bytes = [self.batch, seq, d_model, 4]
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            if bytes.is_none_or(|b| b > largest) {
                return Err(CliError::Usage(format!(
                    "--seq {seq}: the input x [batch {}, seq {seq}, d_model {d_model}] alone \
                     needs {} bytes, over this adapter's largest buffer of {largest} bytes",
                    self.batch,
                    bytes.map_or("more than 2^64".to_string(), |b| b.to_string())
                )));
            }
        }
        Ok(())
    }

    pub(super) fn sequence_lengths(&self, info: &wgpu::AdapterInfo) -> Vec<usize> {
        if !self.seq.is_empty() {
            return self.seq.clone();
        }
        let software = info.device_type == wgpu::DeviceType::Cpu;
        let max = self.seq_max.unwrap_or(if software { 1024 } else { 8192 });
        std::iter::successors(Some(self.seq_start.max(1)), |n| n.checked_mul(2))
            .take_while(|&n| n <= max)
            .collect()
    }

    pub(super) fn config(&self, seq: usize) -> AttentionConfig {
        let d_model = self.d_model.unwrap_or(self.heads * self.head_dim);
        let mut config = AttentionConfig::new(self.batch, seq, d_model, self.heads, self.head_dim)
            .with_output_projection(d_model);
        config.causal = self.causal;
        config
    }

    /// The kernels to time, each once, in the order given.
    fn kernels(&self) -> Vec<KernelChoice> {
        let mut kernels = self.kernel.clone();
        kernels.dedup();
        kernels
    }
}

/// Median and minimum of repeated timings, in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Stat {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Error of a result against the f64 reference over the checked rows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ErrorFigures {
    pub max_abs: f64,
    /// The largest share of the allowance `atol + rtol·|ref|` any element used (at most 1
    /// passes). Unlike a relative error it is not inflated by references near zero.
    pub tolerance_used: f64,
    pub passed: bool,
}

/// One GPU path at one sequence length.
#[derive(Debug, Clone, Serialize)]
pub struct GpuRow {
    pub seq: usize,
    pub kernel: &'static str,
    pub memory_bytes: u64,
    /// Each stage's GPU time.
    pub stages: Vec<(&'static str, Stat)>,
    /// Sum of the stages, each timed in a pass of its own.
    pub gpu: Stat,
    /// `softmax(QKᵀ)V` alone: every stage but the projections.
    pub attention: Stat,
    /// `run`: upload, dispatches, read-back, as a caller sees it.
    pub end_to_end: Stat,
    pub attention_gflops: f64,
    pub layer_gflops: f64,
    pub error: ErrorFigures,
}

/// The fast CPU path at one sequence length.
#[derive(Debug, Clone, Serialize)]
pub struct CpuRow {
    pub seq: usize,
    pub threads: usize,
    /// Untimed runs of each of the layer and the attention before timing.
    pub warmup: usize,
    /// Timed runs behind each median (the GPU's `--repeats`, at most [`CPU_MAX_REPEATS`]).
    pub samples: usize,
    pub layer: Stat,
    pub attention: Stat,
    pub layer_gflops: f64,
    pub attention_gflops: f64,
    pub error: ErrorFigures,
}

/// A shape a path could not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub seq: usize,
    pub kernel: &'static str,
    pub reason: String,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub timing: &'static str,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub d_model: usize,
    pub causal: bool,
    pub warmup: usize,
    pub repeats: u32,
    pub flops_attention: &'static str,
    pub flops_layer: &'static str,
    pub checked_rows: usize,
    pub gpu: Vec<GpuRow>,
    pub cpu: Vec<CpuRow>,
    pub skipped: Vec<Skipped>,
}

const FLOPS_ATTENTION: &str = "4*B*H*N*N*D (2*B*H*N*N*(D+Dv); causal counted dense)";
const FLOPS_LAYER: &str =
    "attention + 2*B*N*d_model*H*(2*D+Dv) (q, k, v projections) + 2*B*N*H*Dv*d_out (output)";

/// Output rows checked against the f64 reference per shape: all, up to this many.
const CHECKED_ROWS: usize = 64;

/// Timed CPU runs per shape at most: at seq 1024 a CPU layer takes seconds on a small machine,
/// and its median is steady well before ten runs.
pub const CPU_MAX_REPEATS: usize = 5;

pub fn main(
    adapter: &AdapterArgs,
    args: &BenchArgs,
    progress: &MultiProgress,
) -> Result<(), CliError> {
    if args.precision != PrecisionArg::F32 {
        return super::bench_precision::main(adapter, args, args.precision, progress);
    }
    // The sweep reaches past wgpu's portable defaults where the adapter allows.
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    let info = ctx.adapter_info().clone();
    let lengths = args.sequence_lengths(&info);
    if lengths.is_empty() {
        return Err(CliError::Usage(format!(
            "no sequence lengths: --seq-start {} is past --seq-max {:?}",
            args.seq_start, args.seq_max
        )));
    }
    args.check_sizes(&lengths, &ctx.limits())?;
    let kernels = args.kernels();
    let bar = progress.add(ProgressBar::new(
        (lengths.len() * (kernels.len() + usize::from(!args.no_cpu))) as u64,
    ));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:24} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut report = Report {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        timing: if ctx.has_timestamps() {
            "timestamp queries"
        } else {
            "wall clock per stage"
        },
        batch: args.batch,
        heads: args.heads,
        head_dim: args.head_dim,
        d_model: args.d_model.unwrap_or(args.heads * args.head_dim),
        causal: args.causal,
        warmup: args.warmup,
        repeats: args.repeats,
        flops_attention: FLOPS_ATTENTION,
        flops_layer: FLOPS_LAYER,
        checked_rows: 0,
        gpu: Vec::new(),
        cpu: Vec::new(),
        skipped: Vec::new(),
    };
    for &seq in &lengths {
        let config = args.config(seq);
        // The seed is the length, so each row of a sweep is reproducible on its own.
        let mut random = Random::new(seq as u64);
        let (weights, inputs) = (random.weights(&config)?, random.inputs(&config)?);
        let rows = checked_rows(&config);
        bar.set_message(format!("seq {seq}: f64 reference"));
        let expected = reference::output_rows(&config, &weights, &inputs, &rows)?;
        report.checked_rows = rows.len();
        for &kernel in &kernels {
            let name = kernel_name(kernel);
            bar.set_message(format!("seq {seq}: {name}"));
            let config = config.clone().with_kernel(kernel);
            match measure_gpu(&ctx, &config, &weights, &inputs, args, &rows, &expected) {
                Ok(row) => report.gpu.push(row),
                Err(CliError::Attention(e @ Error::LimitExceeded { .. })) => {
                    log::warn!("seq {seq} {name}: {e}");
                    report.skipped.push(Skipped {
                        seq,
                        kernel: name,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
            bar.inc(1);
        }
        if !args.no_cpu {
            bar.set_message(format!("seq {seq}: cpu"));
            report.cpu.push(measure_cpu(
                &config, &weights, &inputs, args, &rows, &expected,
            )?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    print_table(&report);
    report::write(&report, args)?;
    check_errors(&report)
}

/// Fails when any row, GPU or CPU, is outside the tolerance: a wrong fast path is as much a
/// bug as a wrong kernel.
fn check_errors(report: &Report) -> Result<(), CliError> {
    let failed: Vec<String> = report
        .gpu
        .iter()
        .filter(|r| !r.error.passed)
        .map(|r| format!("seq {} {}", r.seq, r.kernel))
        .chain(
            report
                .cpu
                .iter()
                .filter(|r| !r.error.passed)
                .map(|r| format!("seq {} cpu", r.seq)),
        )
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Mismatch(format!(
            "outside the tolerance at {}",
            failed.join(", ")
        )))
    }
}

pub fn kernel_name(kernel: KernelChoice) -> &'static str {
    match kernel {
        KernelChoice::Staged => "staged",
        KernelChoice::Fused => "fused",
        KernelChoice::Auto => "auto",
    }
}

/// Every output row for small shapes, else an even spread including the first and last.
fn checked_rows(config: &AttentionConfig) -> Vec<(usize, usize)> {
    let total = config.batch * config.seq_len;
    let picks: Vec<usize> = if total <= CHECKED_ROWS {
        (0..total).collect()
    } else {
        (0..CHECKED_ROWS)
            .map(|k| k * (total - 1) / (CHECKED_ROWS - 1))
            .collect()
    };
    picks
        .into_iter()
        .map(|r| (r / config.seq_len, r % config.seq_len))
        .collect()
}

/// The error of `output` over `rows` against the reference's rows.
fn row_error(
    config: &AttentionConfig,
    output: &[f32],
    rows: &[(usize, usize)],
    expected: &[Vec<f32>],
) -> Result<ErrorFigures, CliError> {
    let d = config.d_out();
    let got: Vec<f32> = rows
        .iter()
        .flat_map(|&(b, t)| {
            let start = (b * config.seq_len + t) * d;
            output[start..start + d].iter().copied()
        })
        .collect();
    let want: Vec<f32> = expected.iter().flatten().copied().collect();
    let shape = [rows.len(), d];
    let c = compare(
        &Tensor::new(shape, got)?,
        &Tensor::new(shape, want)?,
        Tolerance::F32,
    )?;
    Ok(ErrorFigures {
        max_abs: c.max_abs,
        tolerance_used: c.worst_ratio,
        passed: c.passed(),
    })
}

fn measure_gpu(
    ctx: &GpuContext,
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    args: &BenchArgs,
    rows: &[(usize, usize)],
    expected: &[Vec<f32>],
) -> Result<GpuRow, CliError> {
    let mut plan = AttentionPlan::new(ctx, config, weights)?;
    for _ in 0..args.warmup {
        plan.run(inputs)?;
    }
    let mut per_stage: Vec<(&'static str, Vec<f64>)> = plan
        .stages()
        .into_iter()
        .map(|s| (s.label(), Vec::new()))
        .collect();
    let (mut gpu, mut attention, mut end_to_end) = (Vec::new(), Vec::new(), Vec::new());
    let mut source = TimingSource::Timestamps;
    for _ in 0..args.repeats {
        let times = plan.time_stages(inputs)?;
        source = times.source;
        for ((_, samples), t) in per_stage.iter_mut().zip(&times.stages) {
            samples.push(t.seconds);
        }
        gpu.push(times.total());
        attention.push(times.attention());
    }
    let mut output = None;
    for _ in 0..args.repeats {
        let start = Instant::now();
        let out = plan.run(inputs)?;
        end_to_end.push(start.elapsed().as_secs_f64());
        output = Some(out);
    }
    log::debug!("seq {} timed with {source:?}", config.seq_len);
    let output = output.ok_or_else(|| CliError::Usage("--repeats must be at least 1".into()))?;
    let attention = Stat::of(&attention);
    let gpu = Stat::of(&gpu);
    Ok(GpuRow {
        seq: config.seq_len,
        kernel: kernel_name(plan.kernel()),
        memory_bytes: plan.gpu_memory_bytes(),
        stages: per_stage
            .into_iter()
            .map(|(s, samples)| (s, Stat::of(&samples)))
            .collect(),
        gpu,
        attention,
        end_to_end: Stat::of(&end_to_end),
        attention_gflops: config.attention_flops() / attention.median / 1e9,
        layer_gflops: config.flops() / gpu.median / 1e9,
        error: row_error(config, output.data(), rows, expected)?,
    })
}

fn measure_cpu(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    args: &BenchArgs,
    rows: &[(usize, usize)],
    expected: &[Vec<f32>],
) -> Result<CpuRow, CliError> {
    let layer = CpuAttention::new(config, weights)?;
    let repeats = (args.repeats as usize).clamp(1, CPU_MAX_REPEATS);
    // At least one untimed run: the first pays for rayon's thread pool and cold caches.
    let warmup = args.warmup.max(1);
    let mut output = layer.run(inputs)?;
    for _ in 1..warmup {
        output = layer.run(inputs)?;
    }
    let mut layer_times = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        output = layer.run(inputs)?;
        layer_times.push(start.elapsed().as_secs_f64());
    }
    // The attention alone on already-projected inputs, as attention libraries are compared.
    let shape = AttentionShape::of(config);
    let qk_len = config.batch * config.heads * config.seq_len * config.head_dim;
    let q: Vec<f32> = inputs
        .x
        .data()
        .iter()
        .cycle()
        .take(qk_len)
        .copied()
        .collect();
    for _ in 0..warmup {
        std::hint::black_box(cpu::attention(&shape, &q, &q, &q, None)?);
    }
    let mut attention_times = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        std::hint::black_box(cpu::attention(&shape, &q, &q, &q, None)?);
        attention_times.push(start.elapsed().as_secs_f64());
    }
    let layer_stat = Stat::of(&layer_times);
    let attention = Stat::of(&attention_times);
    Ok(CpuRow {
        seq: config.seq_len,
        threads: rayon::current_num_threads(),
        warmup,
        samples: repeats,
        layer: layer_stat,
        attention,
        layer_gflops: config.flops() / layer_stat.median / 1e9,
        attention_gflops: config.attention_flops() / attention.median / 1e9,
        error: row_error(config, output.data(), rows, expected)?,
    })
}

fn print_table(r: &Report) {
    println!(
        "adapter {} ({}, {}); GPU stage times from {}; median of {} runs after {} warm-up",
        r.adapter, r.backend, r.device_type, r.timing, r.repeats, r.warmup
    );
    println!(
        "layer: batch {}, heads {}, head_dim {}, d_model {}, output projection to {}, causal {}",
        r.batch, r.heads, r.head_dim, r.d_model, r.d_model, r.causal
    );
    println!("GFLOP/s: attention {}", r.flops_attention);
    println!("         layer     {}", r.flops_layer);
    if let Some(c) = r.cpu.first() {
        println!(
            "cpu: {} threads, median of {} runs after {} warm-up (the CPU takes at most {CPU_MAX_REPEATS} runs)",
            c.threads, c.samples, c.warmup
        );
    }
    println!(
        "errors: max over {} output rows per shape against the f64 reference; tol used: the \
         largest share of the allowance {:e} + {:e}*|ref| (1 = at the limit)",
        r.checked_rows,
        Tolerance::F32.atol,
        Tolerance::F32.rtol
    );
    println!();
    println!(
        "{:>6} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "seq",
        "path",
        "proj ms",
        "attn ms",
        "out ms",
        "gpu ms",
        "e2e ms",
        "attn GF",
        "layer GF",
        "fus/stg",
        "max abs",
        "tol used",
        "MiB",
        "vs cpu"
    );
    let ms = |s: f64| s * 1e3;
    for row in &r.gpu {
        let stage = |name: &str| {
            row.stages
                .iter()
                .find(|(s, _)| *s == name)
                .map_or(0.0, |(_, t)| t.median)
        };
        let staged = r
            .gpu
            .iter()
            .find(|o| o.seq == row.seq && o.kernel == "staged");
        let ratio = match (row.kernel, staged) {
            ("fused", Some(s)) => format!("{:.2}", row.attention.median / s.attention.median),
            _ => String::new(),
        };
        let vs_cpu = r
            .cpu
            .iter()
            .find(|c| c.seq == row.seq)
            .map_or(String::new(), |c| {
                format!("{:.2}x", c.layer.median / row.end_to_end.median)
            });
        println!(
            "{:>6} {:<7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>8} {:>9.2e} {:>9.3} {:>9.1} {:>9}",
            row.seq,
            row.kernel,
            ms(stage(Stage::Projection.label())),
            ms(row.attention.median),
            ms(stage(Stage::OutputProjection.label())),
            ms(row.gpu.median),
            ms(row.end_to_end.median),
            row.attention_gflops,
            row.layer_gflops,
            ratio,
            row.error.max_abs,
            row.error.tolerance_used,
            row.memory_bytes as f64 / (1 << 20) as f64,
            vs_cpu
        );
    }
    for row in &r.cpu {
        println!(
            "{:>6} {:<7} {:>9} {:>9.3} {:>9} {:>9} {:>9.3} {:>8.2} {:>8.2} {:>8} {:>9.2e} {:>9.3} {:>9} {:>9}",
            row.seq,
            "cpu",
            "",
            ms(row.attention.median),
            "",
            "",
            ms(row.layer.median),
            row.attention_gflops,
            row.layer_gflops,
            "",
            row.error.max_abs,
            row.error.tolerance_used,
            "",
            format!("n={}", row.samples)
        );
    }
    for s in &r.skipped {
        println!("{:>6} {:<7} skipped: {}", s.seq, s.kernel, s.reason);
    }
    println!();
    println!(
        "proj/attn/out: GPU time of the q|k|v projection, of softmax(QK^T)V, of the output projection; \
         gpu: their sum; e2e: run() with upload and read-back (for cpu: the whole layer); \
         fus/stg: fused attention time over staged; vs cpu: CPU layer time over the GPU's e2e time; \
         cpu attn: on already-projected inputs; n: timed CPU runs"
    );
}

/// A count that must be at least 1; refused here so the message names the flag.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(gpu_ok: bool, cpu_ok: bool) -> Report {
        let stat = Stat {
            median: 1e-3,
            min: 1e-3,
        };
        let error = |passed| ErrorFigures {
            max_abs: if passed { 1e-6 } else { 1.0 },
            tolerance_used: if passed { 0.1 } else { 1e4 },
            passed,
        };
        Report {
            adapter: "test".into(),
            backend: "Vulkan".into(),
            device_type: "Cpu".into(),
            timing: "timestamp queries",
            batch: 1,
            heads: 1,
            head_dim: 4,
            d_model: 4,
            causal: false,
            warmup: 1,
            repeats: 1,
            flops_attention: FLOPS_ATTENTION,
            flops_layer: FLOPS_LAYER,
            checked_rows: 8,
            gpu: vec![GpuRow {
                seq: 8,
                kernel: "fused",
                memory_bytes: 1,
                stages: Vec::new(),
                gpu: stat,
                attention: stat,
                end_to_end: stat,
                attention_gflops: 1.0,
                layer_gflops: 1.0,
                error: error(gpu_ok),
            }],
            cpu: vec![CpuRow {
                seq: 8,
                threads: 1,
                warmup: 1,
                samples: 1,
                layer: stat,
                attention: stat,
                layer_gflops: 1.0,
                attention_gflops: 1.0,
                error: error(cpu_ok),
            }],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn a_mismatch_on_either_side_fails_the_command() {
        assert!(check_errors(&report(true, true)).is_ok());
        for (gpu_ok, cpu_ok, culprit) in [(false, true, "seq 8 fused"), (true, false, "seq 8 cpu")]
        {
            match check_errors(&report(gpu_ok, cpu_ok)) {
                Err(CliError::Mismatch(m)) => assert!(m.contains(culprit), "{m}"),
                other => panic!("gpu ok {gpu_ok}, cpu ok {cpu_ok}: {other:?}"),
            }
        }
    }
}
