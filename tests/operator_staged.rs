//! The operator's staged kernels (scores, softmax, weighted sum through a readable score
//! matrix) and the choice between them and the fused kernel: the operator's cases (GQA against
//! MHA on repeated K/V, cross-attention, end-aligned causal masking, every bias broadcast,
//! fully masked rows) on the staged kernels, random shapes on both kernels against the f64
//! reference, the probabilities read back, bounded submissions, and a device with four storage
//! buffers per stage running the staged kernels where `Auto` picks them. (No allocation at
//! changing lengths is checked for both kernels in tests/operator.rs.)

mod common;

use common::{Rng, ctx, repeat_heads};
use wgpu_attention::{
    AttentionOp, BiasShape, Error, GpuContext, KernelChoice, OperatorConfig, OperatorInputs,
    QkvLayout, Tensor, Tolerance, compare, reference,
};

fn staged(config: OperatorConfig) -> OperatorConfig {
    config.with_kernel(KernelChoice::Staged)
}

/// Runs `config` (staged) on `inputs` and checks the output against the reference.
fn run_on(gpu: &GpuContext, config: &OperatorConfig, inputs: &OperatorInputs) -> Tensor {
    let mut op = AttentionOp::new(gpu, config).unwrap();
    assert_eq!(op.kernel(), config.kernel, "{config:?}");
    let out = op.run(inputs).unwrap();
    let cpu = reference::operator(config, inputs).unwrap();
    let cmp = compare(&out, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{config:?}\n{cmp}");
    out
}

fn run(config: &OperatorConfig, inputs: &OperatorInputs) -> Tensor {
    run_on(ctx(), config, inputs)
}

/// Builds the operator on the suite's context. Under the downlevel test profile (fewer storage
/// buffers per stage than the fused variant binds) the fused kernel must be refused by name:
/// that is checked, and gives `None`.
fn build(config: &OperatorConfig) -> Option<AttentionOp> {
    let allowed = ctx().limits().max_storage_buffers_per_shader_stage;
    match AttentionOp::new(ctx(), config) {
        Ok(op) => {
            assert_eq!(op.kernel(), config.kernel, "{config:?}");
            Some(op)
        }
        Err(Error::LimitExceeded {
            limit: "max_storage_buffers_per_shader_stage",
            ..
        }) if config.kernel == KernelChoice::Fused && allowed < 6 => None,
        Err(e) => panic!("{config:?}: {e}"),
    }
}

/// [`run`] for either kernel: `None` where [`build`] finds the fused kernel refused.
fn run_either(config: &OperatorConfig, inputs: &OperatorInputs) -> Option<Tensor> {
    let out = build(config)?.run(inputs).unwrap();
    let cpu = reference::operator(config, inputs).unwrap();
    let cmp = compare(&out, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{config:?}\n{cmp}");
    Some(out)
}

#[test]
fn staged_gqa_equals_mha_with_repeated_kv() {
    let mut rng = Rng::new(21);
    let (heads, d, nq, nk) = (8, 12, 7, 19);
    for kv_heads in [8, 2, 1] {
        let q = rng.tensor(&[1, heads, nq, d], 1.0);
        let k = rng.tensor(&[1, kv_heads, nk, d], 1.0);
        let v = rng.tensor(&[1, kv_heads, nk, d], 1.0);
        let gqa = run(
            &staged(OperatorConfig::new(1, heads, kv_heads, d, nq, nk).causal()),
            &OperatorInputs::new(q.clone(), k.clone(), v.clone()),
        );
        let mha = run(
            &staged(OperatorConfig::new(1, heads, heads, d, nq, nk).causal()),
            &OperatorInputs::new(q, repeat_heads(&k, heads), repeat_heads(&v, heads)),
        );
        let cmp = compare(&gqa, &mha, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{heads}/{kv_heads}: {cmp}");
    }
}

#[test]
fn staged_cross_attention_five_queries_over_three_hundred_keys() {
    let mut rng = Rng::new(22);
    let config = staged(
        OperatorConfig::new(1, 2, 1, 12, 5, 300)
            .with_head_dim_v(20)
            .with_key_padding_mask(),
    );
    let mask: Vec<f32> = (0..300).map(|j| (j % 7 != 3) as u8 as f32).collect();
    let inputs = OperatorInputs::new(
        rng.tensor(&[1, 2, 5, 12], 1.0),
        rng.tensor(&[1, 1, 300, 12], 1.0),
        rng.tensor(&[1, 1, 300, 20], 1.0),
    )
    .with_key_mask(Tensor::new([1, 300], mask).unwrap());
    assert_eq!(run(&config, &inputs).shape(), &[1, 2, 5, 20]);
}

#[test]
fn staged_causal_is_aligned_to_the_end_of_the_keys() {
    // With Q = 0 every visible key scores the same, so query i's output is the mean of the
    // values it may see: keys 0 ..= i + kv_len - q_len = i + 6.
    let (nq, nk, dv) = (4, 10, 3);
    let config = staged(
        OperatorConfig::new(1, 1, 1, 4, nq, nk)
            .with_head_dim_v(dv)
            .causal(),
    );
    let v: Vec<f32> = (0..nk * dv).map(|x| x as f32).collect();
    let inputs = OperatorInputs::new(
        Tensor::zeros([1, 1, nq, 4]),
        Rng::new(23).tensor(&[1, 1, nk, 4], 1.0),
        Tensor::new([1, 1, nk, dv], v.clone()).unwrap(),
    );
    let out = run(&config, &inputs);
    for i in 0..nq {
        let seen = i + nk - nq + 1;
        for c in 0..dv {
            let mean = (0..seen).map(|j| v[j * dv + c]).sum::<f32>() / seen as f32;
            let got = out.data()[i * dv + c];
            assert!(
                (got - mean).abs() < 1e-4,
                "query {i} column {c}: {got} != {mean}"
            );
        }
    }
}

#[test]
fn staged_bias_broadcasts_over_each_of_its_shapes() {
    let mut rng = Rng::new(24);
    let (b, h, kvh, d, nq, nk) = (2, 4, 2, 8, 6, 13);
    let q = rng.tensor(&[b, h, nq, d], 1.0);
    let k = rng.tensor(&[b, kvh, nk, d], 1.0);
    let v = rng.tensor(&[b, kvh, nk, d], 1.0);
    let full_shape = BiasShape {
        per_batch: true,
        per_head: true,
    };
    for per_batch in [false, true] {
        for per_head in [false, true] {
            let shape = BiasShape {
                per_batch,
                per_head,
            };
            let [bb, hb] = shape.dims(b, h);
            let mut data = rng.tensor(&[bb, hb, nq, nk], 2.0).data().to_vec();
            // A -inf bias masks a key, as an additive mask does in PyTorch.
            data[3] = f32::NEG_INFINITY;
            let bias = Tensor::new([bb, hb, nq, nk], data).unwrap();
            let config = staged(OperatorConfig::new(b, h, kvh, d, nq, nk).with_bias(shape));
            let broadcast = run(
                &config,
                &OperatorInputs::new(q.clone(), k.clone(), v.clone()).with_bias(bias.clone()),
            );
            // The same bias written out in full gives the same output.
            let mut full = Vec::with_capacity(b * h * nq * nk);
            for bi in 0..b {
                for hi in 0..h {
                    let at = (bi.min(bb - 1) * hb + hi.min(hb - 1)) * nq * nk;
                    full.extend_from_slice(&bias.data()[at..at + nq * nk]);
                }
            }
            let expanded = run(
                &staged(OperatorConfig::new(b, h, kvh, d, nq, nk).with_bias(full_shape)),
                &OperatorInputs::new(q.clone(), k.clone(), v.clone())
                    .with_bias(Tensor::new([b, h, nq, nk], full).unwrap()),
            );
            let cmp = compare(&broadcast, &expanded, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "{shape:?}: {cmp}");
        }
    }
}

#[test]
fn a_row_with_no_key_to_attend_gives_zeros_on_both_kernels() {
    // Batch row 0 pads every key; in batch row 1 query 2's bias row is all -inf; and causal
    // with more queries than keys leaves the first q_len - kv_len queries nothing to see.
    let mut rng = Rng::new(25);
    let (b, h, d, nq, nk) = (2, 2, 4, 6, 4);
    let mask: Vec<f32> = (0..b * nk).map(|j| (j >= nk) as u8 as f32).collect();
    let mut bias = rng.tensor(&[1, 1, nq, nk], 1.0).data().to_vec();
    bias[2 * nk..3 * nk].fill(f32::NEG_INFINITY);
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, h, nk, d], 1.0),
        rng.tensor(&[b, h, nk, d], 1.0),
    )
    .with_key_mask(Tensor::new([b, nk], mask).unwrap())
    .with_bias(Tensor::new([1, 1, nq, nk], bias).unwrap());
    for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
        let config = OperatorConfig::new(b, h, h, d, nq, nk)
            .causal()
            .with_key_padding_mask()
            .with_bias(BiasShape::default())
            .with_kernel(kernel);
        let Some(out) = run_either(&config, &inputs) else {
            continue;
        };
        let row = |bi: usize, hi: usize, i: usize| {
            let at = ((bi * h + hi) * nq + i) * d;
            out.data()[at..at + d].to_vec()
        };
        for hi in 0..h {
            for i in 0..nq {
                assert_eq!(row(0, hi, i), vec![0.0; d], "{kernel:?}: padded batch row");
            }
            for i in [0, 1, 2] {
                assert_eq!(row(1, hi, i), vec![0.0; d], "{kernel:?}: query {i}");
            }
            assert!(row(1, hi, 3).iter().any(|&x| x != 0.0), "{kernel:?}");
        }
    }
}

