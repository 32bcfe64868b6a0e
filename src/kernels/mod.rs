//! The kernels' host side: shader sources, bind group layouts, compiled pipelines (cached per
//! device and override values), the uniform parameters each kernel reads, and grid sizes.
//!
//! A kernel here is one WGSL file in `shaders/`. Its tile and workgroup sizes are `override`
//! constants, so one source gives every specialisation; each specialisation is compiled once per
//! [`crate::GpuContext`] and shared by all plans on it.

pub(crate) mod backward;
mod cache;
pub(crate) mod decode;
pub(crate) mod fused;
pub(crate) mod gemm;
pub(crate) mod layout;
mod sources;
pub(crate) mod staged;
mod submit;
pub(crate) mod tune;
mod variants;

#[doc(hidden)]
pub use fused::FusedIo;
pub use tune::Autotune;
#[doc(hidden)]
pub use variants::{Variant, variants};

use crate::error::{Error, Result};
use crate::precision::Precision;
pub(crate) use cache::{ChunkTable, KernelCache, MAX_CHUNKS, Pipeline};
pub(crate) use layout::{Layout, check_sizes};
pub(crate) use submit::{Piece, Work, submissions};

/// The WGSL kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `gemm.wgsl`: projection GEMM with bias, its storage in f32 or f16 (f32 arithmetic).
    Gemm(Precision),
    /// `gemm.wgsl` storing K or V straight into a KV cache, each batch row's new tokens from
    /// its current length, read from the cache's table of row lengths (binding 5): the cached
    /// layer's projection.
    GemmCache(Precision),
    /// `scores.wgsl`: the staged path's unscaled `Q K^T`, Q and K stored in f32 or f16 (the
    /// scores are f32 either way).
    Scores(Precision),
    /// `softmax.wgsl`: the staged path's scaled, biased, masked, stable row softmax in place.
    Softmax,
    /// `weighted_sum.wgsl`: the staged path's `P V`, written through the output's strides; V
    /// and the output stored in f32 or f16 (the probabilities are f32 either way).
    WeightedSum(Precision),
    /// `fused_attention.wgsl`: scores, online softmax and `P V` in one pass, in the variant
    /// that binds the given buffers.
    Fused(fused::FusedIo),
    /// `attention_bwd_prep.wgsl`: the backward's `D = rowsum(dO ∘ O)` beside the saved
    /// logsumexp.
    BackwardPrep,
    /// `attention_bwd_kv.wgsl`: the backward's dK and dV, a workgroup per key block.
    BackwardKv,
    /// `attention_bwd_q.wgsl`: the backward's dQ, a workgroup per query block.
    BackwardQ,
    /// `decode_split.wgsl`: split-K decode, partial (max, sum, output) per key range; with a
    /// key-padding mask bound, or without (then 4 storage buffers); Q, K and V stored in f32
    /// or f16 (the partials are f32 either way).
    DecodeSplit {
        /// A key-padding mask is bound.
        mask: bool,
        /// How Q, K and V are stored.
        precision: Precision,
    },
    /// `decode_combine.wgsl`: merges split-K partials (f32) into the output, stored in the
    /// given precision.
    DecodeCombine(Precision),
    /// `stream_read.wgsl`: sums a buffer with vec4 loads (the benchmark's read ceiling).
    StreamRead,
}

/// How a kernel sees one binding.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>`.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One binding of a kernel's pipeline layout, as the host creates it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    /// The `@group` index.
    pub group: u32,
    /// The `@binding` index within the group.
    pub binding: u32,
    /// How the kernel sees the buffer.
    pub access: Access,
    /// Whether the buffer is bound at a dynamic offset (the dispatch-chunk table).
    pub has_dynamic_offset: bool,
    /// Bytes the bound range must hold at least; the uniform struct's size for uniforms.
    pub min_binding_size: Option<std::num::NonZeroU64>,
    /// The Rust layout of the uniform struct bound here.
    pub uniform: Option<&'static UniformLayout>,
}

/// The Rust side of a WGSL uniform struct: its name, size and fields, for checking against the
/// shader (tests/shaders.rs) and for the binding's minimum size.
#[doc(hidden)]
#[derive(Debug)]
pub struct UniformLayout {
    /// The struct's name, the same in Rust and WGSL.
    pub name: &'static str,
    /// `size_of` the struct in bytes.
    pub size: usize,
    /// Every field as (name, byte offset), in declaration order.
    pub fields: &'static [(&'static str, usize)],
}

