//! `wgpu-attention bench`: a sweep of sequence lengths, timing every GPU stage, the whole layer
//! end to end and the fast CPU path, with each result's error against the f64 reference.

use std::path::PathBuf;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use wgpu_attention::{
    AttentionConfig, Autotune, DeviceLimits, Error, KernelChoice, Random, reference,
};

use super::bench_precision::PrecisionArg;
use super::report;
use super::{AdapterArgs, CliError};

mod layer;
mod operator;
mod table;

use layer::{checked_rows, measure_cpu, measure_gpu};
pub use operator::OperatorRow;
use table::print_table;

/// `--autotune`: [`Autotune`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AutotuneArg {
    Off,
    Cached,
    Full,
}

impl From<AutotuneArg> for Autotune {
    fn from(a: AutotuneArg) -> Self {
        match a {
            AutotuneArg::Off => Autotune::Off,
            AutotuneArg::Cached => Autotune::Cached,
            AutotuneArg::Full => Autotune::Full,
        }
    }
}

/// Arguments of `wgpu-attention bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Batch rows.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub batch: usize,
    /// Attention heads [default: 8; 32 with --decode].
    #[arg(long, value_parser = positive)]
    pub heads: Option<usize>,
    /// Width of each head (queries, keys and values) [default: 64; 128 with --decode].
    #[arg(long, value_parser = positive)]
    pub head_dim: Option<usize>,
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
    /// Lengths of the attention operator's GQA rows: 32 query heads over 8 key/value heads of
    /// 128, causal, as many queries as keys [default: 256 on a software (CPU) adapter, 256,
    /// 1024, 4096 on a GPU]. Each call's pass is timed as one submission.
    #[arg(long, value_delimiter = ',', num_args = 1.., value_parser = positive)]
    pub op_len: Vec<usize>,
    /// Keys of the operator's cross-attention row: 64 queries over them, 8 heads of 64, as
    /// Whisper's decoder attends its encoder's 1500 positions.
    #[arg(long, default_value_t = 1500, value_parser = positive)]
    pub op_cross_kv_len: usize,
    /// Skip the attention operator's rows.
    #[arg(long)]
    pub no_op: bool,
    /// How plans choose the fused kernel's tiles: timed on this adapter once per shape class
    /// (`full`), only from what `--autotune-file` holds (`cached`), or by the limits rule
    /// alone (`off`).
    #[arg(long, value_enum, default_value_t = AutotuneArg::Full)]
    pub autotune: AutotuneArg,
    /// Read the autotuner's winners for this adapter from this file, and append new ones.
    #[arg(long)]
    pub autotune_file: Option<PathBuf>,
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
    /// Time the attention operator's backward beside its forward instead (see
    /// `bench_backward.rs`); reads --batch, --heads, --head-dim, the lengths, --causal,
    /// --warmup, --repeats and --json.
    #[arg(long)]
    pub backward: bool,
    /// The decode sweep (`--decode`) in place of the layer's.
    #[command(flatten)]
    pub decode: super::bench_decode::DecodeArgs,
}

impl BenchArgs {
    /// The short sweep `cargo run --release` shows after the walkthrough.
    pub fn quick_default() -> Self {
        BenchArgs {
            batch: 1,
            heads: None,
            head_dim: None,
            d_model: None,
            seq_start: 64,
            seq_max: Some(512),
            seq: Vec::new(),
            causal: false,
            kernel: vec![KernelChoice::Staged, KernelChoice::Fused],
            warmup: 1,
            repeats: 3,
            no_cpu: false,
            op_len: Vec::new(),
            op_cross_kv_len: 1500,
            no_op: false,
            autotune: AutotuneArg::Full,
            autotune_file: None,
            json: None,
            csv: None,
            plot: None,
            precision: PrecisionArg::F32,
            backward: false,
            decode: Default::default(),
        }
    }

    /// Attention heads: as given, else 8 (32 for the decode sweep).
    pub fn heads(&self) -> usize {
        self.heads
            .unwrap_or(if self.decode.decode { 32 } else { 8 })
    }

