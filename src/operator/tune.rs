//! The autotuner's trials: when a plan is built for a class of shapes the device has not seen,
//! each candidate tile shape of the fused kernel ([`FusedTiles::candidates`]) runs the same
//! trial problem, and the fastest is remembered for the class (see `kernels::tune`).
//!
//! The trial is the plan's own heads and widths, head-major in fresh buffers, at lengths cut
//! down until one call takes about [`TRIAL_SECONDS`] at the device's rate, so that tuning a
//! class costs well under a second even on a CPU driver, compiles included.

use std::time::Instant;

use super::lengths::LengthTable;
use crate::context::GpuContext;
use crate::error::Result;
use crate::gpu::{STORAGE, buffer, init_uniform, scoped, scoped_async};
use crate::kernels::fused::{FusedGeometry, FusedIo, FusedTiles, Strides};
use crate::kernels::tune::TuneClass;
use crate::kernels::{Autotune, fold_grid, pad4, rows_per_eight};

/// About how long one trial call should take at the device's rate.
const TRIAL_SECONDS: f64 = 0.02;

/// Timed calls per candidate, after one untimed call; the fastest counts.
const REPS: usize = 2;

/// What tuning one class may spend, compiles included: candidates not reached by then are
/// skipped. On a CPU driver compiling one candidate takes 0.1-0.4 s, so there the first few
/// candidates (the rule's, then fewer rows per workgroup, then more key columns) are what gets
/// timed; a GPU compiles and runs all six well within it.
const TUNE_SECONDS: f64 = 1.0;

/// The fused kernel's tiles for calls of up to `max_q` queries over `max_kv` keys: the rule's
/// ([`FusedGeometry::tiles`]), or the winner of this shape class on this device, timed now if
/// the context's [`Autotune`] mode asks for it and nobody has yet.
pub(crate) async fn tiles(
    ctx: &GpuContext,
    g: &FusedGeometry,
    max_q: u32,
    max_kv: u32,
) -> Result<FusedTiles> {
    let limits = ctx.limits();
    let rule = g.tiles(max_q, max_kv, &limits)?;
    let mode = ctx.kernels().tune().mode;
    // Timing waits for the device, which a browser's main thread must not.
    if mode == Autotune::Off || cfg!(target_arch = "wasm32") {
        return Ok(rule);
    }
    let class = class(g, max_q, max_kv);
    if let Some(t) = ctx.kernels().tune().winner(&class) {
        return Ok(t);
    }
    if mode == Autotune::Cached {
        return Ok(rule);
    }
    let candidates = candidates(g, max_q, max_kv, &limits);
    let winner = if candidates.len() > 1 {
        ctx.kernels().tune().trials += 1;
        fastest(ctx, g, max_q, max_kv, &candidates).await?
    } else {
        rule
    };
    ctx.kernels().tune().record(class, winner)?;
    Ok(winner)
}

/// The shape class of calls of up to `max_q` queries over `max_kv` keys.
pub(crate) fn class(g: &FusedGeometry, max_q: u32, max_kv: u32) -> TuneClass {
    TuneClass {
        group: g.group(),
        dp: pad4(g.head_dim),
        dvp: pad4(g.head_dim_v),
        causal: g.causal,
        rows: rows_per_eight(g.group().saturating_mul(max_q)),
        keys: max_kv.max(1).next_power_of_two(),
    }
}

/// The tiles the autotuner would time for these calls, the rule's first.
pub(crate) fn candidates(
    g: &FusedGeometry,
    max_q: u32,
    max_kv: u32,
    limits: &wgpu::Limits,
) -> Vec<FusedTiles> {
    let rows = g.group().saturating_mul(max_q);
    FusedTiles::candidates(rows, max_kv, pad4(g.head_dim), pad4(g.head_dim_v), limits)
}

