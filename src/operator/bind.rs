//! Tying an operator to buffers: the application's (checked against the configuration), a
//! KV cache's, or the operator's own; one bind group per kernel, made once and reused by
//! every call.

use super::*;

impl AttentionOp {
    /// Makes the bind group that ties this operator to an application's buffers, checking
    /// each (usage, size for the maximum lengths). Call once per set of buffers and keep it.
    pub fn bind(&self, io: OperatorIo<'_>) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        pollster::block_on(self.bind_async(io))
    }

    /// The async form of [`AttentionOp::bind`].
    pub async fn bind_async(&self, io: OperatorIo<'_>) -> Result<OperatorBindings> {
        self.bind_checked(io, None).await
    }

    /// [`AttentionOp::bind`] for an operator built with gradients
    /// ([`OperatorConfig::with_gradients`]), whose forward also writes each query row's
    /// logsumexp to `lse` (f32 `[batch, heads, q_len]`, `STORAGE` usage; see
    /// [`AttentionOp::encode_backward`] for its units), which the backward reads.
    pub fn bind_with_lse(
        &self,
        io: OperatorIo<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        pollster::block_on(self.bind_checked(io, Some(lse)))
    }

    /// The async form of [`AttentionOp::bind_with_lse`].
    pub async fn bind_with_lse_async(
        &self,
        io: OperatorIo<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        self.bind_checked(io, Some(lse)).await
    }

    async fn bind_checked(
        &self,
        io: OperatorIo<'_>,
        lse: Option<&wgpu::Buffer>,
    ) -> Result<OperatorBindings> {
        let rows = (self.config.batch * self.config.heads * self.config.max_q_len) as u64;
        match (self.config.gradients, lse) {
            (true, Some(b)) => check_storage("lse", b, rows * 4, " (the maximum lengths)")?,
            (true, None) => {
                return Err(Error::BadBuffer {
                    name: "lse",
                    problem: "the operator was built with gradients, so its forward saves each \
                              row's logsumexp: bind with bind_with_lse"
                        .into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::BadBuffer {
                    name: "lse",
                    problem: "given, but the operator was built without gradients \
                              (OperatorConfig::with_gradients)"
                        .into(),
                });
            }
            (false, None) => {}
        }
        if self.config.row_lengths {
            return Err(Error::BadBuffer {
                name: "row_lengths",
                problem: "the configuration has per-row lengths: bind a KvCache with \
                          AttentionOp::bind_cache"
                    .into(),
            });
        }
        self.check_io(io)?;
        make_groups(
            self.ctx.device(),
            self.id,
            &self.path,
            self.decode.as_ref(),
            None,
            io,
            lse,
        )
        .await
    }

    /// Makes the bind group that ties this operator to a [`KvCache`] (its K, V and, with
    /// [`OperatorConfig::with_row_lengths`], its per-row lengths) and the application's query
    /// and output buffers. The cache must match the configuration: batch, kv heads, head
    /// widths, precision, head-major, and a capacity equal to the configuration's
    /// `kv_capacity`.
    pub fn bind_cache(
        &self,
        q: &wgpu::Buffer,
        cache: &KvCache,
        out: &wgpu::Buffer,
    ) -> Result<OperatorBindings> {
        let _device = self.ctx.kernels().exclusive();
        let c = &self.config;
        let wanted = [
            ("batch", c.batch, cache.batch()),
            ("kv_heads", c.kv_heads, cache.kv_heads()),
            ("head_dim", c.head_dim, cache.head_dim()),
            ("head_dim_v", c.head_dim_v, cache.head_dim_v()),
            ("kv_capacity", c.kv_capacity.unwrap_or(0), cache.capacity()),
        ];
        for (what, config, given) in wanted {
            if config != given {
                return Err(Error::InvalidConfig(format!(
                    "the KV cache has {what} {given}, the operator {config} (build the operator \
                     with the cache's shape: KvCache::operator_config)"
                )));
            }
        }
        if c.precision != cache.precision() {
            return Err(Error::InvalidConfig(format!(
                "the KV cache stores {}, the operator {} (build the operator with the cache's \
                 shape: KvCache::operator_config)",
                cache.precision(),
                c.precision
            )));
        }
        if c.layout != QkvLayout::HeadMajor {
            return Err(Error::InvalidConfig(
                "a KvCache is head-major; the operator is token-major".into(),
            ));
        }
        let io = OperatorIo {
            q,
            k: cache.k(),
            v: cache.v(),
            key_mask: None,
            bias: None,
            out,
        };
        if c.key_padding_mask || c.bias.is_some() {
            return Err(Error::InvalidConfig(
                "bind_cache binds no key mask or bias; use bind with the cache's buffers".into(),
            ));
        }
        self.check_io(io)?;
        let row_lengths = c.row_lengths.then(|| cache.row_lengths());
        pollster::block_on(make_groups(
            self.ctx.device(),
            self.id,
            &self.path,
            self.decode.as_ref(),
            row_lengths,
            io,
            None,
        ))
    }

    /// Checks each of an application's buffers (usage, size for the maximum lengths).
    fn check_io(&self, io: OperatorIo<'_>) -> Result<()> {
        let [q, k, v, out, mask, bias] = self.config.max_elements();
        // Q, K and V are read as vec4: their last elements need a whole vec4 to lie in.
        let e = self.config.precision.bytes();
        let sized_for = match self.config.precision {
            Precision::F32 => " (the maximum lengths)",
            Precision::F16 => " (the maximum lengths, f16 elements)",
        };
        for ((name, elements), buffer) in [(q, io.q), (k, io.k), (v, io.v)] {
            check_storage(
                name,
                buffer,
                (elements * e).next_multiple_of(4 * e),
                sized_for,
            )?;
        }
        check_storage(out.0, io.out, (out.1 * e).next_multiple_of(4), sized_for)?;
        for ((name, elements), wanted, given) in [
            (mask, self.config.key_padding_mask, io.key_mask),
            (bias, self.config.bias.is_some(), io.bias),
        ] {
            match (wanted, given) {
                (true, Some(b)) => check_storage(name, b, elements * 4, " (the maximum lengths)")?,
                (true, None) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "the configuration has one but no buffer was given".into(),
                    });
                }
                (false, Some(_)) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "given, but the configuration has none".into(),
                    });
                }
                (false, None) => {}
            }
        }
        Ok(())
    }
}

