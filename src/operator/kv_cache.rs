//! A KV cache: K and V buffers with room for `capacity` tokens per batch row, appended to by
//! commands recorded into the caller's encoder, and each row's current length.

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, scoped};
use crate::kernels::decode::MAX_ROW_LENGTHS;
use crate::operator::{Lengths, OperatorConfig};
use crate::precision::{Precision, check_f16_range, write_f16};
use crate::tensor::Tensor;
use wgpu::util::DeviceExt;

/// K and V of a decoding model, head-major with a capacity:
/// K `[batch, kv_heads, capacity, head_dim]`, V `[batch, kv_heads, capacity, head_dim_v]`,
/// stored in f32 ([`KvCache::new`]) or in f16 ([`KvCache::with_precision`]: half the bytes,
/// and so half the reading, of every decode step; the kernels still compute in f32).
///
/// Each batch row holds its own number of tokens (its *length*), its first tokens in place;
/// [`KvCache::append_buffers`] and [`KvCache::append_host`] record the write of new tokens at
/// each row's length into the caller's encoder and advance it, and [`KvCache::set_lengths`]
/// sets the lengths outright (a new sequence, a rewind). Going past the capacity is
/// [`Error::KvCacheFull`], never a wrap-around. The lengths also live on the GPU, in a uniform
/// table ([`KvCache::row_lengths`]) that the same encoder updates with copies from a table of
/// every length made with the cache: a step writes, allocates and compiles nothing. At most
/// 1024 batch rows.
///
/// An [`crate::AttentionOp`] built from [`KvCache::operator_config`] and bound with
/// [`crate::AttentionOp::bind_cache`] attends each row's own keys, causal masking aligned to
/// each row's end; pass it [`KvCache::lengths`].
///
/// ```no_run
/// use wgpu_attention::{AttentionOp, GpuContext, KvCache, Tensor};
/// # fn demo(ctx: &GpuContext, q: &wgpu::Buffer, out: &wgpu::Buffer)
/// #     -> Result<(), wgpu_attention::Error> {
/// // One sequence, 8 kv heads of 128, up to 4096 tokens.
/// let mut cache = KvCache::new(ctx, 1, 8, 128, 128, 4096)?;
/// // 32 query heads, up to 16 new tokens a step, causal; the application's q and out.
/// let op = AttentionOp::new(ctx, &cache.operator_config(32, 16).causal())?;
/// let bindings = op.bind_cache(q, &cache, out)?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// let (k, v) = (Tensor::zeros([1, 8, 1, 128]), Tensor::zeros([1, 8, 1, 128]));
/// cache.append_host(&mut encoder, &k, &v)?;
/// op.encode(&mut encoder, &bindings, cache.lengths(1)?)?;
/// ctx.queue().submit([encoder.finish()]);
/// cache.recall();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct KvCache {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    head_dim_v: usize,
    capacity: usize,
    precision: Precision,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    row_lengths: wgpu::Buffer,
    /// u32 0, 1, ..., capacity: the source of the copies that set `row_lengths`.
    numbers: wgpu::Buffer,
    lens: Vec<usize>,
    belt: wgpu::util::StagingBelt,
}

impl KvCache {
    /// An empty f32 cache of `batch` rows, `kv_heads` heads of K `head_dim` and V
    /// `head_dim_v` wide, room for `capacity` tokens per row.
    pub fn new(
        ctx: &GpuContext,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        head_dim_v: usize,
        capacity: usize,
    ) -> Result<Self> {
        Self::with_precision(
            ctx,
            Precision::F32,
            batch,
            kv_heads,
            head_dim,
            head_dim_v,
            capacity,
        )
    }

