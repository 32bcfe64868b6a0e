//! The sizes and offsets every kernel agrees on for one layer, and their check against the
//! device's limits before anything is allocated (ONNX Runtime keeps the same in
//! attention_common.h).

use crate::config::{AttentionConfig, KernelChoice};
use crate::error::{Error, Result};
use crate::kernels::pad4;

/// Elements (f32) between section starts of the qkv buffer: 256 bytes.
pub(crate) const SECTION_ALIGN: u64 = 64;

/// Sizes and offsets the kernels agree on, in f32 elements, checked to fit u32 indexing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub batch: u32,
    pub seq: u32,
    /// Row stride of the score and probability matrices: `seq` rounded up to a multiple of 4,
    /// so rows can be read as vec4.
    pub seq_pad: u32,
    pub d_model: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub head_dim_v: u32,
    /// `head_dim` and `head_dim_v` padded with zero columns to multiples of 4 (vec4 loads).
    pub dp: u32,
    pub dvp: u32,
    pub d_out: u32,
    /// `d_out` padded to a multiple of 4 in the output weights.
    pub d_out_pad: u32,
    /// Offsets of the Q, K and V sections in the qkv buffer.
    pub q_offset: u32,
    pub k_offset: u32,
    pub v_offset: u32,
    pub qkv_len: u64,
    pub scores_len: u64,
    pub scale: f32,
    pub causal: bool,
    pub has_mask: bool,
    /// The resolved path: `Staged` or `Fused`.
    pub kernel: KernelChoice,
}

impl Layout {
    pub fn new(config: &AttentionConfig) -> Result<Self> {
        let to_u32 = |name: &'static str, v: usize| -> Result<u32> {
            u32::try_from(v).map_err(|_| Error::LimitExceeded {
                limit: "u32 indexing",
                max: u32::MAX as u64,
                requested: v as u64,
                what: format!("`{name}`"),
                hint: String::new(),
            })
        };
        let batch = to_u32("batch", config.batch)?;
        let seq = to_u32("seq_len", config.seq_len)?;
        let heads = to_u32("heads", config.heads)?;
        let head_dim = to_u32("head_dim", config.head_dim)?;
        let head_dim_v = to_u32("head_dim_v", config.head_dim_v)?;
        let d_out = to_u32("d_out", config.d_out())?;
        let (dp, dvp) = (pad4(head_dim), pad4(head_dim_v));
        let rows = batch as u64 * heads as u64 * seq as u64;
        let q_len = rows * dp as u64;
        let v_len = rows * dvp as u64;
        // Sections start on 256-byte boundaries (WebGPU's largest storage offset alignment),
        // so that the backward can bind Q, K and V, and their gradients, as ranges of one
        // buffer each, without two writable bindings overlapping.
        let section = |len: u64| len.next_multiple_of(SECTION_ALIGN);
        let qkv_len = 2 * section(q_len) + v_len;
        let seq_pad = pad4(seq);
        let scores_len = rows * seq_pad as u64;
        Ok(Layout {
            batch,
            seq,
            seq_pad,
            d_model: to_u32("d_model", config.d_model)?,
            heads,
            head_dim,
            head_dim_v,
            dp,
            dvp,
            d_out,
            d_out_pad: pad4(d_out),
            q_offset: 0,
            // Offsets are checked by the buffer-size checks (every length fits u32 there).
            k_offset: section(q_len).min(u32::MAX as u64) as u32,
            v_offset: (2 * section(q_len)).min(u32::MAX as u64) as u32,
            qkv_len,
            scores_len,
            scale: config.scale_value(),
            causal: config.causal,
            has_mask: config.key_padding_mask,
            kernel: config.resolved_kernel(),
        })
    }

    /// Columns of the packed `[w_q | w_k | w_v]` weight, each head padded.
    pub fn qkv_width(&self) -> u32 {
        self.heads * (2 * self.dp + self.dvp)
    }

    /// The qkv buffer's layout as the GEMM reads and writes it.
    pub fn head_major(&self) -> crate::kernels::gemm::HeadMajor {
        crate::kernels::gemm::HeadMajor {
            seq: self.seq,
            heads: self.heads,
            width_qk: self.dp,
            width_v: self.dvp,
            k_offset: self.k_offset,
            v_offset: self.v_offset,
        }
    }

    pub fn tokens(&self) -> u64 {
        self.batch as u64 * self.seq as u64
    }
}

