//! Host side of `fused_attention.wgsl`: the FlashAttention-2 style kernel, with its tile shape
//! chosen to fit the device's workgroup memory and invocation limits.

pub(crate) use super::fused_tiles::{FusedTiles, MAX_HEAD_DIM_V};
use super::{Layout, pad4, uniform_params};
use crate::error::Result;
use crate::precision::Precision;

uniform_params! {
    /// Uniform parameters; the layout of `FusedParams` in `fused_attention.wgsl`.
    struct FusedParams {
        batch: u32,
        kv_heads: u32,
        group: u32,
        head_dim: u32,
        head_dim_v: u32,
        dp4: u32,
        dvp4: u32,
        causal: u32,
        bias_b: u32,
        bias_h: u32,
        scale: f32,
        q_offset: u32,
        q_sb: u32,
        q_sbc: u32,
        q_sh: u32,
        q_shc: u32,
        q_si: u32,
        k_offset: u32,
        k_sb: u32,
        k_sbc: u32,
        k_sh: u32,
        k_shc: u32,
        k_si: u32,
        v_offset: u32,
        v_sb: u32,
        v_sbc: u32,
        v_sh: u32,
        v_shc: u32,
        v_si: u32,
        o_offset: u32,
        o_sb: u32,
        o_sbc: u32,
        o_sh: u32,
        o_shc: u32,
        o_si: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
        _pad3: u32,
        _pad4: u32,
    }
}

uniform_params! {
    /// One length of a call (`Len` in `fused_attention.wgsl`): an entry of a plan's table of
    /// lengths, bound at a dynamic offset.
    struct Len {
        n: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

impl Len {
    pub(crate) fn new(n: u32) -> Self {
        Len {
            n,
            ..Len::default()
        }
    }
}

/// Where one tensor's elements are, as the kernel computes it for a call whose length along
/// the tensor's sequence axis is `n`: element `[b, h, i, d]` at
/// `offset + b (sb n + sbc) + h (sh n + shc) + i si + d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Strides {
    pub offset: u32,
    pub sb: u32,
    pub sbc: u32,
    pub sh: u32,
    pub shc: u32,
    pub si: u32,
}

impl Strides {
    /// The same layout laid out for `capacity` tokens whatever the call's length: a KV cache.
    pub fn at_capacity(self, capacity: u32) -> Self {
        Strides {
            sb: 0,
            sbc: self.sbc + self.sb * capacity,
            sh: 0,
            shc: self.shc + self.sh * capacity,
            ..self
        }
    }

    /// `[batch, heads, n, width]`, rows `width` apart.
    pub fn head_major(heads: u32, width: u32, offset: u32) -> Self {
        Strides {
            offset,
            sb: heads * width,
            sbc: 0,
            sh: width,
            shc: 0,
            si: width,
        }
    }

    /// `[batch, n, heads * width]`: the layout projections produce.
    pub fn token_major(heads: u32, width: u32, offset: u32) -> Self {
        Strides {
            offset,
            sb: heads * width,
            sbc: 0,
            sh: 0,
            shc: width,
            si: heads * width,
        }
    }
}

/// What the fused kernel binds, which picks the include files it is composed from (see the
/// header of `fused_attention.wgsl`): the variants differ in exactly their bindings, so a
/// pipeline's layout holds only the buffers its kernel reads, and a device with few storage
/// buffers per shader stage runs the variants that fit.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FusedIo {
    /// Q, K and V in one buffer at their offsets (the layer's projection output) rather than
    /// three (an application's).
    pub packed_qkv: bool,
    /// A key-padding mask is bound.
    pub mask: bool,
    /// An additive bias is bound.
    pub bias: bool,
    /// The row logsumexp is saved for the backward (binding 9): only where gradients are
    /// wanted, so a forward without them binds and computes nothing more.
    pub lse: bool,
    /// How Q, K, V and the output are stored (f32 arithmetic either way).
    pub precision: Precision,
}

