//! `wgpu-attention bench --precision f16|both`: the layer (fused kernel) in f32 and in f16
//! storage at each length of the sweep, side by side, with their time ratio, and each result
//! checked against the f64 reference under its own error bound.
//!
//! Kept apart from the f32 sweep of `bench.rs`: the f16 path has no staged kernels and no CPU
//! counterpart, and its check is the f16 bound rather than the fixed f32 rule.

use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use wgpu_attention::{
    AttentionPlan, DeviceLimits, KernelChoice, Precision, Random, Tensor, compare_bounded,
    reference,
};

use super::bench::{BenchArgs, Stat};
use super::{AdapterArgs, CliError};

/// What `--precision` asks the sweep for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// f32 storage (the default sweep, every kernel and the CPU path).
    F32,
    /// f16 storage, f32 arithmetic: the fused kernel (with `--decode`, split-K decode too).
    F16,
    /// Both storages side by side, with the f16/f32 time ratio.
    Both,
}

/// One precision at one length.
struct Row {
    seq: usize,
    precision: Precision,
    gpu: Stat,
    attention: Stat,
    end_to_end: Stat,
    memory_bytes: u64,
    /// The largest share of the error bound any checked element used (at most 1 passes).
    bound_used: f64,
    max_abs: f64,
    passed: bool,
}

/// Output rows checked per shape: all, up to this many (as the f32 sweep).
const CHECKED_ROWS: usize = 64;

pub fn main(
    adapter: &AdapterArgs,
    args: &BenchArgs,
    which: PrecisionArg,
    progress: &MultiProgress,
) -> Result<(), CliError> {
    let precisions: &[Precision] = match which {
        PrecisionArg::F32 => &[Precision::F32],
        PrecisionArg::F16 => &[Precision::F16],
        PrecisionArg::Both => &[Precision::F32, Precision::F16],
    };
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    let info = ctx.adapter_info().clone();
    let lengths = args.sequence_lengths(&info);
    let bar = progress.add(ProgressBar::new((lengths.len() * precisions.len()) as u64));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:24} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for &seq in &lengths {
        let base = args.config(seq).with_kernel(KernelChoice::Fused);
        let mut random = Random::new(seq as u64);
        let (weights, inputs) = (random.weights(&base)?, random.inputs(&base)?);
        let total = base.batch * seq;
        let checked: Vec<(usize, usize)> = (0..total.min(CHECKED_ROWS))
            .map(|k| k * (total - 1) / (total.min(CHECKED_ROWS) - 1).max(1))
            .map(|r| (r / seq, r % seq))
            .collect();
        for &precision in precisions {
            bar.set_message(format!("seq {seq}: {precision}"));
            let config = base.clone().with_precision(precision);
            let mut plan = AttentionPlan::new(&ctx, &config, &weights)?;
            for _ in 0..args.warmup {
                plan.run(&inputs)?;
            }
            let (mut gpu, mut attention, mut end_to_end) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.repeats {
                let times = plan.time_stages(&inputs)?;
                gpu.push(times.total());
                attention.push(times.attention());
            }
            let mut output = None;
            for _ in 0..args.repeats {
                let start = Instant::now();
                output = Some(plan.run(&inputs)?);
                end_to_end.push(start.elapsed().as_secs_f64());
            }
            let output =
                output.ok_or_else(|| CliError::Usage("--repeats must be at least 1".into()))?;
            // The reference starts from the inputs as stored in this precision, and the bound
            // adds f16's store error wherever the kernels store in f16.
            let expected = reference::output_rows(&config, &weights, &inputs, &checked)?;
            let bounds = reference::output_row_bounds(&config, &weights, &inputs, &checked)?;
            let d = config.d_out();
            let got: Vec<f32> = checked
                .iter()
                .flat_map(|&(b, t)| output.data()[(b * seq + t) * d..][..d].to_vec())
                .collect();
            let shape = [checked.len(), d];
            let c = compare_bounded(
                &Tensor::new(shape, got)?,
                &Tensor::new(shape, expected.concat())?,
                &Tensor::new(shape, bounds.concat())?,
            )?;
            rows.push(Row {
                seq,
                precision,
                gpu: Stat::of(&gpu),
                attention: Stat::of(&attention),
                end_to_end: Stat::of(&end_to_end),
                memory_bytes: plan.gpu_memory_bytes(),
                bound_used: c.worst_ratio,
                max_abs: c.max_abs,
                passed: c.passed(),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!(
        "adapter {} ({:?}, {:?}); fused kernel; batch {}, heads {}, head_dim {}, causal {}; \
         median of {} runs after {} warm-up; times in ms; `bound` = largest share of the \
         error bound used over {} checked rows",
        info.name,
        info.backend,
        info.device_type,
        args.batch,
        args.heads(),
        args.head_dim(),
        args.causal,
        args.repeats,
        args.warmup,
        CHECKED_ROWS,
    );
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}",
        "seq", "prec", "gpu", "attention", "run", "memory MB", "max abs", "bound", "check"
    );
    for r in &rows {
        println!(
            "{:>6} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.2} {:>9.2e} {:>9.3} {:>7}",
            r.seq,
            r.precision.name(),
            r.gpu.median * 1e3,
            r.attention.median * 1e3,
            r.end_to_end.median * 1e3,
            r.memory_bytes as f64 / 1e6,
            r.max_abs,
            r.bound_used,
            if r.passed { "pass" } else { "FAIL" }
        );
    }
    if precisions.len() == 2 {
        println!("\nf16/f32 time ratio (below 1: f16 is faster)");
        println!(
            "{:>6} {:>10} {:>10} {:>10}",
            "seq", "gpu", "attention", "run"
        );
        for pair in rows.chunks_exact(2) {
            let (a, b) = (&pair[0], &pair[1]);
            println!(
                "{:>6} {:>10.3} {:>10.3} {:>10.3}",
                a.seq,
                b.gpu.median / a.gpu.median,
                b.attention.median / a.attention.median,
                b.end_to_end.median / a.end_to_end.median
            );
        }
    }
    if let Some(bad) = rows.iter().find(|r| !r.passed) {
        return Err(CliError::Mismatch(format!(
            "seq {} {}: outside its error bound ({:.3} of it used)",
            bad.seq,
            bad.precision.name(),
            bad.bound_used
        )));
    }
    Ok(())
}
