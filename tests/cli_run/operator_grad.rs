//! `wgpu-attention run` on an operator file that also holds `grad_out`: the backward runs
//! too, `grad_q`, `grad_k` and `grad_v` are checked against the f64 reference gradients and
//! written beside `out`, and a bad `grad_out` is refused by name with nothing written.

use super::*;
use wgpu_attention::{BiasShape, OperatorConfig, OperatorInputs};

/// Batch 2, 4 query heads over 2 key/value heads (GQA) of width 4, values 3 wide, 3 queries
/// over 7 keys; batch row 1 pads its last 2 keys; a per-head bias with one key at -inf.
struct GradCase {
    config: OperatorConfig,
    inputs: OperatorInputs,
    grad_out: Tensor,
}

fn grad_case() -> GradCase {
    let mut rng = Rng(71);
    let q = rng.tensor(&[2, 4, 3, 4], 1.0);
    let k = rng.tensor(&[2, 2, 7, 4], 1.0);
    let v = rng.tensor(&[2, 2, 7, 3], 1.0);
    let mut keep = vec![1.0; 14];
    keep[12..].fill(0.0);
    let mut bias = rng.tensor(&[1, 4, 3, 7], 1.0).into_data();
    bias[1] = f32::NEG_INFINITY;
    let grad_out = rng.tensor(&[2, 4, 3, 3], 1.0);
    let config = OperatorConfig::new(2, 4, 2, 4, 3, 7)
        .with_head_dim_v(3)
        .causal()
        .with_key_padding_mask()
        .with_bias(BiasShape {
            per_batch: false,
            per_head: true,
        });
    let inputs = OperatorInputs::new(q, k, v)
        .with_key_mask(Tensor::new([2, 7], keep).unwrap())
        .with_bias(Tensor::new([1, 4, 3, 7], bias).unwrap());
    GradCase {
        config,
        inputs,
        grad_out,
    }
}

fn grad_file(case: &GradCase, grad_out: Stored) -> Vec<(&'static str, Stored)> {
    let i = &case.inputs;
    vec![
        ("q", from_tensor(&i.q)),
        ("k", from_tensor(&i.k)),
        ("v", from_tensor(&i.v)),
        ("key_mask", from_tensor(i.key_mask.as_ref().unwrap())),
        ("attn_bias", from_tensor(i.bias.as_ref().unwrap())),
        ("grad_out", grad_out),
    ]
}

/// Every element within `1e-4 · max|reference| + 1e-5`, the rule the program states.
fn assert_grad_close(name: &str, gpu: &Tensor, cpu: &Tensor) {
    assert_eq!(gpu.shape(), cpu.shape(), "{name}");
    let scale = cpu.data().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.1, "{name}: a reference of zeros tests nothing");
    for (i, (g, c)) in gpu.data().iter().zip(cpu.data()).enumerate() {
        assert!(
            (g - c).abs() <= 1e-4 * scale + 1e-5,
            "{name} at {:?}: gpu {g}, reference {c}",
            cpu.unravel(i)
        );
    }
}

#[test]
fn grad_out_makes_run_write_the_checked_gradients_of_q_k_and_v() {
    let case = grad_case();
    let file = Case::new(grad_file(&case, from_tensor(&case.grad_out)));
    file.run(&["--causal"])
        .success()
        .stdout(predicate::str::contains("gradients  `grad_out` given"))
        .stdout(predicate::str::is_match(r"grad_k\s+\[2, 2, 7, 4\].*%\s+pass").unwrap())
        .stdout(predicate::str::contains("(out, grad_q, grad_k, grad_v)"));
    let written = load(&file.output);
    let names: Vec<&str> = written.keys().map(String::as_str).collect();
    assert_eq!(names, ["grad_k", "grad_q", "grad_v", "out"]);
    let want = reference::operator_backward(&case.config, &case.inputs, &case.grad_out).unwrap();
    // Shaped like q, k and v: grad_k and grad_v summed over each group's two query heads.
    assert_grad_close("grad_q", &written["grad_q"], &want.q);
    assert_grad_close("grad_k", &written["grad_k"], &want.k);
    assert_grad_close("grad_v", &written["grad_v"], &want.v);
    assert_matches(
        &written["out"],
        &reference::operator(&case.config, &case.inputs).unwrap(),
    );
    // Batch row 1's two padded keys get no gradient at all.
    for name in ["grad_k", "grad_v"] {
        let t = &written[name];
        let row = t.shape()[3];
        for head in 0..2 {
            let at = ((2 + head) * 7 + 5) * row;
            assert!(
                t.data()[at..at + 2 * row].iter().all(|&x| x == 0.0),
                "{name}"
            );
        }
    }
}