impl Binding {
    /// Group 0's uniform parameters at `binding`, sized by their struct.
    const fn uniform(binding: u32, layout: &'static UniformLayout) -> Self {
        Binding {
            group: 0,
            binding,
            access: Access::Uniform,
            has_dynamic_offset: false,
            min_binding_size: std::num::NonZeroU64::new(layout.size as u64),
            uniform: Some(layout),
        }
    }

    /// The layout entry the host creates for this binding.
    fn layout_entry(&self) -> wgpu::BindGroupLayoutEntry {
        wgpu::BindGroupLayoutEntry {
            binding: self.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match self.access {
                    Access::Uniform => wgpu::BufferBindingType::Uniform,
                    Access::Read | Access::ReadWrite => wgpu::BufferBindingType::Storage {
                        read_only: self.access == Access::Read,
                    },
                },
                has_dynamic_offset: self.has_dynamic_offset,
                min_binding_size: self.min_binding_size,
            },
            count: None,
        }
    }
}

/// Declares a kernel's uniform parameter struct and, from the same token list, its
/// [`UniformLayout`] as `NAME::LAYOUT`, so the list of fields cannot drift from the struct.
macro_rules! uniform_params {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub(crate) struct $name {
            $($field: $ty),+
        }

        impl $name {
            pub(crate) const LAYOUT: $crate::kernels::UniformLayout =
                $crate::kernels::UniformLayout {
                    name: stringify!($name),
                    size: ::core::mem::size_of::<$name>(),
                    fields: &[$((stringify!($field), ::core::mem::offset_of!($name, $field))),+],
                };
        }
    };
}
pub(crate) use uniform_params;

impl Kernel {
    /// Every kernel in every variant, for validation and listing.
    pub fn all() -> Vec<Kernel> {
        let mut all = vec![
            Kernel::Gemm(Precision::F32),
            Kernel::Gemm(Precision::F16),
            Kernel::GemmCache(Precision::F32),
            Kernel::GemmCache(Precision::F16),
            Kernel::Scores(Precision::F32),
            Kernel::Scores(Precision::F16),
            Kernel::Softmax,
            Kernel::WeightedSum(Precision::F32),
            Kernel::WeightedSum(Precision::F16),
        ];
        all.extend(fused::FusedIo::ALL.map(Kernel::Fused));
        all.extend([Kernel::BackwardPrep, Kernel::BackwardKv, Kernel::BackwardQ]);
        for precision in [Precision::F32, Precision::F16] {
            all.extend([
                Kernel::DecodeSplit {
                    mask: true,
                    precision,
                },
                Kernel::DecodeSplit {
                    mask: false,
                    precision,
                },
                Kernel::DecodeCombine(precision),
            ]);
        }
        all.push(Kernel::StreamRead);
        all
    }

