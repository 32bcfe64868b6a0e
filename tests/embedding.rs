//! The library inside an application's wgpu code: the app's device and queue, the app's buffers,
//! the app's command encoder. And the promise that a plan allocates nothing per call, checked
//! with wgpu's own live-object counters.

mod common;

use common::{Rng, ctx};
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionIo, AttentionPlan, AttentionWeights, GpuContext,
    Tensor, Tolerance, compare, reference,
};

fn layer(rng: &mut Rng) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let config = AttentionConfig::new(2, 37, 24, 4, 6)
        .causal()
        .with_key_padding_mask()
        .with_output_projection(24);
    let weights = AttentionWeights::new(
        rng.tensor(&[24, 24], 0.2),
        rng.tensor(&[24, 24], 0.2),
        rng.tensor(&[24, 24], 0.2),
    )
    .with_qkv_bias(
        rng.tensor(&[24], 0.1),
        rng.tensor(&[24], 0.1),
        rng.tensor(&[24], 0.1),
    )
    .with_output_projection(rng.tensor(&[24, 24], 0.2), Some(rng.tensor(&[24], 0.1)));
    let mask: Vec<f32> = (0..2 * 37)
        .map(|i| if i % 37 > 30 { 0.0 } else { 1.0 })
        .collect();
    let inputs = AttentionInputs::new(rng.tensor(&[2, 37, 24], 1.0))
        .with_key_mask(Tensor::new([2, 37], mask).unwrap());
    (config, weights, inputs)
}

/// Copies `buffer` to a mappable one and reads it, the way an application would.
fn read(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer) -> Vec<f32> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app read-back"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    queue.submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec()
}

#[test]
fn records_into_the_apps_encoder_with_the_apps_buffers() {
    // The application owns its device...
    let (device, queue) = common::app_device(|_| {});
    let (config, weights, inputs) = layer(&mut Rng::new(11));

    // ...and its buffers: the input written by "an earlier pass", the mask as u32, the output.
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let x = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app x"),
        contents: bytemuck::cast_slice(inputs.x.data()),
        usage: storage,
    });
    let mask_words: Vec<u32> = inputs
        .key_mask
        .as_ref()
        .unwrap()
        .data()
        .iter()
        .map(|&m| m as u32)
        .collect();
    let mask = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app mask"),
        contents: bytemuck::cast_slice(&mask_words),
        usage: storage,
    });
    let out_len = config.output_shape().iter().product::<usize>();
    let output = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app output"),
        size: (out_len * 4) as u64,
        usage: storage,
        mapped_at_creation: false,
    });

    let ctx = GpuContext::from_device(device.clone(), queue.clone());
    let plan = AttentionPlan::new(&ctx, &config, &weights).unwrap();
    let bindings = plan
        .bind(AttentionIo {
            x: &x,
            key_mask: Some(&mask),
            output: &output,
        })
        .unwrap();

    // The app's encoder: its own work before, the layer, its own work after.
    let before = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app scratch"),
        size: 16,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.clear_buffer(&before, 0, None);
    plan.encode(&mut encoder, &bindings).unwrap();
    queue.submit([encoder.finish()]);

    let gpu = Tensor::new(
        config.output_shape().to_vec(),
        read(&device, &queue, &output),
    )
    .unwrap();
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let cmp = compare(&gpu, &cpu.output, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
}

#[test]
fn a_second_call_allocates_nothing() {
    // A device of its own: tests running beside this one must not move its counters.
    let own = GpuContext::from_env().expect("an adapter");
    let ctx = &own;
    let (config, weights, inputs) = layer(&mut Rng::new(5));
    let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
    let counters = || {
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        let c = ctx.device().get_internal_counters().hal;
        [
            ("buffers", c.buffers.read()),
            ("bind groups", c.bind_groups.read()),
            ("compute pipelines", c.compute_pipelines.read()),
            ("shader modules", c.shader_modules.read()),
            ("bind group layouts", c.bind_group_layouts.read()),
        ]
    };
    let first = plan.run(&inputs).unwrap();
    let after_first = counters();
    // Counters must be live: a plan holds buffers and pipelines, so they cannot read zero.
    assert!(
        after_first.iter().all(|(_, n)| *n > 0),
        "counters are not counting: {after_first:?}"
    );
    for _ in 0..3 {
        let again = plan.run(&inputs).unwrap();
        assert_eq!(again, first, "same inputs, same plan, same bits");
        assert_eq!(
            counters(),
            after_first,
            "a repeated call created or leaked wgpu objects"
        );
    }
    // A second plan with the same shapes reuses the compiled pipelines and modules.
    let _twin = AttentionPlan::new(ctx, &config, &weights).unwrap();
    let with_twin = counters();
    assert_eq!(
        with_twin[2], after_first[2],
        "pipelines are shared per context"
    );
    assert_eq!(
        with_twin[3], after_first[3],
        "shader modules are shared per context"
    );
    assert!(
        with_twin[0].1 > after_first[0].1,
        "the twin has buffers of its own"
    );
}

