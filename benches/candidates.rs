//! `cargo bench --bench candidates`: every tile candidate the autotuner may pick for one
//! attention shape, each pinned and timed on this adapter, interleaved round by round so
//! that all of them see the same minutes of a machine whose speed drifts. What the tuner's
//! one-second trial decides, measured at the real shape and at leisure: for choosing and
//! ordering candidates, not for users.
//!
//! ```text
//! cargo bench --bench candidates -- [--heads 8] [--seq 1024] [--head-dim 64] [--causal]
//!     [--rounds 5]
//! ```
//!
//! Each call is the operator encoded into a fresh encoder, submitted and waited for (wall
//! clock), Q, K and V already on the device; compile time is the operator's construction.

use std::time::Instant;

use clap::Parser;
use wgpu_attention::{
    AdapterOptions, AttentionOp, Autotune, DeviceLimits, GpuContext, KernelChoice, Lengths,
    OperatorConfig, OperatorIo,
};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, Parser)]
#[command(about = "Every fused-kernel tile candidate of one shape, timed side by side")]
struct Args {
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long)]
    causal: bool,
    /// Timed rounds (each times every candidate once); medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let mut options = AdapterOptions::from_env();
    options.limits = DeviceLimits::Adapter;
    let ctx = GpuContext::from_options(&options)?;
    ctx.set_autotune(Autotune::Cached);
    let (h, n, d) = (args.heads, args.seq, args.head_dim);
    let mut config = OperatorConfig::new(1, h, h, d, n, n).with_kernel(KernelChoice::Fused);
    if args.causal {
        config = config.causal();
    }
    let (class, candidates) = AttentionOp::tile_candidates(&ctx, &config);
    println!("adapter {}", ctx.adapter_info().name);
    println!("class {class}");

    let (device, queue) = (ctx.device(), ctx.queue());
    let tensor = |salt: u32| {
        let data: Vec<f32> = (0..(h * n * d) as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(salt) >> 8) % 1000) as f32 / 500.0 - 1.0
            })
            .collect();
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("candidates io"),
            size: (data.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&buffer, 0, bytemuck::cast_slice(&data));
        buffer
    };
    let (q, k, v, out) = (tensor(1), tensor(2), tensor(3), tensor(4));
    let mut ops = Vec::new();
    for tiles in &candidates {
        ctx.pin_tiles(&class, tiles)?;
        let start = Instant::now();
        let op = AttentionOp::new(&ctx, &config)?;
        let built = start.elapsed().as_secs_f64() * 1e3;
        let bindings = op.bind(OperatorIo {
            q: &q,
            k: &k,
            v: &v,
            key_mask: None,
            bias: None,
            out: &out,
        })?;
        ops.push((tiles.clone(), op, bindings, built, Vec::new()));
    }
    let lengths = Lengths {
        q_len: n,
        kv_len: n,
    };
    for round in 0..=args.rounds {
        for (_, op, bindings, _, times) in ops.iter_mut() {
            let start = Instant::now();
            let mut encoder = device.create_command_encoder(&Default::default());
            op.encode(&mut encoder, bindings, lengths)?;
            queue.submit([encoder.finish()]);
            device.poll(wgpu::PollType::wait_indefinitely())?;
            // Round 0 warms up.
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let flops = 4.0 * (h * n * n * d) as f64 * if args.causal { 0.5 } else { 1.0 };
    println!("candidate (rule first)                median ms     min ms  GFLOP/s  build ms");
    for (tiles, _, _, built, mut times) in ops {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{tiles:<36} {median:>10.1} {:>10.1} {:>8.2} {built:>9.0}",
            times[0],
            flops / median / 1e6
        );
    }
    Ok(())
}
