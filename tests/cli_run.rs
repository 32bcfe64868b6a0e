//! `wgpu-attention run` end to end: safetensors files in, the program run as a user runs it,
//! safetensors files out. Runs that reach the GPU need an adapter and fail without one.
#![cfg(feature = "cli")]

// Files holding an operator's q, k, v rather than a layer.
#[path = "cli_run/operator.rs"]
mod operator;
// Operator files that also hold `grad_out`: the backward.
#[path = "cli_run/operator_grad.rs"]
mod operator_grad;

// Layer files that also hold `grad_out`: the layer's backward.
#[path = "cli_run/layer_grad.rs"]
mod layer_grad;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionWeights, Tensor, Tolerance, compare, reference,
};

const X: [f32; 12] = [1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.];
const W_Q: [f32; 12] = [1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.];
const W_K: [f32; 12] = [0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.];
const W_V: [f32; 12] = [0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.];
const OUT_SCALE_1: [f32; 9] = [
    1.9366211, 6.6831053, 1.5950684, 1.999994, 7.9639916, 0.0539764, 1.9997046, 7.7598923,
    0.3583893,
];
const OUT_DEFAULT_SCALE: [f32; 9] = [
    1.8638742, 6.319371, 1.7041887, 1.9991096, 7.8141235, 0.2734721, 1.9925551, 7.4796356,
    0.7358773,
];

/// A tensor as stored: dtype, shape, little-endian bytes.
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32s(shape: &[usize], data: &[f32]) -> Stored {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    Stored {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn from_tensor(t: &Tensor) -> Stored {
    f32s(t.shape(), t.data())
}

/// Rows and columns swapped, as PyTorch's nn.Linear stores the same projection.
fn transposed(rows: usize, cols: usize, data: &[f32]) -> Stored {
    let t: Vec<f32> = (0..rows * cols)
        .map(|i| data[(i % rows) * cols + i / rows])
        .collect();
    f32s(&[cols, rows], &t)
}

fn save(path: &Path, tensors: Vec<(&str, Stored)>) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, s)| {
            let view = TensorView::new(s.dtype, s.shape.clone(), &s.bytes).unwrap();
            (*name, view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every tensor of an output file, which must all be F32.
fn load(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (
                name.to_string(),
                Tensor::new(view.shape().to_vec(), data).unwrap(),
            )
        })
        .collect()
}

/// The worked example: 2-D x [3, 4] and three [4, 3] weights.
fn worked_example() -> Vec<(&'static str, Stored)> {
    vec![
        ("x", f32s(&[3, 4], &X)),
        ("w_q", f32s(&[4, 3], &W_Q)),
        ("w_k", f32s(&[4, 3], &W_K)),
        ("w_v", f32s(&[4, 3], &W_V)),
    ]
}

/// A scratch directory with `in.safetensors` holding `tensors`, and the output's path.
struct Case {
    _dir: tempfile::TempDir,
    input: PathBuf,
    output: PathBuf,
}

impl Case {
    fn new(tensors: Vec<(&str, Stored)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        save(&input, tensors);
        Case {
            input,
            output: dir.path().join("out.safetensors"),
            _dir: dir,
        }
    }

    fn run(&self, flags: &[&str]) -> assert_cmd::assert::Assert {
        self.command(flags).assert()
    }

    /// The command [`Case::run`] runs, for adding to it.
    fn command(&self, flags: &[&str]) -> Command {
        let mut command = Command::cargo_bin("wgpu-attention").unwrap();
        command
            .arg("run")
            .arg("--input")
            .arg(&self.input)
            .arg("--output")
            .arg(&self.output)
            .args(flags);
        command
    }

    /// Runs expecting success and returns what was written.
    fn ok(&self, flags: &[&str]) -> BTreeMap<String, Tensor> {
        self.run(flags)
            .success()
            .stdout(predicate::str::contains("pass"));
        load(&self.output)
    }

    /// Runs expecting failure with `message` on stderr, and no output file.
    fn fails(&self, flags: &[&str], message: &str) {
        self.run(flags)
            .failure()
            .stderr(predicate::str::contains(message));
        assert!(!self.output.exists(), "a failed run left {:?}", self.output);
        let leftovers: Vec<_> = std::fs::read_dir(self.output.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "in.safetensors")
            .collect();
        assert!(leftovers.is_empty(), "a failed run left {leftovers:?}");
    }
}

fn assert_close(actual: &Tensor, shape: &[usize], expected: &[f32], atol: f32) {
    assert_eq!(actual.shape(), shape);
    // zip stops at the shorter side: without this an empty output would pass.
    assert_eq!(actual.data().len(), expected.len());
    for (i, (a, e)) in actual.data().iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= atol, "element {i}: {a} vs {e}");
    }
}

#[test]
fn worked_example_unscaled() {
    let case = Case::new(worked_example());
    let out = case.ok(&["--heads", "1", "--scale", "1"]);
    assert_eq!(out.keys().collect::<Vec<_>>(), ["out"]);
    assert_close(&out["out"], &[3, 3], &OUT_SCALE_1, 1e-6);
}

#[test]
fn worked_example_with_the_default_scale() {
    let case = Case::new(worked_example());
    let out = case.ok(&["--heads", "1"]);
    assert_close(&out["out"], &[3, 3], &OUT_DEFAULT_SCALE, 1e-6);
}