    /// Head width: as given, else 64 (128 for the decode sweep).
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(if self.decode.decode { 128 } else { 64 })
    }

    /// Refuses, before any data is made, a length whose input alone exceeds the adapter's
    /// largest buffer: `--seq 4294967297` used to abort allocating 68 GB on the CPU.
    fn check_sizes(&self, lengths: &[usize], limits: &wgpu::Limits) -> Result<(), CliError> {
        let d_model = self.d_model.unwrap_or(self.heads() * self.head_dim());
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
        let d_model = self.d_model.unwrap_or(self.heads() * self.head_dim());
        let mut config =
            AttentionConfig::new(self.batch, seq, d_model, self.heads(), self.head_dim())
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
    pub flops_operator: &'static str,
    /// The attention operator's rows (GQA, cross-attention).
    pub operator: Vec<OperatorRow>,
    pub skipped: Vec<Skipped>,
    /// How the fused kernel's tiles were chosen (`--autotune`).
    pub autotune: String,
    /// The fused kernel's tiles chosen per shape class, as (class, override constants).
    pub tuned: Vec<(String, String)>,
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
    // Decoding takes --precision itself (f32, f16, or both side by side).
    if args.decode.decode {
        return super::bench_decode::main(adapter, args);
    }
    if args.precision != PrecisionArg::F32 {
        return super::bench_precision::main(adapter, args, args.precision, progress);
    }
    // The sweep reaches past wgpu's portable defaults where the adapter allows.
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    ctx.set_autotune(args.autotune.into());
    if let Some(path) = &args.autotune_file {
        ctx.autotune_file(path)?;
    }
    let info = ctx.adapter_info().clone();
    let lengths = args.sequence_lengths(&info);
    if lengths.is_empty() {
        return Err(CliError::Usage(format!(
            "no sequence lengths: --seq-start {} is past --seq-max {:?}",
            args.seq_start, args.seq_max
        )));
    }
    args.check_sizes(&lengths, &ctx.limits())?;
    if args.backward {
        return super::bench_backward::main(adapter, args, &lengths);
    }
    let kernels = args.kernels();
    let op_shapes = operator::shapes(args, info.device_type == wgpu::DeviceType::Cpu);
    let bar = progress.add(ProgressBar::new(
        (lengths.len() * (kernels.len() + usize::from(!args.no_cpu)) + op_shapes.len()) as u64,
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
        heads: args.heads(),
        head_dim: args.head_dim(),
        d_model: args.d_model.unwrap_or(args.heads() * args.head_dim()),
        causal: args.causal,
        warmup: args.warmup,
        repeats: args.repeats,
        flops_attention: FLOPS_ATTENTION,
        flops_layer: FLOPS_LAYER,
        checked_rows: 0,
        gpu: Vec::new(),
        cpu: Vec::new(),
        flops_operator: operator::FLOPS_OPERATOR,
        operator: Vec::new(),
        skipped: Vec::new(),
        autotune: format!("{:?}", args.autotune).to_lowercase(),
        tuned: Vec::new(),
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
    for shape in &op_shapes {
        bar.set_message(format!("operator {} {}", shape.name, shape.kv_len));
        match operator::measure(&ctx, shape, args) {
            Ok(row) => report.operator.push(row),
            Err(CliError::Attention(e @ Error::LimitExceeded { .. })) => {
                log::warn!("operator {} kv_len {}: {e}", shape.name, shape.kv_len);
                report.skipped.push(Skipped {
                    seq: shape.kv_len,
                    kernel: shape.name,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.tuned = ctx.tuned();
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
        .chain(
            report
                .operator
                .iter()
                .filter(|r| !r.error.passed)
                .map(|r| format!("operator {} kv_len {}", r.shape.name, r.shape.kv_len)),
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
            flops_operator: operator::FLOPS_OPERATOR,
            operator: Vec::new(),
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
            autotune: "off".into(),
            tuned: Vec::new(),
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
