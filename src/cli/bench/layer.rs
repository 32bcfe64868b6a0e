//! The layer's rows: the plan timed stage by stage and end to end, and the fast CPU path,
//! each checked against the f64 reference on a spread of output rows.

use std::time::Instant;

use wgpu_attention::cpu;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionShape, AttentionWeights,
    CpuAttention, GpuContext, Tensor, TimingSource, Tolerance, compare,
};

use super::super::CliError;
use super::{
    BenchArgs, CHECKED_ROWS, CPU_MAX_REPEATS, CpuRow, ErrorFigures, GpuRow, Stat, kernel_name,
};

/// Every output row for small shapes, else an even spread including the first and last.
pub(super) fn checked_rows(config: &AttentionConfig) -> Vec<(usize, usize)> {
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

pub(super) fn measure_gpu(
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

pub(super) fn measure_cpu(
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