#[test]
fn torch_layout_reads_transposed_weights() {
    let case = Case::new(vec![
        ("x", f32s(&[1, 3, 4], &X)),
        ("w_q", transposed(4, 3, &W_Q)),
        ("w_k", transposed(4, 3, &W_K)),
        ("w_v", transposed(4, 3, &W_V)),
    ]);
    let out = case.ok(&["--torch-layout", "--heads", "1", "--scale", "1"]);
    // A 3-D x keeps its batch axis.
    assert_close(&out["out"], &[1, 3, 3], &OUT_SCALE_1, 1e-6);
}

#[test]
fn the_report_names_the_adapter_the_check_and_the_file() {
    let case = Case::new(worked_example());
    case.run(&["--heads", "1", "--scale", "1"])
        .success()
        .stdout(predicate::str::contains("adapter "))
        .stdout(predicate::str::contains(
            "each output element within its f32 forward error bound",
        ))
        .stdout(predicate::str::is_match(r"out\s+\[3, 3\]").unwrap())
        .stdout(predicate::str::contains("wrote "));
}

/// A seeded generator so the multi-head data is the same on every run.
struct Rng(u64);

impl Rng {
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), self.values(n, scale)).unwrap()
    }
}

/// Two heads of width 3 (values 2), batch 2, seq 5, d_model 8, every optional tensor, and a
/// mask that hides key 0 of the second row, so with --causal its first query sees nothing.
fn multi_head() -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let mut rng = Rng(7);
    let config = AttentionConfig::new(2, 5, 8, 2, 3)
        .with_head_dim_v(2)
        .causal()
        .with_key_padding_mask()
        .with_output_projection(5);
    let weights = AttentionWeights::new(
        rng.tensor(&[8, 6], 0.5),
        rng.tensor(&[8, 6], 0.5),
        rng.tensor(&[8, 4], 0.5),
    )
    .with_qkv_bias(
        rng.tensor(&[6], 0.1),
        rng.tensor(&[6], 0.1),
        rng.tensor(&[4], 0.1),
    )
    .with_output_projection(rng.tensor(&[4, 5], 0.5), Some(rng.tensor(&[5], 0.1)));
    let mask = Tensor::new([2, 5], vec![1., 1., 1., 0., 0., 0., 1., 1., 1., 1.]).unwrap();
    let inputs = AttentionInputs::new(rng.tensor(&[2, 5, 8], 1.0)).with_key_mask(mask);
    (config, weights, inputs)
}

fn multi_head_file(w: &AttentionWeights, i: &AttentionInputs) -> Case {
    let mask: Vec<u8> = i
        .key_mask
        .as_ref()
        .unwrap()
        .data()
        .iter()
        .map(|&m| m as u8)
        .collect();
    let mut tensors: Vec<(&str, Stored)> = w
        .named()
        .into_iter()
        .map(|(n, t)| (n, from_tensor(t)))
        .collect();
    tensors.push(("x", from_tensor(&i.x)));
    tensors.push((
        "key_mask",
        Stored {
            dtype: Dtype::BOOL,
            shape: vec![2, 5],
            bytes: mask,
        },
    ));
    Case::new(tensors)
}

#[test]
fn multi_head_with_biases_projection_mask_and_causal_matches_the_reference() {
    let (config, weights, inputs) = multi_head();
    let case = multi_head_file(&weights, &inputs);
    let out = case.ok(&["--heads", "2", "--causal", "--allow-masked-rows"]);
    let expected = reference::run(&config, &weights, &inputs).unwrap();
    let check = compare(&out["out"], &expected.output, Tolerance::F32).unwrap();
    assert!(check.passed(), "{check}");
    assert_eq!(out["out"].shape(), &[2, 5, 5]);
    // Query 0 of row 1 has every key masked: its heads give zeros, so only b_o remains.
    let b_o = weights.b_o.as_ref().unwrap().data();
    assert_close(
        &Tensor::new([5], out["out"].data()[25..30].to_vec()).unwrap(),
        &[5],
        b_o,
        1e-6,
    );
}

#[test]
fn intermediates_are_written_with_their_shapes_and_checked() {
    let (config, weights, inputs) = multi_head();
    let case = multi_head_file(&weights, &inputs);
    let out = case.ok(&[
        "--heads",
        "2",
        "--causal",
        "--allow-masked-rows",
        "--intermediates",
    ]);
    let expected = reference::run(&config, &weights, &inputs).unwrap();
    let shapes: [(&str, &[usize], &Tensor); 7] = [
        ("out", &[2, 5, 5], &expected.output),
        ("q", &[2, 2, 5, 3], &expected.q),
        ("k", &[2, 2, 5, 3], &expected.k),
        ("v", &[2, 2, 5, 2], &expected.v),
        ("scores", &[2, 2, 5, 5], &expected.scores),
        ("probs", &[2, 2, 5, 5], &expected.probs),
        ("attention", &[2, 5, 4], &expected.attention),
    ];
    assert_eq!(out.len(), shapes.len());
    for (name, shape, reference) in shapes {
        assert_eq!(out[name].shape(), shape, "{name}");
        let check = compare(&out[name], reference, Tolerance::F32).unwrap();
        assert!(check.passed(), "{name}: {check}");
    }
    // Causal: query 0 never sees key 1, so that score is stored as -inf.
    assert_eq!(out["scores"].get(&[0, 0, 0, 1]), Some(f32::NEG_INFINITY));
}

