//! Generating with a KV cache: a small random attention layer (4 query heads over 2 key/value
//! heads of width 8, GQA, with biases and an output projection) prefills a 20-token prompt,
//! then generates 64 tokens one at a time, each new token's input being the previous step's
//! output (RMS-normalised), as a model's next token comes from its last.
//!
//! Everything runs on the GPU in the application's own encoder: `CachedAttention` projects the
//! new tokens, writes their keys and values straight into its cache, attends and projects out.
//! Every step is checked against the f64 reference of the whole sequence so far.
//!
//! Run: `cargo run --example decode` (pick a backend with WGPU_BACKEND=vulkan|metal|dx12|gl).

use wgpu_attention::{
    AttentionWeights, CachedAttention, CachedIo, CachedLayerConfig, GpuContext, Tensor, Tolerance,
    compare, reference,
};

const D_MODEL: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const PROMPT: usize = 20;
const STEPS: usize = 64;
const CAPACITY: usize = PROMPT + STEPS;

/// A small seeded generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        x as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(|_| self.next() * scale).collect()).expect("shape")
    }
}

fn read(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    let device = ctx.device();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read-back"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    ctx.queue().submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    bytemuck::cast_slice(&staging.get_mapped_range(..).expect("mapped"))[..len].to_vec()
}

/// The next token's input: a step's last output row scaled to unit RMS (a layer norm without
/// its weights).
fn next_input(out: &[f32]) -> Vec<f32> {
    let last = &out[out.len() - D_MODEL..];
    let rms = (last.iter().map(|v| v * v).sum::<f32>() / D_MODEL as f32).sqrt();
    last.iter().map(|v| v / rms.max(1e-6)).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let ctx = GpuContext::from_env()?;
    let (device, queue) = (ctx.device(), ctx.queue());
    println!("adapter: {}", ctx.adapter_info().name);
    let mut rng = Rng(0x5eed);
    let s = 1.0 / (D_MODEL as f32).sqrt();
    let weights = AttentionWeights::new(
        rng.tensor(&[D_MODEL, HEADS * HEAD_DIM], s),
        rng.tensor(&[D_MODEL, KV_HEADS * HEAD_DIM], s),
        rng.tensor(&[D_MODEL, KV_HEADS * HEAD_DIM], s),
    )
    .with_qkv_bias(
        rng.tensor(&[HEADS * HEAD_DIM], 0.1),
        rng.tensor(&[KV_HEADS * HEAD_DIM], 0.1),
        rng.tensor(&[KV_HEADS * HEAD_DIM], 0.1),
    )
    .with_output_projection(
        rng.tensor(&[HEADS * HEAD_DIM, D_MODEL], s),
        Some(rng.tensor(&[D_MODEL], 0.1)),
    );
    // Steps of up to the prompt's length: the prompt in one step (the prefill kernels, as it
    // is longer than split-K decode's 16), then one token a step (split-K decode).
    let config = CachedLayerConfig::new(1, D_MODEL, HEADS, KV_HEADS, HEAD_DIM, CAPACITY, PROMPT)
        .with_output_projection(D_MODEL);
    let mut layer = CachedAttention::new(&ctx, &config, &weights)?;
    println!("decode splits the keys into {:?} ranges", layer.splits());
    let (x_buf, out_buf) = layer.io_buffers();
    let bindings = layer.bind(CachedIo {
        x: &x_buf,
        output: &out_buf,
    })?;

    // Every token's input so far: the reference recomputes the whole sequence each step.
    let mut inputs: Vec<f32> = rng.tensor(&[PROMPT, D_MODEL], 1.0).data().to_vec();
    let mut worst = 0f64;
    for s in 0..=STEPS {
        let n = if s == 0 { PROMPT } else { 1 };
        let new = &inputs[inputs.len() - n * D_MODEL..];
        queue.write_buffer(&x_buf, 0, bytemuck::cast_slice(new));
        let mut encoder = device.create_command_encoder(&Default::default());
        layer.encode_step(&mut encoder, &bindings, n)?;
        queue.submit([encoder.finish()]);
        let gpu = Tensor::new([1, n, D_MODEL], read(&ctx, &out_buf, n * D_MODEL))?;

        let len = inputs.len() / D_MODEL;
        let all = Tensor::new([1, len, D_MODEL], inputs.clone())?;
        let forward = reference::cached_layer(&config, &weights, &all)?;
        let cpu = Tensor::new(
            [1, n, D_MODEL],
            forward.data()[(len - n) * D_MODEL..].to_vec(),
        )?;
        let cmp = compare(&gpu, &cpu, Tolerance::F32)?;
        if !cmp.passed() {
            return Err(
                format!("step {s} (cache length {}): {cmp}", layer.cache().lens()[0]).into(),
            );
        }
        worst = worst.max(cmp.max_abs);
        if s == 0 || s % 16 == 0 {
            println!(
                "step {s:>2}: {n:>2} token(s), cache holds {:>2}, out[0, last, ..4] = {:?}, \
                 max |gpu - ref| {:.1e}",
                layer.cache().lens()[0],
                &gpu.data()[(n - 1) * D_MODEL..(n - 1) * D_MODEL + 4],
                cmp.max_abs
            );
        }
        if s < STEPS {
            inputs.extend(next_input(gpu.data()));
        }
    }
    println!(
        "prefill of {PROMPT} and {STEPS} generated tokens all match the f64 reference (largest \
         error {worst:.1e})"
    );
    Ok(())
}
