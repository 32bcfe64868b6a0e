//! What an adapter's memory allows, measured: its buffer-copy bandwidth and the rate at which a
//! trivial kernel reads memory with vec4 loads. Memory-bound kernels (decoding over a KV cache)
//! are judged against these, measured in the same run.

use std::time::Instant;

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, init_uniform, map_and_read, scoped};
use crate::kernels::decode::{STREAM_WG, StreamParams};
use crate::kernels::{Kernel, fold_grid};

/// The most workgroups of the streaming read: enough to fill any adapter, few partial sums to
/// read.
const STREAM_GROUPS: u32 = 1024;

/// vec4 each invocation of the streaming read sums at least: a workgroup's start and its
/// reduction (costly on CPU drivers, where a barrier switches between invocations) stay small
/// beside its reads.
const STREAM_PER_INVOCATION: u32 = 64;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A buffer of `bytes` (a multiple of 16) f32 ones, for copying from and reading.
fn ones(ctx: &GpuContext, bytes: u64) -> Result<wgpu::Buffer> {
    let limits = ctx.limits();
    if bytes == 0 || bytes > limits.max_storage_buffer_binding_size {
        return Err(Error::LimitExceeded {
            limit: "max_storage_buffer_binding_size",
            max: limits.max_storage_buffer_binding_size,
            requested: bytes,
            what: "the ceiling's buffer".into(),
            hint: String::new(),
        });
    }
    let device = ctx.device();
    scoped(device, "creating the ceiling's buffer", || {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("ceiling source"),
            contents: bytemuck::cast_slice(&vec![1f32; (bytes / 4) as usize]),
            usage: STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
    })
}

/// Times `record` over `repeats` submissions (after one untimed), each waited for: the median
/// wall-clock seconds.
fn time(
    ctx: &GpuContext,
    repeats: usize,
    record: impl Fn(&mut wgpu::CommandEncoder),
) -> Result<f64> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let mut samples = Vec::new();
    for r in 0..=repeats.max(1) {
        let start = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        record(&mut encoder);
        queue.submit([encoder.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely())?;
        if r > 0 {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(samples))
}

/// The adapter's `copy_buffer_to_buffer` bandwidth in bytes copied per second, copying
/// `bytes` (rounded up to 16) `repeats` times (the median; one submission each, waited for).
pub fn copy_bytes_per_s(ctx: &GpuContext, bytes: u64, repeats: usize) -> Result<f64> {
    let bytes = bytes.next_multiple_of(16);
    let src = ones(ctx, bytes)?;
    let device = ctx.device();
    let dst = scoped(device, "creating the ceiling's buffer", || {
        buffer(device, "ceiling copy", bytes, wgpu::BufferUsages::COPY_DST)
    })?;
    let seconds = time(ctx, repeats, |e| {
        e.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes)
    })?;
    Ok(bytes as f64 / seconds)
}

/// The adapter's streaming-read rate in bytes per second: `stream_read.wgsl` summing `bytes`
/// (rounded up to 16) with vec4 loads, `repeats` times (the median; one submission each,
/// waited for). The sum is checked, so that a kernel reading nothing cannot look fast.
pub fn stream_bytes_per_s(ctx: &GpuContext, bytes: u64, repeats: usize) -> Result<f64> {
    let bytes = bytes.next_multiple_of(16);
    let src = ones(ctx, bytes)?;
    let n4 = u32::try_from(bytes / 16).map_err(|_| Error::LimitExceeded {
        limit: "u32 indexing",
        max: u32::MAX as u64,
        requested: bytes / 16,
        what: "the streaming read's vec4".into(),
        hint: String::new(),
    })?;
    let _device = ctx.kernels().exclusive();
    let pipeline = pollster::block_on(
        ctx.kernels()
            .pipeline(Kernel::StreamRead, &[("WG", STREAM_WG as f64)]),
    )?;
    let chunks = pollster::block_on(ctx.kernels().chunks())?;
    let device = ctx.device();
    let groups = (n4 / (STREAM_WG * STREAM_PER_INVOCATION)).clamp(1, STREAM_GROUPS);
    let params = StreamParams::new(n4, groups);
    let grid = fold_grid(
        groups,
        ctx.limits().max_compute_workgroups_per_dimension,
        "the streaming read",
    )?;
    let (out, staging, group) = scoped(device, "creating the streaming read", || {
        let out = buffer(
            device,
            "stream sums",
            STREAM_GROUPS as u64 * 4,
            STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let staging = buffer(
            device,
            "stream read-back",
            STREAM_GROUPS as u64 * 4,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let uniform = init_uniform(device, "stream params", bytemuck::bytes_of(&params));
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("streaming read"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: uniform.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        (out, staging, group)
    })?;
    let seconds = time(ctx, repeats, |e| {
        let mut pass = e.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.set_bind_group(1, &chunks.group, &[0]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    })?;
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(&out, 0, &staging, 0, STREAM_GROUPS as u64 * 4);
    ctx.queue().submit([encoder.finish()]);
    let sum: f64 = map_and_read(device, &staging, |b| {
        bytemuck::cast_slice::<u8, f32>(b)
            .iter()
            .map(|&x| x as f64)
            .sum()
    })?;
    let expected = (bytes / 4) as f64;
    if sum != expected {
        return Err(Error::Wgpu {
            stage: "checking the streaming read".into(),
            message: format!("the sum of {expected} ones came back {sum}"),
        });
    }
    Ok(bytes as f64 / seconds)
}