    /// The file name under `shaders/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Kernel::Gemm(_) | Kernel::GemmCache(_) => "gemm.wgsl",
            Kernel::Scores(_) => "scores.wgsl",
            Kernel::Softmax => "softmax.wgsl",
            Kernel::WeightedSum(_) => "weighted_sum.wgsl",
            Kernel::Fused(_) => "fused_attention.wgsl",
            Kernel::BackwardPrep => "attention_bwd_prep.wgsl",
            Kernel::BackwardKv => "attention_bwd_kv.wgsl",
            Kernel::BackwardQ => "attention_bwd_q.wgsl",
            Kernel::DecodeSplit { .. } => "decode_split.wgsl",
            Kernel::DecodeCombine(_) => "decode_combine.wgsl",
            Kernel::StreamRead => "stream_read.wgsl",
        }
    }

    /// The kernel's name in messages and labels: its file, and for a variant what it binds
    /// and, for f16 storage, `f16`.
    pub fn name(self) -> String {
        let name = match self {
            Kernel::Fused(io) => format!(
                "{} ({}, {}, {}{})",
                self.file_name(),
                if io.packed_qkv {
                    "packed qkv"
                } else {
                    "q, k, v"
                },
                if io.mask { "mask" } else { "no mask" },
                if io.bias { "bias" } else { "no bias" },
                if io.lse { ", saving lse" } else { "" },
            ),
            Kernel::GemmCache(_) => format!("{} (into a KV cache)", self.file_name()),
            Kernel::DecodeSplit { mask, .. } => format!(
                "{} ({})",
                self.file_name(),
                if mask { "mask" } else { "no mask" }
            ),
            _ => self.file_name().into(),
        };
        match self.precision() {
            Precision::F32 => name,
            Precision::F16 => format!("{name} f16"),
        }
    }

    /// The storage precision of the variant: the element type of the storage buffers it reads
    /// and writes (f32 arithmetic either way). The softmax, the backward and the benchmark's
    /// read ceiling store f32 only.
    pub fn precision(self) -> Precision {
        match self {
            Kernel::Gemm(precision)
            | Kernel::GemmCache(precision)
            | Kernel::Scores(precision)
            | Kernel::WeightedSum(precision) => precision,
            Kernel::Fused(io) => io.precision,
            Kernel::DecodeSplit { precision, .. } | Kernel::DecodeCombine(precision) => precision,
            _ => Precision::F32,
        }
    }

    /// The device features the variant needs: `SHADER_F16` for f16 storage.
    pub fn features(self) -> wgpu::Features {
        match self.precision() {
            Precision::F32 => wgpu::Features::empty(),
            Precision::F16 => wgpu::Features::SHADER_F16,
        }
    }

    /// The Rust layout of the uniform parameters at `@group(0) @binding(0)`.
    #[doc(hidden)]
    pub fn params_layout(self) -> &'static UniformLayout {
        match self {
            Kernel::Gemm(_) | Kernel::GemmCache(_) => &gemm::GemmParams::LAYOUT,
            Kernel::Scores(_) | Kernel::Softmax | Kernel::WeightedSum(_) => {
                &staged::StagedParams::LAYOUT
            }
            // The backward reads the forward's parameters (the same buffer).
            Kernel::Fused(_) | Kernel::BackwardPrep | Kernel::BackwardKv | Kernel::BackwardQ => {
                &fused::FusedParams::LAYOUT
            }
            Kernel::DecodeSplit { .. } => &decode::DecodeParams::LAYOUT,
            Kernel::DecodeCombine(_) => &decode::CombineParams::LAYOUT,
            Kernel::StreamRead => &decode::StreamParams::LAYOUT,
        }
    }

    /// How many storage buffers the kernel binds: a device must allow that many per shader
    /// stage (`max_storage_buffers_per_shader_stage`; 4 on downlevel devices, 8 in WebGPU).
    pub fn storage_buffers(self) -> u32 {
        self.bindings()
            .iter()
            .filter(|b| b.access != Access::Uniform)
            .count() as u32
    }

    /// Refuses the kernel, naming the limit, on a device that allows fewer storage buffers per
    /// shader stage than it binds.
    pub(crate) fn check_storage_buffers(self, limits: &wgpu::Limits, hint: &str) -> Result<()> {
        let needed = self.storage_buffers();
        if needed > limits.max_storage_buffers_per_shader_stage {
            return Err(Error::LimitExceeded {
                limit: "max_storage_buffers_per_shader_stage",
                max: limits.max_storage_buffers_per_shader_stage as u64,
                requested: needed as u64,
                what: format!("{} (its storage buffers)", self.file_name()),
                hint: hint.into(),
            });
        }
        Ok(())
    }

    /// The bindings of the kernel's pipeline layout, exactly as the kernel cache creates them.
    #[doc(hidden)]
    pub fn bindings(self) -> Vec<Binding> {
        use Access::*;
        let storage: Vec<(u32, Access)> = match self {
            Kernel::Gemm(_) | Kernel::GemmCache(_) => numbered(&[Read, Read, Read, ReadWrite]),
            // q, k, scores.
            Kernel::Scores(_) => numbered(&[Read, Read, ReadWrite]),
            // key_mask, bias, scores in and probabilities out.
            Kernel::Softmax => numbered(&[Read, Read, ReadWrite]),
            // probabilities, v, out.
            Kernel::WeightedSum(_) => numbered(&[Read, Read, ReadWrite]),
            Kernel::Fused(io) => io
                .storage()
                .into_iter()
                .map(|(b, rw)| (b, if rw { ReadWrite } else { Read }))
                .collect(),
            // o, d_o, lse, aux.
            Kernel::BackwardPrep => numbered(&[Read, Read, Read, ReadWrite]),
            // q, k, v, d_o, aux, bias, dk, dv.
            Kernel::BackwardKv => {
                numbered(&[Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite])
            }
            // q, k, v, d_o, aux, bias, dq.
            Kernel::BackwardQ => numbered(&[Read, Read, Read, Read, Read, Read, ReadWrite]),
            // q, k, v, key_mask, partials.
            Kernel::DecodeSplit { mask: true, .. } => {
                numbered(&[Read, Read, Read, Read, ReadWrite])
            }
            // q, k, v, partials.
            Kernel::DecodeSplit { mask: false, .. } => {
                vec![(1, Read), (2, Read), (3, Read), (5, ReadWrite)]
            }
            // partials, out.
            Kernel::DecodeCombine(_) => numbered(&[Read, ReadWrite]),
            // src, out.
            Kernel::StreamRead => numbered(&[Read, ReadWrite]),
        };
        // The backward's lengths follow its storage buffers.
        let after_storage = storage.len() as u32 + 1;
        let params = self.params_layout();
        let mut bindings = vec![Binding::uniform(0, params)];
        bindings.extend(storage.into_iter().map(|(binding, access)| Binding {
            group: 0,
            binding,
            access,
            has_dynamic_offset: false,
            // Storage sizes follow the shape; the plan checks them against the limits.
            min_binding_size: None,
            uniform: None,
        }));
        // The call's q_len (and kv_len), each at a dynamic offset into a table of lengths.
        let lengths = match self {
            Kernel::Fused(_) => 7..9,
            Kernel::Scores(_) | Kernel::Softmax | Kernel::WeightedSum(_) => 4..6,
            Kernel::DecodeSplit { .. } => 6..8,
            Kernel::DecodeCombine(_) => 3..4,
            Kernel::Gemm(_) | Kernel::GemmCache(_) | Kernel::StreamRead => 0..0,
            Kernel::BackwardPrep | Kernel::BackwardKv | Kernel::BackwardQ => {
                after_storage..after_storage + 2
            }
        };
        {
            bindings.extend(lengths.map(|binding| Binding {
                binding,
                has_dynamic_offset: true,
                ..Binding::uniform(binding, &fused::Len::LAYOUT)
            }));
        }
        match self {
            // Each batch row's key count.
            Kernel::DecodeSplit { .. } => {
                bindings.push(Binding::uniform(8, &decode::RowLengths::LAYOUT))
            }
            // Each batch row's length in the cache, where its new tokens go.
            Kernel::GemmCache(_) => bindings.push(Binding::uniform(5, &decode::RowLengths::LAYOUT)),
            _ => {}
        }
        bindings.push(CHUNK_BINDING);
        bindings
    }

    /// The `@binding` numbers of group 0, in order: where a bind group puts its resources.
    pub(crate) fn group0(self) -> Vec<u32> {
        self.bindings()
            .iter()
            .filter(|b| b.group == 0)
            .map(|b| b.binding)
            .collect()
    }
}

