//! Attention inside an application's own wgpu code: the app creates its device, queue and
//! buffers; the plan records into the app's command encoder. Prints the adapter and the worked
//! example's outputs, checked against the CPU reference.
//!
//! Run: `cargo run --example embed` (pick a backend with WGPU_BACKEND=vulkan|metal|dx12|gl).

use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionIo, AttentionPlan, AttentionWeights, GpuContext,
    Tensor, Tolerance, compare, reference,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    // The application's device, made with plain wgpu as any application makes its own
    // (WGPU_BACKEND picks the backend). The crate never needs to create it.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default()))?;
    let info = adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    );

    // The worked example's layer: 3 tokens of width 4, one head of width 3, unscaled.
    let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
    let weights = AttentionWeights::new(
        Tensor::new([4, 3], vec![1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.])?,
        Tensor::new([4, 3], vec![0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.])?,
        Tensor::new([4, 3], vec![0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.])?,
    );
    let x = Tensor::new(
        [1, 3, 4],
        vec![1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.],
    )?;

    // The app's buffers.
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let x_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("x"),
        contents: bytemuck::cast_slice(x.data()),
        usage,
    });
    let out_bytes = (config.output_shape().iter().product::<usize>() * 4) as u64;
    let out_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("out"),
        size: out_bytes,
        usage,
        mapped_at_creation: false,
    });
    let read_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read-back"),
        size: out_bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    // Build once, bind once, then record as often as needed.
    let plan = AttentionPlan::new(
        &GpuContext::from_device(device.clone(), queue.clone()),
        &config,
        &weights,
    )?;
    let bindings = plan.bind(AttentionIo {
        x: &x_buf,
        key_mask: None,
        output: &out_buf,
    })?;
    let mut encoder = device.create_command_encoder(&Default::default());
    plan.encode(&mut encoder, &bindings)?;
    encoder.copy_buffer_to_buffer(&out_buf, 0, &read_buf, 0, out_bytes);
    queue.submit([encoder.finish()]);

    read_buf.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let gpu = Tensor::new(
        config.output_shape().to_vec(),
        bytemuck::cast_slice(&read_buf.get_mapped_range(..)?).to_vec(),
    )?;
    let cpu = reference::run(&config, &weights, &AttentionInputs::new(x))?;
    let report = compare(&gpu, &cpu.output, Tolerance::F32)?;
    for row in gpu.data().chunks(3) {
        println!("output {row:?}");
    }
    println!("against the CPU reference: {report}");
    if !report.passed() {
        return Err("GPU and CPU disagree".into());
    }
    Ok(())
}