#[test]
fn intermediates_of_a_2d_x_lose_the_batch_axis() {
    let case = Case::new(worked_example());
    let out = case.ok(&["--heads", "1", "--scale", "1", "--intermediates"]);
    assert_close(&out["out"], &[3, 3], &OUT_SCALE_1, 1e-6);
    // The worked example's queries and scores.
    assert_close(
        &out["q"],
        &[1, 3, 3],
        &[1., 0., 2., 2., 2., 2., 2., 1., 3.],
        1e-6,
    );
    assert_close(
        &out["scores"],
        &[1, 3, 3],
        &[2., 4., 4., 4., 16., 12., 4., 12., 10.],
        1e-5,
    );
    assert_eq!(out["probs"].shape(), &[1, 3, 3]);
    assert_eq!(out["attention"].shape(), &[3, 3]);
}

#[test]
fn a_failed_run_leaves_an_existing_output_untouched() {
    let case = Case::new(vec![("x", f32s(&[3, 4], &X))]);
    std::fs::write(&case.output, b"earlier result").unwrap();
    case.run(&[]).failure();
    assert_eq!(std::fs::read(&case.output).unwrap(), b"earlier result");
}

// Bad files: each must fail with a message naming the problem, and write nothing.

fn without(name: &str) -> Vec<(&'static str, Stored)> {
    worked_example()
        .into_iter()
        .filter(|(n, _)| *n != name)
        .collect()
}

fn with(name: &'static str, stored: Stored) -> Vec<(&'static str, Stored)> {
    let mut tensors = without(name);
    tensors.push((name, stored));
    tensors
}

#[test]
fn missing_tensor() {
    Case::new(without("w_k")).fails(
        &[],
        "missing tensor `w_k`, expected shape [4, 3] ([d_model, heads*head_dim] in the x @ W \
         layout [in, out]); the file holds w_q, w_v, x",
    );
}