/// Storage bindings numbered from 1, after the parameters.
fn numbered(access: &[Access]) -> Vec<(u32, Access)> {
    access
        .iter()
        .copied()
        .zip(1..)
        .map(|(a, b)| (b, a))
        .collect()
}

/// Override values of one pipeline, as (name, value) pairs.
pub(crate) type Overrides = Vec<(&'static str, f64)>;

/// Workgroup counts for `total` workgroups, folded into 2D or 3D where one dimension would pass
/// `max_per_dim`; kernels linearise the workgroup id and skip ids `>= total`.
pub(crate) fn fold_grid(total: u32, max_per_dim: u32, what: &str) -> Result<[u32; 3]> {
    let max = max_per_dim.max(1);
    let x = total.clamp(1, max);
    let rest = total.div_ceil(x);
    let y = rest.clamp(1, max);
    let z = rest.div_ceil(y);
    if z > max {
        return Err(Error::LimitExceeded {
            limit: "max_compute_workgroups_per_dimension",
            max: max as u64,
            requested: total as u64,
            what: format!("{what} ({total} workgroups, more than max³)"),
            hint: String::new(),
        });
    }
    Ok([x, y, z.max(1)])
}

/// One dispatch of one kernel, before it is bound to buffers: which specialisation, the uniform
/// parameters, how many workgroups, and the arithmetic it does (which sizes submissions).
pub(crate) struct DispatchSpec {
    pub kernel: Kernel,
    pub overrides: Overrides,
    pub params: Vec<u8>,
    pub workgroups: u32,
    pub flops: f64,
}

uniform_params! {
    /// The chunk number of `shaders/dispatch.wgsl`, one per table entry.
    struct Chunk {
        index: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// `@group(1) @binding(0)` of every kernel: the dispatch-chunk table, read at a dynamic offset.
const CHUNK_BINDING: Binding = Binding {
    group: 1,
    has_dynamic_offset: true,
    ..Binding::uniform(0, &Chunk::LAYOUT)
};

/// Workgroup shape of the register-tiled kernels (gemm, scores, weighted_sum; see
/// `shaders/tiles.wgsl`): `tx` x `ty` invocations, each owning 8 rows and either `nv` vec4
/// column groups (gemm, weighted_sum) or 8 keys (scores), over tiles `tk` deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct MatmulTiles {
    pub tx: u32,
    pub ty: u32,
    pub nv: u32,
    pub tk: u32,
}

/// What a tiled kernel produces per invocation along its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Columns {
    /// `nv` vec4 column groups: `4 tx nv` columns per workgroup.
    Vec4Groups,
    /// Eight keys: `8 tx` columns per workgroup.
    Keys,
}

impl MatmulTiles {
    /// 8 x 8 invocations with two vec4 column groups each (64 x 64 outputs per workgroup) over
    /// 16-deep tiles, narrowed when the output has fewer rows or columns (no invocation
    /// without work), and shrunk to fit the device's workgroup limits.
    pub fn for_shape(rows: u32, cols: u32, columns: Columns, limits: &wgpu::Limits) -> Self {
        let (mut tx, nv) = match columns {
            Columns::Vec4Groups => {
                let groups = cols.div_ceil(4);
                if groups >= 16 {
                    (8, 2)
                } else {
                    (groups.next_power_of_two().clamp(1, 8), 1)
                }
            }
            Columns::Keys => (cols.div_ceil(8).next_power_of_two().clamp(1, 8), 1),
        };
        let mut t = MatmulTiles {
            tx,
            ty: rows_per_eight(rows),
            nv,
            tk: 16,
        };
        while !t.fits(columns, limits) {
            if t.ty > 1 {
                t.ty /= 2;
            } else if t.tk > 4 {
                t.tk /= 2;
            } else if tx > 1 {
                tx /= 2;
                t.tx = tx;
            } else {
                break;
            }
        }
        t
    }

    fn fits(&self, columns: Columns, limits: &wgpu::Limits) -> bool {
        let padded_rows = |rows: u32| rows * (self.tk / 4 + 1);
        let vec4s = match columns {
            Columns::Vec4Groups => padded_rows(8 * self.ty) + self.tk * self.tx * self.nv,
            Columns::Keys => padded_rows(8 * self.ty + 8 * self.tx),
        };
        vec4s * 16 <= limits.max_compute_workgroup_storage_size
            && self.tx * self.ty <= limits.max_compute_invocations_per_workgroup
            && self.tx <= limits.max_compute_workgroup_size_x
            && self.ty <= limits.max_compute_workgroup_size_y
    }

    /// Rows of output per workgroup.
    pub fn tile_m(&self) -> u32 {
        8 * self.ty
    }

    /// vec4 column groups per workgroup (gemm, weighted_sum).
    pub fn groups(&self) -> u32 {
        self.tx * self.nv
    }

    /// Keys per workgroup (scores).
    pub fn keys(&self) -> u32 {
        8 * self.tx
    }

    /// The override constants; the depth is `TK` for the matmuls and `DK` for the scores.
    pub fn overrides(&self, depth_name: &'static str) -> Overrides {
        vec![
            ("TX", self.tx as f64),
            ("TY", self.ty as f64),
            ("NV", self.nv as f64),
            (depth_name, self.tk as f64),
        ]
    }
}

/// Invocations needed along a dimension of `n` when each owns eight: a power of two, 1 to 8.
pub(crate) fn rows_per_eight(n: u32) -> u32 {
    n.div_ceil(8).next_power_of_two().clamp(1, 8)
}

/// `n` rounded up to a multiple of 4.
pub(crate) fn pad4(n: u32) -> u32 {
    n.div_ceil(4) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_grid_covers_total_within_limit() {
        for (total, max) in [
            (1, 65535),
            (65535, 65535),
            (65536, 65535),
            (10, 3),
            (27, 3),
            (5_000_000, 65535),
        ] {
            let [x, y, z] = fold_grid(total, max, "test").unwrap();
            assert!(
                x <= max && y <= max && z <= max,
                "{total} {max}: {x} {y} {z}"
            );
            let covered = x as u64 * y as u64 * z as u64;
            assert!(covered >= total as u64, "{total}: {x}x{y}x{z}");
            // Folding wastes less than one row of the outer dimension.
            assert!(
                covered - (total as u64) < (x as u64) * (y as u64),
                "{total}: {x}x{y}x{z}"
            );
        }
        assert!(matches!(
            fold_grid(28, 3, "big"),
            Err(Error::LimitExceeded { .. })
        ));
    }
}