#[test]
fn run_async_returns_the_same_result() {
    let ctx = ctx();
    let (config, weights, inputs) = layer(&mut Rng::new(9));
    let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
    let blocking = plan.run(&inputs).unwrap();
    // On native backends someone must poll the device while the future waits: here a thread.
    let device = ctx.device().clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let poller = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            device.poll(wgpu::PollType::Poll).unwrap();
            std::thread::yield_now();
        }
    });
    let result = pollster::block_on(plan.run_async(&inputs));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    assert_eq!(result.unwrap(), blocking);
}

/// On a layer that takes several milliseconds, the GPU's timestamps of the whole stream agree
/// with the host's clock around the same submissions: a unit error (ns read as µs, a wrong
/// period) would put them a thousand times apart.
#[test]
fn timestamps_agree_with_the_wall_clock() {
    let ctx = ctx();
    let mut rng = Rng::new(17);
    let config = AttentionConfig::new(1, 256, 64, 4, 16);
    let weights = AttentionWeights::new(
        rng.tensor(&[64, 64], 0.2),
        rng.tensor(&[64, 64], 0.2),
        rng.tensor(&[64, 64], 0.2),
    );
    let inputs = AttentionInputs::new(rng.tensor(&[1, 256, 64], 1.0));
    let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
    plan.run(&inputs).unwrap();
    let times = plan.time_stages(&inputs).unwrap();
    assert!(
        times.wall_seconds > 0.002,
        "the shape is too small to judge: {times:?}"
    );
    let ratio = times.gpu_seconds / times.wall_seconds;
    assert!(
        (0.2..=1.01).contains(&ratio),
        "GPU/wall = {ratio}: {times:?}"
    );
}

#[test]
fn stages_are_timed_on_the_gpu() {
    use wgpu_attention::{Stage, TimingSource};
    let ctx = ctx();
    let (config, weights, inputs) = layer(&mut Rng::new(13));
    for (kernel, stages) in [
        (
            wgpu_attention::KernelChoice::Staged,
            vec![
                Stage::Projection,
                Stage::Scores,
                Stage::Softmax,
                Stage::WeightedSum,
                Stage::OutputProjection,
            ],
        ),
        (
            wgpu_attention::KernelChoice::Fused,
            vec![
                Stage::Projection,
                Stage::FusedAttention,
                Stage::OutputProjection,
            ],
        ),
    ] {
        let mut plan =
            AttentionPlan::new(ctx, &config.clone().with_kernel(kernel), &weights).unwrap();
        assert_eq!(plan.stages(), stages);
        for _ in 0..2 {
            let times = plan.time_stages(&inputs).unwrap();
            // Timestamps are used exactly when the device has them.
            let source = if ctx.has_timestamps() {
                TimingSource::Timestamps
            } else {
                TimingSource::WallClock
            };
            assert_eq!(times.source, source);
            let names: Vec<Stage> = times.stages.iter().map(|s| s.stage).collect();
            assert_eq!(names, stages);
            assert!(times.stages.iter().all(|s| s.seconds > 0.0), "{times:?}");
            // The GPU's own time of a stream cannot exceed the host's clock around it.
            assert!(times.gpu_seconds > 0.0, "{times:?}");
            assert!(
                times.gpu_seconds <= times.wall_seconds * 1.01 + 1e-4,
                "{times:?}"
            );
        }
        // Timing leaves the plan as it was: a run still gives the reference's answer.
        let cpu = reference::run(&config, &weights, &inputs).unwrap();
        assert!(
            compare(&plan.run(&inputs).unwrap(), &cpu.output, Tolerance::F32)
                .unwrap()
                .passed()
        );
    }
}
