//! Timing a plan on the GPU: the whole stream as `run` submits it, then each stage alone.

use std::time::Instant;

use super::AttentionPlan;
use super::steps::{Stamps, Step};
use crate::error::Result;
use crate::gpu::scoped;
use crate::timing::{GpuTimer, StageTime, StageTimes, TimingSource, since};
use crate::weights::AttentionInputs;

impl AttentionPlan {
    /// Uploads `inputs` and times the layer on the GPU, leaving the output in the plan's own
    /// output buffer (not read back).
    ///
    /// First the dispatches exactly as [`AttentionPlan::run`] submits them, then each stage
    /// in submissions of its own, for a breakdown. With timestamp queries where the device has
    /// them (made on the first call and reused), else with the wall clock around each
    /// submission, waited for.
    pub fn time_stages(&mut self, inputs: &AttentionInputs) -> Result<StageTimes> {
        inputs.validate(&self.config)?;
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        let device = self.ctx.device().clone();
        self.submit_pieces(&[Vec::new()], Some(inputs), false, None)?;
        device.poll(wgpu::PollType::wait_indefinitely())?;
        let dispatches: Vec<usize> = (0..self.steps.len())
            .filter(|&i| matches!(self.steps[i], Step::Dispatch(_)))
            .collect();
        let stages: Vec<_> = self.stages();
        let intervals = 1 + dispatches.len() as u32;
        let timer = match self.timer.take() {
            Some(t) if t.intervals() == intervals => Some(t),
            _ if self.ctx.has_timestamps() => {
                Some(scoped(&device, "creating timestamp queries", || {
                    GpuTimer::new(&device, intervals)
                })?)
            }
            _ => None,
        };
        let result = match &timer {
            Some(t) => self.timed_runs(&dispatches, Some(t)).and_then(|(wall, _)| {
                let mut encoder = device.create_command_encoder(&Default::default());
                t.resolve(&mut encoder);
                self.ctx.queue().submit([encoder.finish()]);
                Ok((
                    TimingSource::Timestamps,
                    t.read(&device, self.ctx.queue())?,
                    wall,
                ))
            }),
            None => self
                .timed_runs(&dispatches, None)
                .map(|(wall, seconds)| (TimingSource::WallClock, seconds, wall)),
        };
        self.timer = timer;
        let (source, seconds, wall) = result?;
        Ok(StageTimes {
            source,
            gpu_seconds: seconds[0],
            wall_seconds: wall,
            stages: stages
                .into_iter()
                .zip(&seconds[1..])
                .map(|(stage, &seconds)| StageTime { stage, seconds })
                .collect(),
        })
    }

    /// Runs the whole stream, then each dispatch alone, writing timestamp pairs 0, 1, ... if
    /// `timer` is given. Returns the whole stream's wall-clock time and every interval's wall
    /// time (whole stream first).
    fn timed_runs(
        &mut self,
        dispatches: &[usize],
        timer: Option<&GpuTimer>,
    ) -> Result<(f64, Vec<f64>)> {
        let device = self.ctx.device().clone();
        let ranges =
            std::iter::once(0..self.steps.len()).chain(dispatches.iter().map(|&i| i..i + 1));
        let ranges: Vec<_> = ranges.collect();
        let mut walls = Vec::with_capacity(ranges.len());
        for (k, range) in ranges.into_iter().enumerate() {
            let subs = self.submissions(range)?;
            let stamps = timer.map(|t| Stamps {
                query_set: &t.queries,
                beginning: Some(2 * k as u32),
                end: Some(2 * k as u32 + 1),
            });
            let start = Instant::now();
            self.submit_pieces(&subs, None, false, stamps)?;
            device.poll(wgpu::PollType::wait_indefinitely())?;
            walls.push(since(start));
        }
        Ok((walls[0], walls))
    }
}
