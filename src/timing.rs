//! Timing the plan's stages on the GPU: timestamp queries where the adapter has them, the wall
//! clock around each stage's own submission where it has not.

use std::time::Instant;

/// How the stage times were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingSource {
    /// GPU timestamps written at the start and end of each stage's compute pass.
    Timestamps,
    /// The host's clock around a submission of each stage alone, waited for; includes the
    /// submit and wait overhead (tens of microseconds).
    WallClock,
}

/// The GPU time of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTime {
    /// The stage: `project q, k, v`, `scores`, `softmax`, `weighted sum`, `fused attention` or
    /// `output projection`.
    pub stage: &'static str,
    /// Its duration.
    pub seconds: f64,
}

/// Every stage's time for one run of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTimes {
    /// How they were measured.
    pub source: TimingSource,
    /// In the order the plan runs them.
    pub stages: Vec<StageTime>,
}

impl StageTimes {
    /// The sum over all stages.
    pub fn total(&self) -> f64 {
        self.stages.iter().map(|s| s.seconds).sum()
    }

    /// The time of `stage`, if the plan has it.
    pub fn get(&self, stage: &str) -> Option<f64> {
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .map(|s| s.seconds)
    }

    /// The attention alone, `softmax(scale · Q Kᵀ) V`: every stage but the projections.
    pub fn attention(&self) -> f64 {
        self.stages
            .iter()
            .filter(|s| !PROJECTION_STAGES.contains(&s.stage))
            .map(|s| s.seconds)
            .sum()
    }
}

/// The stages that are matrix products with weights rather than attention.
pub const PROJECTION_STAGES: [&str; 2] = ["project q, k, v", "output projection"];

/// A query set with a start and an end timestamp per stage, and the buffers to read it back.
#[derive(Debug)]
pub(crate) struct GpuTimer {
    pub queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    count: u32,
}

impl GpuTimer {
    pub fn new(device: &wgpu::Device, stages: u32) -> Self {
        let count = 2 * stages;
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

    /// The pass's timestamp writes for stage `i`.
    pub fn writes(&self, i: u32) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        }
    }

    /// Records the copy of the timestamps to the mappable buffer.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..self.count, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, self.resolve.size());
    }

    /// Waits for the submitted work and returns each stage's duration in seconds.
    pub fn read(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> crate::Result<Vec<f64>> {
        let ticks = crate::plan::map_and_read(device, &self.read, |bytes| {
            bytemuck::cast_slice::<u8, u64>(bytes).to_vec()
        })?;
        let period = queue.get_timestamp_period() as f64 * 1e-9;
        Ok(ticks
            .chunks_exact(2)
            .map(|t| t[1].saturating_sub(t[0]) as f64 * period)
            .collect())
    }
}

/// Seconds since `start`.
pub(crate) fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
