//! `cargo bench`: each kernel and the whole layer at fixed shapes.
//!
//! GPU benchmarks feed criterion the GPU's own timestamps for the stage measured
//! (`iter_custom`), so host overhead does not blur kernel times; where the adapter has no
//! timestamps the plan falls back to the wall clock around each stage, and the benchmark says
//! so in its name. The whole-layer benchmarks time `run` as a caller sees it: upload,
//! dispatches, read-back. The CPU benchmarks time the fast multi-threaded CPU path.
//!
//! Shapes: batch 1, 8 heads of width 64, d_model 512 with an output projection, seq 256 and
//! 1024 (the sizes of the comparison table). `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`
//! pick the adapter. The device gets the adapter's own limits, as the program's `run` and
//! `bench` ask, so the tile configurations timed here are the ones users get.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wgpu_attention::{
    AdapterOptions, AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights,
    CpuAttention, DeviceLimits, GpuContext, KernelChoice, Random, TimingSource,
};

const SEQS: [usize; 2] = [256, 1024];

fn layer(seq: usize) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let config = AttentionConfig::new(1, seq, 512, 8, 64).with_output_projection(512);
    // Seeded values shaped like a trained layer's; the kernels' speed does not depend on them.
    let mut random = Random::new(seq as u64);
    let weights = random.weights(&config).expect("weights for a valid config");
    let inputs = random.inputs(&config).expect("inputs for a valid config");
    (config, weights, inputs)
}

/// A context as the program makes it: wgpu's portable defaults would pick other (smaller)
/// fused tiles on lavapipe than users run.
fn context() -> GpuContext {
    let options = AdapterOptions {
        limits: DeviceLimits::Adapter,
        ..AdapterOptions::from_env()
    };
    GpuContext::from_options(&options).expect("benchmarks need a GPU adapter")
}

/// Ten samples over three seconds: enough for these kernels on a software adapter, whose
/// largest shape takes most of a second per run.
fn short(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

fn kernels(c: &mut Criterion) {
    let ctx = context();
    let mut group = c.benchmark_group("gpu stage");
    short(&mut group);
    for seq in SEQS {
        let (config, weights, inputs) = layer(seq);
        for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
            let mut plan = AttentionPlan::new(&ctx, &config.clone().with_kernel(kernel), &weights)
                .expect("plan");
            let clock = match plan.time_stages(&inputs).expect("timing").source {
                TimingSource::Timestamps => "",
                TimingSource::WallClock => " (wall clock)",
            };
            for stage in plan.stages() {
                // The projections are the same in both paths: measure them once.
                if kernel == KernelChoice::Fused && stage.is_projection() {
                    continue;
                }
                let id = BenchmarkId::new(format!("{stage}{clock}"), seq);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let times = plan.time_stages(&inputs).expect("timing");
                            total += Duration::from_secs_f64(times.get(stage).unwrap_or(0.0));
                        }
                        total
                    })
                });
            }
        }
    }
    group.finish();
}

fn whole_layer(c: &mut Criterion) {
    let ctx = context();
    let mut group = c.benchmark_group("layer end to end");
    short(&mut group);
    for seq in SEQS {
        let (config, weights, inputs) = layer(seq);
        for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
            let mut plan = AttentionPlan::new(&ctx, &config.clone().with_kernel(kernel), &weights)
                .expect("plan");
            let name = format!(
                "gpu {}",
                if kernel == KernelChoice::Staged {
                    "staged"
                } else {
                    "fused"
                }
            );
            group.bench_function(BenchmarkId::new(name, seq), |b| {
                b.iter(|| plan.run(&inputs).expect("run"))
            });
        }
        let cpu = CpuAttention::new(&config, &weights).expect("cpu layer");
        group.bench_function(BenchmarkId::new("cpu", seq), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(cpu.run(&inputs).expect("cpu run"));
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernels, whole_layer);
criterion_main!(benches);
