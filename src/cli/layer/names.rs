//! The weights' names and layout: this program's names, PyTorch's and Hugging Face's, and
//! which of `[in, out]` and `[out, in]` the matrices are stored in.

use wgpu_attention::{Shape, Tensor};

use super::super::CliError;
use super::super::files::TensorFile;

/// This program's names for the weights, which say nothing about their layout.
pub(super) const OWN_WEIGHTS: [&str; 8] = ["w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o"];

/// PyTorch's and Hugging Face's names for the same weights, and the name each stands for here.
/// Their matrices are always `nn.Linear.weight`, `[out_features, in_features]`.
pub(super) const TORCH_WEIGHTS: [(&str, &str); 16] = [
    ("query.weight", "w_q"),
    ("query.bias", "b_q"),
    ("key.weight", "w_k"),
    ("key.bias", "b_k"),
    ("value.weight", "w_v"),
    ("value.bias", "b_v"),
    ("q_proj.weight", "w_q"),
    ("q_proj.bias", "b_q"),
    ("k_proj.weight", "w_k"),
    ("k_proj.bias", "b_k"),
    ("v_proj.weight", "w_v"),
    ("v_proj.bias", "b_v"),
    ("out_proj.weight", "w_o"),
    ("out_proj.bias", "b_o"),
    ("in_proj_weight", "w_q, w_k, w_v"),
    ("in_proj_bias", "b_q, b_k, b_v"),
];

/// How the weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, applied as `x @ W` (the worked example's layout and the library's).
    XW,
    /// PyTorch `nn.Linear.weight`: `[out_features, in_features]`.
    Torch,
}

/// What decided the layout, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayoutFrom {
    /// `--layout` or `--torch-layout`.
    Flag,
    /// No flag: a non-square matrix, which fits only one way, lets the default stand.
    Default,
    /// PyTorch's own tensor names.
    Names,
}

/// A layout and what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) layout: WeightLayout,
    pub(super) from: LayoutFrom,
}

impl Layout {
    pub(super) fn describe(self) -> &'static str {
        match (self.layout, self.from) {
            (WeightLayout::XW, _) => "in the x @ W layout [in, out]",
            (WeightLayout::Torch, LayoutFrom::Names) => {
                "in PyTorch's nn.Linear layout [out_features, in_features], as PyTorch's names \
                 mean"
            }
            (WeightLayout::Torch, _) => {
                "in PyTorch's nn.Linear layout [out_features, in_features], as --layout torch \
                 asks"
            }
        }
    }

    /// What to say when a matrix fits only once transposed.
    pub(super) fn transposed_hint(self) -> &'static str {
        match (self.layout, self.from) {
            (WeightLayout::XW, _) => {
                "it looks transposed: weights saved from PyTorch's nn.Linear are \
                 [out_features, in_features], so pass --layout torch"
            }
            (WeightLayout::Torch, LayoutFrom::Names) => {
                "it looks transposed: under PyTorch's names, save nn.Linear's weight as it is, \
                 not its .T"
            }
            (WeightLayout::Torch, _) => {
                "it looks transposed: weights in the x @ W layout are [in, out], so pass \
                 --layout xw"
            }
        }
    }

    /// Orders the two sides of a matrix as this layout stores them.
    pub(super) fn order<T>(self, input: T, output: T) -> [T; 2] {
        match self.layout {
            WeightLayout::XW => [input, output],
            WeightLayout::Torch => [output, input],
        }
    }

    /// The output side of a matrix as stored.
    pub(super) fn width(self, w: &Tensor) -> usize {
        match self.layout {
            WeightLayout::XW => w.shape()[1],
            WeightLayout::Torch => w.shape()[0],
        }
    }
}

/// How the file named its weights: the name each was saved under, and the layout.
#[derive(Debug, Clone)]
pub(super) struct Names {
    pub(super) shown: Vec<(&'static str, String)>,
    pub(super) layout: Layout,
}

impl Names {
    /// The name the user saved `name` under.
    pub(super) fn shown(&self, name: &str) -> String {
        self.shown
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name.to_string(), |(_, s)| s.clone())
    }
}

