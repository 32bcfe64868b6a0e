//! `cargo bench --bench compare`: our kernels beside Burn's attention, and the figures the
//! performance work is judged by. Not part of the program: targets and peer figures are
//! questions for the developers, not for the users of `wgpu-attention`.
//!
//! ```text
//! cargo bench --bench compare -- [--burn PATH] [--repeats N] [--warmup N] [--json FILE]
//! ```
//!
//! The peer is `burn_attn`, given by `--burn` or the `BURN_ATTN` variable. Its source is
//! `benches/peers/burn_attn`, a package of its own (empty `[workspace]`, its own Cargo.lock),
//! never part of this package's build. Build it once, outside the repository (about 25
//! minutes on 2 cores; a later edit rebuilds only its own crate when the same target
//! directory is reused):
//!
//! ```text
//! P=$(cd .. && pwd)/peer-build; mkdir -p "$P"
//! (cd benches/peers/burn_attn && CARGO_TARGET_DIR="$P/target" cargo build --release)
//! cargo bench --bench compare -- --burn "$P/target/release/burn_attn"
//! ```
//!
//! It times Burn's attention (`METHODS=attention,fallback`) and, from this version on, its
//! matmul on our projection shapes (`METHODS=matmul`), which `--gemm` (or the extras) prints
//! beside our projection GEMM; an older binary without it prints no matmul line, and the
//! report says Burn's matmul was not measured. With it, each shape runs Burn and then ours, one after
//! the other, so that both sides see the same minutes of a machine whose speed drifts. Without
//! it the Burn columns are a table of figures measured once elsewhere, and the report says so
//! on every line that uses them; verdicts against that table are printed only on the adapter
//! it was measured on.
//!
//! Like for like: the peer times `out = attention(q, k, v); device.sync()` with q, k, v already
//! on the device (wall clock, call to completion). Ours is timed the same way: the layer encoded
//! into a fresh encoder, submitted, and waited for, its input already on the device. Our layer
//! includes the q|k|v projection; its `d_model` is 8 so that the projection is about 1 % of the
//! work, and its own GPU time is reported beside, so the reader can subtract it. The kernels'
//! GPU-timestamp times (no launch or wait overhead) are shown too, labelled as such.
//!
//! Every output is checked against the f64 reference; a mismatch fails the run.

// In a folder of its own, so that cargo does not take it for a bench target.
#[path = "compare/gemm.rs"]
mod gemm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use serde::Serialize;
use wgpu_attention::{
    AdapterOptions, AttentionConfig, AttentionInputs, AttentionIo, AttentionPlan, AttentionShape,
    AttentionWeights, CpuAttention, DeviceLimits, GpuContext, KernelChoice, Random, Stage, Tensor,
    Tolerance, compare, reference,
};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, Parser)]
#[command(about = "Our kernels beside Burn's attention on the same adapter")]
struct Args {
    /// The `burn_attn` release binary; without it the Burn figures come from a fixed table.
    #[arg(long, env = "BURN_ATTN")]
    burn: Option<PathBuf>,
    /// Timed runs per shape and side (medians are reported).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these shapes (S1..S5), e.g. `--shapes S1,S2` to check the harness itself quickly.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Skip what is not a shape row: the GEMM against the score kernel, the tiny call, the
    /// CPU path and the 4096² GEMM.
    #[arg(long)]
    no_extras: bool,
    /// Read the autotuner's winners for this adapter from this file (and append new ones), as
    /// an application may: with `benches/candidates`' winners pinned there, the run shows
    /// them whatever the one-second tuning budget reaches on a slow adapter.
    #[arg(long)]
    autotune_file: Option<PathBuf>,
    /// Only the projection GEMM beside Burn's matmul (with `--burn`), no attention shapes.
    #[arg(long)]
    gemm: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One shape of the comparison: Burn's S1..S5, batch 1, inputs already projected.
struct Shape {
    name: &'static str,
    heads: usize,
    seq: usize,
    head_dim: usize,
    causal: bool,
}

const SHAPES: [Shape; 5] = [
    Shape {
        name: "S1",
        heads: 1,
        seq: 3,
        head_dim: 3,
        causal: false,
    },
    Shape {
        name: "S2",
        heads: 8,
        seq: 128,
        head_dim: 64,
        causal: false,
    },
    Shape {
        name: "S3",
        heads: 8,
        seq: 512,
        head_dim: 64,
        causal: false,
    },
    Shape {
        name: "S4",
        heads: 8,
        seq: 1024,
        head_dim: 64,
        causal: false,
    },
    Shape {
        name: "S5",
        heads: 8,
        seq: 1024,
        head_dim: 64,
        causal: true,
    },
];

impl Shape {
    fn describe(&self) -> String {
        format!(
            "H={} N={} D={}{}",
            self.heads,
            self.seq,
            self.head_dim,
            if self.causal { " causal" } else { "" }
        )
    }

