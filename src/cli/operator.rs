//! From the named tensors of an input file to one call of the attention operator: `q`, `k`,
//! `v` head-major, an optional `key_mask` and `attn_bias`, and an optional `grad_out` that asks
//! for the backward too.
//!
//! Every size comes from the shapes (head counts too), and every shape is checked here against
//! the others, so that a message names the two tensors that disagree and the axis, in the
//! file's own terms, before the library sees anything.

use wgpu_attention::{BiasShape, OperatorConfig, OperatorInputs, Shape, Tensor};

use super::CliError;
use super::files::{Kind, TensorFile};

/// Every tensor name an operator file may hold, with how its dtype is accepted.
pub const TENSORS: [(&str, Kind); 6] = [
    ("q", Kind::Float),
    ("k", Kind::Float),
    ("v", Kind::Float),
    ("key_mask", Kind::Attend),
    ("attn_bias", Kind::Bias),
    ("grad_out", Kind::Float),
];

/// The names only an operator file holds (`key_mask` and `grad_out` are a layer's too).
pub const OWN: [&str; 4] = ["q", "k", "v", "attn_bias"];

/// What each rank-4 tensor's axes mean, for messages.
const Q_AXES: &str = "[batch, heads, q_len, head_dim]";
const K_AXES: &str = "[batch, kv_heads, kv_len, head_dim]";
const V_AXES: &str = "[batch, kv_heads, kv_len, head_dim_v]";

/// The accepted tensors for a file holding `names`: an operator's if it holds `q`, `k`, `v`
/// or `attn_bias`, else `layer`'s; a file holding both kinds is refused by name.
pub fn choose_tensors<'k>(
    names: &[String],
    layer: &'k [(&'k str, Kind)],
) -> Result<&'k [(&'k str, Kind)], String> {
    let own: Vec<&str> = OWN
        .iter()
        .copied()
        .filter(|n| names.iter().any(|m| m == n))
        .collect();
    let Some(first) = own.first() else {
        return Ok(layer);
    };
    let layer_only: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !TENSORS.iter().any(|(k, _)| k == n) && layer.iter().any(|(k, _)| k == n))
        .collect();
    if let Some(other) = layer_only.first() {
        return Err(format!(
            "the file mixes a layer's tensors (`{other}`) with an attention operator's \
             (`{first}`); a layer file holds `x` and the weights, an operator file `q`, `k`, \
             `v` (and optionally `key_mask`, `attn_bias`): save them apart"
        ));
    }
    Ok(&TENSORS)
}

/// The choices the command line makes about the call.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// `--heads`, which must agree with `q` if given.
    pub heads: Option<usize>,
    /// Score scale; `None` for `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Causal, aligned to the end of the keys.
    pub causal: bool,
    /// Run even when a query has no key to attend (its output is zeros).
    pub allow_masked_rows: bool,
}

/// One operator call ready to run, as the library takes it.
#[derive(Debug, Clone)]
pub struct OperatorCall {
    /// Sizes and options, with maxima at this call's lengths.
    pub config: OperatorConfig,
    /// The tensors, checked.
    pub inputs: OperatorInputs,
    /// The keys each batch row keeps, if there is a mask.
    pub kept: Option<Vec<usize>>,
    /// `∂L/∂out`, shaped like the output, when the file asks for gradients.
    pub grad_out: Option<Tensor>,
}

impl OperatorCall {
    /// Queries per call.
    pub fn q_len(&self) -> usize {
        self.inputs.q.shape()[2]
    }

    /// Keys per call.
    pub fn kv_len(&self) -> usize {
        self.inputs.k.shape()[2]
    }
}

