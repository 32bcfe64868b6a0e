//! From the named tensors of an input file to a layer: its configuration, weights and inputs.
//!
//! Every size is derived from the tensors themselves (d_model from `x`, head widths from `w_q`
//! and `w_v` and `--heads`, the output projection from `w_o`), and every shape is checked here,
//! in the layout the file uses, so that messages show shapes as the user saved them rather
//! than as the library sees them after transposition.

use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionWeights, Shape, Tensor};

use super::CliError;
use super::files::{Kind, TensorFile};

/// Every tensor name the program reads, with how its dtype is accepted.
pub const TENSORS: [(&str, Kind); 10] = [
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
];

/// How the weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, applied as `x @ W` (the worked example's layout and the library's).
    XW,
    /// PyTorch `nn.Linear.weight`: `[out_features, in_features]`.
    Torch,
}

impl WeightLayout {
    fn describe(self) -> &'static str {
        match self {
            WeightLayout::XW => "in the x @ W layout [in, out]",
            WeightLayout::Torch => {
                "in PyTorch's nn.Linear layout [out_features, in_features], as --torch-layout asks"
            }
        }
    }

    /// What to say when a matrix fits only once transposed.
    fn transposed_hint(self) -> &'static str {
        match self {
            WeightLayout::XW => {
                "it looks transposed: weights saved from PyTorch's nn.Linear are \
                 [out_features, in_features], so pass --torch-layout"
            }
            WeightLayout::Torch => {
                "it looks transposed: weights in the x @ W layout are [in, out], so drop \
                 --torch-layout"
            }
        }
    }

    /// Orders the two sides of a matrix as this layout stores them.
    fn order<T>(self, input: T, output: T) -> [T; 2] {
        match self {
            WeightLayout::XW => [input, output],
            WeightLayout::Torch => [output, input],
        }
    }
}

/// The choices the command line makes about the layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Number of heads the projections' widths are split into.
    pub heads: usize,
    /// Score scale; `None` for `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Query `i` attends only keys `j <= i`.
    pub causal: bool,
    /// How the weight matrices are stored.
    pub layout: WeightLayout,
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
    name: &'static str,
    dims: Vec<Dim>,
    layout: Option<WeightLayout>,
}

impl Expected {
    fn vector(name: &'static str, dim: Dim) -> Self {
        Expected {
            name,
            dims: vec![dim],
            layout: None,
        }
    }

