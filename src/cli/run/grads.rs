//! `run` with `grad_out` in a layer file: the layer's backward on the GPU, each gradient
//! checked against the f64 reference (`reference::layer_backward`) before anything is written.

use wgpu_attention::{Tensor, compare, compare_bounded, reference};

use super::super::layer::{self, Layer, WeightLayout};
use super::{CheckRule, Checked, CliError};

/// The gradients the layer's backward gives, named as written: `grad_x`, `grad_w_q`,
/// `grad_w_k`, `grad_w_v`, and `grad_b_q`, `grad_b_k`, `grad_b_v`, `grad_w_o`, `grad_b_o`
/// where the layer has those tensors.
pub(super) fn named(g: reference::LayerGrads) -> Vec<(&'static str, Tensor)> {
    let mut named = vec![
        ("grad_x", g.x),
        ("grad_w_q", g.w_q),
        ("grad_w_k", g.w_k),
        ("grad_w_v", g.w_v),
    ];
    for (name, t) in [
        ("grad_b_q", g.b_q),
        ("grad_b_k", g.b_k),
        ("grad_b_v", g.b_v),
        ("grad_w_o", g.w_o),
        ("grad_b_o", g.b_o),
    ] {
        named.extend(t.map(|t| (name, t)));
    }
    named
}

/// Each element of a gradient within `1e-4 · max|reference| + 1e-5` of the reference: the
/// rule the library's backward tests hold its gradients to. A gradient element sums many
/// terms of both signs, so its own size says little of its error; the tensor's largest does.
pub(super) fn gradient_bound(cpu: &Tensor) -> Result<Tensor, CliError> {
    let largest = cpu.data().iter().fold(0f32, |m, x| m.max(x.abs()));
    let allowed = 1e-4 * largest + 1e-5;
    Ok(Tensor::new(cpu.shape().to_vec(), vec![allowed; cpu.len()])?)
}

/// Checks `gpu` gradients against `cpu` ones of the same names, under the gradient rule, or
/// the user's fixed rule when given.
pub(super) fn check(
    gpu: Vec<(&'static str, Tensor)>,
    cpu: Vec<(&'static str, Tensor)>,
    rule: CheckRule,
) -> Result<Vec<Checked>, CliError> {
    let mut checked = Vec::new();
    for (name, gpu) in gpu {
        let Some((_, cpu)) = cpu.iter().find(|(n, _)| *n == name) else {
            return Err(CliError::Usage(format!(
                "the GPU gave `{name}` but the reference did not"
            )));
        };
        let comparison = match rule {
            CheckRule::Fixed(tolerance) => compare(&gpu, cpu, tolerance)?,
            CheckRule::Bound => compare_bounded(&gpu, cpu, &gradient_bound(cpu)?)?,
        };
        checked.push(Checked {
            name,
            gpu,
            comparison,
        });
    }
    Ok(checked)
}

/// The layer's gradients from the reference, and the GPU's (`gpu`), in the file's own layout:
/// weight gradients transposed back when its weights are PyTorch's `[out, in]`.
pub(super) fn check_layer(
    layer: &Layer,
    gpu: reference::LayerGrads,
    rule: CheckRule,
) -> Result<Vec<Checked>, CliError> {
    let Some(grad_out) = &layer.grad_out else {
        return Ok(Vec::new());
    };
    let cpu = reference::layer_backward(&layer.config, &layer.weights, &layer.inputs, grad_out)?;
    let as_filed = |named: Vec<(&'static str, Tensor)>| -> Vec<(&'static str, Tensor)> {
        named
            .into_iter()
            .map(|(name, t)| match layer.weight_layout {
                WeightLayout::Torch if name.starts_with("grad_w_") => (name, layer::transpose(&t)),
                _ => (name, t),
            })
            .collect()
    };
    check(as_filed(named(gpu)), as_filed(named(cpu)), rule)
}

/// Whether a written tensor has the batch axis (which an unbatched `x` drops): everything
/// but the weights' gradients.
pub(super) fn batched(name: &str) -> bool {
    !(name.starts_with("grad_w_") || name.starts_with("grad_b_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradient_rule_scales_with_the_largest_element() {
        let cpu = Tensor::new([3], vec![-200.0, 1.0, 0.0]).unwrap();
        let bound = gradient_bound(&cpu).unwrap();
        assert_eq!(bound.data(), &[0.02001f32; 3]);
        let gpu = Tensor::new([3], vec![-200.01, 1.019, 0.021]).unwrap();
        let c = check(vec![("g", gpu)], vec![("g", cpu)], CheckRule::Bound).unwrap();
        assert_eq!(c[0].comparison.failures, 1);
        assert_eq!(c[0].comparison.worst_at.index, vec![2]);
    }
}