/// `data` stored as F16 or BF16 (each value rounded to the dtype).
fn halves(dtype: Dtype, shape: &[usize], data: &[f32]) -> Stored {
    let bytes = data
        .iter()
        .flat_map(|&v| match dtype {
            Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
            Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
            other => panic!("{other:?} is not a half type"),
        })
        .collect();
    Stored {
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

#[test]
fn f16_and_bf16_tensors_are_read_as_their_exact_values() {
    // The worked example's values are small integers, exact in both formats, so the layer
    // must give exactly the f32 file's answer.
    let case = Case::new(vec![
        ("x", halves(Dtype::BF16, &[3, 4], &X)),
        ("w_q", halves(Dtype::F16, &[4, 3], &W_Q)),
        ("w_k", halves(Dtype::BF16, &[4, 3], &W_K)),
        ("w_v", halves(Dtype::F16, &[4, 3], &W_V)),
    ]);
    let out = case.ok(&["--heads", "1", "--scale", "1"]);
    assert_close(&out["out"], &[3, 3], &OUT_SCALE_1, 1e-6);
}

/// `--precision f16`: F16 and BF16 tensors taken as they are, F32 ones rounded; the output is
/// stored in f16 and checked against its f16 bound. On an adapter without shader-f16 (llvmpipe's
/// OpenGL) the run fails with the named error instead.
#[test]
fn precision_f16_runs_and_checks_in_f16_or_names_the_missing_feature() {
    let w_v: Vec<f32> = W_V.iter().map(|v| v + 0.1).collect();
    let case = Case::new(vec![
        ("x", f32s(&[3, 4], &X)),
        ("w_q", halves(Dtype::F16, &[4, 3], &W_Q)),
        ("w_k", halves(Dtype::BF16, &[4, 3], &W_K)),
        ("w_v", halves(Dtype::BF16, &[4, 3], &w_v)),
    ]);
    let flags = ["--heads", "1", "--scale", "1", "--precision", "f16"];
    let has_f16 = wgpu_attention::GpuContext::from_env().unwrap().has_f16();
    if !has_f16 {
        return case.fails(&flags, "lacks shader-f16");
    }
    case.run(&flags).success().stdout(predicate::str::contains(
        "precision f16 storage, f32 arithmetic",
    ));
    let out = load(&case.output);
    // The reference for these inputs: w_v as stored in BF16, then in f16.
    let round = |v: f32| half::f16::from_f32(half::bf16::from_f32(v).to_f32()).to_f32();
    let w_v16: Vec<f32> = w_v.iter().map(|&v| round(v)).collect();
    let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
    let t = |shape: [usize; 2], d: &[f32]| Tensor::new(shape, d.to_vec()).unwrap();
    let weights = AttentionWeights::new(t([4, 3], &W_Q), t([4, 3], &W_K), t([4, 3], &w_v16));
    let inputs = AttentionInputs::new(Tensor::new([1, 3, 4], X.to_vec()).unwrap());
    let exact = reference::run(&config, &weights, &inputs).unwrap().output;
    for (i, (&a, &e)) in out["out"].data().iter().zip(exact.data()).enumerate() {
        assert_eq!(half::f16::from_f32(a).to_f32(), a, "out[{i}] is not an f16");
        assert!(
            (a - e).abs() <= 4e-3 * e.abs().max(1.0),
            "out[{i}]: {a} vs {e}"
        );
    }
}

#[test]
fn integer_weights_are_refused() {
    let i32s = Stored {
        dtype: Dtype::I32,
        shape: vec![4, 3],
        bytes: W_Q.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
    };
    Case::new(with("w_q", i32s))
        .fails(&[], "tensor `w_q` has dtype I32, expected F32, F16 or BF16");
}

#[test]
fn wrong_width() {
    Case::new(with("w_k", f32s(&[4, 2], &[0.; 8]))).fails(
        &[],
        "tensor `w_k` has shape [4, 2], expected [4, 3] ([d_model, heads*head_dim] in the x @ W \
         layout [in, out])",
    );
}

#[test]
fn transposed_weights_without_torch_layout_get_a_hint() {
    Case::new(with("w_q", transposed(4, 3, &W_Q))).fails(
        &[],
        "tensor `w_q` has shape [3, 4], expected [4, heads*head_dim] ([d_model, heads*head_dim] \
         in the x @ W layout [in, out]); it looks transposed: weights saved from PyTorch's \
         nn.Linear are [out_features, in_features], so pass --layout torch",
    );
}

#[test]
fn torch_layout_names_the_layout_it_assumed() {
    Case::new(worked_example()).fails(
        &["--torch-layout"],
        "tensor `w_q` has shape [4, 3], expected [heads*head_dim, 4] ([heads*head_dim, d_model] \
         in PyTorch's nn.Linear layout [out_features, in_features], as --layout torch asks); it \
         looks transposed: weights in the x @ W layout are [in, out], so pass --layout xw",
    );
}

#[test]
fn heads_must_divide_the_width() {
    Case::new(worked_example()).fails(
        &["--heads", "2"],
        "tensor `w_q` has 3 columns (heads*head_dim), which cannot be split into --heads 2 \
         equal heads",
    );
}

#[test]
fn unknown_tensor_names_are_refused() {
    Case::new(with("wq", f32s(&[4, 3], &W_Q))).fails(
        &[],
        "unknown tensor `wq` (did you mean `w_q`?); this program reads only x, w_q, w_k, w_v, \
         b_q, b_k, b_v, w_o, b_o, key_mask, attention_mask, key_padding_mask",
    );
}

#[test]
fn unreadable_file() {
    let case = Case::new(worked_example());
    let missing = case.input.with_file_name("nowhere.safetensors");
    Command::cargo_bin("wgpu-attention")
        .unwrap()
        .args(["run", "--input"])
        .arg(&missing)
        .arg("--output")
        .arg(&case.output)
        .assert()
        .failure()
        .stderr(predicate::str::contains("nowhere.safetensors"))
        .stderr(predicate::str::contains("No such file or directory"));
    assert!(!case.output.exists());
}

#[test]
fn truncated_file() {
    let case = Case::new(worked_example());
    let bytes = std::fs::read(&case.input).unwrap();
    std::fs::write(&case.input, &bytes[..bytes.len() / 2]).unwrap();
    case.fails(&[], "truncated or not a safetensors file");
}

#[test]
fn truncated_tensor_data() {
    let case = Case::new(worked_example());
    let bytes = std::fs::read(&case.input).unwrap();
    std::fs::write(&case.input, &bytes[..bytes.len() - 10]).unwrap();
    case.fails(
        &[],
        "truncated or not a safetensors file: the header describes 192 bytes of tensor data, \
         but 182 bytes follow it",
    );
}

#[test]
fn not_a_safetensors_file() {
    let case = Case::new(worked_example());
    let mut rng = Rng(3);
    let noise: Vec<u8> = rng
        .values(1000, 1.0)
        .iter()
        .map(|v| (v * 127.0) as i8 as u8)
        .collect();
    std::fs::write(&case.input, noise).unwrap();
    case.fails(&[], "truncated or not a safetensors file");
}

#[test]
fn mask_values_must_be_zero_or_one() {
    let mask = Stored {
        dtype: Dtype::U8,
        shape: vec![3],
        bytes: vec![1, 2, 1],
    };
    Case::new(with("key_mask", mask)).fails(
        &[],
        "tensor `key_mask` holds 2 at index [1]: use 1 for a real token and 0 for padding",
    );
}

#[test]
fn mask_shape_follows_x() {
    Case::new(with("key_mask", f32s(&[1, 3], &[1., 1., 1.]))).fails(
        &["--heads", "1"],
        "tensor `key_mask` has shape [1, 3], expected [3] ([seq])",
    );
}

#[test]
fn non_finite_inputs_are_refused() {
    let mut x = X;
    x[5] = f32::NAN;
    Case::new(with("x", f32s(&[3, 4], &x))).fails(
        &[],
        "tensor `x` holds NaN at index [1, 1]: inputs must be finite",
    );
}

#[test]
fn output_bias_needs_an_output_projection() {
    Case::new(with("b_o", f32s(&[3], &[0.; 3]))).fails(
        &["--heads", "1"],
        "tensor `b_o` was given but there is no output projection `w_o` for it to bias",
    );
}

#[test]
fn an_impossible_check_fails_and_writes_nothing() {
    // Zero tolerance cannot hold for hundreds of f32 values (exponentials among them) checked
    // against an f64 reference.
    let (_, weights, inputs) = multi_head();
    multi_head_file(&weights, &inputs).fails(
        &[
            "--heads",
            "2",
            "--causal",
            "--allow-masked-rows",
            "--intermediates",
            "--tolerance-atol",
            "0",
            "--tolerance-rtol",
            "0",
        ],
        "GPU and CPU reference disagree: `",
    );
}

#[test]
fn negative_tolerances_are_refused() {
    Case::new(worked_example()).fails(
        &["--tolerance-rtol", "-1"],
        "--tolerance-rtol must be a finite number >= 0, got -1",
    );
}

#[test]
fn an_output_in_a_missing_directory_is_refused_before_any_work() {
    let case = Case::new(worked_example());
    let output = case
        .output
        .with_file_name("no-such-dir")
        .join("out.safetensors");
    Command::cargo_bin("wgpu-attention")
        .unwrap()
        .args(["run", "--heads", "1", "--input"])
        .arg(&case.input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure()
        .stderr(predicate::str::contains("no-such-dir` is not a directory"));
}

#[test]
fn every_kernel_choice_gives_the_worked_example() {
    for kernel in ["staged", "fused", "auto"] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let output = dir.path().join("out.safetensors");
        save(
            &input,
            vec![
                ("x", f32s(&[3, 4], &X)),
                ("w_q", f32s(&[4, 3], &W_Q)),
                ("w_k", f32s(&[4, 3], &W_K)),
                ("w_v", f32s(&[4, 3], &W_V)),
            ],
        );
        Command::cargo_bin("wgpu-attention")
            .unwrap()
            .args([
                "run", "--heads", "1", "--scale", "1", "--kernel", kernel, "--input",
            ])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .assert()
            .success();
        let bytes = std::fs::read(&output).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let out: Vec<f32> = file
            .tensor("out")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(out.len(), OUT_SCALE_1.len(), "{kernel}: {out:?}");
        for (got, want) in out.iter().zip(OUT_SCALE_1) {
            assert!((got - want).abs() < 1e-6, "{kernel}: {out:?}");
        }
    }
    // The fused kernel keeps no intermediates, so asking for both is a clear error.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    save(
        &input,
        vec![
            ("x", f32s(&[3, 4], &X)),
            ("w_q", f32s(&[4, 3], &W_Q)),
            ("w_k", f32s(&[4, 3], &W_K)),
            ("w_v", f32s(&[4, 3], &W_V)),
        ],
    );
    let output = dir.path().join("out.safetensors");
    Command::cargo_bin("wgpu-attention")
        .unwrap()
        .args(["run", "--kernel", "fused", "--intermediates", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure()
        .stderr(predicate::str::contains("use --kernel staged (or auto)"));
    assert!(!output.exists());
}

// Issue 14: long sequences, interruptions, hostile files, and PyTorch users' conventions.

/// `x` [1, seq, d] and three [d, width] weights of seeded noise: tiny heads, long sequences.
fn long_layer(seq: usize, d: usize, width: usize) -> Vec<(&'static str, Stored)> {
    let mut rng = Rng(11);
    vec![
        ("x", from_tensor(&rng.tensor(&[1, seq, d], 1.0))),
        ("w_q", from_tensor(&rng.tensor(&[d, width], 0.5))),
        ("w_k", from_tensor(&rng.tensor(&[d, width], 0.5))),
        ("w_v", from_tensor(&rng.tensor(&[d, width], 0.5))),
    ]
}

/// The peak resident memory the program reports `when` with WGPU_ATTENTION_REPORT_PEAK_RSS, in
/// kB.
fn peak_kb(stderr: &[u8], when: &str) -> u64 {
    let stderr = String::from_utf8_lossy(stderr);
    let prefix = format!("peak memory {when}: ");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stderr}"));
    line.trim_end_matches(" kB").trim().parse().unwrap()
}

#[test]
fn a_long_sequence_is_checked_in_linear_memory() {
    // [seq, seq] in f64 is 2 GiB here; the streamed check needs a few MB beyond the GPU's.
    let case = Case::new(long_layer(16384, 8, 8));
    let out = case
        .command(&["--heads", "1", "--layout", "xw"])
        .env("WGPU_ATTENTION_REPORT_PEAK_RSS", "1")
        .assert()
        .success()
        .stdout(predicate::str::contains("check      a sample of "))
        .stdout(predicate::str::contains(
            "of 16384 output rows, evenly spread",
        ))
        .stdout(predicate::str::contains("estimate   roughly"))
        .stdout(predicate::str::is_match(r"out\s+\[1, 16384, 8\].*pass").unwrap());
    let stderr = &out.get_output().stderr;
    let (gpu, end) = (
        peak_kb(stderr, "after the GPU"),
        peak_kb(stderr, "at the end"),
    );
    assert!(end - gpu < 32 * 1024, "the check took {} kB", end - gpu);
    // The whole run, the software GPU's own memory included: 105-120 MB measured.
    assert!(end < 200 * 1024, "peak memory {end} kB");
    assert_eq!(load(&case.output)["out"].shape(), &[1, 16384, 8]);
}

#[test]
fn a_short_sequence_checks_every_row() {
    let case = Case::new(long_layer(64, 4, 4));
    case.run(&["--heads", "2", "--layout", "xw"])
        .success()
        .stdout(predicate::str::contains(
            "check      all 64 output rows, streamed through the f64 reference",
        ))
        .stdout(predicate::str::contains("estimate").not());
}

#[test]
fn check_all_checks_every_row_of_a_long_sequence() {
    // Just over the budget, where the default would sample.
    let case = Case::new(long_layer(12000, 4, 4));
    case.run(&["--heads", "1", "--layout", "xw", "--check-all"])
        .success()
        .stdout(predicate::str::contains(
            "all 12000 output rows, streamed through the f64 reference (1.2e9 multiply-adds, \
             over the check's budget of 1e9, as --check-all asks)",
        ));
}

/// Starts a long run, waits until it has started the GPU work, sends `signal`, and returns its
/// exit status and stderr. The directory must then hold nothing but the input.
fn interrupt(signal: &str) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead, Read};
    let case = Case::new(long_layer(32768, 8, 8));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("wgpu-attention"))
        .args([
            "run",
            "--heads",
            "1",
            "--layout",
            "xw",
            "--check-all",
            "--input",
        ])
        .arg(&case.input)
        .arg("--output")
        .arg(&case.output)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("estimate") {
            break;
        }
    }
    assert!(
        seen.contains("estimate"),
        "no estimate before the work:\n{seen}"
    );
    // No temporary file exists while the result is being computed.
    let files = || -> Vec<_> {
        std::fs::read_dir(case.input.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "in.safetensors")
            .collect()
    };
    assert!(files().is_empty(), "{:?}", files());
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(files().is_empty(), "an interrupted run left {:?}", files());
    (status, stderr)
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_long_run_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let (status, stderr) = interrupt("-INT");
    assert_eq!(status.signal(), Some(2), "{status:?}\n{stderr}");
    assert!(stderr.contains("interrupted by Ctrl-C"), "{stderr}");
}