impl FusedIo {
    /// Every variant, the one binding the most first, then those saving the logsumexp (only
    /// with Q, K and V apart: the operator; the layer has no backward yet), all in f32 storage;
    /// then the f16 storage variants, which save no logsumexp (the backward is f32 only).
    pub const ALL: [FusedIo; 20] = {
        let mut all = [FusedIo {
            packed_qkv: false,
            mask: true,
            bias: true,
            lse: true,
            precision: Precision::F32,
        }; 20];
        let mut i = 0;
        while i < 20 {
            // 0-7: without the logsumexp; 8-11: with it, Q, K and V apart; 12-19: f16.
            let (lse, j, precision) = if i < 8 {
                (false, i, Precision::F32)
            } else if i < 12 {
                (true, i - 8, Precision::F32)
            } else {
                (false, i - 12, Precision::F16)
            };
            all[i] = FusedIo {
                packed_qkv: j & 4 != 0,
                mask: j & 2 == 0,
                bias: j & 1 == 0,
                lse,
                precision,
            };
            i += 1;
        }
        all
    };

    /// The include files, in order: Q/K/V, mask, bias, logsumexp, output (Q/K/V and the
    /// output in the storage precision).
    pub(crate) fn files(self) -> [&'static str; 5] {
        let f16 = self.precision == Precision::F16;
        [
            match (self.packed_qkv, f16) {
                (true, false) => "fused_io_qkv_packed.wgsl",
                (true, true) => "fused_io_qkv_packed_f16.wgsl",
                (false, false) => "fused_io_qkv.wgsl",
                (false, true) => "fused_io_qkv_f16.wgsl",
            },
            if self.mask {
                "fused_io_mask.wgsl"
            } else {
                "fused_io_no_mask.wgsl"
            },
            if self.bias {
                "fused_io_bias.wgsl"
            } else {
                "fused_io_no_bias.wgsl"
            },
            if self.lse {
                "fused_io_lse.wgsl"
            } else {
                "fused_io_no_lse.wgsl"
            },
            if f16 {
                "fused_io_out_f16.wgsl"
            } else {
                "fused_io_out.wgsl"
            },
        ]
    }

    /// The storage bindings after the parameters, as (binding, read_write), in binding order.
    pub(crate) fn storage(self) -> Vec<(u32, bool)> {
        let mut b: Vec<(u32, bool)> = if self.packed_qkv {
            vec![(1, false)]
        } else {
            vec![(1, false), (2, false), (3, false)]
        };
        if self.mask {
            b.push((4, false));
        }
        if self.bias {
            b.push((5, false));
        }
        b.push((6, true));
        if self.lse {
            b.push((9, true));
        }
        b
    }
}

/// Everything the fused kernel needs to know of one attention problem but its lengths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FusedGeometry {
    pub batch: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub head_dim_v: u32,
    pub causal: bool,
    pub has_mask: bool,
    /// Q, K and V lie in one buffer (the layer's), bound once.
    pub packed_qkv: bool,
    /// The row logsumexp is saved for the backward.
    pub lse: bool,
    /// The bias's broadcast, as (varies over batch, varies over heads), if there is one.
    pub bias: Option<(bool, bool)>,
    pub scale: f32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub out: Strides,
    /// How Q, K, V and the output are stored: which storage variant of the kernel runs.
    pub precision: Precision,
}

impl FusedGeometry {
    /// The layer's attention: Q, K and V head-major in the plan's qkv buffer (head widths
    /// padded to multiples of 4), the heads written token-major, concatenated, as the output
    /// projection (or the caller) reads them.
    pub fn for_layer(l: &Layout, precision: Precision) -> Self {
        FusedGeometry {
            precision,
            batch: l.batch,
            heads: l.heads,
            kv_heads: l.heads,
            head_dim: l.head_dim,
            head_dim_v: l.head_dim_v,
            causal: l.causal,
            has_mask: l.has_mask,
            packed_qkv: true,
            lse: false,
            bias: None,
            scale: l.scale,
            q: Strides::head_major(l.heads, l.dp, l.q_offset),
            k: Strides::head_major(l.heads, l.dp, l.k_offset),
            v: Strides::head_major(l.heads, l.dvp, l.v_offset),
            out: Strides::token_major(l.heads, l.head_dim_v, 0),
        }
    }

