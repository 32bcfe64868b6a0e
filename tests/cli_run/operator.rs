//! `wgpu-attention run` on files holding `q`, `k`, `v`: the attention operator end to end,
//! against PyTorch's own `F.scaled_dot_product_attention` (fixtures made by
//! tests/fixtures/make_sdpa_fixture.py) and against the f64 reference, and every bad tensor
//! refused by name with nothing written.

use super::*;
use wgpu_attention::{BiasShape, OperatorConfig, OperatorInputs};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Runs the program on a committed fixture and returns what it wrote beside PyTorch's output.
fn run_fixture(name: &str, flags: &[&str]) -> (Tensor, Tensor) {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.safetensors");
    Command::cargo_bin("wgpu-attention")
        .unwrap()
        .arg("run")
        .arg("--input")
        .arg(format!("{FIXTURES}/{name}.safetensors"))
        .arg("--output")
        .arg(&output)
        .args(flags)
        .assert()
        .success()
        .stdout(predicate::str::contains("pass"));
    let mut ours = load(&output);
    let mut torch = load(Path::new(&format!("{FIXTURES}/{name}_out.safetensors")));
    (ours.remove("out").unwrap(), torch.remove("out").unwrap())
}

#[test]
fn gqa_cross_causal_mask_bias_and_scale_match_pytorch_sdpa() {
    let (ours, torch) = run_fixture("sdpa_gqa", &["--causal", "--scale", "0.3"]);
    assert_eq!(ours.shape(), &[2, 8, 5, 8]);
    assert_matches(&ours, &torch);
    // Without --causal the same file gives other numbers: the fixture does test the alignment.
    let (unmasked, _) = run_fixture("sdpa_gqa", &["--scale", "0.3"]);
    assert!(!compare(&unmasked, &torch, Tolerance::F32).unwrap().passed());
}

#[test]
fn mqa_with_the_default_scale_matches_pytorch_sdpa() {
    let (ours, torch) = run_fixture("sdpa_mqa", &[]);
    assert_eq!(ours.shape(), &[1, 4, 3, 8]);
    assert_matches(&ours, &torch);
}