    fn matrix(name: &'static str, layout: WeightLayout, input: Dim, output: Dim) -> Self {
        Expected {
            name,
            dims: layout.order(input, output).to_vec(),
            layout: Some(layout),
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
            self.name,
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
    let heads = options.heads;
    let layout = options.layout;
    let d_model_dim = known(d_model, "d_model");

    let w_q = require(
        file,
        Expected::matrix("w_q", layout, d_model_dim, free("heads*head_dim")),
    )?;
    let head_dim = split_heads(file, "w_q", &w_q, layout, heads, "heads*head_dim")?;
    let qk = known(heads * head_dim, "heads*head_dim");
    let w_k = require(file, Expected::matrix("w_k", layout, d_model_dim, qk))?;
    let w_v = require(
        file,
        Expected::matrix("w_v", layout, d_model_dim, free("heads*head_dim_v")),
    )?;
    let head_dim_v = split_heads(file, "w_v", &w_v, layout, heads, "heads*head_dim_v")?;
    let v = known(heads * head_dim_v, "heads*head_dim_v");

    let b_q = take(file, Expected::vector("b_q", qk))?;
    let b_k = take(file, Expected::vector("b_k", qk))?;
    let b_v = take(file, Expected::vector("b_v", v))?;
    let w_o = take(file, Expected::matrix("w_o", layout, v, free("d_out")))?;
    let b_o = take_output_bias(file, w_o.as_ref(), layout)?;
    let key_mask = take_key_mask(file, batch, seq, unbatched)?;

    let mut config =
        AttentionConfig::new(batch, seq, d_model, heads, head_dim).with_head_dim_v(head_dim_v);
    config.scale = options.scale;
    config.causal = options.causal;
    config.key_padding_mask = key_mask.is_some();
    let to_xw = |t: Tensor| match layout {
        WeightLayout::XW => t,
        WeightLayout::Torch => transpose(&t),
    };
    if let Some(w_o) = &w_o {
        config = config.with_output_projection(w_o_width(w_o, layout));
    }
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
    let inputs = AttentionInputs { x, key_mask };
    // The checks above cover shapes; these catch what is left (zero sizes, a bad scale) with
    // the library's own messages.
    weights
        .validate(&config)
        .and_then(|()| inputs.validate(&config))
        .map_err(|e| file.error(e.to_string()))?;
    Ok(Layer {
        config,
        weights,
        inputs,
        unbatched,
    })
}

/// `x` as `[batch, seq, d_model]`, and whether it was saved without the batch axis.
fn take_x(file: &mut TensorFile) -> Result<(Tensor, bool), CliError> {
    const SHAPES: &str = "[batch, seq, d_model] or [seq, d_model]";
    let Some(x) = file.take("x") else {
        return Err(file.error(format!(
            "missing tensor `x`, the input {SHAPES}; the file holds {}",
            file.names()
        )));
    };
    match *x.shape() {
        [_, _, _] => Ok((x, false)),
        [seq, d_model] => Ok((reshape(file, &x, vec![1, seq, d_model])?, true)),
        _ => Err(file.error(format!(
            "tensor `x` has shape {}, expected {SHAPES}",
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
            expected.name,
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

/// Width per head of a projection whose output side is `heads * width`.
fn split_heads(
    file: &TensorFile,
    name: &str,
    w: &Tensor,
    layout: WeightLayout,
    heads: usize,
    meaning: &str,
) -> Result<usize, CliError> {
    let (side, width) = match layout {
        WeightLayout::XW => ("columns", w.shape()[1]),
        WeightLayout::Torch => ("rows", w.shape()[0]),
    };
    if heads > 0 && width % heads == 0 {
        return Ok(width / heads);
    }
    Err(file.error(format!(
        "tensor `{name}` has shape {}: its {width} {side} ({meaning}) cannot be split into \
         --heads {heads} equal heads",
        Shape(w.shape().to_vec())
    )))
}

/// The output width `d_out` of `w_o` as stored.
fn w_o_width(w_o: &Tensor, layout: WeightLayout) -> usize {
    match layout {
        WeightLayout::XW => w_o.shape()[1],
        WeightLayout::Torch => w_o.shape()[0],
    }
}

fn take_output_bias(
    file: &mut TensorFile,
    w_o: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Option<Tensor>, CliError> {
    match w_o {
        Some(w_o) => take(
            file,
            Expected::vector("b_o", known(w_o_width(w_o, layout), "d_out")),
        ),
        None if file.holds("b_o") => Err(file.error(
            "tensor `b_o` was given but there is no output projection `w_o` for it to bias",
        )),
        None => Ok(None),
    }
}

/// The key-padding mask as `[batch, seq]`, if the file holds one.
fn take_key_mask(
    file: &mut TensorFile,
    batch: usize,
    seq: usize,
    unbatched: bool,
) -> Result<Option<Tensor>, CliError> {
    let dims = if unbatched {
        vec![known(seq, "seq")]
    } else {
        vec![known(batch, "batch"), known(seq, "seq")]
    };
    let expected = Expected {
        name: "key_mask",
        dims,
        layout: None,
    };
    match take(file, expected)? {
        Some(mask) if unbatched => Ok(Some(reshape(file, &mask, vec![1, seq])?)),
        mask => Ok(mask),
    }
}

fn reshape(file: &TensorFile, t: &Tensor, shape: Vec<usize>) -> Result<Tensor, CliError> {
    t.reshape(shape).map_err(|e| file.error(e.to_string()))
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(t: &Tensor) -> Tensor {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let data = (0..cols * rows)
        .map(|i| t.data()[(i % rows) * cols + i / rows])
        .collect();
    Tensor::new([cols, rows], data).expect("a transpose keeps the element count")
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "w_k",
            WeightLayout::Torch,
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
        assert!(message.contains("drop --torch-layout"), "{message}");
    }

    #[test]
    fn a_free_dimension_fits_any_size() {
        let e = Expected::matrix(
            "w_q",
            WeightLayout::XW,
            known(4, "d_model"),
            free("heads*head_dim"),
        );
        assert!(e.fits(&[4, 1]) && e.fits(&[4, 100]));
        let message = e.mismatch(&[3, 4]);
        assert!(
            message.contains("expected [4, heads*head_dim]"),
            "{message}"
        );
        assert!(message.contains("pass --torch-layout"), "{message}");
        assert!(!e.mismatch(&[5, 5]).contains("--torch-layout"));
    }
}
