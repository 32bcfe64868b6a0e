//! Cutting a stream of dispatches into submissions of bounded work (see
//! `shaders/dispatch.wgsl`): what the plan and the operator both do when they run their own
//! work, so that no submission holds an OpenGL context or a watchdog's patience for long.

use std::ops::Range;

use super::{MAX_CHUNKS, fold_grid};
use crate::error::Result;

/// A dispatch's size, for cutting it into submissions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Work {
    pub workgroups: u32,
    pub flops: f64,
}

/// Part of a step: a copy, or chunks `chunks` of a dispatch recorded with grid `grid`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub step: usize,
    pub grid: [u32; 3],
    pub chunks: Range<u32>,
}

/// The steps `range` cut into submissions of at most about `budget` FLOPs each: a dispatch
/// with more work than that is split into chunks of the same grid (see
/// `shaders/dispatch.wgsl`), and consecutive pieces share a submission while they fit.
///
/// Why: a submission is one uninterrupted call for some backends. OpenGL's context is locked
/// for a whole submission, so a second thread using the same device gives up after a few
/// seconds, and OS and browser watchdogs reset a GPU whose submission runs for seconds.
pub(crate) fn submissions(
    steps: &[Option<Work>],
    range: Range<usize>,
    budget: f64,
    max_per_dim: u32,
) -> Result<Vec<Vec<Piece>>> {
    let mut subs: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut used = 0.0;
    for (i, step) in steps.iter().enumerate().take(range.end).skip(range.start) {
        let Some(d) = step else {
            subs.last_mut().expect("one submission").push(Piece {
                step: i,
                grid: [0; 3],
                chunks: 0..0,
            });
            continue;
        };
        let wanted = (d.flops / budget).ceil().clamp(1.0, MAX_CHUNKS as f64) as u32;
        let grid = fold_grid(
            d.workgroups.div_ceil(wanted),
            max_per_dim,
            "a dispatch chunk",
        )?;
        let per_chunk = grid.iter().map(|&g| g as u64).product::<u64>();
        let chunks = (d.workgroups as u64).div_ceil(per_chunk).max(1) as u32;
        let flops = d.flops / chunks as f64;
        for c in 0..chunks {
            if used > 0.0 && used + flops > budget {
                subs.push(Vec::new());
                used = 0.0;
            }
            used += flops;
            let sub = subs.last_mut().expect("one submission");
            match sub.last_mut() {
                Some(p) if p.step == i && p.chunks.end == c => p.chunks.end = c + 1,
                _ => sub.push(Piece {
                    step: i,
                    grid,
                    chunks: c..c + 1,
                }),
            }
        }
    }
    subs.retain(|s| !s.is_empty());
    Ok(subs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(workgroups: u32, flops: f64) -> Option<Work> {
        Some(Work { workgroups, flops })
    }

    /// Every workgroup of every step is dispatched exactly once, in step order, and no
    /// submission holds more than the budget unless it is a single chunk.
    fn check(steps: &[Option<Work>], budget: f64, max: u32) -> Vec<Vec<Piece>> {
        let subs = submissions(steps, 0..steps.len(), budget, max).unwrap();
        let pieces: Vec<&Piece> = subs.iter().flatten().collect();
        for (i, step) in steps.iter().enumerate() {
            let mine: Vec<&&Piece> = pieces.iter().filter(|p| p.step == i).collect();
            let Some(w) = step else {
                assert_eq!(mine.len(), 1, "copy {i} once");
                continue;
            };
            let mut next = 0;
            for p in &mine {
                assert_eq!(p.chunks.start, next, "chunks of step {i} in order");
                next = p.chunks.end;
            }
            let per = mine[0].grid.iter().map(|&g| g as u64).product::<u64>();
            assert!(mine.iter().all(|p| p.grid == mine[0].grid));
            let covered = next as u64 * per;
            assert!(covered >= w.workgroups as u64, "step {i} not covered");
            assert!(
                covered - per < w.workgroups as u64,
                "step {i}: an empty chunk"
            );
        }
        let order: Vec<usize> = pieces.iter().map(|p| p.step).collect();
        assert!(order.is_sorted(), "{order:?}");
        for sub in &subs {
            let flops: f64 = sub
                .iter()
                .map(|p| match steps[p.step] {
                    Some(w) => {
                        let n = pieces
                            .iter()
                            .filter(|q| q.step == p.step)
                            .map(|q| q.chunks.len())
                            .sum::<usize>();
                        w.flops * p.chunks.len() as f64 / n as f64
                    }
                    None => 0.0,
                })
                .sum();
            let single = sub.iter().map(|p| p.chunks.len()).sum::<usize>() <= 1;
            assert!(flops <= budget * 1.000001 || single, "{flops} > {budget}");
        }
        subs
    }

    #[test]
    fn small_work_is_one_submission_of_whole_dispatches() {
        let steps = [
            dispatch(10, 1e6),
            None,
            dispatch(300, 2e6),
            dispatch(7, 1e3),
        ];
        let subs = check(&steps, 1e9, 65535);
        assert_eq!(subs.len(), 1);
        assert!(subs[0].iter().all(|p| p.chunks.len() <= 1));
    }

    #[test]
    fn large_dispatches_split_into_chunks_within_the_budget() {
        let steps = [dispatch(64, 1e8), dispatch(4096, 8.6e9), dispatch(64, 1e8)];
        let subs = check(&steps, 1e9, 65535);
        assert!(subs.len() >= 9, "{}", subs.len());
        let chunks: usize = subs
            .iter()
            .flatten()
            .filter(|p| p.step == 1)
            .map(|p| p.chunks.len())
            .sum();
        assert_eq!(chunks, 9);
    }

    #[test]
    fn chunking_respects_folded_grids_and_the_chunk_limit() {
        check(&[dispatch(70000, 1e12)], 1e9, 100);
        let subs = check(&[dispatch(5_000_000, 1e15)], 1e6, 65535);
        let chunks: usize = subs.iter().flatten().map(|p| p.chunks.len()).sum();
        assert!(chunks <= MAX_CHUNKS as usize);
        check(&[dispatch(3, 1e12), None], 1.0, 65535);
    }
}
