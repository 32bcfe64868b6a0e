//! What one training step of an operator holds in GPU memory: the buffers a backward call
//! binds, at the operator's maximum lengths, for an application sizing its buffers or checking
//! that the backward's memory grows linearly with the sequence.

use super::AttentionOp;

impl AttentionOp {
    /// Bytes of GPU memory a backward call on an application's buffers binds, at the
    /// operator's maximum lengths (`None` without gradients): the buffers
    /// [`AttentionOp::bind_backward`] requires (Q, K, V, O, the saved logsumexp, dO, dQ, dK,
    /// dV, and the key mask and bias when the configuration has them), each at the size it
    /// checks, plus [`AttentionOp::backward_scratch_bytes`]. Every term is linear in the
    /// lengths except a bias, which is `q_len × kv_len` by nature (the application's input,
    /// not the backward's); nothing the backward itself allocates is.
    ///
    /// ```no_run
    /// # use wgpu_attention::{AttentionOp, GpuContext, OperatorConfig};
    /// let ctx = GpuContext::from_env()?;
    /// let bytes = |n| -> wgpu_attention::Result<u64> {
    ///     let config = OperatorConfig::new(1, 1, 1, 16, n, n).with_gradients();
    ///     Ok(AttentionOp::new(&ctx, &config)?.backward_memory_bytes().unwrap())
    /// };
    /// // Four times the tokens, four times the memory.
    /// assert_eq!(bytes(16384)?, 4 * bytes(4096)?);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn backward_memory_bytes(&self) -> Option<u64> {
        let scratch = self.backward_scratch_bytes()?;
        let [q, k, v, out, mask, bias] = self.config.max_elements();
        let c = &self.config;
        let rows = (c.batch * c.heads * c.max_q_len) as u64;
        // Read as vec4, so padded to 16 bytes, as bind_backward checks them.
        let read = |n: u64| (n * 4).next_multiple_of(16);
        let inputs = read(q.1) + read(k.1) + read(v.1) + read(out.1) + read(out.1);
        let written = 4 * (rows + q.1 + k.1 + v.1);
        Some(scratch + inputs + written + 4 * (mask.1 + bias.1))
    }
}