#[cfg(unix)]
#[test]
fn sigterm_stops_a_long_run_and_leaves_no_temporary_file() {
    use std::os::unix::process::ExitStatusExt;
    let (status, stderr) = interrupt("-TERM");
    assert_eq!(status.signal(), Some(15), "{status:?}\n{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
}

#[cfg(unix)]
#[test]
fn only_regular_files_are_read() {
    let case = Case::new(worked_example());
    Command::cargo_bin("wgpu-attention")
        .unwrap()
        .args(["run", "--heads", "1", "--input", "/dev/zero", "--output"])
        .arg(&case.output)
        .timeout(std::time::Duration::from_secs(20))
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "/dev/zero: not a regular file (a character device)",
        ));
}

#[test]
fn a_header_larger_than_the_file_is_refused_before_reading() {
    let case = Case::new(worked_example());
    let mut bytes = std::fs::read(&case.input).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&case.input, &bytes).unwrap();
    case.fails(
        &["--heads", "1"],
        "the first 8 bytes give a header of 1099511627776 bytes, but the file is only",
    );
}

#[test]
fn the_output_may_not_be_the_input() {
    let case = Case::new(worked_example());
    let before = std::fs::read(&case.input).unwrap();
    let refused = |output: &Path| {
        Command::cargo_bin("wgpu-attention")
            .unwrap()
            .args(["run", "--heads", "1", "--input"])
            .arg(&case.input)
            .arg("--output")
            .arg(output)
            .assert()
            .failure()
            .stderr(predicate::str::contains(
                "is the input file itself; writing it would replace the weights",
            ));
        assert_eq!(std::fs::read(&case.input).unwrap(), before);
    };
    refused(&case.input);
    // The same file by another path, and by a hard link.
    let dir = case.input.parent().unwrap();
    refused(&dir.join(".").join("in.safetensors"));
    let link = dir.join("link.safetensors");
    std::fs::hard_link(&case.input, &link).unwrap();
    refused(&link);
}

