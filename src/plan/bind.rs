//! A plan's bind groups (one per dispatch, on the application's buffers and the plan's own)
//! and the first run of each new pipeline.

use super::AttentionBindings;
use super::steps::{self, Piece, Res, Step};
use crate::context::GpuContext;
use crate::error::Result;
use crate::gpu::scoped_async;
use crate::kernels::ChunkTable;

/// Runs one workgroup of every pipeline that this device has not run yet, each in a
/// submission of its own, on the plan's own buffers (their contents are overwritten by any
/// real run). A driver that compiles at first dispatch then compiles here, one pipeline per
/// submission, and never inside a submission of real work.
pub(super) async fn warm_up(
    ctx: &GpuContext,
    steps: &[Step],
    own: &AttentionBindings,
    chunks: &ChunkTable,
) -> Result<()> {
    let (device, queue) = (ctx.device(), ctx.queue());
    for (i, step) in steps.iter().enumerate() {
        let Step::Dispatch(d) = step else { continue };
        if !ctx.kernels().first_use(&d.pipeline.pipeline) {
            continue;
        }
        let piece = Piece {
            step: i,
            grid: [1, 1, 1],
            chunks: 0..1,
        };
        scoped_async(device, "running a new pipeline once", || {
            let mut encoder = device.create_command_encoder(&Default::default());
            let recorded = steps::record(
                &mut encoder,
                steps,
                &own.groups,
                chunks,
                std::slice::from_ref(&piece),
                None,
            );
            queue.submit([encoder.finish()]);
            recorded
        })
        .await??;
        // On the web the browser compiles when the pipeline is created; there is nothing to
        // wait for, and no blocking wait is allowed.
        #[cfg(not(target_arch = "wasm32"))]
        device.poll(wgpu::PollType::wait_indefinitely())?;
    }
    Ok(())
}

/// One bind group per dispatch, on `io` = (x, key_mask, output) and the plan's own buffers.
pub(super) async fn make_bindings(
    device: &wgpu::Device,
    plan: u64,
    steps: &[Step],
    io: [&wgpu::Buffer; 3],
) -> Result<AttentionBindings> {
    let [x, key_mask, output] = io;
    let groups = scoped_async(device, "binding buffers", || {
        bind_groups(device, steps, |r| match r {
            Res::X => Some(x),
            Res::KeyMask => Some(key_mask),
            Res::Output => Some(output),
            _ => None,
        })
    })
    .await?;
    Ok(AttentionBindings { plan, groups })
}

/// One bind group per dispatch of `steps`, each resource the plan's own or the application's
/// buffer `app` gives for it; a dispatch whose buffer `app` lacks gets none (recording it
/// is then refused).
pub(super) fn bind_groups<'a>(
    device: &wgpu::Device,
    steps: &[Step],
    app: impl Fn(&Res) -> Option<&'a wgpu::Buffer>,
) -> Vec<Option<wgpu::BindGroup>> {
    steps
        .iter()
        .map(|step| {
            let Step::Dispatch(d) = step else {
                return None;
            };
            let mut resources = vec![d.params.as_entire_binding()];
            for r in &d.resources {
                resources.push(match r {
                    Res::Own(b) => b.as_entire_binding(),
                    Res::Lengths(b) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: b,
                        offset: 0,
                        size: wgpu::BufferSize::new(size_of::<crate::kernels::fused::Len>() as u64),
                    }),
                    Res::Range(b, offset, size) => {
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: b,
                            offset: *offset,
                            size: wgpu::BufferSize::new(*size),
                        })
                    }
                    other => app(other)?.as_entire_binding(),
                });
            }
            Some(d.pipeline.bind_group(device, d.label, resources))
        })
        .collect()
}
