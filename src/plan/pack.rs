//! The weights as the kernels read them: `[w_q | w_k | w_v]` packed side by side with every
//! head's columns padded to whole vec4s, `w_o` padded likewise, and the padding taken off again
//! when intermediates are read back.

use crate::config::AttentionConfig;
use crate::kernels::Layout;
use crate::tensor::Tensor;
use crate::weights::AttentionWeights;

/// `[w_q | w_k | w_v]` side by side as `[d_model, heads * (2 dp + dvp)]`, each head's columns
/// padded with zeros to a multiple of 4, and the matching bias.
pub(super) fn pack_qkv(
    config: &AttentionConfig,
    l: &Layout,
    weights: &AttentionWeights,
) -> (Vec<f32>, Vec<f32>) {
    let (h, dm) = (config.heads, config.d_model);
    let sections = [
        (&weights.w_q, &weights.b_q, config.head_dim, l.dp as usize),
        (&weights.w_k, &weights.b_k, config.head_dim, l.dp as usize),
        (
            &weights.w_v,
            &weights.b_v,
            config.head_dim_v,
            l.dvp as usize,
        ),
    ];
    let width = l.qkv_width() as usize;
    let mut w = vec![0.0f32; dm * width];
    let mut bias = vec![0.0f32; width];
    let mut col0 = 0;
    for (wt, bt, d, dpad) in sections {
        let cols = h * d;
        for head in 0..h {
            for c in 0..d {
                let src = head * d + c;
                let dst = col0 + head * dpad + c;
                for k in 0..dm {
                    w[k * width + dst] = wt.data()[k * cols + src];
                }
                if let Some(b) = bt {
                    bias[dst] = b.data()[src];
                }
            }
        }
        col0 += h * dpad;
    }
    (w, bias)
}

/// `w_o` with its columns padded to a multiple of 4, and the matching bias.
pub(super) fn pack_out(l: &Layout, w_o: &Tensor, b_o: Option<&Tensor>) -> (Vec<f32>, Vec<f32>) {
    let (rows, d_out, pad) = (
        (l.heads * l.head_dim_v) as usize,
        l.d_out as usize,
        l.d_out_pad as usize,
    );
    let mut w = vec![0.0f32; rows * pad];
    for r in 0..rows {
        w[r * pad..r * pad + d_out].copy_from_slice(&w_o.data()[r * d_out..(r + 1) * d_out]);
    }
    let mut b = vec![0.0f32; pad];
    if let Some(b_o) = b_o {
        b[..d_out].copy_from_slice(b_o.data());
    }
    (w, b)
}

/// Drops the padding columns of row-major data with row stride `stride`.
pub(super) fn unpad_rows(data: &[f32], stride: usize, width: usize) -> Vec<f32> {
    data.chunks_exact(stride)
        .flat_map(|row| &row[..width])
        .copied()
        .collect()
}
