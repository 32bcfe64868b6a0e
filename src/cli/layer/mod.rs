//! From the named tensors of an input file to a layer: its configuration, weights and inputs.
//!
//! Every size is derived from the tensors themselves (d_model from `x`, head widths from `w_q`
//! and `w_v` and `--heads`, the output projection from `w_o`), and every shape is checked here,
//! in the layout the file uses, so that messages show shapes as the user saved them rather
//! than as the library sees them after transposition.

use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionWeights, Shape, Tensor};

use super::CliError;
use super::files::{Kind, TensorFile};

mod names;

pub use names::WeightLayout;
use names::{Layout, LayoutFrom, Names, resolve_names};

/// Every tensor name the program reads, with how its dtype is accepted.
pub const TENSORS: [(&str, Kind); 31] = [
    ("x", Kind::Float),
    ("w_q", Kind::Float),
    ("w_k", Kind::Float),
    ("w_v", Kind::Float),
    ("b_q", Kind::Float),
    ("b_k", Kind::Float),
    ("b_v", Kind::Float),
    ("w_o", Kind::Float),
    ("b_o", Kind::Float),
    ("key_mask", Kind::Mask),
    ("attention_mask", Kind::Mask),
    ("key_padding_mask", Kind::PaddingMask),
    ("additive_key_mask", Kind::Additive),
    ("in_proj_weight", Kind::Float),
    ("in_proj_bias", Kind::Float),
    ("out_proj.weight", Kind::Float),
    ("out_proj.bias", Kind::Float),
    ("query.weight", Kind::Float),
    ("query.bias", Kind::Float),
    ("key.weight", Kind::Float),
    ("key.bias", Kind::Float),
    ("value.weight", Kind::Float),
    ("value.bias", Kind::Float),
    ("q_proj.weight", Kind::Float),
    ("q_proj.bias", Kind::Float),
    ("k_proj.weight", Kind::Float),
    ("k_proj.bias", Kind::Float),
    ("v_proj.weight", Kind::Float),
    ("v_proj.bias", Kind::Float),
    ("hidden_states", Kind::Float),
    ("grad_out", Kind::Float),
];

/// The names a key mask may have, each with its own convention (see [`Kind`]).
const MASKS: [&str; 4] = [
    "key_mask",
    "attention_mask",
    "key_padding_mask",
    "additive_key_mask",
];

/// The choices the command line makes about the layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Number of heads the projections' widths are split into; `None` when not given, which
    /// is accepted only when the widths allow a single count.
    pub heads: Option<usize>,
    /// Score scale; `None` for `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Query `i` attends only keys `j <= i`.
    pub causal: bool,
    /// How the weight matrices are stored, if the command line says.
    pub layout: Option<WeightLayout>,
    /// Run even when a batch row or a query has every key masked (its output is zeros).
    pub allow_masked_rows: bool,
}

/// A layer ready to run, as the library takes it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's sizes and options.
    pub config: AttentionConfig,
    /// Weights in the library's `x @ W` layout.
    pub weights: AttentionWeights,
    /// `x` as `[batch, seq, d_model]` and the mask as `[batch, seq]`.
    pub inputs: AttentionInputs,
    /// `x` was `[seq, d_model]`: results are written without their batch axis.
    pub unbatched: bool,
    /// The mask's name in the file and the keys each batch row keeps, if there is a mask.
    pub mask: Option<(&'static str, Vec<usize>)>,
    /// How the weights were read, for the report.
    pub layout: String,
    /// How the file stores its weight matrices: their gradients are written the same way.
    pub weight_layout: WeightLayout,
    /// `∂L/∂out` as `[batch, seq, d_out]`, if the file holds `grad_out`: then the backward
    /// runs too.
    pub grad_out: Option<Tensor>,
}

/// One dimension of an expected shape: a size where it is known, and always its meaning.
#[derive(Debug, Clone, Copy)]
struct Dim {
    size: Option<usize>,
    name: &'static str,
}

fn known(size: usize, name: &'static str) -> Dim {
    Dim {
        size: Some(size),
        name,
    }
}

fn free(name: &'static str) -> Dim {
    Dim { size: None, name }
}

