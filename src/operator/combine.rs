//! The merge of partial attention results as a public step: split-K decode's second pass, for
//! a caller whose keys were attended in parts elsewhere (other passes, other devices: ring or
//! sequence-parallel attention).

use std::sync::atomic::{AtomicU64, Ordering};

use super::QkvLayout;
use super::core::LengthTable;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{check_storage, init_uniform, scoped};
use crate::kernels::decode::{COMBINE_WG, combine_params, partial_elements};
use crate::kernels::fused::Strides;
use crate::kernels::{ChunkTable, Kernel, Pipeline, fold_grid};

/// Merges partial attention results over disjoint parts of the keys into the attention output,
/// on the GPU (`shaders/decode_combine.wgsl`).
///
/// # The partials' layout
///
/// f32 `[batch, heads, q_len, parts, 4 + 4 ceil(head_dim_v / 4)]`: for each query row and part
/// of the keys, one entry `(m, l, 0, 0, o[0], ..., o[head_dim_v - 1], 0...)` where, over the
/// keys `j` of the part that the query attends, with `s_j = sign(scale) · q·k_j` (the score
/// before the scale's magnitude):
/// - `m = max_j s_j`,
/// - `l = sum_j exp(|scale| (s_j - m))`,
/// - `o = sum_j exp(|scale| (s_j - m)) v_j` (not divided by `l`).
///
/// The partials are f32 whatever the configuration's precision; the output is stored in it
/// (f16 rounded once, as it is written).
///
/// A part with no key to attend has `m = f32::MIN` (-3.402823e38), `l = 0`, `o = 0`. The
/// output is `sum_p w_p o_p / sum_p w_p l_p`, `w_p = exp(|scale| (m_p - max_p m_p))`; a row
/// with no key in any part gets zeros. Keeping `m` unscaled means no finite scale overflows.
/// Split-K decode ([`super::OperatorPath::SplitK`]) writes exactly this layout between its
/// passes.
#[derive(Debug)]
pub struct CombinePartials {
    ctx: GpuContext,
    id: u64,
    batch: usize,
    heads: usize,
    head_dim_v: usize,
    parts: usize,
    max_q_len: usize,
    precision: crate::Precision,
    pipeline: Pipeline,
    params: wgpu::Buffer,
    lengths: LengthTable,
    chunks: ChunkTable,
}

/// A bind group tying a [`CombinePartials`] to one partials buffer and one output buffer.
#[derive(Debug)]
pub struct CombineBindings {
    id: u64,
    group: wgpu::BindGroup,
}

impl CombinePartials {
    /// The merge of `parts` partial results of the attention `config` describes: its batch,
    /// heads, value head width, `max_q_len`, scale (only its magnitude matters: the one the
    /// partials were made with) and output layout (`[batch, heads, q_len, head_dim_v]`
    /// head-major, `[batch, q_len, heads * head_dim_v]` token-major) and precision (the
    /// output's storage; f16 needs the device's shader-f16).
    pub fn new(ctx: &GpuContext, config: &super::OperatorConfig, parts: usize) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        config.validate()?;
        config.precision.check_device(ctx)?;
        if parts == 0 {
            return Err(Error::ZeroSize { name: "parts" });
        }
        let (batch, heads, head_dim_v) = (config.batch, config.heads, config.head_dim_v);
        let (max_q_len, scale, layout) = (config.max_q_len, config.scale_value(), config.layout);
        let _device = ctx.kernels().exclusive();
        let (h, w) = (heads as u32, head_dim_v as u32);
        let out = match layout {
            QkvLayout::HeadMajor => Strides::head_major(h, w, 0),
            QkvLayout::TokenMajor => Strides::token_major(h, w, 0),
        };
        let params = combine_params(batch as u32, h, w, parts as u32, scale, out);
        let pipeline = pollster::block_on(ctx.kernels().pipeline(
            Kernel::DecodeCombine(config.precision),
            &[("WG", COMBINE_WG as f64)],
        ))?;
        let chunks = pollster::block_on(ctx.kernels().chunks())?;
        let device = ctx.device();
        let (params, lengths) = scoped(device, "creating the partials' merge", || {
            (
                init_uniform(device, "combine", bytemuck::bytes_of(&params)),
                LengthTable::new(device, 1, max_q_len as u32),
            )
        })?;
        Ok(CombinePartials {
            ctx: ctx.clone(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            batch,
            heads,
            head_dim_v,
            parts,
            max_q_len,
            precision: config.precision,
            pipeline,
            params,
            lengths,
            chunks,
        })
    }

    /// Bytes of the partials of a call of `q_len` queries (the layout above).
    pub fn partials_bytes(&self, q_len: usize) -> u64 {
        partial_elements(
            self.batch as u32,
            self.heads as u32,
            q_len as u32,
            self.parts as u32,
            self.head_dim_v as u32,
        ) * 4
    }

    /// Ties the merge to `partials` (read, laid out as above at each call's `q_len`) and `out`
    /// (written), both `STORAGE`, sized for `max_q_len`. Call once per pair and keep it.
    pub fn bind(&self, partials: &wgpu::Buffer, out: &wgpu::Buffer) -> Result<CombineBindings> {
        let max = self.max_q_len;
        check_storage(
            "partials",
            partials,
            self.partials_bytes(max),
            " (max_q_len)",
        )?;
        let out_bytes = (self.batch * self.heads * max * self.head_dim_v) as u64;
        // An odd number of f16 outputs still fills a whole 4-byte word of a binding.
        let out_bytes = (out_bytes * self.precision.bytes()).next_multiple_of(4);
        check_storage("out", out, out_bytes, " (max_q_len)")?;
        let device = self.ctx.device();
        let group = scoped(device, "binding the partials' merge", || {
            self.pipeline.bind_group(
                device,
                "combine partials",
                [&self.params, partials, out]
                    .map(|b| b.as_entire_binding())
                    .into_iter()
                    .chain([self.lengths.binding()]),
            )
        })?;
        Ok(CombineBindings { id: self.id, group })
    }

    /// Records the merge of a call of `q_len` queries into `encoder`; allocates nothing.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &CombineBindings,
        q_len: usize,
    ) -> Result<()> {
        if bindings.id != self.id {
            return Err(Error::ForeignBindings);
        }
        if q_len == 0 {
            return Err(Error::ZeroSize { name: "q_len" });
        }
        if q_len > self.max_q_len {
            return Err(Error::LengthPastMaximum {
                name: "q_len",
                len: q_len,
                max: self.max_q_len,
            });
        }
        let total = (self.batch * self.heads * q_len * self.head_dim_v.div_ceil(4))
            .div_ceil(COMBINE_WG as usize) as u32;
        let [x, y, z] = fold_grid(
            total,
            self.ctx.limits().max_compute_workgroups_per_dimension,
            "the partials' merge",
        )?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("combine partials"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &bindings.group, &[self.lengths.offset(q_len as u32)]);
        pass.set_bind_group(1, &self.chunks.group, &[0]);
        pass.dispatch_workgroups(x, y, z);
        Ok(())
    }
}
