//! Generating with a KV cache: a small random attention layer (4 query heads over 2 key/value
//! heads of width 8, GQA) prefills a 20-token prompt, then decodes 64 steps of one token each.
//! The projections run on the host here; the new tokens' K and V are appended to the cache
//! through its staging belt, and the attention reads the cache on the GPU. Every step is
//! checked against the f64 reference of the same cache step.
//!
//! Run: `cargo run --example decode` (pick a backend with WGPU_BACKEND=vulkan|metal|dx12|gl).

use wgpu_attention::{
    AttentionOp, GpuContext, KvCache, Lengths, OperatorConfig, OperatorIo, Tensor, Tolerance,
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

    fn matrix(&mut self, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        (0..rows * cols).map(|_| self.next() * scale).collect()
    }
}

/// `x [n, D_MODEL] · w [D_MODEL, heads * HEAD_DIM]`, head-major `[1, heads, n, HEAD_DIM]`.
fn project(x: &[f32], w: &[f32], heads: usize) -> Tensor {
    let n = x.len() / D_MODEL;
    let cols = heads * HEAD_DIM;
    let mut out = vec![0f32; heads * n * HEAD_DIM];
    for t in 0..n {
        for c in 0..cols {
            let s: f32 = (0..D_MODEL)
                .map(|i| x[t * D_MODEL + i] * w[i * cols + c])
                .sum();
            let (h, d) = (c / HEAD_DIM, c % HEAD_DIM);
            out[(h * n + t) * HEAD_DIM + d] = s;
        }
    }
    Tensor::new([1, heads, n, HEAD_DIM], out).expect("shape")
}

/// The cache's contents as the host knows them, `[1, KV_HEADS, CAPACITY, HEAD_DIM]`.
fn mirror(t: &mut [f32], new: &Tensor, at: usize) {
    let n = new.shape()[2];
    for h in 0..KV_HEADS {
        for i in 0..n {
            let dst = (h * CAPACITY + at + i) * HEAD_DIM;
            let src = (h * n + i) * HEAD_DIM;
            t[dst..dst + HEAD_DIM].copy_from_slice(&new.data()[src..src + HEAD_DIM]);
        }
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let ctx = GpuContext::from_env()?;
    let (device, queue) = (ctx.device(), ctx.queue());
    println!("adapter: {}", ctx.adapter_info().name);
    let mut rng = Rng(0x5eed);
    let w_scale = 1.0 / (D_MODEL as f32).sqrt();
    let wq = rng.matrix(D_MODEL, HEADS * HEAD_DIM, w_scale);
    let wk = rng.matrix(D_MODEL, KV_HEADS * HEAD_DIM, w_scale);
    let wv = rng.matrix(D_MODEL, KV_HEADS * HEAD_DIM, w_scale);

    let mut cache = KvCache::new(&ctx, 1, KV_HEADS, HEAD_DIM, HEAD_DIM, CAPACITY)?;
    // Prefill: all prompt tokens at once over the cache, rows of one length, the fused kernel.
    let prefill_config = OperatorConfig::new(1, HEADS, KV_HEADS, HEAD_DIM, PROMPT, CAPACITY)
        .with_kv_capacity(CAPACITY)
        .causal();
    let prefill = AttentionOp::new(&ctx, &prefill_config)?;
    // Decode: one token a step, split-K, each row's length from the cache.
    let step_config = cache.operator_config(HEADS, 1).causal();
    let step = AttentionOp::new(&ctx, &step_config)?;
    println!("decode splits the keys into {:?} ranges", step.splits());

    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let make = |elements: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (elements * 4).next_multiple_of(16) as u64,
            usage: storage,
            mapped_at_creation: false,
        })
    };
    let q_buf = make(HEADS * PROMPT * HEAD_DIM);
    let out_buf = make(HEADS * PROMPT * HEAD_DIM);
    let prefill_bindings = prefill.bind(OperatorIo {
        q: &q_buf,
        k: cache.k(),
        v: cache.v(),
        key_mask: None,
        bias: None,
        out: &out_buf,
    })?;
    let step_bindings = step.bind_cache(&q_buf, &cache, &out_buf)?;
    let mut k_host = vec![0f32; KV_HEADS * CAPACITY * HEAD_DIM];
    let mut v_host = k_host.clone();

    let mut worst = 0f64;
    for s in 0..=STEPS {
        // Step 0 is the prompt; each later step one new token.
        let n = if s == 0 { PROMPT } else { 1 };
        let at = cache.lens()[0];
        let x = rng.matrix(n, D_MODEL, 1.0);
        let (q, k, v) = (
            project(&x, &wq, HEADS),
            project(&x, &wk, KV_HEADS),
            project(&x, &wv, KV_HEADS),
        );
        mirror(&mut k_host, &k, at);
        mirror(&mut v_host, &v, at);
        queue.write_buffer(&q_buf, 0, bytemuck::cast_slice(q.data()));
        let mut encoder = device.create_command_encoder(&Default::default());
        cache.append_host(&mut encoder, &k, &v)?;
        let (op, bindings, lengths) = if s == 0 {
            let lengths = Lengths {
                q_len: PROMPT,
                kv_len: PROMPT,
            };
            (&prefill, &prefill_bindings, lengths)
        } else {
            (&step, &step_bindings, cache.lengths(1)?)
        };
        op.encode(&mut encoder, bindings, lengths)?;
        queue.submit([encoder.finish()]);
        cache.recall();
        let gpu = Tensor::new(
            [1, HEADS, n, HEAD_DIM],
            read(&ctx, &out_buf, HEADS * n * HEAD_DIM),
        )?;
        let shape = [1, KV_HEADS, CAPACITY, HEAD_DIM];
        let cpu = reference::cache_step(
            &step_config,
            &q,
            &Tensor::new(shape, k_host.clone())?,
            &Tensor::new(shape, v_host.clone())?,
            cache.lens(),
        )?;
        let cmp = compare(&gpu, &cpu, Tolerance::F32)?;
        if !cmp.passed() {
            return Err(format!("step {s} (cache length {}): {cmp}", cache.lens()[0]).into());
        }
        worst = worst.max(cmp.max_abs);
        if s == 0 || s % 16 == 0 {
            println!(
                "step {s:>2}: {n:>2} token(s), cache holds {:>2}, out[0, 0, last, ..4] = {:?}, \
                 max |gpu - ref| {:.1e}",
                cache.lens()[0],
                &gpu.data()[(n - 1) * HEAD_DIM..(n - 1) * HEAD_DIM + 4],
                cmp.max_abs
            );
        }
    }
    println!(
        "prefill of {PROMPT} and {STEPS} decode steps all match the f64 reference (largest \
         error {worst:.1e})"
    );
    Ok(())
}