#[test]
fn the_gradients_are_checked_under_a_fixed_rule_too() {
    let case = grad_case();
    let file = Case::new(grad_file(&case, from_tensor(&case.grad_out)));
    file.run(&[
        "--causal",
        "--tolerance-atol",
        "1e-4",
        "--tolerance-rtol",
        "1e-3",
    ])
    .success()
    .stdout(predicate::str::contains("under the same fixed rule"));
    std::fs::remove_file(&file.output).unwrap();
    file.fails(
        &["--causal", "--tolerance-atol", "0", "--tolerance-rtol", "0"],
        "nothing was written",
    );
}

#[test]
fn a_grad_out_not_shaped_like_out_is_refused() {
    let case = grad_case();
    // Shaped like q (head_dim 4) instead of out (head_dim_v 3).
    let file = Case::new(grad_file(&case, f32s(&[2, 4, 3, 4], &[0.5; 96])));
    file.fails(
        &["--causal"],
        "tensor `grad_out` has shape [2, 4, 3, 4], expected [2, 4, 3, 3] ([batch, heads, \
         q_len, head_dim_v], the shape of `out`",
    );
}

#[test]
fn a_grad_out_holding_nan_is_refused() {
    let case = grad_case();
    let mut data = case.grad_out.data().to_vec();
    data[40] = f32::NAN;
    let file = Case::new(grad_file(&case, f32s(&[2, 4, 3, 3], &data)));
    file.fails(
        &["--causal"],
        "tensor `grad_out` holds NaN at index [1, 0, 1, 1]: inputs must be finite",
    );
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// PyTorch autograd's gradients (tests/fixtures/make_sdpa_fixture.py, `gqa_grad`): 6 query
/// heads over 2 key/value heads, causal aligned to the end of the keys, a key mask, a bias
/// per batch row and head, scale 0.3; q.grad, k.grad and v.grad after out.backward(grad_out).
#[test]
fn gqa_causal_mask_and_bias_gradients_match_pytorch_autograd() {
    let torch = load(Path::new(&format!(
        "{FIXTURES}/sdpa_gqa_grad_out.safetensors"
    )));
    let run = |flags: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.safetensors");
        Command::cargo_bin("wgpu-attention")
            .unwrap()
            .arg("run")
            .arg("--input")
            .arg(format!("{FIXTURES}/sdpa_gqa_grad.safetensors"))
            .arg("--output")
            .arg(&output)
            .args(flags)
            .assert()
            .success();
        load(&output)
    };
    let ours = run(&["--causal", "--scale", "0.3"]);
    assert_eq!(ours["grad_q"].shape(), &[2, 6, 7, 8]);
    assert_eq!(ours["grad_k"].shape(), &[2, 2, 10, 8]);
    assert_eq!(ours["grad_v"].shape(), &[2, 2, 10, 4]);
    assert_matches(&ours["out"], &torch["out"]);
    for name in ["grad_q", "grad_k", "grad_v"] {
        assert_grad_close(name, &ours[name], &torch[name]);
    }
    // Without --causal the same file gives other gradients: the fixture tests the alignment.
    let acausal = run(&["--scale", "0.3"]);
    let differs = |name: &str| {
        let (a, b) = (acausal[name].data(), torch[name].data());
        a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3)
    };
    assert!(differs("grad_q") && differs("grad_k") && differs("grad_v"));
}