/// Reads PyTorch's and Hugging Face's names as this program's, and decides the layout.
///
/// Their names fix the layout (`nn.Linear.weight`, `[out, in]`); this program's names do not,
/// so when every matrix is square, and so fits either way, the command line must say.
pub(super) fn resolve_names(
    file: &mut TensorFile,
    d_model: usize,
    flag: Option<WeightLayout>,
) -> Result<Names, CliError> {
    let own: Vec<&str> = OWN_WEIGHTS
        .iter()
        .copied()
        .filter(|n| file.holds(n))
        .collect();
    let torch: Vec<(&str, &str)> = TORCH_WEIGHTS
        .iter()
        .copied()
        .filter(|(n, _)| file.holds(n))
        .collect();
    if let (Some(o), Some((t, _))) = (own.first(), torch.first()) {
        return Err(file.error(format!(
            "the file mixes this program's names (`{o}`) with PyTorch's (`{t}`); save every \
             weight under one convention, so their layout is known"
        )));
    }
    if torch.is_empty() {
        let layout = match flag {
            Some(layout) => Layout {
                layout,
                from: LayoutFrom::Flag,
            },
            None => {
                let matrices: Vec<Vec<usize>> = ["w_q", "w_k", "w_v", "w_o"]
                    .iter()
                    .filter_map(|n| file.shape(n))
                    .collect();
                if !matrices.is_empty() && matrices.iter().all(|s| s.len() == 2 && s[0] == s[1]) {
                    return Err(CliError::Usage(
                        "every weight matrix is square, so its shape cannot tell PyTorch's \
                         nn.Linear layout [out_features, in_features] from the x @ W layout \
                         [in, out], and the wrong one gives wrong numbers: pass --layout torch \
                         for weights saved from nn.Linear, or --layout xw"
                            .into(),
                    ));
                }
                Layout {
                    layout: WeightLayout::XW,
                    from: LayoutFrom::Default,
                }
            }
        };
        return Ok(Names {
            shown: Vec::new(),
            layout,
        });
    }
    if flag == Some(WeightLayout::XW) {
        return Err(CliError::Usage(format!(
            "--layout xw contradicts the file's PyTorch names (`{}`), whose matrices are \
             nn.Linear's [out_features, in_features]: drop the flag",
            torch[0].0
        )));
    }
    let mut shown: Vec<(&'static str, String)> = Vec::new();
    let mut claim = |ours: &'static str, theirs: &str| -> Result<(), String> {
        if let Some((_, earlier)) = shown.iter().find(|(n, _)| *n == ours) {
            return Err(format!(
                "`{earlier}` and `{theirs}` both give `{ours}`; keep one of them"
            ));
        }
        shown.push((ours, theirs.to_string()));
        Ok(())
    };
    for (theirs, ours) in &torch {
        match *theirs {
            "in_proj_weight" => ["w_q", "w_k", "w_v"]
                .iter()
                .try_for_each(|o| claim(o, "in_proj_weight"))
                .map_err(|e| file.error(e))?,
            "in_proj_bias" => ["b_q", "b_k", "b_v"]
                .iter()
                .try_for_each(|o| claim(o, "in_proj_bias"))
                .map_err(|e| file.error(e))?,
            _ => {
                let ours = OWN_WEIGHTS
                    .iter()
                    .find(|o| *o == ours)
                    .expect("every PyTorch name maps to one of ours");
                claim(ours, theirs).map_err(|e| file.error(e))?;
                let t = file.take(theirs).expect("held, so present");
                file.put(ours, t);
            }
        }
    }
    if let Some(w) = file.take("in_proj_weight") {
        // nn.MultiheadAttention's packed projections: [3E, E], queries, keys, values.
        if w.shape() != [3 * d_model, d_model] {
            return Err(file.error(format!(
                "tensor `in_proj_weight` has shape {}, expected [{}, {d_model}] ([3*d_model, \
                 d_model], nn.MultiheadAttention's queries, keys and values stacked)",
                Shape(w.shape().to_vec()),
                3 * d_model
            )));
        }
        for (i, name) in ["w_q", "w_k", "w_v"].into_iter().enumerate() {
            let part = &w.data()[i * d_model * d_model..(i + 1) * d_model * d_model];
            let t = Tensor::new([d_model, d_model], part.to_vec())?;
            file.put(name, t);
        }
    }
    if let Some(b) = file.take("in_proj_bias") {
        if b.shape() != [3 * d_model] {
            return Err(file.error(format!(
                "tensor `in_proj_bias` has shape {}, expected [{}] ([3*d_model])",
                Shape(b.shape().to_vec()),
                3 * d_model
            )));
        }
        for (i, name) in ["b_q", "b_k", "b_v"].into_iter().enumerate() {
            let t = Tensor::new([d_model], b.data()[i * d_model..(i + 1) * d_model].to_vec())?;
            file.put(name, t);
        }
    }
    Ok(Names {
        shown,
        layout: Layout {
            layout: WeightLayout::Torch,
            from: LayoutFrom::Names,
        },
    })
}
