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

/// The application's own compute kernel: `dst = src * factor`. Factors that are powers of two
/// keep every value exact, so the layer's results can be checked through it.
const APP_SHADER: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
override factor: f32;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&dst)) {
        dst[id.x] = src[id.x] * factor;
    }
}
"#;

/// One of the app's passes: `dst = src * factor` over `len` elements.
struct AppPass {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    len: u32,
}

impl AppPass {
    fn new(device: &wgpu::Device, factor: f64, src: &wgpu::Buffer, dst: &wgpu::Buffer) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("app kernel"),
            source: wgpu::ShaderSource::Wgsl(APP_SHADER.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("app kernel"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[("factor", factor)],
                ..Default::default()
            },
            cache: None,
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("app kernel"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: dst.as_entire_binding(),
                },
            ],
        });
        AppPass {
            pipeline,
            group,
            len: (dst.size() / 4) as u32,
        }
    }

    fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group, &[]);
        pass.dispatch_workgroups(self.len.div_ceil(64), 1, 1);
    }
}

#[test]
fn records_into_the_apps_encoder_between_the_apps_own_passes() {
    // The application owns its device...
    let (device, queue) = common::app_device(|_| {});
    let (config, weights, first) = layer(&mut Rng::new(11));
    let (_, _, second) = layer(&mut Rng::new(12));
    assert_ne!(first.x, second.x);

    // ...and its buffers. The layer's input `x` starts as zeros: only the app's own pass, in
    // the same encoder, fills it, from the app's source data at twice the size.
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |label: &str, data: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: storage,
        })
    };
    let doubled = |inputs: &AttentionInputs| -> Vec<f32> {
        inputs.x.data().iter().map(|v| v * 2.0).collect()
    };
    let sources = [
        init("app source 1", bytemuck::cast_slice(&doubled(&first))),
        init("app source 2", bytemuck::cast_slice(&doubled(&second))),
    ];
    let empty = |label: &str, len: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len * 4) as u64,
            usage: storage,
            mapped_at_creation: false,
        })
    };
    let x = empty("app x", first.x.len());
    let mask_words: Vec<u32> = first
        .key_mask
        .as_ref()
        .unwrap()
        .data()
        .iter()
        .map(|&m| m as u32)
        .collect();
    let mask = init("app mask", bytemuck::cast_slice(&mask_words));
    let out_len = config.output_shape().iter().product::<usize>();
    let output = empty("app output", out_len);
    let results = [
        empty("app result 1", out_len),
        empty("app result 2", out_len),
    ];

    let ctx = GpuContext::from_device(device.clone(), queue.clone());
    let plan = AttentionPlan::new(&ctx, &config, &weights).unwrap();
    let bindings = plan
        .bind(AttentionIo {
            x: &x,
            key_mask: Some(&mask),
            output: &output,
        })
        .unwrap();

    // One encoder: [app: x = source 1 / 2] [layer] [app: result 1 = output * 4]
    //              [app: x = source 2 / 2] [layer] [app: result 2 = output * 4]
    let mut encoder = device.create_command_encoder(&Default::default());
    for (source, result) in sources.iter().zip(&results) {
        AppPass::new(&device, 0.5, source, &x).record(&mut encoder);
        plan.encode(&mut encoder, &bindings).unwrap();
        AppPass::new(&device, 4.0, &output, result).record(&mut encoder);
    }
    queue.submit([encoder.finish()]);

    for (name, inputs, result) in [
        ("first", &first, &results[0]),
        ("second", &second, &results[1]),
    ] {
        let gpu: Vec<f32> = common::read_buffer(&device, &queue, result)
            .iter()
            .map(|v| v / 4.0)
            .collect();
        let gpu = Tensor::new(config.output_shape().to_vec(), gpu).unwrap();
        let cpu = reference::run(&config, &weights, inputs).unwrap();
        let cmp = compare(&gpu, &cpu.output, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{name} input: {cmp}");
    }
}

#[test]
fn a_second_call_allocates_nothing() {
    // A device of its own: tests running beside this one must not move its counters.
    let own = GpuContext::from_env().expect("an adapter");
    let ctx = &own;
    let (config, weights, inputs) = layer(&mut Rng::new(5));
    let mut plan = AttentionPlan::new(ctx, &config, &weights).unwrap();
    let counters = || common::object_counts(ctx.device());
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
    let result = result.unwrap();
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let cmp = compare(&result, &cpu.output, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "run_async: {cmp}");
    assert_eq!(result, blocking);
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