    /// The layer's geometry as its plan runs it: [`FusedGeometry::for_layer`], or with
    /// gradients Q, K and V bound as three ranges of the qkv buffer (each from offset 0) and
    /// the logsumexp saved, which the backward's kernels read through the same parameters.
    pub fn for_plan(l: &Layout, config: &crate::config::AttentionConfig) -> Self {
        let g = Self::for_layer(l, config.precision);
        if !config.gradients {
            return g;
        }
        FusedGeometry {
            packed_qkv: false,
            lse: true,
            q: Strides::head_major(l.heads, l.dp, 0),
            k: Strides::head_major(l.heads, l.dp, 0),
            v: Strides::head_major(l.heads, l.dvp, 0),
            ..g
        }
    }

    /// What the kernel binds for this geometry.
    pub fn io(&self) -> FusedIo {
        FusedIo {
            packed_qkv: self.packed_qkv,
            mask: self.has_mask,
            bias: self.bias.is_some(),
            lse: self.lse,
            precision: self.precision,
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> u32 {
        self.heads / self.kv_heads
    }

    /// The uniform parameters.
    pub fn params(&self) -> FusedParams {
        let (bias_b, bias_h) = match self.bias {
            Some((per_batch, per_head)) => {
                let hb = if per_head { self.heads } else { 1 };
                (if per_batch { hb } else { 0 }, per_head as u32)
            }
            None => (0, 0),
        };
        let (q, k, v, o) = (self.q, self.k, self.v, self.out);
        FusedParams {
            batch: self.batch,
            kv_heads: self.kv_heads,
            group: self.group(),
            head_dim: self.head_dim,
            head_dim_v: self.head_dim_v,
            dp4: self.head_dim.div_ceil(4),
            dvp4: self.head_dim_v.div_ceil(4),
            causal: self.causal as u32,
            bias_b,
            bias_h,
            scale: self.scale,
            q_offset: q.offset,
            q_sb: q.sb,
            q_sbc: q.sbc,
            q_sh: q.sh,
            q_shc: q.shc,
            q_si: q.si,
            k_offset: k.offset,
            k_sb: k.sb,
            k_sbc: k.sbc,
            k_sh: k.sh,
            k_shc: k.shc,
            k_si: k.si,
            v_offset: v.offset,
            v_sb: v.sb,
            v_sbc: v.sbc,
            v_sh: v.sh,
            v_shc: v.shc,
            v_si: v.si,
            o_offset: o.offset,
            o_sb: o.sb,
            o_sbc: o.sbc,
            o_sh: o.sh,
            o_shc: o.shc,
            o_si: o.si,
            ..Default::default()
        }
    }

    /// Tiles for calls of up to `max_q` queries over `max_kv` keys: the group's query heads
    /// packed as rows.
    pub fn tiles(&self, max_q: u32, max_kv: u32, limits: &wgpu::Limits) -> Result<FusedTiles> {
        FusedTiles::choose(
            self.group().saturating_mul(max_q),
            max_kv,
            pad4(self.head_dim),
            pad4(self.head_dim_v),
            limits,
        )
    }

    /// Workgroups of a call with `q_len` queries: one per block of packed rows of each
    /// (batch, kv head).
    pub fn workgroups(&self, tiles: &FusedTiles, q_len: u32) -> u32 {
        (self.group() * q_len).div_ceil(tiles.rows()) * self.batch * self.kv_heads
    }

    /// The arithmetic of a call, which sizes submissions.
    pub fn flops(&self, q_len: u32, kv_len: u32) -> f64 {
        let full = 2.0 * (self.batch * self.heads) as f64 * q_len as f64 * kv_len as f64;
        // Causal blocks past each row's last key are never visited: about half the work.
        let visited = if self.causal { 0.5 } else { 1.0 };
        full * (pad4(self.head_dim) + pad4(self.head_dim_v)) as f64 * visited
    }
}
