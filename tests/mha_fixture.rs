//! An outside check of the conventions (scale, head split, mask sense, weight layout, biases,
//! output projection): `torch.nn.MultiheadAttention`'s own output on a tiny layer, stored with
//! its inputs and state_dict in tests/fixtures/mha.safetensors by
//! tests/fixtures/make_mha_fixture.py; and PyTorch autograd's gradients of another such layer
//! (tests/fixtures/mha_grad.safetensors, by tests/fixtures/make_mha_grad_fixture.py) against
//! the layer's GPU backward and the f64 reference backward.

mod common;

use common::ctx;
use safetensors::SafeTensors;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, GpuContext, KernelChoice,
    Tensor, Tolerance, compare, reference,
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/mha.safetensors"
);

const GRAD_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/mha_grad.safetensors"
);

fn tensor(file: &SafeTensors, name: &str) -> Tensor {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
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

/// The layer a fixture holds, in the crate's `x @ W` terms: its config (2 heads, causal, key
/// padding, output projection), weights and inputs.
fn layer(file: &SafeTensors) -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let x = tensor(file, "x");
    let (batch, seq, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let heads = 2;
    let in_w = tensor(file, "in_proj_weight");
    let in_b = tensor(file, "in_proj_bias");
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
        rows_transposed(&tensor(file, "out_proj.weight"), 0..d),
        Some(tensor(file, "out_proj.bias")),
    );
    // PyTorch's key_padding_mask is True for padding; the crate's key_mask is 1 for a token.
    let padding = tensor(file, "key_padding_mask");
    let keep = padding.data().iter().map(|&p| 1.0 - p).collect();
    let inputs = AttentionInputs::new(x).with_key_mask(Tensor::new([batch, seq], keep).unwrap());
    // The default scale, 1/sqrt(head_dim), is PyTorch's.
    let config = AttentionConfig::new(batch, seq, d, heads, d / heads)
        .causal()
        .with_key_padding_mask()
        .with_output_projection(d);
    (config, weights, inputs)
}

#[test]
fn matches_torch_multihead_attention() {
    let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (config, weights, inputs) = layer(&file);
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

/// Every element of `got` within `1e-4 · max|want| + 1e-5` of `want`: the gradient rule of
/// tests/backward.rs (a gradient element sums terms of both signs, so the tensor's largest
/// element sets the scale); PyTorch's own f32 error is far below it.
fn assert_grad(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let largest = want.data().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(largest > 0.0, "{what}: an all-zero gradient checks nothing");
    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * largest + 1e-5,
            "{what} at {i}: {g}, PyTorch {w}"
        );
    }
}

#[test]
fn gradients_match_torch_autograd() {
    let bytes = std::fs::read(GRAD_FIXTURE).unwrap_or_else(|e| panic!("{GRAD_FIXTURE}: {e}"));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (config, weights, inputs) = layer(&file);
    let d = config.d_model;
    let grad_out = tensor(&file, "grad_out");
    // PyTorch's gradients in the crate's terms: nn.Linear's `[out, in]` weights transposed,
    // in_proj's rows cut into Q, K and V.
    let w = tensor(&file, "torch_grad_in_proj_weight");
    let b = tensor(&file, "torch_grad_in_proj_bias");
    let want = [
        ("x", tensor(&file, "torch_grad_x")),
        ("w_q", rows_transposed(&w, 0..d)),
        ("w_k", rows_transposed(&w, d..2 * d)),
        ("w_v", rows_transposed(&w, 2 * d..3 * d)),
        ("b_q", slice(&b, 0..d)),
        ("b_k", slice(&b, d..2 * d)),
        ("b_v", slice(&b, 2 * d..3 * d)),
        (
            "w_o",
            rows_transposed(&tensor(&file, "torch_grad_out_proj.weight"), 0..d),
        ),
        ("b_o", tensor(&file, "torch_grad_out_proj.bias")),
    ];
    let named = |g: &reference::LayerGrads| {
        [
            ("x", g.x.clone()),
            ("w_q", g.w_q.clone()),
            ("w_k", g.w_k.clone()),
            ("w_v", g.w_v.clone()),
            ("b_q", g.b_q.clone().expect("b_q's gradient")),
            ("b_k", g.b_k.clone().expect("b_k's gradient")),
            ("b_v", g.b_v.clone().expect("b_v's gradient")),
            ("w_o", g.w_o.clone().expect("w_o's gradient")),
            ("b_o", g.b_o.clone().expect("b_o's gradient")),
        ]
    };
    let cpu = reference::layer_backward(&config, &weights, &inputs, &grad_out).unwrap();
    for ((name, got), (_, torch)) in named(&cpu).iter().zip(&want) {
        assert_grad(&format!("reference {name}"), got, torch);
    }
    let config = config.with_gradients();
    // The backward binds eight storage buffers: under the suite's downlevel profile too, this
    // comparison runs on a device of its own with WebGPU's default limits.
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device, queue);
    let mut plan = AttentionPlan::new(&app, &config, &weights).unwrap();
    let (out, gpu) = plan.run_with_grad(&inputs, &grad_out).unwrap();
    let c = compare(
        &out,
        &tensor(&file, "expected_output"),
        Tolerance::new(1e-5, 1e-4),
    )
    .unwrap();
    assert!(c.passed(), "forward against PyTorch: {c}");
    for ((name, got), (_, torch)) in named(&gpu).iter().zip(&want) {
        assert_grad(&format!("GPU {name}"), got, torch);
    }
}