/// A safetensors file written by hand, so its header can be what no writer makes.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let case = Case::new(worked_example());
    let data: Vec<u8> = [X, X]
        .concat()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    raw_file(
        &case.input,
        r#"{"x":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},"x":{"dtype":"F32","shape":[4,3],"data_offsets":[48,96]}}"#,
        &data,
    );
    case.fails(&["--heads", "1"], "the header names `x` twice");
}

#[test]
fn offset_errors_name_the_tensor_at_fault() {
    let case = Case::new(worked_example());
    let data = vec![0u8; 96];
    // `b` claims 40 bytes for 12 floats (48); `a` is right.
    raw_file(
        &case.input,
        r#"{"a":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},"b":{"dtype":"F32","shape":[4,3],"data_offsets":[48,88]}}"#,
        &data,
    );
    case.fails(
        &["--heads", "1"],
        "tensor `b` has shape [4, 3] of F32 (48 bytes), but its data_offsets [48, 88] span 40 \
         bytes",
    );
    // A gap: `b` starts past the end of `a`.
    raw_file(
        &case.input,
        r#"{"a":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},"b":{"dtype":"F32","shape":[4,3],"data_offsets":[48,96]}}"#,
        &data,
    );
    case.fails(
        &["--heads", "1"],
        "tensor `b` has data_offsets [48, 96], but `a` ends at byte 32: a gap in the data",
    );
}

#[test]
fn a_bad_scale_is_blamed_on_the_flag() {
    Case::new(worked_example()).fails(
        &["--heads", "1", "--scale", "nan"],
        "invalid value 'nan' for '--scale <S>': the scale must be a finite number",
    );
}

#[test]
fn intermediates_with_the_fused_kernel_suggest_the_staged_one() {
    Case::new(worked_example()).fails(
        &["--heads", "1", "--intermediates", "--kernel", "fused"],
        "use --kernel staged (or auto)",
    );
}

#[test]
fn a_successful_run_keeps_stderr_clean_without_a_display() {
    let case = Case::new(worked_example());
    let out = Command::cargo_bin("wgpu-attention")
        .unwrap()
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .args(["run", "--heads", "1", "--input"])
        .arg(&case.input)
        .arg("--output")
        .arg(&case.output)
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr);
    assert!(stderr.is_empty(), "stderr of a successful run:\n{stderr}");
}

// Masks in PyTorch's and Hugging Face's conventions. Each run is checked against the reference
// for the mask the user meant: row 1 pads its last two tokens.

const KEEP: [f32; 10] = [1., 1., 1., 1., 1., 1., 1., 1., 0., 0.];