/// A tensor's expected shape, and for matrices the layout it is stored in.
#[derive(Debug, Clone)]
struct Expected {
    /// The name the tensor is taken under.
    name: &'static str,
    /// The name the user saved it under, for messages.
    shown: String,
    dims: Vec<Dim>,
    layout: Option<Layout>,
}

impl Expected {
    fn vector(names: &Names, name: &'static str, dim: Dim) -> Self {
        Expected {
            name,
            shown: names.shown(name),
            dims: vec![dim],
            layout: None,
        }
    }

    fn matrix(names: &Names, name: &'static str, input: Dim, output: Dim) -> Self {
        Expected {
            name,
            shown: names.shown(name),
            dims: names.layout.order(input, output).to_vec(),
            layout: Some(names.layout),
        }
    }

    fn fits(&self, shape: &[usize]) -> bool {
        shape.len() == self.dims.len()
            && shape
                .iter()
                .zip(&self.dims)
                .all(|(&s, d)| d.size.is_none_or(|size| size == s))
    }

    /// A matrix that fits only the other way round was most likely saved in the other layout.
    fn looks_transposed(&self, shape: &[usize]) -> bool {
        let reversed: Vec<usize> = shape.iter().rev().copied().collect();
        self.layout.is_some() && shape.len() == 2 && self.fits(&reversed)
    }

    /// "[4, 3] ([d_model, heads*head_dim] in the x @ W layout [in, out])".
    fn describe(&self) -> String {
        let concrete: Vec<String> = self
            .dims
            .iter()
            .map(|d| d.size.map_or(d.name.to_string(), |s| s.to_string()))
            .collect();
        let symbolic: Vec<&str> = self.dims.iter().map(|d| d.name).collect();
        let layout = self
            .layout
            .map_or(String::new(), |l| format!(" {}", l.describe()));
        format!(
            "[{}] ([{}]{layout})",
            concrete.join(", "),
            symbolic.join(", ")
        )
    }

    fn mismatch(&self, shape: &[usize]) -> String {
        let mut message = format!(
            "tensor `{}` has shape {}, expected {}",
            self.shown,
            Shape(shape.to_vec()),
            self.describe()
        );
        if let Some(layout) = self.layout.filter(|_| self.looks_transposed(shape)) {
            message.push_str("; ");
            message.push_str(layout.transposed_hint());
        }
        message
    }
}

