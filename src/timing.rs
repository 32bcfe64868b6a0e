//! Timing the plan's stages on the GPU: timestamp queries where the adapter has them, the wall
//! clock around each stage's own submission where it has not.

use std::time::Instant;

use crate::gpu::map_and_read;
use crate::stage::Stage;

/// How the stage times were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingSource {
    /// GPU timestamps written at the start and end of each stage's compute pass.
    Timestamps,
    /// The host's clock around a submission of each stage alone, waited for; includes the
    /// submit and wait overhead (tens of microseconds).
    WallClock,
}

/// The GPU time of one stage, measured alone: a breakdown of [`StageTimes::total`].
#[derive(Debug, Clone, PartialEq)]
pub struct StageTime {
    /// The stage.
    pub stage: Stage,
    /// Its duration.
    pub seconds: f64,
}

/// The times of one run of a plan: the whole stream as [`crate::AttentionPlan::run`] records
/// it, and each stage run alone.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTimes {
    /// How they were measured.
    pub source: TimingSource,
    /// The dispatches exactly as `run` submits them (one compute pass per run of consecutive
    /// dispatches, cut into the same submissions), from the start of the first pass to the
    /// end of the last; no upload or read-back.
    pub gpu_seconds: f64,
    /// The host's clock around that same stream, from its first submission to its
    /// completion: [`StageTimes::gpu_seconds`] plus submission and waiting overhead.
    pub wall_seconds: f64,
    /// Each stage in a submission of its own, in the order the plan runs them: a breakdown.
    /// Their sum exceeds [`StageTimes::gpu_seconds`] by the passes and barriers that the real
    /// stream shares between stages.
    pub stages: Vec<StageTime>,
}

impl StageTimes {
    /// The GPU time of the whole layer as it runs: [`StageTimes::gpu_seconds`].
    pub fn total(&self) -> f64 {
        self.gpu_seconds
    }

    /// The time of `stage` in the breakdown, if the plan has it.
    pub fn get(&self, stage: Stage) -> Option<f64> {
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .map(|s| s.seconds)
    }

    /// The attention alone, `softmax(scale · Q Kᵀ) V`, from the breakdown: every stage but the
    /// projections.
    pub fn attention(&self) -> f64 {
        self.stages
            .iter()
            .filter(|s| !s.stage.is_projection())
            .map(|s| s.seconds)
            .sum()
    }

    /// The projections alone, from the breakdown.
    pub fn projections(&self) -> f64 {
        self.stages
            .iter()
            .filter(|s| s.stage.is_projection())
            .map(|s| s.seconds)
            .sum()
    }
}

/// A query set with a start and an end timestamp per measured interval, and the buffers to
/// read it back.
#[derive(Debug)]
pub(crate) struct GpuTimer {
    pub queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    count: u32,
}

impl GpuTimer {
    pub fn new(device: &wgpu::Device, intervals: u32) -> Self {
        let count = 2 * intervals;
        let bytes = count as u64 * 8;
        GpuTimer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("stage timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp read-back"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            count,
        }
    }

    /// The number of intervals.
    pub fn intervals(&self) -> u32 {
        self.count / 2
    }

    /// Records the copy of the timestamps to the mappable buffer.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..self.count, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, self.resolve.size());
    }

    /// Waits for the submitted work and returns each interval's duration in seconds. An
    /// interval whose end is not after its start (never written, or written out of order) is
    /// an error, not a zero.
    pub fn read(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> crate::Result<Vec<f64>> {
        let ticks = map_and_read(device, &self.read, |bytes| {
            bytemuck::cast_slice::<u8, u64>(bytes).to_vec()
        })?;
        intervals(&ticks, queue.get_timestamp_period() as f64 * 1e-9)
    }
}

/// Durations in seconds of the (start, end) tick pairs in `ticks`, `period` seconds per tick.
/// A pair whose end is not after its start, or whose start is zero (never written), is an
/// error: reported as zero it would print as an infinite rate.
fn intervals(ticks: &[u64], period: f64) -> crate::Result<Vec<f64>> {
    ticks
        .chunks_exact(2)
        .enumerate()
        .map(|(i, t)| match t[1].checked_sub(t[0]) {
            Some(d) if d > 0 && t[0] > 0 => Ok(d as f64 * period),
            _ => Err(crate::Error::Wgpu {
                stage: "reading GPU timestamps".into(),
                message: format!(
                    "interval {i} has start {} and end {}: the timestamps were not written in \
                     order",
                    t[0], t[1]
                ),
            }),
        })
        .collect()
}

/// Seconds since `start`.
pub(crate) fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_durations_and_bad_pairs_are_errors() {
        let ok = intervals(&[100, 350, 1000, 1001], 0.5).unwrap();
        assert_eq!(ok, vec![125.0, 0.5]);
        // Reversed, equal, and never written (both zero) are refused, not turned into 0 s.
        for bad in [[500u64, 400], [7, 7], [0, 0], [0, 10]] {
            let e = intervals(&bad, 1e-9).unwrap_err().to_string();
            assert!(e.contains("not written in order"), "{bad:?}: {e}");
        }
    }
}