fn masked_layer() -> (AttentionConfig, AttentionWeights, AttentionInputs) {
    let mut rng = Rng(5);
    let config = AttentionConfig::new(2, 5, 4, 2, 2).with_key_padding_mask();
    let weights = AttentionWeights::new(
        rng.tensor(&[4, 4], 0.5),
        rng.tensor(&[4, 4], 0.5),
        rng.tensor(&[4, 4], 0.5),
    );
    let keep = Tensor::new([2, 5], KEEP.to_vec()).unwrap();
    let inputs = AttentionInputs::new(rng.tensor(&[2, 5, 4], 1.0)).with_key_mask(keep);
    (config, weights, inputs)
}

fn masked_case(mask_name: &'static str, mask: Stored) -> (Case, Tensor) {
    let (config, weights, inputs) = masked_layer();
    let expected = reference::run(&config, &weights, &inputs).unwrap().output;
    let mut tensors: Vec<(&str, Stored)> = weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, from_tensor(t)))
        .collect();
    tensors.push(("x", from_tensor(&inputs.x)));
    tensors.push((mask_name, mask));
    (Case::new(tensors), expected)
}

fn assert_matches(out: &Tensor, expected: &Tensor) {
    let check = compare(out, expected, Tolerance::F32).unwrap();
    assert!(check.passed(), "{check}");
}

#[test]
fn key_padding_mask_is_read_with_pytorchs_convention() {
    let padding: Vec<u8> = KEEP.iter().map(|&k| u8::from(k == 0.0)).collect();
    let (case, expected) = masked_case(
        "key_padding_mask",
        Stored {
            dtype: Dtype::BOOL,
            shape: vec![2, 5],
            bytes: padding,
        },
    );
    let out = case
        .run(&["--heads", "2", "--layout", "xw"])
        .success()
        .stdout(predicate::str::contains(
            "mask       `key_padding_mask`: keys kept per batch row (of 5): 5, 3",
        ));
    drop(out);
    assert_matches(&load(&case.output)["out"], &expected);
}

#[test]
fn attention_mask_is_read_with_hugging_faces_convention() {
    let (case, expected) = masked_case(
        "attention_mask",
        Stored {
            dtype: Dtype::I64,
            shape: vec![2, 5],
            bytes: KEEP
                .iter()
                .flat_map(|&k| (k as i64).to_le_bytes())
                .collect(),
        },
    );
    let out = case.ok(&["--heads", "2", "--layout", "xw"]);
    assert_matches(&out["out"], &expected);
}

#[test]
fn additive_masks_are_told_apart_by_name() {
    let additive: Vec<f32> = KEEP
        .iter()
        .map(|&k| if k == 1.0 { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let (case, expected) = masked_case("additive_key_mask", f32s(&[2, 5], &additive));
    assert_matches(
        &case.ok(&["--heads", "2", "--layout", "xw"])["out"],
        &expected,
    );
    // PyTorch adds a float key_padding_mask to the scores.
    let (case, expected) = masked_case("key_padding_mask", f32s(&[2, 5], &additive));
    assert_matches(
        &case.ok(&["--heads", "2", "--layout", "xw"])["out"],
        &expected,
    );
    // Saved as key_mask, the same values are refused, not read as padding.
    let (case, _) = masked_case("key_mask", f32s(&[2, 5], &additive));
    case.fails(
        &["--heads", "2", "--layout", "xw"],
        "tensor `key_mask` holds -inf at index [1, 3]: use 1 for a real token and 0 for padding; \
         an additive mask (0 = keep, -inf = drop) must be named `additive_key_mask`",
    );
    // An additive mask with no -inf at all: under key_mask, every key is masked, refused.
    let (case, _) = masked_case("key_mask", f32s(&[2, 5], &[0.0; 10]));
    case.fails(
        &["--heads", "2", "--layout", "xw"],
        "`key_mask` masks every key of batch row 0 (and of 1 other rows), so its queries have \
         nothing to attend",
    );
}

#[test]
fn a_fully_masked_row_needs_allow_masked_rows() {
    // PyTorch's key_padding_mask saved as key_mask: the unpadded row 0 keeps no key.
    let inverted: Vec<f32> = KEEP.iter().map(|&k| 1.0 - k).collect();
    let (case, _) = masked_case("key_mask", f32s(&[2, 5], &inverted));
    case.fails(
        &["--heads", "2", "--layout", "xw"],
        "`key_mask` masks every key of batch row 0, so its queries have nothing to attend. \
         `key_mask` is read as 1 = real token, 0 = padding",
    );
    let out = case.ok(&["--heads", "2", "--layout", "xw", "--allow-masked-rows"]);
    assert!(out["out"].data()[..10].iter().all(|&v| v == 0.0));
}

#[test]
fn heads_are_required_unless_the_widths_allow_one_count() {
    let (_, weights, inputs) = masked_layer();
    let mut tensors: Vec<(&str, Stored)> = weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, from_tensor(t)))
        .collect();
    tensors.push(("x", from_tensor(&inputs.x)));
    Case::new(tensors).fails(
        &["--layout", "xw"],
        "--heads is required: the query width 4 and value width 4 split evenly into 1, 2, 4 \
         heads",
    );
    // Query width 3 and value width 2 split only into one head.
    let mut rng = Rng(9);
    let case = Case::new(vec![
        ("x", from_tensor(&rng.tensor(&[2, 4], 1.0))),
        ("w_q", from_tensor(&rng.tensor(&[4, 3], 0.5))),
        ("w_k", from_tensor(&rng.tensor(&[4, 3], 0.5))),
        ("w_v", from_tensor(&rng.tensor(&[4, 2], 0.5))),
    ]);
    case.run(&[]).success().stdout(predicate::str::contains(
        "heads 1, head_dim 3, head_dim_v 2",
    ));
}