    /// Our layer for the shape. `d_model` 8 keeps the q|k|v projection near 1 % of the work,
    /// so a wall-clock time of the whole layer is a fair stand-in for attention alone.
    fn config(&self, kernel: KernelChoice) -> AttentionConfig {
        let mut c =
            AttentionConfig::new(1, self.seq, 8, self.heads, self.head_dim).with_kernel(kernel);
        c.causal = self.causal;
        c
    }
}

/// Where the given table was measured. Its figures are ranges over several runs; ratios use
/// the low end (the peer at its fastest).
const TABLE_SOURCE: &str = "Burn 0.22.1 attention as given in ../shared/peers/README.md and \
    issue 12 (not measured in this run): Mesa lavapipe (Vulkan) on a 2-core Intel Xeon with \
    AVX-512, `sync` timing, median of 20 runs, range over runs of different minutes";
/// The table's adapter: verdicts against it are printed only on an adapter of this name and
/// backend. Even there the machine under it may differ (the peers README shows 4x between two
/// CPUs), which the report says.
const TABLE_ADAPTER: &str = "llvmpipe";
const TABLE_BACKEND: wgpu::Backend = wgpu::Backend::Vulkan;

/// A range of times over runs, ms: (low, high).
type Range = (f64, f64);

/// Burn's attention (autotuned, fused) and fallback (unfused) per shape, ms.
const TABLE: [(&str, Range, Range); 5] = [
    ("S1", (1.05, 1.05), (0.71, 0.71)),
    ("S2", (3.9, 3.9), (11.8, 11.8)),
    ("S3", (32.0, 50.0), (88.0, 132.0)),
    ("S4", (165.0, 211.0), (570.0, 610.0)),
    ("S5", (141.0, 171.0), (634.0, 634.0)),
];

/// The targets of issue 12: fused no slower than Burn's attention at N >= 512 (aim for 2/3);
/// of the earlier performance work: causal at most this share of dense, a tiny whole call
/// within this multiple of a bare round trip, the fast CPU attention at this many GFLOP/s.
const FUSED_VS_BURN: f64 = 1.0;
const FUSED_VS_BURN_AIM: f64 = 2.0 / 3.0;
const CAUSAL_VS_DENSE: f64 = 0.6;
const TINY_VS_ROUND_TRIP: f64 = 2.0;
const CPU_GFLOPS: f64 = 128.0;

/// Median and minimum of a side's samples, ms.
#[derive(Debug, Clone, Copy, Serialize)]
struct Ms {
    median: f64,
    min: f64,
}

impl Ms {
    fn of(samples: &[f64]) -> Ms {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Ms {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Burn's figures for one shape and where they come from.
#[derive(Debug, Clone, Serialize)]
struct Peer {
    /// `measured` (live, this run) or `given` (the table).
    source: &'static str,
    /// Autotuned attention, ms: (low, high) of the table, or (median, median) measured.
    fused_ms: (f64, f64),
    /// The unfused fallback, ms.
    unfused_ms: (f64, f64),
    /// The peer's own max abs error against its f64 reference (measured only).
    fused_max_abs_err: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Ours {
    /// Wall clock from encode to completion, input on the device (the peer's `sync`).
    wall_ms: Ms,
    /// GPU timestamps of the attention stages alone.
    attention_gpu_ms: Ms,
    /// GPU timestamps of the q|k|v projection, included in `wall_ms`.
    projection_gpu_ms: Ms,
    /// Share of the f32 tolerance the output used against the f64 reference (<= 1 passes).
    tolerance_used: f64,
}

#[derive(Debug, Serialize)]
struct ShapeRow {
    shape: String,
    staged: Ours,
    fused: Ours,
    burn: Peer,
    /// Our fused wall time over Burn's attention (its low end when given).
    fused_over_burn: f64,
    /// Our staged wall time over Burn's unfused fallback (its low end when given).
    staged_over_burn_unfused: f64,
}

#[derive(Debug, Serialize)]
struct Tiny {
    empty_submit_ms: f64,
    round_trip_ms: f64,
    fused_call_ms: f64,
    staged_call_ms: f64,
    fused_gpu_ms: f64,
    fused_over_round_trip: f64,
}

#[derive(Debug, Serialize)]
struct CpuFigures {
    seq: usize,
    fast_attention_ms: f64,
    fast_attention_gflops: f64,
    fast_layer_ms: f64,
    /// One run, not a median: the f64 reference takes seconds.
    reference_layer_one_run_ms: Option<f64>,
    tolerance_used: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    adapter: String,
    peer_source: String,
    /// Whether verdicts against Burn are printed: measured live, or given for this adapter.
    peer_verdicts: bool,
    repeats: usize,
    warmup: usize,
    shapes: Vec<ShapeRow>,
    /// Fused GPU time, causal over dense, at N=1024 (when both shapes ran).
    causal_over_dense: Option<f64>,
    /// The fused kernel's rate at N=1024 dense, GPU timestamps.
    fused_gflops_1024: Option<f64>,
    extras: Option<Extras>,
    /// The projection GEMM beside Burn's matmul (empty with `--no-extras`).
    gemm: Vec<gemm::GemmRow>,
    failures: Vec<String>,
}

/// The figures beside the shape rows.
#[derive(Debug, Serialize)]
struct Extras {
    tiny: Tiny,
    /// At N=1024, d_model 512: our projection GEMM's rate against our score kernel's.
    our_gemm_gflops: f64,
    score_kernel_gflops: f64,
    cpu: Vec<CpuFigures>,
    /// Our tiled GEMM at 4096² (GPUs only: it takes minutes on a software adapter).
    our_gemm_gflops_4096: Option<f64>,
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    if let Some(unknown) = args
        .shapes
        .iter()
        .find(|s| !SHAPES.iter().any(|k| k.name == s.as_str()))
    {
        return Err(format!("--shapes: no shape {unknown}; the shapes are S1..S5").into());
    }
    let mut options = AdapterOptions::from_env();
    options.limits = DeviceLimits::Adapter;
    let ctx = GpuContext::from_options(&options)?;
    if let Some(path) = &args.autotune_file {
        ctx.autotune_file(path)?;
    }
    let info = ctx.adapter_info().clone();
    let adapter = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
    let (repeats, warmup) = (args.repeats.max(1), args.warmup);
    let peer = args.burn.as_deref().map(BurnPeer::new).transpose()?;
    if args.gemm {
        eprintln!("measuring the projection GEMM beside Burn's matmul");
        gemm::print(&gemm::side_by_side(&ctx, peer.as_ref(), warmup, repeats)?);
        return Ok(());
    }
    let peer_source = match &peer {
        Some(p) => format!("Burn measured live in this run by {}", p.path.display()),
        None => TABLE_SOURCE.to_string(),
    };
    eprintln!("Burn figures: {peer_source}");
    let on_table_adapter = info.name.contains(TABLE_ADAPTER) && info.backend == TABLE_BACKEND;
    let mut peer_verdicts = peer.is_some() || on_table_adapter;
    let mut failures = Vec::new();
    let selected = SHAPES
        .iter()
        .filter(|s| args.shapes.is_empty() || args.shapes.iter().any(|n| n == s.name));
    let mut shapes = Vec::new();
    for shape in selected {
        eprintln!("measuring {}", shape.describe());
        let burn = match &peer {
            Some(p) => {
                let (burn, peer_adapter) = p.measure(shape, warmup, repeats)?;
                if !peer_adapter.contains(&info.name) {
                    eprintln!(
                        "warning: Burn ran on `{peer_adapter}`, we on `{}`: no verdicts",
                        info.name
                    );
                    peer_verdicts = false;
                }
                burn
            }
            None => given(shape.name)?,
        };
        let staged = measure(
            &ctx,
            shape,
            KernelChoice::Staged,
            warmup,
            repeats,
            &mut failures,
        )?;
        let fused = measure(
            &ctx,
            shape,
            KernelChoice::Fused,
            warmup,
            repeats,
            &mut failures,
        )?;
        shapes.push(ShapeRow {
            shape: shape.describe(),
            fused_over_burn: fused.wall_ms.median / burn.fused_ms.0,
            staged_over_burn_unfused: staged.wall_ms.median / burn.unfused_ms.0,
            staged,
            fused,
            burn,
        });
    }
    let fused_of = |shape: &Shape| {
        shapes
            .iter()
            .find(|s| s.shape == shape.describe())
            .map(|s| s.fused.attention_gpu_ms.median)
    };
    let (dense, causal) = (&SHAPES[3], &SHAPES[4]);
    let causal_over_dense = fused_of(causal).zip(fused_of(dense)).map(|(c, d)| c / d);
    let fused_gflops_1024 =
        fused_of(dense).map(|ms| dense.config(KernelChoice::Fused).attention_flops() / ms / 1e6);
    let (extras, gemm) = if args.no_extras {
        (None, Vec::new())
    } else {
        eprintln!("measuring the projection GEMM beside Burn's matmul");
        (
            Some(extras(&ctx, &info, repeats, &mut failures)?),
            gemm::side_by_side(&ctx, peer.as_ref(), warmup, repeats)?,
        )
    };
    let report = Report {
        adapter,
        peer_source,
        peer_verdicts,
        repeats,
        warmup,
        shapes,
        causal_over_dense,
        fused_gflops_1024,
        extras,
        gemm,
        failures,
    };
    print_report(&report, peer.is_some());
    // What the autotuner chose (or the file gave) per shape class: the fused kernel's tiles.
    for (class, tiles) in ctx.tuned() {
        println!("  fused tiles: {class}  {tiles}");
    }
    if let Some(path) = &args.json {
        serde_json::to_writer_pretty(std::fs::File::create(path)?, &report)?;
    }
    if report.failures.is_empty() {
        Ok(())
    } else {
        Err(format!("outside the tolerance: {}", report.failures.join(", ")).into())
    }
}

fn extras(
    ctx: &GpuContext,
    info: &wgpu::AdapterInfo,
    repeats: usize,
    failures: &mut Vec<String>,
) -> Result<Extras, Error> {
    eprintln!("measuring the projection GEMM against the score kernel at N=1024");
    let (our_gemm_gflops, score_kernel_gflops) = gemm_and_scores(ctx, repeats)?;
    eprintln!("measuring the tiny call");
    let tiny = tiny_call(ctx)?;
    eprintln!("measuring the CPU paths");
    let cpu = cpu_figures(failures)?;
    let our_gemm_gflops_4096 = if info.device_type == wgpu::DeviceType::Cpu {
        None
    } else {
        eprintln!("measuring our GEMM at 4096^2");
        Some(gemm_4096(ctx)?)
    };
    Ok(Extras {
        tiny,
        our_gemm_gflops,
        score_kernel_gflops,
        cpu,
        our_gemm_gflops_4096,
    })
}

fn given(shape: &str) -> Result<Peer, Error> {
    let (_, fused_ms, unfused_ms) = TABLE
        .iter()
        .find(|(name, _, _)| *name == shape)
        .ok_or_else(|| format!("no table row for {shape}"))?;
    Ok(Peer {
        source: "given",
        fused_ms: *fused_ms,
        unfused_ms: *unfused_ms,
        fused_max_abs_err: None,
    })
}

/// The `burn_attn` program, run from a directory whose `cubecl.toml` turns off Burn's
/// persistent autotune cache, as its README requires.
struct BurnPeer {
    path: PathBuf,
    dir: tempfile::TempDir,
    api: &'static str,
}

impl BurnPeer {
    fn new(path: &Path) -> Result<BurnPeer, Error> {
        if !path.is_file() {
            return Err(format!(
                "BURN_ATTN/--burn: {} is not a file (build ../shared/peers/burn_attn first)",
                path.display()
            )
            .into());
        }
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("env"))?;
        std::fs::write(
            dir.path().join("cubecl.toml"),
            format!(
                "[autotune]\ndisable_cache = true\n[environment]\npath = {{ directory = \"{}\" }}\n",
                dir.path().join("env").display()
            ),
        )?;
        // Burn does not read WGPU_BACKEND: pass the same choice as its argument.
        let api = match std::env::var("WGPU_BACKEND").as_deref() {
            Ok("vulkan") => "vulkan",
            Ok("gl") => "gl",
            _ => "auto",
        };
        Ok(BurnPeer {
            path: path.to_path_buf(),
            dir,
            api,
        })
    }

    /// Burn's `sync` medians for one shape, and the adapter it ran on.
    fn measure(&self, shape: &Shape, warmup: usize, runs: usize) -> Result<(Peer, String), Error> {
        let out = Command::new(&self.path)
            .args([self.api.to_string(), warmup.to_string(), runs.to_string()])
            .env("SHAPES", shape.name)
            .env("METHODS", "attention,fallback")
            .current_dir(self.dir.path())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                self.path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let adapter = stdout
            .lines()
            .find_map(|l| l.strip_prefix("# adapter: "))
            .and_then(|l| l.split(" | ").next())
            .unwrap_or("unknown")
            .to_string();
        // RESULT peer api shape H N D causal timing median min max gflops err first_ms
        let mut sync: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for line in stdout.lines().filter(|l| l.starts_with("RESULT\tburn")) {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 14 || f[3] != shape.name || !f[8].starts_with("sync") {
                continue;
            }
            let method = if f[1].ends_with("-attention") {
                "attention"
            } else {
                "fallback"
            };
            sync.insert(method, (f[9].parse()?, f[13].parse()?));
        }
        let (fused, err) = *sync
            .get("attention")
            .ok_or_else(|| format!("no attention RESULT line for {} in:\n{stdout}", shape.name))?;
        let (unfused, _) = *sync
            .get("fallback")
            .ok_or_else(|| format!("no fallback RESULT line for {} in:\n{stdout}", shape.name))?;
        Ok((
            Peer {
                source: "measured",
                fused_ms: (fused, fused),
                unfused_ms: (unfused, unfused),
                fused_max_abs_err: Some(err),
            },
            adapter,
        ))
    }
}

fn layer(
    config: &AttentionConfig,
    seed: u64,
) -> Result<(AttentionWeights, AttentionInputs), Error> {
    let mut random = Random::new(seed);
    Ok((random.weights(config)?, random.inputs(config)?))
}

/// Output rows to check: all of a short sequence, else an even spread with the first and last.
fn rows(seq: usize) -> Vec<(usize, usize)> {
    const MAX: usize = 24;
    if seq <= MAX {
        (0..seq).map(|t| (0, t)).collect()
    } else {
        (0..MAX).map(|k| (0, k * (seq - 1) / (MAX - 1))).collect()
    }
}

/// The share of the tolerance `output` uses on `rows` against the f64 reference.
fn check(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    output: &[f32],
) -> Result<f64, Error> {
    let rows = rows(config.seq_len);
    let d = config.d_out();
    let want: Vec<f32> = reference::output_rows(config, weights, inputs, &rows)?
        .into_iter()
        .flatten()
        .collect();
    let got: Vec<f32> = rows
        .iter()
        .flat_map(|&(_, t)| output[t * d..(t + 1) * d].iter().copied())
        .collect();
    let shape = [rows.len(), d];
    Ok(compare(
        &Tensor::new(shape, got)?,
        &Tensor::new(shape, want)?,
        Tolerance::F32,
    )?
    .worst_ratio)
}

fn measure(
    ctx: &GpuContext,
    shape: &Shape,
    kernel: KernelChoice,
    warmup: usize,
    repeats: usize,
    failures: &mut Vec<String>,
) -> Result<Ours, Error> {
    let config = shape.config(kernel);
    let (weights, inputs) = layer(&config, shape.seq as u64)?;
    let mut plan = AttentionPlan::new(ctx, &config, &weights)?;
    let (device, queue) = (ctx.device(), ctx.queue());
    let buffer = |bytes: usize, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("compare io"),
            size: bytes as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    let x = buffer(
        inputs.x.len() * 4,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
    );
    queue.write_buffer(&x, 0, bytemuck::cast_slice(inputs.x.data()));
    let output = buffer(
        config.seq_len * config.d_out() * 4,
        wgpu::BufferUsages::STORAGE,
    );
    let bindings = plan.bind(AttentionIo {
        x: &x,
        key_mask: None,
        output: &output,
    })?;
    let submit_and_wait = || -> Result<f64, Error> {
        let start = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        plan.encode(&mut encoder, &bindings)?;
        queue.submit([encoder.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..warmup {
        submit_and_wait()?;
    }
    let wall: Vec<f64> = (0..repeats)
        .map(|_| submit_and_wait())
        .collect::<Result<_, _>>()?;
    let (mut attention, mut projection) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let times = plan.time_stages(&inputs)?;
        attention.push(times.attention() * 1e3);
        projection.push(times.get(Stage::Projection).unwrap_or(f64::NAN) * 1e3);
    }
    let result = plan.run(&inputs)?;
    let tolerance_used = check(&config, &weights, &inputs, result.data())?;
    if tolerance_used > 1.0 {
        failures.push(format!("{} {kernel:?}", shape.describe()));
    }
    Ok(Ours {
        wall_ms: Ms::of(&wall),
        attention_gpu_ms: Ms::of(&attention),
        projection_gpu_ms: Ms::of(&projection),
        tolerance_used,
    })
}

/// Our projection GEMM's and score kernel's rates at N=1024, H=8, D=64, d_model 512, from the
/// staged plan's GPU timestamps (medians).
fn gemm_and_scores(ctx: &GpuContext, repeats: usize) -> Result<(f64, f64), Error> {
    let config = AttentionConfig::new(1, 1024, 512, 8, 64).with_kernel(KernelChoice::Staged);
    let (weights, inputs) = layer(&config, 1024)?;
    let mut plan = AttentionPlan::new(ctx, &config, &weights)?;
    plan.run(&inputs)?;
    let (mut proj, mut scores) = (Vec::new(), Vec::new());
    for _ in 0..repeats.min(5) {
        let times = plan.time_stages(&inputs)?;
        proj.push(times.get(Stage::Projection).unwrap_or(f64::NAN));
        scores.push(times.get(Stage::Scores).unwrap_or(f64::NAN));
    }
    let proj_flops = 2.0 * 1024.0 * 512.0 * (3 * 512) as f64;
    let score_flops = 2.0 * (8 * 1024 * 1024 * 64) as f64;
    Ok((
        proj_flops / Ms::of(&proj).median / 1e9,
        score_flops / Ms::of(&scores).median / 1e9,
    ))
}

/// A whole call at the worked example's size against an empty submission and a bare one-
/// invocation dispatch, each waited for; measured in turn, 300 rounds, so drifts in the
/// machine's speed fall on all of them alike.
fn tiny_call(ctx: &GpuContext) -> Result<Tiny, Error> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bare round trip"),
        source: wgpu::ShaderSource::Wgsl(
            "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n\
             @compute @workgroup_size(1) fn main() { o[0] = 1u; }"
                .into(),
        ),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("bare round trip"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let target = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bare round trip"),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("bare round trip"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: target.as_entire_binding(),
        }],
    });
    let wait = || -> Result<(), Error> {
        device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(())
    };
    let config = AttentionConfig::new(1, 3, 3, 1, 3);
    let (weights, inputs) = layer(&config, 3)?;
    let mut fused = AttentionPlan::new(
        ctx,
        &config.clone().with_kernel(KernelChoice::Fused),
        &weights,
    )?;
    let mut staged = AttentionPlan::new(
        ctx,
        &config.clone().with_kernel(KernelChoice::Staged),
        &weights,
    )?;
    for (name, plan) in [("fused", &mut fused), ("staged", &mut staged)] {
        let out = plan.run(&inputs)?;
        let used = check(&config, &weights, &inputs, out.data())?;
        if used > 1.0 {
            return Err(format!("the tiny {name} call is outside the tolerance ({used})").into());
        }
    }
    let mut samples: [Vec<f64>; 4] = Default::default();
    for round in 0..320 {
        let time = |f: &mut dyn FnMut() -> Result<(), Error>| -> Result<f64, Error> {
            let start = Instant::now();
            f()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        let empty = time(&mut || {
            queue.submit([]);
            wait()
        })?;
        let bare = time(&mut || {
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            queue.submit([encoder.finish()]);
            wait()
        })?;
        let f = time(&mut || {
            fused.run(&inputs)?;
            Ok(())
        })?;
        let s = time(&mut || {
            staged.run(&inputs)?;
            Ok(())
        })?;
        // The first rounds warm caches and the driver's thread pool.
        if round >= 20 {
            for (v, x) in samples.iter_mut().zip([empty, bare, f, s]) {
                v.push(x);
            }
        }
    }
    let mut gpu = Vec::new();
    for _ in 0..50 {
        gpu.push(fused.time_stages(&inputs)?.total() * 1e3);
    }
    let [empty, bare, f, s] = samples.map(|v| Ms::of(&v).median);
    Ok(Tiny {
        empty_submit_ms: empty,
        round_trip_ms: bare,
        fused_call_ms: f,
        staged_call_ms: s,
        fused_gpu_ms: Ms::of(&gpu).median,
        fused_over_round_trip: f / bare,
    })
}

/// The fast CPU path at N = 512 and 1024 (H=8, D=64): the attention core on projected inputs
/// and the whole layer, checked against the f64 reference, beside one run of the reference's
/// whole layer at 512.
fn cpu_figures(failures: &mut Vec<String>) -> Result<Vec<CpuFigures>, Error> {
    let mut out = Vec::new();
    for seq in [512, 1024] {
        let config = AttentionConfig::new(1, seq, 512, 8, 64);
        let (weights, inputs) = layer(&config, seq as u64)?;
        let shape = AttentionShape::of(&config);
        let q = Tensor::random([seq * 512], 1.0, seq as u64 + 1)?;
        let time = |f: &mut dyn FnMut() -> Result<(), Error>, n: usize| -> Result<f64, Error> {
            f()?;
            let mut v = Vec::new();
            for _ in 0..n {
                let start = Instant::now();
                f()?;
                v.push(start.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Ms::of(&v).median)
        };
        let attention = time(
            &mut || {
                std::hint::black_box(wgpu_attention::cpu::attention(
                    &shape,
                    q.data(),
                    q.data(),
                    q.data(),
                    None,
                )?);
                Ok(())
            },
            15,
        )?;
        let layer = CpuAttention::new(&config, &weights)?;
        let fast_layer = time(
            &mut || {
                std::hint::black_box(layer.run(&inputs)?);
                Ok(())
            },
            7,
        )?;
        let tolerance_used = check(&config, &weights, &inputs, layer.run(&inputs)?.data())?;
        if tolerance_used > 1.0 {
            failures.push(format!("cpu N={seq}"));
        }
        let reference_layer = if seq == 512 {
            let start = Instant::now();
            std::hint::black_box(reference::run(&config, &weights, &inputs)?);
            Some(start.elapsed().as_secs_f64() * 1e3)
        } else {
            None
        };
        out.push(CpuFigures {
            seq,
            fast_attention_ms: attention,
            fast_attention_gflops: config.attention_flops() / attention / 1e6,
            fast_layer_ms: fast_layer,
            reference_layer_one_run_ms: reference_layer,
            tolerance_used,
        });
    }
    Ok(out)
}

/// Our projection GEMM with M = K = 4096 and N = 3 x 1364 = 4092: the rate of our own tiled
/// GEMM on this adapter (not the adapter's peak).
fn gemm_4096(ctx: &GpuContext) -> Result<f64, Error> {
    let config = AttentionConfig::new(1, 4096, 4096, 1, 1364).with_kernel(KernelChoice::Staged);
    let (weights, inputs) = layer(&config, 4096)?;
    let mut plan = AttentionPlan::new(ctx, &config, &weights)?;
    plan.run(&inputs)?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(
            plan.time_stages(&inputs)?
                .get(Stage::Projection)
                .unwrap_or(f64::NAN),
        );
    }
    let flops = 2.0 * 4096.0 * 4096.0 * (3 * 1364) as f64;
    Ok(flops / Ms::of(&samples).median / 1e9)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn print_report(r: &Report, live: bool) {
    println!("adapter {}", r.adapter);
    println!("Burn: {}", r.peer_source);
    println!(
        "ours: median of {} runs after {} warm-up; wall = encode, submit and wait, input on the \
         device (as Burn's `sync`), including a q|k|v projection from d_model 8 whose GPU time \
         is the proj column; gpu attn = GPU timestamps of the attention stages alone",
        r.repeats, r.warmup
    );
    let label = if live {
        "Burn ms (measured)"
    } else {
        "Burn ms (GIVEN)"
    };
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9} {:>20} {:>20} {:>10} {:>12} {:>8}",
        "shape",
        "staged ms",
        "fused ms",
        "proj ms",
        "stg gpu",
        "fus gpu",
        "fus/stg",
        label,
        "Burn unfused ms",
        "fused/Burn",
        "staged/unfus",
        "tol used"
    );
    let range = |(lo, hi): (f64, f64)| {
        if lo == hi {
            format!("{lo:.2}")
        } else {
            format!("{lo}-{hi}")
        }
    };
    for s in &r.shapes {
        println!(
            "{:<22} {:>10.3} {:>10.3} {:>9.3} {:>10.3} {:>10.3} {:>9.2} {:>20} {:>20} {:>10.2} {:>12.2} {:>8.3}",
            s.shape,
            s.staged.wall_ms.median,
            s.fused.wall_ms.median,
            s.fused.projection_gpu_ms.median,
            s.staged.attention_gpu_ms.median,
            s.fused.attention_gpu_ms.median,
            s.fused.wall_ms.median / s.staged.wall_ms.median,
            range(s.burn.fused_ms),
            range(s.burn.unfused_ms),
            s.fused_over_burn,
            s.staged_over_burn_unfused,
            s.staged.tolerance_used.max(s.fused.tolerance_used)
        );
    }
    if !live {
        println!(
            "(ratios against the GIVEN figures use their low end; they were measured on another \
             machine and day, so they indicate, they do not measure)"
        );
    }
    println!();
    println!("targets");
    let big = |s: &&ShapeRow| s.shape.contains("N=512") || s.shape.contains("N=1024");
    let worst = r
        .shapes
        .iter()
        .filter(big)
        .map(|s| s.fused_over_burn)
        .reduce(f64::max);
    match worst {
        Some(worst) if r.peer_verdicts => {
            println!(
                "  fused wall / Burn attention at N=512, 1024: worst {worst:.2} (<= {FUSED_VS_BURN}; aim {FUSED_VS_BURN_AIM:.2})  {}",
                verdict(worst <= FUSED_VS_BURN)
            );
            if !live {
                println!(
                    "    (against the table: same adapter, but the CPU under lavapipe may differ)"
                );
            }
        }
        Some(_) => println!(
            "  fused against Burn: no verdict (the given figures are for {TABLE_ADAPTER} on \
             {TABLE_BACKEND:?}; pass --burn to measure here)"
        ),
        None => println!("  fused against Burn: no N=512 or N=1024 shape ran"),
    }
    if let Some(ratio) = r.causal_over_dense {
        println!(
            "  causal fused / dense fused at N=1024 (GPU timestamps) = {ratio:.2} (<= {CAUSAL_VS_DENSE})  {}",
            verdict(ratio <= CAUSAL_VS_DENSE)
        );
    }
    if let Some(e) = &r.extras {
        print_extras(e, r.fused_gflops_1024);
    }
    if !r.gemm.is_empty() {
        gemm::print(&r.gemm);
    }
    if !r.failures.is_empty() {
        println!("OUTSIDE THE TOLERANCE: {}", r.failures.join(", "));
    }
}

fn print_extras(r: &Extras, fused_gflops_1024: Option<f64>) {
    let t = &r.tiny;
    println!(
        "  tiny whole call: fused {:.3} ms, staged {:.3} ms; bare round trip {:.3} ms, empty submit {:.3} ms",
        t.fused_call_ms, t.staged_call_ms, t.round_trip_ms, t.empty_submit_ms
    );
    println!(
        "    fused call / round trip = {:.2} (<= {TINY_VS_ROUND_TRIP}); GPU time of its stages {:.3} ms  {}",
        t.fused_over_round_trip,
        t.fused_gpu_ms,
        verdict(t.fused_over_round_trip <= TINY_VS_ROUND_TRIP)
    );
    println!(
        "  our projection GEMM {:.2} GFLOP/s vs our score kernel {:.2} GFLOP/s at N=1024  {}",
        r.our_gemm_gflops,
        r.score_kernel_gflops,
        verdict(r.our_gemm_gflops >= r.score_kernel_gflops)
    );
    for c in &r.cpu {
        let reference = c.reference_layer_one_run_ms.map_or(String::new(), |ms| {
            format!(
                ", f64 reference layer {ms:.0} ms in one run ({:.0}x slower)",
                ms / c.fast_layer_ms
            )
        });
        println!(
            "  cpu N={}: attention {:.2} ms = {:.0} GFLOP/s; layer {:.2} ms, tol used {:.3}{reference}",
            c.seq, c.fast_attention_ms, c.fast_attention_gflops, c.fast_layer_ms, c.tolerance_used
        );
    }
    let cpu_worst = r
        .cpu
        .iter()
        .map(|c| c.fast_attention_gflops)
        .fold(f64::INFINITY, f64::min);
    println!(
        "  fast CPU attention >= {CPU_GFLOPS} GFLOP/s at N=512, 1024  {}",
        verdict(cpu_worst >= CPU_GFLOPS)
    );
    match (r.our_gemm_gflops_4096, fused_gflops_1024) {
        (Some(rate), Some(fused)) => println!(
            "  our GEMM at 4096^2: {rate:.0} GFLOP/s; fused attention at N=1024 {fused:.0} GFLOP/s = {:.0} % of it",
            100.0 * fused / rate
        ),
        (Some(rate), None) => println!("  our GEMM at 4096^2: {rate:.0} GFLOP/s"),
        (None, Some(fused)) => println!(
            "  fused attention at N=1024: {fused:.1} GFLOP/s (our 4096^2 GEMM is measured on GPUs only)"
        ),
        (None, None) => {}
    }
}