/// Batch 2, 4 query heads over 2 key/value heads of width 4 (values 3), 3 queries over 7 keys.
struct Small {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn small() -> Small {
    let mut rng = Rng(31);
    Small {
        q: rng.tensor(&[2, 4, 3, 4], 1.0),
        k: rng.tensor(&[2, 2, 7, 4], 1.0),
        v: rng.tensor(&[2, 2, 7, 3], 1.0),
    }
}

fn small_config() -> OperatorConfig {
    OperatorConfig::new(2, 4, 2, 4, 3, 7).with_head_dim_v(3)
}

fn small_file() -> Vec<(&'static str, Stored)> {
    let s = small();
    vec![
        ("q", from_tensor(&s.q)),
        ("k", from_tensor(&s.k)),
        ("v", from_tensor(&s.v)),
    ]
}

fn small_with(name: &'static str, stored: Stored) -> Vec<(&'static str, Stored)> {
    let mut tensors: Vec<_> = small_file()
        .into_iter()
        .filter(|(n, _)| *n != name)
        .collect();
    tensors.push((name, stored));
    tensors
}

fn expected(config: &OperatorConfig, mask: Option<Tensor>, bias: Option<Tensor>) -> Tensor {
    let s = small();
    let inputs = OperatorInputs {
        q: s.q,
        k: s.k,
        v: s.v,
        key_mask: mask,
        bias,
    };
    reference::operator(config, &inputs).unwrap()
}

/// Keeps for row 0: every key; row 1: keys 0..5.
const KEPT: [f32; 14] = [1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.];

#[test]
fn key_masks_of_every_dtype_a_pytorch_user_saves_mean_nonzero_attends() {
    let config = small_config().causal().with_key_padding_mask();
    let keep = Tensor::new([2, 7], KEPT.to_vec()).unwrap();
    let want = expected(&config, Some(keep), None);
    // Nonzero values other than 1 attend too.
    let stored = |dtype: Dtype, one: &[u8], zero: &[u8]| Stored {
        dtype,
        shape: vec![2, 7],
        bytes: KEPT
            .iter()
            .flat_map(|&k| if k != 0.0 { one } else { zero }.to_vec())
            .collect(),
    };
    for mask in [
        stored(Dtype::BOOL, &[1], &[0]),
        stored(Dtype::U8, &[255], &[0]),
        stored(Dtype::I32, &3i32.to_le_bytes(), &0i32.to_le_bytes()),
        stored(Dtype::I64, &1i64.to_le_bytes(), &0i64.to_le_bytes()),
        stored(Dtype::F32, &0.5f32.to_le_bytes(), &0f32.to_le_bytes()),
        stored(Dtype::F64, &1f64.to_le_bytes(), &0f64.to_le_bytes()),
    ] {
        let dtype = mask.dtype;
        let case = Case::new(small_with("key_mask", mask));
        let out = case
            .run(&["--causal"])
            .success()
            .stdout(predicate::str::contains(
                "mask       `key_mask`: keys kept per batch row (of 7): 7, 5",
            ));
        drop(out);
        let out = load(&case.output);
        let check = compare(&out["out"], &want, Tolerance::F32).unwrap();
        assert!(check.passed(), "{dtype}: {check}");
    }
}

#[test]
fn bias_is_broadcast_over_each_of_its_shapes() {
    let mut rng = Rng(41);
    for (per_batch, per_head) in [(false, false), (true, false), (false, true), (true, true)] {
        let shape = [
            if per_batch { 2 } else { 1 },
            if per_head { 4 } else { 1 },
            3,
            7,
        ];
        let mut bias = rng.tensor(&shape, 2.0);
        // -inf masks a key: key 6 for the first bias row.
        let mut data = bias.data().to_vec();
        data[6] = f32::NEG_INFINITY;
        bias = Tensor::new(shape.to_vec(), data).unwrap();
        let config = small_config().with_bias(BiasShape {
            per_batch,
            per_head,
        });
        let want = expected(&config, None, Some(bias.clone()));
        let case = Case::new(small_with("attn_bias", from_tensor(&bias)));
        let out = case.ok(&[]);
        assert_eq!(out["out"].shape(), &[2, 4, 3, 3]);
        let check = compare(&out["out"], &want, Tolerance::F32).unwrap();
        assert!(check.passed(), "bias {shape:?}: {check}");
        // The bias does change the output: without it the numbers differ.
        let plain = expected(&small_config(), None, None);
        assert!(
            !compare(&out["out"], &plain, Tolerance::F32)
                .unwrap()
                .passed()
        );
    }
}

#[test]
fn a_zero_tolerance_refuses_the_operators_output_and_writes_nothing() {
    Case::new(small_file()).fails(
        &["--tolerance-atol", "0", "--tolerance-rtol", "0"],
        "nothing was written",
    );
}

// Bad files: each fails with a message naming the problem, and writes nothing.

#[test]
fn wrong_rank() {
    Case::new(small_with("q", f32s(&[2, 4, 3], &[0.5; 24]))).fails(
        &[],
        "tensor `q` has shape [2, 4, 3], expected rank 4: [batch, heads, q_len, head_dim]",
    );
}

#[test]
fn missing_values() {
    let tensors: Vec<_> = small_file()
        .into_iter()
        .filter(|(n, _)| *n != "v")
        .collect();
    Case::new(tensors).fails(
        &[],
        "missing tensor `v`, the values [batch, kv_heads, kv_len, head_dim_v]; the file holds k, q",
    );
}

#[test]
fn mismatched_batch() {
    Case::new(small_with("k", f32s(&[3, 2, 7, 4], &[0.5; 168])))
        .fails(&[], "tensor `k` has batch 3 but `q` has 2");
}

#[test]
fn kv_heads_must_divide_heads() {
    Case::new(small_with("q", f32s(&[2, 3, 3, 4], &[0.5; 72])))
        .fails(&[], "`q` has 3 heads and `k` 2: kv_heads must divide heads");
}

#[test]
fn keys_and_values_need_the_same_heads() {
    Case::new(small_with("v", f32s(&[2, 1, 7, 3], &[0.5; 42]))).fails(
        &[],
        "tensor `v` has 1 heads but `k` has 2: keys and values come in the same kv_heads heads",
    );
}

#[test]
fn head_dim_mismatch() {
    Case::new(small_with("k", f32s(&[2, 2, 7, 5], &[0.5; 140])))
        .fails(&[], "tensor `k` has heads 5 wide but `q` has heads 4 wide");
}

#[test]
fn key_and_value_lengths_must_match() {
    Case::new(small_with("v", f32s(&[2, 2, 6, 3], &[0.5; 72]))).fails(
        &[],
        "tensor `v` has 6 positions but `k` has 7: every key needs its value",
    );
}

#[test]
fn mask_shape_follows_batch_and_kv_len() {
    Case::new(small_with("key_mask", f32s(&[2, 3], &[1.0; 6]))).fails(
        &[],
        "tensor `key_mask` has shape [2, 3], expected [2, 7] ([batch, kv_len] from `q` and `k`",
    );
}

#[test]
fn bias_shapes_outside_the_broadcasts_are_refused() {
    Case::new(small_with("attn_bias", f32s(&[1, 3, 3, 7], &[0.0; 63]))).fails(
        &[],
        "tensor `attn_bias` has shape [1, 3, 3, 7], expected [2 or 1, 4 or 1, 3, 7] ([batch or \
         1, heads or 1, q_len, kv_len]",
    );
    Case::new(small_with("attn_bias", f32s(&[3, 7], &[0.0; 21])))
        .fails(&[], "a [q_len, kv_len] bias is saved as bias[None, None]");
}

#[test]
fn wrong_dtypes_are_named() {
    // (F16 and BF16 Q, K and V are read: see precision_f16 in tests/cli_run.rs.)
    let i32s = Stored {
        dtype: Dtype::I32,
        shape: vec![2, 4, 3, 4],
        bytes: vec![0; 384],
    };
    Case::new(small_with("q", i32s)).fails(
        &[],
        "tensor `q` has dtype I32, expected F32, F16 or BF16; save it with tensor.float()",
    );
    let bool_bias = Stored {
        dtype: Dtype::BOOL,
        shape: vec![1, 1, 3, 7],
        bytes: vec![1; 21],
    };
    Case::new(small_with("attn_bias", bool_bias)).fails(
        &[],
        "tensor `attn_bias` has dtype BOOL, expected F32 (added to the scores); a boolean mask \
         over keys goes in `key_mask`",
    );
    let f16_mask = Stored {
        dtype: Dtype::F16,
        shape: vec![2, 7],
        bytes: vec![0; 28],
    };
    Case::new(small_with("key_mask", f16_mask)).fails(
        &[],
        "tensor `key_mask` has dtype F16, expected one of BOOL, U8, I32, I64, F32, F64",
    );
}

#[test]
fn non_finite_inputs_are_refused() {
    let mut q = small().q.data().to_vec();
    q[5] = f32::NAN;
    Case::new(small_with("q", f32s(&[2, 4, 3, 4], &q))).fails(
        &[],
        "tensor `q` holds NaN at index [0, 0, 1, 1]: inputs must be finite",
    );
    let mut v = small().v.data().to_vec();
    v[0] = f32::INFINITY;
    Case::new(small_with("v", f32s(&[2, 2, 7, 3], &v))).fails(
        &[],
        "tensor `v` holds inf at index [0, 0, 0, 0]: inputs must be finite",
    );
    let mut bias = vec![0.0; 21];
    bias[8] = f32::INFINITY;
    Case::new(small_with("attn_bias", f32s(&[1, 1, 3, 7], &bias))).fails(
        &[],
        "tensor `attn_bias` holds inf at index [0, 0, 1, 1]: a bias must be finite, or -inf to \
         mask a key",
    );
}

#[test]
fn an_additive_mask_saved_as_key_mask_is_refused() {
    let additive: Vec<f32> = KEPT
        .iter()
        .map(|&k| if k != 0.0 { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Case::new(small_with("key_mask", f32s(&[2, 7], &additive))).fails(
        &[],
        "tensor `key_mask` holds -inf at index [1, 5]: a key mask is nonzero to attend and 0 for \
         padding; an additive mask (0 = keep, -inf = drop) goes in `attn_bias`",
    );
}

#[test]
fn a_file_mixing_layer_and_operator_tensors_is_refused() {
    let mut tensors = small_file();
    tensors.push(("x", f32s(&[1, 3, 4], &X)));
    Case::new(tensors).fails(
        &[],
        "the file mixes a layer's tensors (`x`) with an attention operator's (`q`)",
    );
}

#[test]
fn heads_that_disagree_with_q_are_refused() {
    Case::new(small_file()).fails(
        &["--heads", "2"],
        "--heads 2 disagrees with `q`, which has 4 heads ([batch, heads, q_len, head_dim] = \
         [2, 4, 3, 4]); an operator file's head counts come from its shapes: drop --heads",
    );
    // Agreeing is fine.
    let out = Case::new(small_file()).ok(&["--heads", "4"]);
    assert_matches(&out["out"], &expected(&small_config(), None, None));
}

#[test]
fn a_layers_flags_are_refused() {
    Case::new(small_file()).fails(
        &["--layout", "torch"],
        "--layout says how a layer's weight matrices are stored",
    );
    Case::new(small_file()).fails(
        &["--kernel", "staged"],
        "the attention operator has only the fused kernel so far",
    );
}

#[test]
fn queries_with_no_key_need_allow_masked_rows() {
    // Row 1 keeps no key at all.
    let mut none = KEPT;
    none[7..].fill(0.0);
    let case = Case::new(small_with("key_mask", f32s(&[2, 7], &none)));
    case.fails(
        &[],
        "`key_mask` masks every key of batch row 1, so its queries have nothing to attend",
    );
    let out = case.ok(&["--allow-masked-rows"]);
    // 4 heads x 3 queries x 3 values of batch row 1: zeros.
    assert!(out["out"].data()[36..].iter().all(|&v| v == 0.0));
    assert!(out["out"].data()[..36].iter().any(|&v| v != 0.0));

    // More queries than keys under causal masking: the first ones see nothing, as the
    // alignment to the end of the keys means (7 queries over 4 keys: queries 0..3).
    let mut rng = Rng(3);
    let case = Case::new(vec![
        ("q", from_tensor(&rng.tensor(&[1, 1, 7, 4], 1.0))),
        ("k", from_tensor(&rng.tensor(&[1, 1, 4, 4], 1.0))),
        ("v", from_tensor(&rng.tensor(&[1, 1, 4, 4], 1.0))),
    ]);
    case.fails(
        &["--causal"],
        "with --causal, queries 0..3 of batch row 0 have no key to attend: there are 7 queries \
         but only 4 keys, and causal masking aligns the queries to the end of the keys",
    );
    let out = case.ok(&["--causal", "--allow-masked-rows"]);
    assert!(out["out"].data()[..12].iter().all(|&v| v == 0.0));
    assert!(out["out"].data()[12..16].iter().any(|&v| v != 0.0));
}

#[test]
fn a_call_past_the_checks_budget_is_checked_on_a_spread_of_head_groups() {
    // 8 query heads over 4 key/value heads of 64, 768 queries over 768 keys: checking all
    // 4 groups would take 1.2e9 multiply-adds, over the budget of 1e9, so 3 are.
    let mut rng = Rng(51);
    let case = Case::new(vec![
        ("q", from_tensor(&rng.tensor(&[1, 8, 768, 64], 1.0))),
        ("k", from_tensor(&rng.tensor(&[1, 4, 768, 64], 1.0))),
        ("v", from_tensor(&rng.tensor(&[1, 4, 768, 64], 1.0))),
    ]);
    case.run(&["--causal"])
        .success()
        .stdout(predicate::str::contains(
            "check      the query heads of 3 of 4 (batch row, key/value head) groups, evenly \
             spread (every one would take 1.2e9 multiply-adds",
        ))
        .stdout(predicate::str::is_match(r"out\s+\[1, 8, 768, 64\].*%\s+pass").unwrap());
    std::fs::remove_file(&case.output).unwrap();
    // The sampled groups are really compared: no error at all is more than f32 gives.
    case.fails(
        &["--causal", "--tolerance-atol", "0", "--tolerance-rtol", "0"],
        "nothing was written",
    );
}

/// The PyTorch fixture in f16 storage (`--precision f16`): Q, K, V rounded to f16 on upload,
/// f32 arithmetic, the output stored in f16 and checked by the program under its f16 bound;
/// here also against PyTorch's f32 output under the fixed f16 rule. Without shader-f16 the
/// program refuses by name.
#[test]
fn gqa_in_f16_matches_pytorch_sdpa_within_the_f16_rule() {
    let flags = ["--causal", "--scale", "0.3", "--precision", "f16"];
    if !wgpu_attention::GpuContext::from_env().unwrap().has_f16() {
        let dir = tempfile::tempdir().unwrap();
        Command::cargo_bin("wgpu-attention")
            .unwrap()
            .arg("run")
            .arg("--input")
            .arg(format!("{FIXTURES}/sdpa_gqa.safetensors"))
            .arg("--output")
            .arg(dir.path().join("out.safetensors"))
            .args(flags)
            .assert()
            .failure()
            .stderr(predicate::str::contains("lacks shader-f16"));
        return;
    }
    let (ours, torch) = run_fixture("sdpa_gqa", &flags);
    assert_eq!(ours.shape(), &[2, 8, 5, 8]);
    let c = compare(&ours, &torch, Tolerance::F16).unwrap();
    assert!(c.passed(), "{c}");
    // And the f16 storage shows: not within the f32 rule.
    assert!(!compare(&ours, &torch, Tolerance::F32).unwrap().passed());
}
