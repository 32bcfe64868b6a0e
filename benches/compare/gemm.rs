//! The projection GEMM beside Burn's matmul (issue 12, item 3): our q|k|v projection's rate
//! from a staged plan's GPU timestamps, and `burn_attn`'s `METHODS=matmul` (`x.matmul(w)`,
//! wall clock to `device.sync()`) on the same M x K x N, in the same minutes.

use std::process::Command;

use serde::Serialize;
use wgpu_attention::{AttentionConfig, AttentionPlan, GpuContext, KernelChoice, Stage};

use super::{BurnPeer, Error, Ms, layer};

/// The projections timed: (Burn's shape name, tokens M); K = d_model 512, N = 3 H D = 1536
/// (H = 8, D = 64), the layer of S3 and S4 with its projection from d_model 512.
const SHAPES: [(&str, usize); 2] = [("P3", 512), ("P4", 1024)];
const D_MODEL: usize = 512;
const HEADS: usize = 8;
const HEAD_DIM: usize = 64;

/// One projection shape, both sides.
#[derive(Debug, Serialize)]
pub(crate) struct GemmRow {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Ours, GPU timestamps of the projection stage (median).
    pub ours_gflops: f64,
    /// Burn's `x.matmul(w)`, `sync` median; `None` without a peer or with one built before
    /// it had the matmul method.
    pub burn_gflops: Option<f64>,
}

/// Both sides for every projection shape; Burn's only when `peer` is given.
pub(crate) fn side_by_side(
    ctx: &GpuContext,
    peer: Option<&BurnPeer>,
    warmup: usize,
    repeats: usize,
) -> Result<Vec<GemmRow>, Error> {
    let burn = match peer {
        Some(p) => burn_matmul(p, warmup, repeats)?,
        None => Vec::new(),
    };
    SHAPES
        .iter()
        .map(|&(name, m)| {
            let n = 3 * HEADS * HEAD_DIM;
            Ok(GemmRow {
                m,
                k: D_MODEL,
                n,
                ours_gflops: ours(ctx, m, repeats)?,
                burn_gflops: burn.iter().find(|(s, _)| s == name).map(|&(_, g)| g),
            })
        })
        .collect()
}

/// Our projection's rate for `m` tokens, from the staged plan's GPU timestamps.
fn ours(ctx: &GpuContext, m: usize, repeats: usize) -> Result<f64, Error> {
    let config =
        AttentionConfig::new(1, m, D_MODEL, HEADS, HEAD_DIM).with_kernel(KernelChoice::Staged);
    let (weights, inputs) = layer(&config, m as u64)?;
    let mut plan = AttentionPlan::new(ctx, &config, &weights)?;
    plan.run(&inputs)?;
    let mut proj = Vec::new();
    for _ in 0..repeats.min(5) {
        proj.push(
            plan.time_stages(&inputs)?
                .get(Stage::Projection)
                .unwrap_or(f64::NAN),
        );
    }
    let flops = 2.0 * (m * D_MODEL * 3 * HEADS * HEAD_DIM) as f64;
    Ok(flops / Ms::of(&proj).median / 1e9)
}

/// Burn's matmul rate per shape name, from its RESULT lines; none from a binary without the
/// method (it prints no matmul line).
fn burn_matmul(peer: &BurnPeer, warmup: usize, runs: usize) -> Result<Vec<(String, f64)>, Error> {
    let names: Vec<&str> = SHAPES.iter().map(|(name, _)| *name).collect();
    let out = Command::new(&peer.path)
        .args([peer.api.to_string(), warmup.to_string(), runs.to_string()])
        .env("SHAPES", names.join(","))
        .env("METHODS", "matmul")
        .current_dir(peer.dir.path())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{} (matmul) failed ({}): {}",
            peer.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    // RESULT peer api shape M K N matmul timing median min max gflops err first_ms
    let mut rates = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() >= 14 && f[0] == "RESULT" && f[1].ends_with("-matmul") {
            rates.push((f[3].to_string(), f[12].parse()?));
        }
    }
    Ok(rates)
}

/// The rows, ours beside Burn's.
pub(crate) fn print(rows: &[GemmRow]) {
    println!(
        "projection GEMM (ours: GPU timestamps of the q|k|v projection; Burn: x.matmul(w), wall \
         to sync), GFLOP/s = 2 M K N / time:"
    );
    for r in rows {
        let burn = match r.burn_gflops {
            Some(b) => format!(
                "Burn matmul {b:.2} GFLOP/s, ours/Burn rate {:.2}  {}",
                r.ours_gflops / b,
                super::verdict(r.ours_gflops >= b)
            ),
            None => "Burn matmul not measured (no --burn, or a burn_attn built before \
                     benches/peers/burn_attn had METHODS=matmul)"
                .into(),
        };
        println!(
            "  {}x{}x{}: ours {:.2} GFLOP/s; {burn}",
            r.m, r.k, r.n, r.ours_gflops
        );
    }
}