/// A bind group per kernel of `path` on `io`.
pub(super) async fn make_groups(
    device: &wgpu::Device,
    op: u64,
    path: &Path,
    decode: Option<&decode::DecodeCore>,
    row_lengths: Option<&wgpu::Buffer>,
    io: OperatorIo<'_>,
    lse: Option<&wgpu::Buffer>,
) -> Result<OperatorBindings> {
    let (groups, decode) = scoped_async(device, "binding the operator's buffers", || {
        let decode = decode.map(|d| {
            d.groups(
                device,
                path.lengths(),
                [io.q, io.k, io.v, io.out],
                io.key_mask,
                row_lengths,
            )
        });
        // Each buffer at its binding in the pipeline's group 0, then the two lengths.
        let group = |pipeline: &Pipeline, buffers: &[&wgpu::Buffer], lengths: &LengthTable| {
            let resources = buffers
                .iter()
                .map(|b| b.as_entire_binding())
                .chain([lengths.binding(), lengths.binding()]);
            pipeline.bind_group(device, "attention operator", resources)
        };
        let groups = match path {
            Path::Fused(core) => {
                // The variant binds a mask and a bias only when the operator has them (`bind`
                // checked that the buffers match the configuration).
                let buffers: Vec<&wgpu::Buffer> = [&core.params, io.q, io.k, io.v]
                    .into_iter()
                    .chain(io.key_mask)
                    .chain(io.bias)
                    .chain([io.out])
                    .chain(lse)
                    .collect();
                vec![group(&core.pipeline, &buffers, &core.lengths)]
            }
            Path::Staged(core) => {
                let [scores, softmax, sum] = &core.pipelines;
                vec![
                    group(
                        scores,
                        &[&core.params, io.q, io.k, &core.scores],
                        &core.lengths,
                    ),
                    group(
                        softmax,
                        &[
                            &core.params,
                            io.key_mask.unwrap_or(&core.absent),
                            io.bias.unwrap_or(&core.absent),
                            &core.probs,
                        ],
                        &core.lengths,
                    ),
                    group(
                        sum,
                        &[&core.params, &core.probs, io.v, io.out],
                        &core.lengths,
                    ),
                ]
            }
        };
        (groups, decode)
    })
    .await?;
    Ok(OperatorBindings { op, groups, decode })
}