#[test]
fn random_shapes_on_both_kernels_match_the_reference_including_lengths_below_the_maximum() {
    let mut rng = Rng::new(26);
    let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.next_u64() % xs.len() as u64) as usize];
    for case in 0..8 {
        let (heads, kv_heads) = *[(1, 1), (2, 1), (4, 2), (3, 3), (6, 2), (8, 1)]
            .get((rng.next_u64() % 6) as usize)
            .unwrap();
        let batch = pick(&mut rng, &[1, 2]);
        let d = pick(&mut rng, &[1, 3, 4, 7, 16, 33]);
        let dv = pick(&mut rng, &[d, 5, 8, 12]);
        let max_q = pick(&mut rng, &[1, 5, 17, 40]);
        let max_kv = pick(&mut rng, &[1, 9, 30, 70]);
        let mut config = OperatorConfig::new(batch, heads, kv_heads, d, max_q, max_kv)
            .with_head_dim_v(dv)
            .with_scale(if case % 4 == 2 {
                -0.5
            } else {
                0.1 + rng.uniform() as f32
            });
        if rng.next_u64().is_multiple_of(2) {
            config = config.causal();
        }
        if rng.next_u64().is_multiple_of(2) {
            config = config.with_key_padding_mask();
        }
        if rng.next_u64().is_multiple_of(2) {
            config = config.with_bias(BiasShape {
                per_batch: rng.next_u64().is_multiple_of(2),
                per_head: rng.next_u64().is_multiple_of(2),
            });
        }
        if rng.next_u64().is_multiple_of(2) {
            config = config.token_major();
        }
        if case % 3 == 1 {
            // K and V laid out for more keys than any call has (a KV cache).
            config = config.with_kv_capacity(max_kv + 3);
        }
        let calls = [
            (max_q, max_kv),
            (
                1 + (rng.next_u64() as usize) % max_q,
                1 + (rng.next_u64() as usize) % max_kv,
            ),
        ];
        let inputs: Vec<OperatorInputs> = calls
            .iter()
            .map(|&(nq, nk)| {
                let shape = |heads: usize, n: usize, w: usize| match config.layout {
                    QkvLayout::HeadMajor => vec![batch, heads, n, w],
                    QkvLayout::TokenMajor => vec![batch, n, heads * w],
                };
                let mut x = OperatorInputs::new(
                    rng.tensor(&shape(heads, nq, d), 1.0),
                    rng.tensor(&shape(kv_heads, nk, d), 1.0),
                    rng.tensor(&shape(kv_heads, nk, dv), 1.0),
                );
                if config.key_padding_mask {
                    let m = (0..batch * nk)
                        .map(|_| !rng.next_u64().is_multiple_of(4) as u8 as f32)
                        .collect();
                    x = x.with_key_mask(Tensor::new([batch, nk], m).unwrap());
                }
                if let Some(s) = config.bias {
                    let [bb, hb] = s.dims(batch, heads);
                    x = x.with_bias(rng.tensor(&[bb, hb, nq, nk], 1.0));
                }
                x
            })
            .collect();
        for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
            let config = config.clone().with_kernel(kernel);
            // One operator, two calls: the maximum lengths, then shorter ones.
            let Some(mut op) = build(&config) else {
                continue;
            };
            for (x, (nq, nk)) in inputs.iter().zip(calls) {
                let out = op.run(x).unwrap();
                let cpu = reference::operator(&config, x).unwrap();
                let cmp = compare(&out, &cpu, Tolerance::F32).unwrap();
                assert!(
                    cmp.passed(),
                    "case {case} {config:?} q_len {nq} kv_len {nk}:\n{cmp}"
                );
            }
        }
    }
}

