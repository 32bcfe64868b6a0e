//! Every buffer a plan owns, by name: the packed weights and the intermediates the kernels pass
//! between them (but the attention core's own: its score matrix, parameters and lengths), and the input, mask, output and read-back buffers that [`super::AttentionPlan::run`]
//! uses in place of an application's.

use super::pack::{pack_out, pack_qkv};
use crate::config::AttentionConfig;
use crate::gpu::{STORAGE, buffer, init_bytes};
use crate::kernels::Layout;
use crate::precision::Precision;
use crate::weights::AttentionWeights;

/// The weights and intermediates.
#[derive(Debug)]
pub(super) struct PlanBuffers {
    /// `[w_q | w_k | w_v]`, `[d_model, heads * (2 dp + dvp)]`, heads padded.
    pub w_qkv: wgpu::Buffer,
    /// The matching bias (zeros where the layer has none).
    pub b_qkv: wgpu::Buffer,
    /// `w_o` and `b_o`, columns padded, when there is an output projection.
    pub w_o: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// Q, K and V, head-major, one after the other.
    pub qkv: wgpu::Buffer,
    /// The concatenated heads, when an output projection follows them.
    pub attention: Option<wgpu::Buffer>,
    /// Each query row's logsumexp, f32 `[batch, heads, seq]`, saved by the forward when the
    /// layer has gradients.
    pub lse: Option<wgpu::Buffer>,
}

impl PlanBuffers {
    /// Creates every buffer and uploads the weights (checked by the caller).
    ///
    /// With f16 storage the weights must already be rounded to f16
    /// ([`AttentionWeights::rounded_to`], which names a value past f16's range), so that
    /// storing them cannot fail here.
    pub fn new(
        device: &wgpu::Device,
        config: &AttentionConfig,
        l: &Layout,
        weights: &AttentionWeights,
    ) -> Self {
        let p = config.precision;
        let store = |label: &str, values: &[f32]| init_bytes(device, label, &stored(p, values));
        let (w, b) = pack_qkv(config, l, weights);
        let w_o = weights.w_o.as_ref().map(|w_o| {
            let (w, b) = pack_out(l, w_o, weights.b_o.as_ref());
            (store("w_o", &w), store("b_o", &b))
        });
        let attention = config.output_projection.map(|_| {
            let len = l.tokens() * (l.heads * l.head_dim_v) as u64;
            buffer(device, "attention", len * p.bytes(), STORAGE)
        });
        let lse = config.gradients.then(|| {
            let rows = l.tokens() * l.heads as u64;
            buffer(device, "lse", (rows * 4).next_multiple_of(16), STORAGE)
        });
        PlanBuffers {
            lse,
            w_qkv: store("w_qkv", &w),
            b_qkv: store("b_qkv", &b),
            w_o,
            qkv: buffer(device, "qkv", l.qkv_len * p.bytes(), STORAGE),
            attention,
        }
    }

    /// Every buffer, each once.
    pub fn all(&self) -> Vec<&wgpu::Buffer> {
        let mut all = vec![&self.w_qkv, &self.b_qkv, &self.qkv];
        if let Some((w, b)) = &self.w_o {
            all.extend([w, b]);
        }
        all.extend(&self.attention);
        all.extend(&self.lse);
        all
    }
}

/// The plan's own input, mask, output and read-back buffers, for [`super::AttentionPlan::run`].
#[derive(Debug)]
pub(super) struct OwnIo {
    pub x: wgpu::Buffer,
    /// The mask, or a 4-byte stand-in bound where the layer has none.
    pub key_mask: wgpu::Buffer,
    pub output: wgpu::Buffer,
    pub staging: wgpu::Buffer,
    /// Mapped upload buffers, reused once the GPU has copied out of them: `queue.write_buffer`
    /// would create a staging buffer on every call.
    pub belt: wgpu::util::StagingBelt,
    /// The mask as the u32 words the kernels read, converted without allocating per call.
    pub mask_words: Vec<u32>,
}

/// Values already within `precision`'s range (checked by the caller) as its storage bytes.
pub(super) fn stored(precision: Precision, values: &[f32]) -> Vec<u8> {
    precision
        .encode("weights", &[values.len()], values)
        .expect("weights are rounded to the storage precision before they are packed")
}

impl OwnIo {
    pub fn new(device: &wgpu::Device, l: &Layout, precision: Precision) -> Self {
        let e = precision.bytes();
        let out_bytes = l.tokens() * l.d_out as u64 * e;
        // Without a mask the kernels still bind one: four bytes they never read.
        let mask_bytes = if l.has_mask { l.tokens() * 4 } else { 4 };
        let x = buffer(device, "x", l.tokens() * l.d_model as u64 * e, STORAGE);
        let upload_bytes = x.size() + if l.has_mask { mask_bytes } else { 0 };
        OwnIo {
            x,
            key_mask: buffer(device, "key_mask", mask_bytes, STORAGE),
            output: buffer(device, "output", out_bytes, STORAGE),
            staging: buffer(
                device,
                "staging",
                out_bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            belt: wgpu::util::StagingBelt::new(device.clone(), upload_bytes.next_multiple_of(256)),
            mask_words: vec![0; if l.has_mask { l.tokens() as usize } else { 0 }],
        }
    }

    pub fn all(&self) -> [&wgpu::Buffer; 4] {
        [&self.x, &self.key_mask, &self.output, &self.staging]
    }
}