/// Builds the call from `file`'s tensors, checking every shape against the others.
pub fn build(file: &mut TensorFile, options: &OperatorOptions) -> Result<OperatorCall, CliError> {
    let q = require(file, "q", "queries", Q_AXES)?;
    let k = require(file, "k", "keys", K_AXES)?;
    let v = require(file, "v", "values", V_AXES)?;
    let [batch, heads, q_len, head_dim] = dims(&q);
    let [k_batch, kv_heads, kv_len, k_dim] = dims(&k);
    let [v_batch, v_heads, v_len, head_dim_v] = dims(&v);
    for (name, axes, t) in [("q", Q_AXES, &q), ("k", K_AXES, &k), ("v", V_AXES, &v)] {
        if let Some(axis) = t.shape().iter().position(|&d| d == 0) {
            return Err(file.error(format!(
                "tensor `{name}` has shape {}, whose axis {axis} of {axes} is empty",
                Shape(t.shape().to_vec())
            )));
        }
    }
    for (name, b) in [("k", k_batch), ("v", v_batch)] {
        if b != batch {
            return Err(file.error(format!(
                "tensor `{name}` has batch {b} but `q` has {batch}: the first axis is the batch \
                 row, the same for q, k and v"
            )));
        }
    }
    if v_heads != kv_heads {
        return Err(file.error(format!(
            "tensor `v` has {v_heads} heads but `k` has {kv_heads}: keys and values come in the \
             same kv_heads heads ({K_AXES}, {V_AXES})"
        )));
    }
    if v_len != kv_len {
        return Err(file.error(format!(
            "tensor `v` has {v_len} positions but `k` has {kv_len}: every key needs its value \
             (kv_len, axis 2 of both)"
        )));
    }
    if k_dim != head_dim {
        return Err(file.error(format!(
            "tensor `k` has heads {k_dim} wide but `q` has heads {head_dim} wide: a query is \
             dotted with a key, so both are head_dim wide (axis 3); `v` may differ"
        )));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(file.error(format!(
            "`q` has {heads} heads and `k` {kv_heads}: kv_heads must divide heads, so each \
             key/value head serves the same number of query heads (equal: MHA, 1: MQA, else \
             GQA)"
        )));
    }
    if let Some(given) = options.heads
        && given != heads
    {
        return Err(CliError::Usage(format!(
            "--heads {given} disagrees with `q`, which has {heads} heads ({Q_AXES} = {}); an \
             operator file's head counts come from its shapes: drop --heads",
            Shape(q.shape().to_vec())
        )));
    }
    let key_mask = take_mask(file, batch, kv_len)?;
    let bias = take_bias(file, batch, heads, q_len, kv_len)?;
    let grad_out = take_grad_out(file, [batch, heads, q_len, head_dim_v])?;
    let mut config = OperatorConfig::new(batch, heads, kv_heads, head_dim, q_len, kv_len)
        .with_head_dim_v(head_dim_v);
    config.causal = options.causal;
    config.scale = options.scale;
    config.key_padding_mask = key_mask.is_some();
    config.bias = bias.as_ref().map(|t| BiasShape {
        per_batch: t.shape()[0] != 1,
        per_head: t.shape()[1] != 1,
    });
    config.gradients = grad_out.is_some();
    let inputs = OperatorInputs {
        q,
        k,
        v,
        key_mask,
        bias,
    };
    let kept = check_masked_rows(file, &inputs, options, q_len, kv_len)?;
    // The checks above cover shapes; the library's own catch what is left (a bad scale).
    config
        .validate()
        .and_then(|()| inputs.validate(&config).map(drop))
        .map_err(|e| file.error(e.to_string()))?;
    Ok(OperatorCall {
        config,
        inputs,
        kept,
        grad_out,
    })
}

fn dims(t: &Tensor) -> [usize; 4] {
    t.shape().try_into().expect("require checks the rank")
}

/// A rank-4 tensor the file must hold.
fn require(file: &mut TensorFile, name: &str, what: &str, axes: &str) -> Result<Tensor, CliError> {
    let Some(t) = file.take(name) else {
        return Err(file.error(format!(
            "missing tensor `{name}`, the {what} {axes}; the file holds {}",
            file.names()
        )));
    };
    if t.shape().len() != 4 {
        return Err(file.error(format!(
            "tensor `{name}` has shape {}, expected rank 4: {axes}, head-major as \
             F.scaled_dot_product_attention takes it (from [batch, len, heads * dim], \
             .view(batch, len, heads, dim).transpose(1, 2))",
            Shape(t.shape().to_vec())
        )));
    }
    Ok(t)
}

/// `∂L/∂out`, if the file holds it: shaped like the output, `[batch, heads, q_len,
/// head_dim_v]` (its finiteness was checked when the file was read).
fn take_grad_out(file: &mut TensorFile, out: [usize; 4]) -> Result<Option<Tensor>, CliError> {
    match file.take("grad_out") {
        Some(g) if g.shape() != out => Err(file.error(format!(
            "tensor `grad_out` has shape {}, expected {} ([batch, heads, q_len, head_dim_v], \
             the shape of `out`: the gradient of the loss with respect to each output element)",
            Shape(g.shape().to_vec()),
            Shape(out.to_vec())
        ))),
        g => Ok(g),
    }
}

