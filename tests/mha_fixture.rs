//! An outside check of the conventions (scale, head split, mask sense, weight layout, biases,
//! output projection): `torch.nn.MultiheadAttention`'s own output on a tiny layer, stored with
//! its inputs and state_dict in tests/fixtures/mha.safetensors by
//! tests/fixtures/make_mha_fixture.py.

mod common;

use common::ctx;
use safetensors::SafeTensors;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, KernelChoice, Tensor,
    Tolerance, compare, reference,
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/mha.safetensors"
);

fn tensor(file: &SafeTensors, name: &str) -> Tensor {
    let view = file
        .tensor(name)
        .unwrap_or_else(|e| panic!("{FIXTURE}: {name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::new(view.shape().to_vec(), data).unwrap()
}

/// Rows `rows` of a row-major matrix `m`, transposed: PyTorch's `nn.Linear` computes
/// `x Wᵀ + b`, the crate `x W + b`.
fn rows_transposed(m: &Tensor, rows: std::ops::Range<usize>) -> Tensor {
    let cols = m.shape()[1];
    let mut data = Vec::with_capacity(rows.len() * cols);
    for c in 0..cols {
        for r in rows.clone() {
            data.push(m.data()[r * cols + c]);
        }
    }
    Tensor::new([cols, rows.len()], data).unwrap()
}

fn slice(v: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    Tensor::new([range.len()], v.data()[range].to_vec()).unwrap()
}

#[test]
fn matches_torch_multihead_attention() {
    let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let x = tensor(&file, "x");
    let (batch, seq, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let heads = 2;
    let in_w = tensor(&file, "in_proj_weight");
    let in_b = tensor(&file, "in_proj_bias");
    assert_eq!(in_w.shape(), [3 * d, d]);
    let weights = AttentionWeights::new(
        rows_transposed(&in_w, 0..d),
        rows_transposed(&in_w, d..2 * d),
        rows_transposed(&in_w, 2 * d..3 * d),
    )
    .with_qkv_bias(
        slice(&in_b, 0..d),
        slice(&in_b, d..2 * d),
        slice(&in_b, 2 * d..3 * d),
    )
    .with_output_projection(
        rows_transposed(&tensor(&file, "out_proj.weight"), 0..d),
        Some(tensor(&file, "out_proj.bias")),
    );
    // PyTorch's key_padding_mask is True for padding; the crate's key_mask is 1 for a token.
    let padding = tensor(&file, "key_padding_mask");
    let keep = padding.data().iter().map(|&p| 1.0 - p).collect();
    let inputs = AttentionInputs::new(x).with_key_mask(Tensor::new([batch, seq], keep).unwrap());
    // The default scale, 1/sqrt(head_dim), is PyTorch's.
    let config = AttentionConfig::new(batch, seq, d, heads, d / heads)
        .causal()
        .with_key_padding_mask()
        .with_output_projection(d);
    let expected = tensor(&file, "expected_output");
    // PyTorch computes in f32: its own error against the exact values is of f32's size.
    let tolerance = Tolerance::new(1e-5, 1e-4);
    let cpu = reference::run(&config, &weights, &inputs).unwrap();
    let c = compare(&cpu.output, &expected, tolerance).unwrap();
    assert!(c.passed(), "reference against PyTorch: {c}");
    for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
        let config = config.clone().with_kernel(kernel);
        let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
        let c = compare(&plan.run(&inputs).unwrap(), &expected, tolerance).unwrap();
        assert!(c.passed(), "{kernel:?} against PyTorch: {c}");
    }
}