/// Checks every buffer the plan will bind against the device's limits, naming the tensor.
pub(crate) fn check_sizes(
    config: &AttentionConfig,
    l: &Layout,
    limits: &wgpu::Limits,
) -> Result<()> {
    let rows = format!(
        "batch {} x heads {} x seq {}",
        config.batch, config.heads, config.seq_len
    );
    let mut tensors = vec![
        ("the input x", l.tokens() * l.d_model as u64, String::new()),
        (
            "the packed q|k|v weights",
            l.d_model as u64 * l.qkv_width() as u64,
            String::new(),
        ),
        (
            "the q, k and v buffer",
            l.qkv_len,
            format!(" ({rows} x {} padded widths)", 2 * l.dp + l.dvp),
        ),
        ("the output", l.tokens() * l.d_out as u64, String::new()),
        (
            "the concatenated heads",
            l.tokens() * (l.heads * l.head_dim_v) as u64,
            String::new(),
        ),
    ];
    if l.kernel == KernelChoice::Staged {
        tensors.push((
            "the score matrix",
            l.scores_len,
            format!(
                " ({rows} x {} keys, padded to {})",
                config.seq_len, l.seq_pad
            ),
        ));
    }
    for (what, elements, detail) in tensors {
        // Scores and probabilities are f32 whatever the storage precision (staged path only).
        let element_bytes = if what == "the score matrix" {
            4
        } else {
            config.precision.bytes()
        };
        let bytes = elements * element_bytes;
        let hint = if what == "the score matrix" {
            "; the staged path stores a [seq, seq] score matrix per head: use the fused kernel \
             (KernelChoice::Fused, or Auto), whose memory grows linearly with seq"
        } else {
            ""
        };
        let what = format!("{what}{detail} at {bytes} bytes");
        if bytes > limits.max_storage_buffer_binding_size {
            return Err(Error::LimitExceeded {
                limit: "max_storage_buffer_binding_size",
                max: limits.max_storage_buffer_binding_size,
                requested: bytes,
                what,
                hint: hint.into(),
            });
        }
        if bytes > limits.max_buffer_size {
            return Err(Error::LimitExceeded {
                limit: "max_buffer_size",
                max: limits.max_buffer_size,
                requested: bytes,
                what,
                hint: hint.into(),
            });
        }
        if elements > u32::MAX as u64 {
            return Err(Error::LimitExceeded {
                limit: "u32 indexing",
                max: u32::MAX as u64,
                requested: elements,
                what,
                hint: "; the kernels index buffers with 32-bit integers".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precision::Precision;

    #[test]
    fn f16_storage_halves_the_bytes_checked_against_the_limits() {
        // x is 1 x 100 x 16 = 1600 elements: 6400 bytes in f32, 3200 in f16, against 4000
        // (and Q|K|V 100 x 12 padded: 2400 bytes in f16).
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: 4000,
            ..wgpu::Limits::default()
        };
        let config = AttentionConfig::new(1, 100, 16, 1, 1);
        let layout = Layout::new(&config).unwrap();
        match check_sizes(&config, &layout, &limits) {
            Err(Error::LimitExceeded {
                requested, what, ..
            }) => {
                assert_eq!(requested, 6400);
                assert!(what.starts_with("the input x"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        let f16 = config.with_precision(Precision::F16);
        check_sizes(&f16, &Layout::new(&f16).unwrap(), &limits).unwrap();
    }
}