/// Builds the layer from `file`'s tensors, checking every shape and value.
pub fn build(file: &mut TensorFile, options: &LayerOptions) -> Result<Layer, CliError> {
    let (x, unbatched) = take_x(file)?;
    let [batch, seq, d_model] = [x.shape()[0], x.shape()[1], x.shape()[2]];
    let names = resolve_names(file, d_model, options.layout)?;
    let d_model_dim = known(d_model, "d_model");

    let w_q = require(
        file,
        Expected::matrix(&names, "w_q", d_model_dim, free("heads*head_dim")),
    )?;
    let width_q = names.layout.width(&w_q);
    let qk = known(width_q, "heads*head_dim");
    let w_k = require(file, Expected::matrix(&names, "w_k", d_model_dim, qk))?;
    let w_v = require(
        file,
        Expected::matrix(&names, "w_v", d_model_dim, free("heads*head_dim_v")),
    )?;
    let width_v = names.layout.width(&w_v);
    let heads = choose_heads(file, &names, options.heads, width_q, width_v)?;
    let (head_dim, head_dim_v) = (width_q / heads, width_v / heads);
    let v = known(width_v, "heads*head_dim_v");

    let b_q = take(file, Expected::vector(&names, "b_q", qk))?;
    let b_k = take(file, Expected::vector(&names, "b_k", qk))?;
    let b_v = take(file, Expected::vector(&names, "b_v", v))?;
    let w_o = take(file, Expected::matrix(&names, "w_o", v, free("d_out")))?;
    let b_o = take_output_bias(file, &names, w_o.as_ref())?;
    let key_mask = take_key_mask(file, batch, seq, unbatched)?;
    let mask = match &key_mask {
        Some((name, m)) => Some((
            *name,
            check_masked_rows(file, name, m, options.causal, options.allow_masked_rows)?,
        )),
        None => None,
    };

    let mut config =
        AttentionConfig::new(batch, seq, d_model, heads, head_dim).with_head_dim_v(head_dim_v);
    config.scale = options.scale;
    config.causal = options.causal;
    config.key_padding_mask = key_mask.is_some();
    let to_xw = |t: Tensor| match names.layout.layout {
        WeightLayout::XW => t,
        WeightLayout::Torch => transpose(&t),
    };
    if let Some(w_o) = &w_o {
        config = config.with_output_projection(names.layout.width(w_o));
    }
    let grad_out = take_grad_out(file, &config, unbatched)?;
    config.gradients = grad_out.is_some();
    let weights = AttentionWeights {
        w_q: to_xw(w_q),
        w_k: to_xw(w_k),
        w_v: to_xw(w_v),
        b_q,
        b_k,
        b_v,
        w_o: w_o.map(to_xw),
        b_o,
    };
    let inputs = AttentionInputs {
        x,
        key_mask: key_mask.map(|(_, m)| m),
    };
    // The checks above cover shapes; these catch what is left (zero sizes, a bad scale) with
    // the library's own messages.
    weights
        .validate(&config)
        .and_then(|()| inputs.validate(&config))
        .map_err(|e| file.error(e.to_string()))?;
    let layout = match names.layout.from {
        LayoutFrom::Names => format!("{} (PyTorch's names)", names.layout.describe()),
        LayoutFrom::Flag => names.layout.describe().to_string(),
        LayoutFrom::Default => format!(
            "{} (the default; a non-square weight fits no other)",
            names.layout.describe()
        ),
    };
    Ok(Layer {
        config,
        weights,
        inputs,
        unbatched,
        mask,
        layout,
        weight_layout: names.layout.layout,
        grad_out,
    })
}

/// `grad_out` (`∂L/∂out`, shaped like the output the layer writes) as `[batch, seq, d_out]`,
/// if the file holds it.
fn take_grad_out(
    file: &mut TensorFile,
    config: &AttentionConfig,
    unbatched: bool,
) -> Result<Option<Tensor>, CliError> {
    let [batch, seq, d_out] = config.output_shape();
    let mut dims = vec![known(seq, "seq"), known(d_out, "d_out")];
    if !unbatched {
        dims.insert(0, known(batch, "batch"));
    }
    let expected = Expected {
        name: "grad_out",
        shown: "grad_out".into(),
        dims,
        layout: None,
    };
    match take(file, expected)? {
        Some(g) if unbatched => Ok(Some(reshape(file, &g, vec![1, seq, d_out])?)),
        g => Ok(g),
    }
}