#[test]
fn square_weights_need_a_layout() {
    let (_, weights, inputs) = masked_layer();
    let mut tensors: Vec<(&str, Stored)> = weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, from_tensor(t)))
        .collect();
    tensors.push(("x", from_tensor(&inputs.x)));
    Case::new(tensors).fails(
        &["--heads", "2"],
        "every weight matrix is square, so its shape cannot tell PyTorch's nn.Linear layout \
         [out_features, in_features] from the x @ W layout [in, out]",
    );
}

/// The layer as nn.MultiheadAttention's state_dict holds it: packed, [out, in].
fn multihead_state_dict(
    weights: &AttentionWeights,
    w_o: &Tensor,
    b_o: &Tensor,
) -> Vec<(&'static str, Stored)> {
    let t = |w: &Tensor| transposed(w.shape()[0], w.shape()[1], w.data());
    let packed: Vec<u8> = [&weights.w_q, &weights.w_k, &weights.w_v]
        .iter()
        .flat_map(|w| t(w).bytes)
        .collect();
    vec![
        (
            "in_proj_weight",
            Stored {
                dtype: Dtype::F32,
                shape: vec![12, 4],
                bytes: packed,
            },
        ),
        ("in_proj_bias", f32s(&[12], &[0.0; 12])),
        ("out_proj.weight", t(w_o)),
        ("out_proj.bias", from_tensor(b_o)),
    ]
}

#[test]
fn pytorch_state_dict_names_fix_the_layout() {
    let (config, weights, inputs) = masked_layer();
    let mut rng = Rng(21);
    let (w_o, b_o) = (rng.tensor(&[4, 4], 0.5), rng.tensor(&[4], 0.1));
    let mut expected_weights = weights.clone();
    expected_weights.w_o = Some(w_o.clone());
    expected_weights.b_o = Some(b_o.clone());
    let expected = reference::run(
        &config.clone().with_output_projection(4),
        &expected_weights,
        &inputs,
    )
    .unwrap()
    .output;
    let padding: Vec<u8> = KEEP.iter().map(|&k| u8::from(k == 0.0)).collect();
    let mask = || Stored {
        dtype: Dtype::BOOL,
        shape: vec![2, 5],
        bytes: padding.clone(),
    };

    let mut mha = multihead_state_dict(&weights, &w_o, &b_o);
    mha.push(("x", from_tensor(&inputs.x)));
    mha.push(("key_padding_mask", mask()));
    let case = Case::new(mha);
    let out = case
        .run(&["--heads", "2"])
        .success()
        .stdout(predicate::str::contains(
            "weights    in PyTorch's nn.Linear layout [out_features, in_features], as PyTorch's \
         names mean",
        ));
    drop(out);
    assert_matches(&load(&case.output)["out"], &expected);
    std::fs::remove_file(&case.output).unwrap();
    case.fails(
        &["--heads", "2", "--layout", "xw"],
        "--layout xw contradicts the file's PyTorch names",
    );

    // Hugging Face's separate projections.
    let t = |w: &Tensor| transposed(w.shape()[0], w.shape()[1], w.data());
    let case = Case::new(vec![
        ("hidden_states", from_tensor(&inputs.x)),
        ("query.weight", t(&weights.w_q)),
        ("key.weight", t(&weights.w_k)),
        ("value.weight", t(&weights.w_v)),
        ("out_proj.weight", t(&w_o)),
        ("out_proj.bias", from_tensor(&b_o)),
        ("key_padding_mask", mask()),
    ]);
    assert_matches(&case.ok(&["--heads", "2"])["out"], &expected);

    // One convention per file.
    let case = Case::new(vec![
        ("x", from_tensor(&inputs.x)),
        ("query.weight", t(&weights.w_q)),
        ("w_k", from_tensor(&weights.w_k)),
        ("w_v", from_tensor(&weights.w_v)),
    ]);
    case.fails(&["--heads", "2"], "the file mixes this program's names");
}

/// Activations of about 20, as in BERT's middle layers: a correct f32 result is judged by its
/// forward error bound, which grows with them, so it is written; a fixed rule of zero error
/// refuses it and says how to give a wider one (issue: a BERT-sized result was refused).
#[test]
fn large_activations_are_judged_by_their_error_bound() {
    let mut rng = Rng(21);
    let (seq, d) = (64, 64);
    let case = Case::new(vec![
        ("x", from_tensor(&rng.tensor(&[1, seq, d], 20.0))),
        ("w_q", from_tensor(&rng.tensor(&[d, d], 0.5))),
        ("w_k", from_tensor(&rng.tensor(&[d, d], 0.5))),
        ("w_v", from_tensor(&rng.tensor(&[d, d], 0.5))),
    ]);
    case.run(&["--heads", "4", "--layout", "xw"])
        .success()
        .stdout(predicate::str::contains("f32 forward error bound"))
        .stdout(predicate::str::is_match(r"out\s+\[1, 64, 64\].*%\s+pass").unwrap());
    case.run(&[
        "--heads",
        "4",
        "--layout",
        "xw",
        "--tolerance-atol",
        "0",
        "--tolerance-rtol",
        "0",
    ])
    .failure()
    .stderr(predicate::str::contains("nothing was written"))
    .stderr(predicate::str::contains("--tolerance-atol"));
}