/// At scale f32::MAX every scaled score overflows f32: both kernels take each row's maximum
/// over unscaled scores and scale only differences from it, so both give the reference's
/// answer (each query attends its best visible key alone).
#[test]
fn a_huge_scale_gives_the_reference_on_both_kernels() {
    let mut rng = Rng::new(31);
    let (b, h, kvh, d, nq, nk) = (1, 4, 2, 8, 5, 23);
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
    );
    for scale in [f32::MAX, -f32::MAX] {
        for kernel in [KernelChoice::Staged, KernelChoice::Fused] {
            let config = OperatorConfig::new(b, h, kvh, d, nq, nk)
                .causal()
                .with_scale(scale)
                .with_kernel(kernel);
            run_either(&config, &inputs);
        }
    }
}

#[test]
fn probabilities_are_kept_and_read_back() {
    let mut rng = Rng::new(27);
    let (b, h, kvh, d, max_q, max_kv) = (2, 4, 2, 8, 6, 11);
    let config = OperatorConfig::new(b, h, kvh, d, max_q, max_kv)
        .causal()
        .with_key_padding_mask()
        .with_intermediates();
    let mut op = AttentionOp::new(ctx(), &config).unwrap();
    assert_eq!(op.kernel(), KernelChoice::Staged, "Auto keeps them staged");
    assert!(
        op.read_probabilities()
            .unwrap_err()
            .to_string()
            .contains("no call has run yet")
    );
    // The maximum lengths, then shorter ones (a row of S narrower than the buffer's).
    for (nq, nk) in [(6, 11), (3, 5)] {
        let mask = (0..b * nk).map(|j| (j % 4 != 2) as u8 as f32).collect();
        let inputs = OperatorInputs::new(
            rng.tensor(&[b, h, nq, d], 1.0),
            rng.tensor(&[b, kvh, nk, d], 1.0),
            rng.tensor(&[b, kvh, nk, d], 1.0),
        )
        .with_key_mask(Tensor::new([b, nk], mask).unwrap());
        let out = op.run(&inputs).unwrap();
        let cmp = compare(
            &out,
            &reference::operator(&config, &inputs).unwrap(),
            Tolerance::F32,
        )
        .unwrap();
        assert!(cmp.passed(), "{cmp}");
        let probs = op.read_probabilities().unwrap();
        assert_eq!(probs.shape(), &[b, h, nq, nk]);
        let cpu = reference::operator_probs(&config, &inputs).unwrap();
        let cmp = compare(&probs, &cpu, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{nq} x {nk}: {cmp}");
        // Masked keys hold exactly 0: key 2 of batch row 0 is padding.
        assert!((0..h * nq).all(|r| probs.data()[r * nk + 2] == 0.0));
    }
    // Without kept intermediates, or with the fused kernel, there is nothing to read.
    let plain = AttentionOp::new(ctx(), &OperatorConfig::new(1, 1, 1, 4, 2, 2)).unwrap();
    assert_eq!(plain.kernel(), KernelChoice::Fused, "Auto picks fused");
    assert!(matches!(
        plain.read_probabilities(),
        Err(Error::InvalidConfig(_))
    ));
    let err = AttentionOp::new(
        ctx(),
        &OperatorConfig::new(1, 1, 1, 4, 2, 2)
            .with_kernel(KernelChoice::Fused)
            .with_intermediates(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("KernelChoice::Staged (or Auto)"),
        "{err}"
    );
}

#[test]
fn a_score_matrix_past_the_limits_is_a_named_error() {
    // 64 heads x 4096 x 4096 scores is 4 GiB: past every device's binding size.
    let config = staged(OperatorConfig::new(1, 64, 8, 64, 4096, 4096));
    let err = AttentionOp::new(ctx(), &config).unwrap_err();
    assert!(
        matches!(&err, Error::LimitExceeded { what, .. } if what.contains("score matrix")),
        "{err}"
    );
    assert!(err.to_string().contains("KernelChoice::Fused"), "{err}");
}

#[test]
fn a_call_split_into_bounded_submissions_gives_the_same_bits_staged() {
    let mut rng = Rng::new(29);
    let (b, h, kvh, d, nq, nk) = (2, 4, 2, 8, 40, 50);
    let config = staged(OperatorConfig::new(b, h, kvh, d, nq, nk).causal()).with_intermediates();
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
    );
    let mut op = AttentionOp::new(ctx(), &config).unwrap();
    let whole = op.run_within(&inputs, 1e15).unwrap();
    let whole_probs = op.read_probabilities().unwrap();
    // A budget of a few thousand FLOPs cuts every kernel into many chunks.
    let split = op.run_within(&inputs, 5e3).unwrap();
    assert_eq!(whole, split);
    assert_eq!(whole_probs, op.read_probabilities().unwrap());
    let cmp = compare(
        &whole,
        &reference::operator(&config, &inputs).unwrap(),
        Tolerance::F32,
    )
    .unwrap();
    assert!(cmp.passed(), "{cmp}");
}

/// A device with wgpu's downlevel limits (four storage buffers per stage, 16352 bytes of
/// workgroup memory): `Auto` runs the staged kernels, which bind three each, and gives the
/// reference's answer; the fused kernel is refused by name.
#[test]
fn the_operator_runs_staged_on_a_downlevel_device() {
    let (device, queue) = common::app_device(|l| *l = wgpu::Limits::downlevel_defaults());
    let small = GpuContext::from_device(device, queue);
    assert_eq!(small.limits().max_storage_buffers_per_shader_stage, 4);
    let mut rng = Rng::new(30);
    let (b, h, kvh, d, nq, nk) = (1, 4, 2, 16, 5, 37);
    let config = OperatorConfig::new(b, h, kvh, d, nq, nk)
        .causal()
        .with_key_padding_mask()
        .with_bias(BiasShape {
            per_batch: false,
            per_head: true,
        });
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
    )
    .with_key_mask(Tensor::new([b, nk], (0..nk).map(|j| (j != 4) as u8 as f32).collect()).unwrap())
    .with_bias(rng.tensor(&[1, h, nq, nk], 1.0));
    let mut op = AttentionOp::new(&small, &config).unwrap();
    assert_eq!(op.kernel(), KernelChoice::Staged);
    let cmp = compare(
        &op.run(&inputs).unwrap(),
        &reference::operator(&config, &inputs).unwrap(),
        Tolerance::F32,
    )
    .unwrap();
    assert!(cmp.passed(), "{cmp}");
    let err = AttentionOp::new(&small, &config.with_kernel(KernelChoice::Fused)).unwrap_err();
    assert!(
        err.to_string()
            .contains("max_storage_buffers_per_shader_stage"),
        "{err}"
    );
}