/// The key mask as keep flags `[batch, kv_len]`, if the file holds one.
fn take_mask(
    file: &mut TensorFile,
    batch: usize,
    kv_len: usize,
) -> Result<Option<Tensor>, CliError> {
    match file.take("key_mask") {
        Some(m) if m.shape() != [batch, kv_len] => Err(file.error(format!(
            "tensor `key_mask` has shape {}, expected [{batch}, {kv_len}] ([batch, kv_len] from \
             `q` and `k`, nonzero = attend)",
            Shape(m.shape().to_vec())
        ))),
        m => Ok(m),
    }
}

/// The additive bias `[batch or 1, heads or 1, q_len, kv_len]`, if the file holds one.
fn take_bias(
    file: &mut TensorFile,
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
) -> Result<Option<Tensor>, CliError> {
    let Some(t) = file.take("attn_bias") else {
        return Ok(None);
    };
    let fits = |d: usize, full: usize| d == full || d == 1;
    match *t.shape() {
        [b, h, q, kv] if fits(b, batch) && fits(h, heads) && q == q_len && kv == kv_len => {
            Ok(Some(t))
        }
        _ => {
            let either = |full: usize| {
                if full == 1 {
                    "1".to_string()
                } else {
                    format!("{full} or 1")
                }
            };
            let rank2 = if t.shape().len() == 2 {
                "; a [q_len, kv_len] bias is saved as bias[None, None]"
            } else {
                ""
            };
            Err(file.error(format!(
                "tensor `attn_bias` has shape {}, expected [{}, {}, {q_len}, {kv_len}] ([batch \
                 or 1, heads or 1, q_len, kv_len] from `q` and `k`; 1 is broadcast){rank2}",
                Shape(t.shape().to_vec()),
                either(batch),
                either(heads)
            )))
        }
    }
}

/// The keys each batch row keeps; refuses, unless allowed, a batch row or query left with no
/// key at all: by a mask, which is likelier saved in the opposite convention than meant, or by
/// causal masking with more queries than keys, where PyTorch's `is_causal` and this program
/// align the queries differently.
fn check_masked_rows(
    file: &TensorFile,
    inputs: &OperatorInputs,
    options: &OperatorOptions,
    q_len: usize,
    kv_len: usize,
) -> Result<Option<Vec<usize>>, CliError> {
    let rows: Vec<Vec<bool>> = match &inputs.key_mask {
        Some(m) => m
            .data()
            .chunks(kv_len)
            .map(|r| r.iter().map(|&x| x != 0.0).collect())
            .collect(),
        None => vec![vec![true; kv_len]],
    };
    let kept: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().filter(|&&k| k).count())
        .collect();
    let masks = inputs.key_mask.is_some();
    if options.allow_masked_rows {
        return Ok(masks.then_some(kept));
    }
    let hint = "If queries with nothing to attend are meant, pass --allow-masked-rows: their \
                output is zeros (PyTorch gives NaN)";
    if let Some(b) = kept.iter().position(|&k| k == 0) {
        return Err(file.error(format!(
            "`key_mask` masks every key of batch row {b}, so its queries have nothing to \
             attend. `key_mask` is read as nonzero = attend, 0 = padding (PyTorch's boolean \
             attn_mask convention; nn.MultiheadAttention's key_padding_mask is the opposite, \
             True = padding). {hint}"
        )));
    }
    if options.causal {
        // Query i sees keys j <= i + kv_len - q_len: those before the first kept key's
        // query see none.
        for (b, row) in rows.iter().enumerate() {
            let first = row.iter().position(|&k| k).unwrap_or(kv_len);
            let blind = (first + q_len).saturating_sub(kv_len).min(q_len);
            if blind > 0 {
                let why = if first == 0 {
                    format!(
                        "there are {q_len} queries but only {kv_len} keys, and causal masking \
                         aligns the queries to the end of the keys (query i sees keys j <= i + \
                         kv_len - q_len, as a KV cache needs; PyTorch's is_causal aligns to the \
                         top left instead)"
                    )
                } else {
                    format!(
                        "`key_mask` masks keys 0..{first} of batch row {b}, and causal masking \
                         (aligned to the end of the keys) lets query i see keys j <= i + {}",
                        kv_len as isize - q_len as isize
                    )
                };
                return Err(file.error(format!(
                    "with --causal, queries 0..{blind} of batch row {b} have no key to attend: \
                     {why}. {hint}"
                )));
            }
        }
    }
    Ok(masks.then_some(kept))
}