    /// An empty cache as [`KvCache::new`]'s, its K and V stored in `precision`. With
    /// [`Precision::F16`] the device needs shader-f16 ([`Error::NoShaderF16`] otherwise), the
    /// head widths must be even (appends are copies of whole 4-byte words, so a token's f16
    /// row must be one), host appends are rounded to f16 (a value past its range is
    /// [`Error::OutsideF16Range`], naming `k` or `v` and the index) and appended buffers
    /// hold f16.
    ///
    /// ```no_run
    /// use wgpu_attention::{AttentionOp, GpuContext, KvCache, Precision};
    /// let ctx = GpuContext::from_env()?;
    /// let cache = KvCache::with_precision(&ctx, Precision::F16, 1, 8, 128, 128, 4096)?;
    /// // The operator's configuration carries the cache's precision: Q and out are f16 too.
    /// let op = AttentionOp::new(&ctx, &cache.operator_config(32, 1).causal())?;
    /// assert_eq!(op.config().precision, Precision::F16);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn with_precision(
        ctx: &GpuContext,
        precision: Precision,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        head_dim_v: usize,
        capacity: usize,
    ) -> Result<Self> {
        precision.check_device(ctx)?;
        for (name, v) in [
            ("batch", batch),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("head_dim_v", head_dim_v),
            ("capacity", capacity),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if batch > MAX_ROW_LENGTHS {
            return Err(Error::LimitExceeded {
                limit: "KV cache batch rows",
                max: MAX_ROW_LENGTHS as u64,
                requested: batch as u64,
                what: "the KV cache's table of row lengths (a uniform buffer)".into(),
                hint: "; use several caches".into(),
            });
        }
        if precision == Precision::F16 {
            for (name, w) in [("head_dim", head_dim), ("head_dim_v", head_dim_v)] {
                if w % 2 != 0 {
                    return Err(Error::InvalidConfig(format!(
                        "an f16 KV cache needs an even {name}, not {w}: each token's row is \
                         copied in whole 4-byte words (use f32, or pad the heads)"
                    )));
                }
            }
        }
        let limits = ctx.limits();
        let e = precision.bytes();
        let elements = |w: usize| (batch * kv_heads * capacity) as u64 * w as u64;
        for (name, n) in [("k", elements(head_dim)), ("v", elements(head_dim_v))] {
            let bytes = n * e;
            if bytes > limits.max_storage_buffer_binding_size || n > u32::MAX as u64 {
                return Err(Error::LimitExceeded {
                    limit: "max_storage_buffer_binding_size",
                    max: limits.max_storage_buffer_binding_size,
                    requested: bytes,
                    what: format!("the KV cache's `{name}` ({capacity} tokens per row)"),
                    hint: "; build the cache with a smaller capacity".into(),
                });
            }
        }
        let device = ctx.device();
        let copy = STORAGE | wgpu::BufferUsages::COPY_DST;
        let table = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
        let numbers: Vec<u32> = (0..=capacity as u32).collect();
        let step = (batch * kv_heads * (head_dim + head_dim_v)) as u64 * e;
        let (k, v, row_lengths, numbers) = scoped(device, "creating the KV cache", || {
            (
                // Read as vec4: the last element needs a whole vec4 to lie in.
                buffer(
                    device,
                    "kv cache k",
                    (elements(head_dim) * e).next_multiple_of(16),
                    copy,
                ),
                buffer(
                    device,
                    "kv cache v",
                    (elements(head_dim_v) * e).next_multiple_of(16),
                    copy,
                ),
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("kv cache row lengths"),
                    contents: bytemuck::cast_slice(&vec![0u32; MAX_ROW_LENGTHS]),
                    usage: table,
                }),
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("kv cache lengths table"),
                    contents: bytemuck::cast_slice(&numbers),
                    usage: wgpu::BufferUsages::COPY_SRC,
                }),
            )
        })?;
        Ok(KvCache {
            batch,
            kv_heads,
            head_dim,
            head_dim_v,
            capacity,
            precision,
            k,
            v,
            row_lengths,
            numbers,
            lens: vec![0; batch],
            // Room for one token of every row and head in one chunk: a decode step's upload.
            belt: wgpu::util::StagingBelt::new(device.clone(), step.next_multiple_of(256)),
        })
    }

    /// The configuration of an operator on this cache: `heads` query heads, calls of up to
    /// `max_q_len` new tokens over up to `capacity` keys, the cache's precision (Q and the
    /// output are stored in it too), per-row lengths (so at most
    /// [`crate::DECODE_MAX_Q_LEN`] queries; a longer prefill takes an operator built without
    /// `with_row_lengths`, on rows of one length).
    pub fn operator_config(&self, heads: usize, max_q_len: usize) -> OperatorConfig {
        OperatorConfig::new(
            self.batch,
            heads,
            self.kv_heads,
            self.head_dim,
            max_q_len,
            self.capacity,
        )
        .with_head_dim_v(self.head_dim_v)
        .with_kv_capacity(self.capacity)
        .with_row_lengths()
        .with_precision(self.precision)
    }

    /// Batch rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Width of a key head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of a value head.
    pub fn head_dim_v(&self) -> usize {
        self.head_dim_v
    }

    /// Tokens each row has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How K and V are stored.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The K buffer, `[batch, kv_heads, capacity, head_dim]` in the cache's precision.
    pub fn k(&self) -> &wgpu::Buffer {
        &self.k
    }

    /// The V buffer, `[batch, kv_heads, capacity, head_dim_v]` in the cache's precision.
    pub fn v(&self) -> &wgpu::Buffer {
        &self.v
    }

    /// The rows' lengths on the GPU, as of the commands recorded so far: a uniform buffer of
    /// 1024 u32, row `b`'s at `b`.
    pub fn row_lengths(&self) -> &wgpu::Buffer {
        &self.row_lengths
    }

    /// Each row's length, as of the commands recorded so far.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The lengths of an operator call of `q_len` new tokens (the last `q_len` of each row):
    /// `kv_len` is the longest row. An error if a row is shorter than `q_len`.
    pub fn lengths(&self, q_len: usize) -> Result<Lengths> {
        if let Some((row, &len)) = self.lens.iter().enumerate().find(|(_, l)| **l < q_len) {
            return Err(Error::InvalidConfig(format!(
                "batch row {row} of the KV cache holds {len} tokens, fewer than the {q_len} \
                 queries of the call"
            )));
        }
        Ok(Lengths {
            q_len,
            kv_len: self.lens.iter().copied().max().unwrap_or(0),
        })
    }

    /// Sets every row's length (a new sequence: 0; a rewind), recording the update of
    /// [`KvCache::row_lengths`] into `encoder`. Tokens past a row's length are kept but
    /// ignored, and overwritten by the next append.
    pub fn set_lengths(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        lens: &[usize],
    ) -> Result<()> {
        if lens.len() != self.batch {
            return Err(Error::shape(
                "kv cache lengths",
                &[self.batch],
                &[lens.len()],
            ));
        }
        if let Some((row, &len)) = lens.iter().enumerate().find(|(_, l)| **l > self.capacity) {
            return Err(Error::KvCacheFull {
                row,
                len: 0,
                adding: len,
                capacity: self.capacity,
            });
        }
        self.lens.copy_from_slice(lens);
        self.record_lengths(encoder);
        Ok(())
    }

    /// Checks that every row can take `tokens` more.
    pub(crate) fn check_room(&self, tokens: usize) -> Result<()> {
        for (row, &len) in self.lens.iter().enumerate() {
            if len + tokens > self.capacity {
                return Err(Error::KvCacheFull {
                    row,
                    len,
                    adding: tokens,
                    capacity: self.capacity,
                });
            }
        }
        Ok(())
    }

    fn record_lengths(&self, encoder: &mut wgpu::CommandEncoder) {
        for (row, &len) in self.lens.iter().enumerate() {
            encoder.copy_buffer_to_buffer(
                &self.numbers,
                len as u64 * 4,
                &self.row_lengths,
                row as u64 * 4,
                4,
            );
        }
    }

    /// Where token `t` of head `h` of row `b` starts in K (`width` = head_dim) or V.
    fn at(&self, b: usize, h: usize, t: usize, width: usize) -> u64 {
        ((((b * self.kv_heads + h) * self.capacity) + t) * width) as u64 * self.precision.bytes()
    }

    /// Records the append of `tokens` new tokens to every row, copied from the application's
    /// buffers `k` `[batch, kv_heads, tokens, head_dim]` and `v` `[batch, kv_heads, tokens,
    /// head_dim_v]` (in the cache's precision, packed, `COPY_SRC` usage), each row's at its
    /// own length; advances the lengths.
    pub fn append_buffers(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        tokens: usize,
    ) -> Result<()> {
        if tokens == 0 {
            return Err(Error::ZeroSize { name: "tokens" });
        }
        self.check_room(tokens)?;
        let e = self.precision.bytes();
        for (name, src, width) in [("k", k, self.head_dim), ("v", v, self.head_dim_v)] {
            let bytes = (self.batch * self.kv_heads * tokens * width) as u64 * e;
            if !src.usage().contains(wgpu::BufferUsages::COPY_SRC) || src.size() < bytes {
                return Err(Error::BadBuffer {
                    name,
                    problem: format!(
                        "needs COPY_SRC usage and {bytes} bytes ({tokens} tokens); has {:?}, {} \
                         bytes",
                        src.usage(),
                        src.size()
                    ),
                });
            }
        }
        for b in 0..self.batch {
            for h in 0..self.kv_heads {
                let block = (b * self.kv_heads + h) * tokens;
                for (src, dst, width) in
                    [(k, &self.k, self.head_dim), (v, &self.v, self.head_dim_v)]
                {
                    encoder.copy_buffer_to_buffer(
                        src,
                        (block * width) as u64 * e,
                        dst,
                        self.at(b, h, self.lens[b], width),
                        (tokens * width) as u64 * e,
                    );
                }
            }
        }
        self.advance(encoder, tokens);
        Ok(())
    }

    /// Records the append of new tokens from host tensors `k` `[batch, kv_heads, tokens,
    /// head_dim]` and `v` `[batch, kv_heads, tokens, head_dim_v]` through the cache's staging
    /// belt (made once; its memory is reused once the GPU is done with it), rounded to f16 as
    /// they are written for an f16 cache (checked first: a value past f16's range is
    /// [`Error::OutsideF16Range`] naming `k` or `v` and its index, and nothing is recorded).
    /// Call [`KvCache::recall`] after submitting `encoder`.
    pub fn append_host(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let tokens = k.shape().get(2).copied().unwrap_or(0);
        for (name, t, width) in [("k", k, self.head_dim), ("v", v, self.head_dim_v)] {
            let expected = [self.batch, self.kv_heads, tokens, width];
            if t.shape() != expected {
                return Err(Error::shape(name, &expected, t.shape()));
            }
            t.check_finite(name)?;
            if self.precision == Precision::F16 {
                check_f16_range(name, t.shape(), t.data())?;
            }
        }
        if tokens == 0 {
            return Err(Error::ZeroSize { name: "tokens" });
        }
        self.check_room(tokens)?;
        for b in 0..self.batch {
            for h in 0..self.kv_heads {
                let block = (b * self.kv_heads + h) * tokens;
                for (t, width, is_k) in [(k, self.head_dim, true), (v, self.head_dim_v, false)] {
                    let src = &t.data()[block * width..(block + tokens) * width];
                    let at = self.at(b, h, self.lens[b], width);
                    let dst = if is_k { &self.k } else { &self.v };
                    let e = self.precision.bytes();
                    if let Some(size) = wgpu::BufferSize::new(src.len() as u64 * e) {
                        let mut view = self.belt.write_buffer(encoder, dst, at, size);
                        match self.precision {
                            Precision::F32 => view.copy_from_slice(bytemuck::cast_slice(src)),
                            // Even widths: whole words, so write_f16 adds no padding.
                            Precision::F16 => write_f16(src, |offset, bytes| {
                                view.slice(offset..offset + bytes.len())
                                    .copy_from_slice(bytes)
                            }),
                        }
                    }
                }
            }
        }
        self.belt.finish();
        self.advance(encoder, tokens);
        Ok(())
    }

    /// Frees the staging memory of submitted host appends for reuse; call after each
    /// submission of an encoder holding [`KvCache::append_host`].
    pub fn recall(&mut self) {
        self.belt.recall();
    }

    /// Records the lengths' advance by `tokens` (written by the caller, whose commands come
    /// first in `encoder`: the cached layer's projection writes K and V straight in).
    pub(crate) fn advance(&mut self, encoder: &mut wgpu::CommandEncoder, tokens: usize) {
        for len in &mut self.lens {
            *len += tokens;
        }
        self.record_lengths(encoder);
    }
}