/// The head count: the one given, which must split both widths, or the only count that does.
fn choose_heads(
    file: &TensorFile,
    names: &Names,
    given: Option<usize>,
    width_q: usize,
    width_v: usize,
) -> Result<usize, CliError> {
    let side = match names.layout.layout {
        WeightLayout::XW => "columns",
        WeightLayout::Torch => "rows",
    };
    if let Some(heads) = given {
        for (name, width, meaning) in [
            ("w_q", width_q, "heads*head_dim"),
            ("w_v", width_v, "heads*head_dim_v"),
        ] {
            if heads == 0 || width % heads != 0 {
                return Err(file.error(format!(
                    "tensor `{}` has {width} {side} ({meaning}), which cannot be split into \
                     --heads {heads} equal heads",
                    names.shown(name)
                )));
            }
        }
        return Ok(heads);
    }
    let common = gcd(width_q, width_v);
    let counts: Vec<usize> = (1..=common).filter(|h| common.is_multiple_of(*h)).collect();
    if let [only] = counts[..] {
        return Ok(only);
    }
    let listed: Vec<String> = counts.iter().take(8).map(usize::to_string).collect();
    Err(CliError::Usage(format!(
        "--heads is required: the query width {width_q} and value width {width_v} split \
         evenly into {}{} heads, and each count gives different numbers; pass the model's \
         own (num_heads in nn.MultiheadAttention, num_attention_heads in a Hugging Face config)",
        listed.join(", "),
        if counts.len() > 8 { ", ..." } else { "" }
    )))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `x` (or Hugging Face's `hidden_states`) as `[batch, seq, d_model]`, and whether it was saved
/// without the batch axis.
fn take_x(file: &mut TensorFile) -> Result<(Tensor, bool), CliError> {
    const SHAPES: &str = "[batch, seq, d_model] or [seq, d_model]";
    if file.holds("x") && file.holds("hidden_states") {
        return Err(file.error("the file holds both `x` and `hidden_states`; keep one input"));
    }
    let name = if file.holds("hidden_states") {
        "hidden_states"
    } else {
        "x"
    };
    let Some(x) = file.take(name) else {
        return Err(file.error(format!(
            "missing tensor `x`, the input {SHAPES}; the file holds {}",
            file.names()
        )));
    };
    match *x.shape() {
        [_, _, _] => Ok((x, false)),
        [seq, d_model] => Ok((reshape(file, &x, vec![1, seq, d_model])?, true)),
        _ => Err(file.error(format!(
            "tensor `{name}` has shape {}, expected {SHAPES}",
            Shape(x.shape().to_vec())
        ))),
    }
}

/// The tensor `expected` names, which the file must hold.
fn require(file: &mut TensorFile, expected: Expected) -> Result<Tensor, CliError> {
    match take(file, expected.clone())? {
        Some(t) => Ok(t),
        None => Err(file.error(format!(
            "missing tensor `{}`, expected shape {}; the file holds {}",
            expected.shown,
            expected.describe(),
            file.names()
        ))),
    }
}

/// The tensor `expected` names if the file holds it, checked against the expected shape.
fn take(file: &mut TensorFile, expected: Expected) -> Result<Option<Tensor>, CliError> {
    match file.take(expected.name) {
        Some(t) if !expected.fits(t.shape()) => Err(file.error(expected.mismatch(t.shape()))),
        t => Ok(t),
    }
}

fn take_output_bias(
    file: &mut TensorFile,
    names: &Names,
    w_o: Option<&Tensor>,
) -> Result<Option<Tensor>, CliError> {
    match w_o {
        Some(w_o) => take(
            file,
            Expected::vector(names, "b_o", known(names.layout.width(w_o), "d_out")),
        ),
        None if file.take("b_o").is_some() => Err(file.error(format!(
            "tensor `{}` was given but there is no output projection `{}` for it to bias",
            names.shown("b_o"),
            if names.layout.from == LayoutFrom::Names {
                "out_proj.weight"
            } else {
                "w_o"
            }
        ))),
        None => Ok(None),
    }
}

/// The key mask as keep flags `[batch, seq]` (1 = attend) with its name, if the file holds one.
fn take_key_mask(
    file: &mut TensorFile,
    batch: usize,
    seq: usize,
    unbatched: bool,
) -> Result<Option<(&'static str, Tensor)>, CliError> {
    let held: Vec<&'static str> = MASKS.iter().copied().filter(|n| file.holds(n)).collect();
    let name = match held[..] {
        [] => return Ok(None),
        [name] => name,
        _ => {
            return Err(file.error(format!(
                "the file holds {} masks ({}); keep one, so which keys are padding is not a \
                 guess",
                held.len(),
                held.join(", ")
            )));
        }
    };
    let dims = if unbatched {
        vec![known(seq, "seq")]
    } else {
        vec![known(batch, "batch"), known(seq, "seq")]
    };
    let expected = Expected {
        name,
        shown: name.to_string(),
        dims,
        layout: None,
    };
    match take(file, expected)? {
        Some(mask) if unbatched => Ok(Some((name, reshape(file, &mask, vec![1, seq])?))),
        mask => Ok(mask.map(|m| (name, m))),
    }
}

/// The keys each batch row keeps; refuses, unless allowed, a batch row or query left with no
/// key at all, which is far likelier a mask saved in the opposite convention than meant.
fn check_masked_rows(
    file: &TensorFile,
    name: &str,
    mask: &Tensor,
    causal: bool,
    allow: bool,
) -> Result<Vec<usize>, CliError> {
    let seq = mask.shape()[1];
    let rows: Vec<&[f32]> = mask.data().chunks(seq.max(1)).collect();
    let kept: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().filter(|&&m| m != 0.0).count())
        .collect();
    if allow {
        return Ok(kept);
    }
    let convention = match name {
        "key_padding_mask" => "True = padding, PyTorch's convention",
        "additive_key_mask" => "0 = keep, -inf = drop",
        _ => "1 = real token, 0 = padding",
    };
    let hint = format!(
        "`{name}` is read as {convention}. A mask in another convention goes under its own name \
         (`key_mask` or `attention_mask`: 1 = real token; `key_padding_mask`: PyTorch's, True = \
         padding; `additive_key_mask`: 0 = keep, -inf = drop). If rows with nothing to attend \
         are meant, pass --allow-masked-rows: their output is zeros (PyTorch gives NaN)"
    );
    if let Some(b) = kept.iter().position(|&k| k == 0) {
        let all = kept.iter().filter(|&&k| k == 0).count();
        return Err(file.error(format!(
            "`{name}` masks every key of batch row {b}{}, so its queries have nothing to \
             attend. {hint}",
            if all > 1 {
                format!(" (and of {} other rows)", all - 1)
            } else {
                String::new()
            }
        )));
    }
    if causal {
        // A causal query i sees keys 0..=i, so the queries before the first kept key see none.
        for (b, row) in rows.iter().enumerate() {
            let first = row.iter().position(|&m| m != 0.0).unwrap_or(seq);
            if first > 0 {
                return Err(file.error(format!(
                    "with --causal, queries 0..{first} of batch row {b} see only keys that \
                     `{name}` masks, so they have nothing to attend. {hint}"
                )));
            }
        }
    }
    Ok(kept)
}

fn reshape(file: &TensorFile, t: &Tensor, shape: Vec<usize>) -> Result<Tensor, CliError> {
    t.reshape(shape).map_err(|e| file.error(e.to_string()))
}

/// `[rows, cols]` to `[cols, rows]`.
pub fn transpose(t: &Tensor) -> Tensor {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let data = (0..cols * rows)
        .map(|i| t.data()[(i % rows) * cols + i / rows])
        .collect();
    Tensor::new([cols, rows], data).expect("a transpose keeps the element count")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(layout: WeightLayout, from: LayoutFrom) -> Names {
        Names {
            shown: Vec::new(),
            layout: Layout { layout, from },
        }
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let t = Tensor::new([2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let tt = transpose(&t);
        assert_eq!(tt.shape(), &[3, 2]);
        assert_eq!(tt.data(), &[1., 4., 2., 5., 3., 6.]);
        assert_eq!(transpose(&tt), t);
    }

    #[test]
    fn expected_shapes_name_their_dimensions_and_layout() {
        let e = Expected::matrix(
            &names(WeightLayout::Torch, LayoutFrom::Flag),
            "w_k",
            known(4, "d_model"),
            known(6, "heads*head_dim"),
        );
        assert!(e.fits(&[6, 4]));
        assert!(!e.fits(&[4, 6]));
        let message = e.mismatch(&[4, 6]);
        assert!(
            message.starts_with(
                "tensor `w_k` has shape [4, 6], expected [6, 4] ([heads*head_dim, d_model] in \
                 PyTorch's nn.Linear layout"
            ),
            "{message}"
        );
        assert!(message.contains("pass --layout xw"), "{message}");
    }

    #[test]
    fn a_free_dimension_fits_any_size() {
        let e = Expected::matrix(
            &names(WeightLayout::XW, LayoutFrom::Default),
            "w_q",
            known(4, "d_model"),
            free("heads*head_dim"),
        );
        assert!(e.fits(&[4, 1]) && e.fits(&[4, 100]));
        let message = e.mismatch(&[3, 4]);
        assert!(
            message.contains("expected [4, heads*head_dim]"),
            "{message}"
        );
        assert!(message.contains("pass --layout torch"), "{message}");
        assert!(!e.mismatch(&[5, 5]).contains("--layout"));
    }

    #[test]
    fn heads_are_found_only_when_one_count_fits() {
        assert_eq!(gcd(12, 8), 4);
        assert_eq!(gcd(7, 5), 1);
    }
}