/// Runs the trial with each candidate and returns the fastest.
async fn fastest(
    ctx: &GpuContext,
    g: &FusedGeometry,
    max_q: u32,
    max_kv: u32,
    candidates: &[FusedTiles],
) -> Result<FusedTiles> {
    // Enough rows for the largest workgroup among the candidates, so that none is timed with
    // most of its invocations idle.
    let rows = candidates.iter().map(|t| t.rows()).max().unwrap_or(64);
    let (trial, q_len, kv_len) =
        trial(g, max_q, max_kv, ctx.kernels().rate() * TRIAL_SECONDS, rows);
    let io = trial.io();
    let device = ctx.device().clone();
    let queue = ctx.queue().clone();
    let elements = |heads: u32, n: u32, width: u32| {
        ((trial.batch * heads * n * width) as u64 * 4).next_multiple_of(16)
    };
    let kv_heads = trial.kv_heads;
    let (params, lengths, bufs) = scoped_async(&device, "creating the autotuner's trial", || {
        (
            init_uniform(
                &device,
                "autotune trial",
                bytemuck::bytes_of(&trial.params()),
            ),
            LengthTable::new(&device, q_len.min(kv_len), q_len.max(kv_len)),
            [
                elements(trial.heads, q_len, pad4(trial.head_dim)),
                elements(kv_heads, kv_len, pad4(trial.head_dim)),
                elements(kv_heads, kv_len, pad4(trial.head_dim_v)),
                elements(trial.heads, q_len, trial.head_dim_v),
            ]
            .map(|bytes| buffer(&device, "autotune trial", bytes, STORAGE)),
        )
    })
    .await?;
    let chunks = ctx.kernels().chunks().await?;
    let offsets = [lengths.offset(q_len), lengths.offset(kv_len)];
    let mut best: Option<(f64, FusedTiles)> = None;
    let began = Instant::now();
    for &t in candidates {
        if best.is_some() && began.elapsed().as_secs_f64() > TUNE_SECONDS {
            log::debug!("autotune: budget spent, {t:?} and later candidates skipped");
            break;
        }
        let pipeline = ctx.kernels().pipeline(t.kernel(io), &t.overrides()).await?;
        let resources = [&params, &bufs[0], &bufs[1], &bufs[2], &bufs[3]]
            .map(|b| b.as_entire_binding())
            .into_iter()
            .chain([lengths.binding(), lengths.binding()]);
        let group = scoped(&device, "binding the autotuner's trial", || {
            pipeline.bind_group(&device, "autotune trial", resources)
        })?;
        let grid = fold_grid(
            trial.workgroups(&t, q_len),
            ctx.limits().max_compute_workgroups_per_dimension,
            "the autotuner's trial",
        )?;
        let mut fastest = f64::INFINITY;
        for rep in 0..=REPS {
            let start = Instant::now();
            scoped(&device, "running the autotuner's trial", || {
                let mut encoder = device.create_command_encoder(&Default::default());
                {
                    let mut pass = encoder.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipeline.pipeline);
                    pass.set_bind_group(0, &group, &offsets);
                    pass.set_bind_group(1, &chunks.group, &[0]);
                    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                }
                queue.submit([encoder.finish()]);
            })?;
            device.poll(wgpu::PollType::wait_indefinitely())?;
            if rep > 0 {
                fastest = fastest.min(start.elapsed().as_secs_f64());
            }
        }
        log::debug!("autotune {t:?}: {:.3} ms", fastest * 1e3);
        drop((group, pipeline));
        match best {
            Some((s, loser)) if fastest < s => {
                forget(ctx, io, loser);
                best = Some((fastest, t));
            }
            Some(_) => forget(ctx, io, t),
            None => best = Some((fastest, t)),
        }
    }
    Ok(best.map_or(candidates[0], |(_, t)| t))
}

/// Lets a losing candidate's pipeline go (a plan already using it keeps it).
fn forget(ctx: &GpuContext, io: FusedIo, t: FusedTiles) {
    ctx.kernels().forget(t.kernel(io), &t.overrides());
}

/// The trial problem for `g`: its heads and widths, causal or not, head-major in buffers of
/// its own with no mask, bias or saved logsumexp, and its lengths halved (the longer first) and then its batch
/// and heads cut until a call is at most `flops`, keeping at least `rows` packed rows (or all
/// there are) and 64 keys.
fn trial(
    g: &FusedGeometry,
    max_q: u32,
    max_kv: u32,
    flops: f64,
    rows: u32,
) -> (FusedGeometry, u32, u32) {
    let mut t = FusedGeometry {
        packed_qkv: false,
        has_mask: false,
        bias: None,
        lse: false,
        ..g.clone()
    };
    let (mut q, mut kv) = (max_q.max(1), max_kv.max(1));
    while t.flops(q, kv) > flops && (kv > 64 || t.group() * q > rows) {
        if kv > 64 && kv >= t.group() * q {
            kv = kv.div_ceil(2);
        } else {
            q = q.div_ceil(2);
        }
    }
    while t.flops(q, kv) > flops && t.batch > 1 {
        t.batch = t.batch.div_ceil(2);
    }
    while t.flops(q, kv) > flops && t.kv_heads > 1 {
        t.kv_heads = t.kv_heads.div_ceil(2);
        t.heads = t.kv_heads * g.group();
    }
    t.q = Strides::head_major(t.heads, pad4(t.head_dim), 0);
    t.k = Strides::head_major(t.kv_heads, pad4(t.head_dim), 0);
    t.v = Strides::head_major(t.kv_heads, pad4(t.head_dim_v), 0);
    t.out = Strides::head_major(t.heads, t.head_dim_v, 0);
    debug_assert_eq!(
        t.io(),
        FusedIo {
            packed_qkv: false,
            mask: false,
            bias: false,
            precision: t.precision,
            lse: false,
        }
    );
    (t, q, kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trial_fits_its_budget_and_keeps_the_heads_shape() {
        let g = FusedGeometry {
            batch: 4,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            head_dim_v: 128,
            causal: true,
            has_mask: true,
            packed_qkv: true,
            lse: true,
            bias: Some((true, true)),
            scale: 0.1,
            q: Strides::head_major(32, 128, 0),
            k: Strides::head_major(8, 128, 0),
            v: Strides::head_major(8, 128, 0),
            out: Strides::head_major(32, 128, 0),
            precision: crate::Precision::F32,
        };
        let budget = 1e10 * TRIAL_SECONDS;
        let (t, q, kv) = trial(&g, 4096, 4096, budget, 64);
        assert!(t.flops(q, kv) <= budget, "{q} {kv} {t:?}");
        assert_eq!(t.group(), 4);
        assert_eq!((t.head_dim, t.head_dim_v, t.causal), (128, 128, true));
        assert_eq!(t.io(), FusedIo::ALL[3]);
        assert!(q * t.group() >= 64 && kv >= 64, "{q} {kv}");
        // A small problem is run as it is.
        let (t, q, kv) = trial(&g, 3, 10, budget, 64);
        assert_eq!((t.batch, t.heads, q, kv), (4, 32, 3, 10));
    }
}
