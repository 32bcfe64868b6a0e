//! The attention operator on an application's own Q, K and V: GQA/MQA, cross-attention,
//! end-aligned causal masking, bias broadcasting, lengths below the maxima, the named errors,
//! and no allocation when the lengths change. Every GPU result is checked against the f64
//! reference (`reference::operator`), and the central cases also against values derived by
//! hand or by a second route (GQA against MHA on repeated K/V).

mod common;

use common::{Rng, ctx, op_ctx, repeat_heads};
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, BiasShape, Error, GpuContext, KernelChoice, Lengths, OperatorConfig,
    OperatorInputs, OperatorIo, QkvLayout, Tensor, Tolerance, compare, reference,
};

fn check(config: &OperatorConfig, inputs: &OperatorInputs, gpu: &Tensor) {
    let cpu = reference::operator(config, inputs).unwrap();
    let cmp = compare(gpu, &cpu, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{config:?}\n{cmp}");
}

fn run(config: &OperatorConfig, inputs: &OperatorInputs) -> Tensor {
    let mut op = AttentionOp::new(op_ctx(config), config).unwrap();
    let out = op.run(inputs).unwrap();
    check(config, inputs, &out);
    out
}

#[test]
fn gqa_equals_mha_with_repeated_kv() {
    let mut rng = Rng::new(1);
    let (heads, d, nq, nk) = (8, 16, 9, 21);
    for kv_heads in [8, 2, 1] {
        let q = rng.tensor(&[1, heads, nq, d], 1.0);
        let k = rng.tensor(&[1, kv_heads, nk, d], 1.0);
        let v = rng.tensor(&[1, kv_heads, nk, d], 1.0);
        let gqa_config = OperatorConfig::new(1, heads, kv_heads, d, nq, nk).causal();
        let gqa = run(
            &gqa_config,
            &OperatorInputs::new(q.clone(), k.clone(), v.clone()),
        );
        let mha_config = OperatorConfig::new(1, heads, heads, d, nq, nk).causal();
        let mha = run(
            &mha_config,
            &OperatorInputs::new(q, repeat_heads(&k, heads), repeat_heads(&v, heads)),
        );
        let cmp = compare(&gqa, &mha, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{heads}/{kv_heads}: {cmp}");
    }
}

#[test]
fn cross_attention_five_queries_over_three_hundred_keys() {
    let mut rng = Rng::new(2);
    let config = OperatorConfig::new(1, 2, 2, 12, 5, 300)
        .with_head_dim_v(20)
        .with_key_padding_mask();
    let mask: Vec<f32> = (0..300).map(|j| (j % 7 != 3) as u8 as f32).collect();
    let inputs = OperatorInputs::new(
        rng.tensor(&[1, 2, 5, 12], 1.0),
        rng.tensor(&[1, 2, 300, 12], 1.0),
        rng.tensor(&[1, 2, 300, 20], 1.0),
    )
    .with_key_mask(Tensor::new([1, 300], mask).unwrap());
    let out = run(&config, &inputs);
    assert_eq!(out.shape(), &[1, 2, 5, 20]);
}

#[test]
fn causal_is_aligned_to_the_end_of_the_keys() {
    // With Q = 0 every visible key scores the same, so query i's output is the mean of the
    // values it may see: keys 0 ..= i + kv_len - q_len = i + 6.
    let (nq, nk, dv) = (4, 10, 3);
    let config = OperatorConfig::new(1, 1, 1, 4, nq, nk)
        .with_head_dim_v(dv)
        .causal();
    let v: Vec<f32> = (0..nk * dv).map(|x| x as f32).collect();
    let inputs = OperatorInputs::new(
        Tensor::zeros([1, 1, nq, 4]),
        Rng::new(3).tensor(&[1, 1, nk, 4], 1.0),
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
    // More queries than keys: the first q_len - kv_len queries see no key and give zeros.
    let config = OperatorConfig::new(1, 1, 1, 4, 6, 4).causal();
    let mut rng = Rng::new(4);
    let inputs = OperatorInputs::new(
        rng.tensor(&[1, 1, 6, 4], 1.0),
        rng.tensor(&[1, 1, 4, 4], 1.0),
        rng.tensor(&[1, 1, 4, 4], 1.0),
    );
    let out = run(&config, &inputs);
    assert!(
        out.data()[..8].iter().all(|&x| x == 0.0),
        "{:?}",
        out.data()
    );
    assert!(out.data()[8..].iter().any(|&x| x != 0.0));
}

#[test]
fn bias_broadcasts_over_each_of_its_shapes() {
    let mut rng = Rng::new(5);
    let (b, h, kvh, d, nq, nk) = (2, 4, 2, 8, 6, 13);
    let q = rng.tensor(&[b, h, nq, d], 1.0);
    let k = rng.tensor(&[b, kvh, nk, d], 1.0);
    let v = rng.tensor(&[b, kvh, nk, d], 1.0);
    for per_batch in [false, true] {
        for per_head in [false, true] {
            let shape = BiasShape {
                per_batch,
                per_head,
            };
            let [bb, hb] = shape.dims(b, h);
            let mut bias = rng.tensor(&[bb, hb, nq, nk], 2.0);
            // A -inf bias masks a key, as an additive mask does in PyTorch.
            let mut data = bias.data().to_vec();
            data[3] = f32::NEG_INFINITY;
            bias = Tensor::new(bias.shape().to_vec(), data).unwrap();
            let config = OperatorConfig::new(b, h, kvh, d, nq, nk).with_bias(shape);
            let inputs =
                OperatorInputs::new(q.clone(), k.clone(), v.clone()).with_bias(bias.clone());
            let broadcast = run(&config, &inputs);
            // The same bias written out in full gives the same output.
            let mut full = Vec::with_capacity(b * h * nq * nk);
            for bi in 0..b {
                for hi in 0..h {
                    let at = ((bi.min(bb - 1)) * hb + hi.min(hb - 1)) * nq * nk;
                    full.extend_from_slice(&bias.data()[at..at + nq * nk]);
                }
            }
            let full_config = OperatorConfig::new(b, h, kvh, d, nq, nk).with_bias(BiasShape {
                per_batch: true,
                per_head: true,
            });
            let expanded = run(
                &full_config,
                &OperatorInputs::new(q.clone(), k.clone(), v.clone())
                    .with_bias(Tensor::new([b, h, nq, nk], full).unwrap()),
            );
            let cmp = compare(&broadcast, &expanded, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "{shape:?}: {cmp}");
        }
    }
}

#[test]
fn random_shapes_match_the_reference_including_lengths_below_the_maximum() {
    let mut rng = Rng::new(6);
    let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.next_u64() % xs.len() as u64) as usize];
    for case in 0..10 {
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
            .with_scale(0.1 + rng.uniform() as f32);
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
        let mut op = AttentionOp::new(op_ctx(&config), &config).unwrap();
        // Two calls on one operator: the maximum lengths, then shorter ones.
        for (nq, nk) in [
            (max_q, max_kv),
            (
                1 + (rng.next_u64() as usize) % max_q,
                1 + (rng.next_u64() as usize) % max_kv,
            ),
        ] {
            let shape = |heads: usize, n: usize, w: usize| match config.layout {
                QkvLayout::HeadMajor => vec![batch, heads, n, w],
                QkvLayout::TokenMajor => vec![batch, n, heads * w],
            };
            let mut inputs = OperatorInputs::new(
                rng.tensor(&shape(heads, nq, d), 1.0),
                rng.tensor(&shape(kv_heads, nk, d), 1.0),
                rng.tensor(&shape(kv_heads, nk, dv), 1.0),
            );
            if config.key_padding_mask {
                let m = (0..batch * nk)
                    .map(|_| !rng.next_u64().is_multiple_of(4) as u8 as f32)
                    .collect();
                inputs = inputs.with_key_mask(Tensor::new([batch, nk], m).unwrap());
            }
            if let Some(s) = config.bias {
                let [bb, hb] = s.dims(batch, heads);
                inputs = inputs.with_bias(rng.tensor(&[bb, hb, nq, nk], 1.0));
            }
            let out = op.run(&inputs).unwrap();
            let cpu = reference::operator(&config, &inputs).unwrap();
            let cmp = compare(&out, &cpu, Tolerance::F32).unwrap();
            assert!(
                cmp.passed(),
                "case {case} {config:?} q_len {nq} kv_len {nk}:\n{cmp}"
            );
        }
    }
}

#[test]
fn bad_configurations_and_inputs_are_named_errors() {
    let err = AttentionOp::new(ctx(), &OperatorConfig::new(1, 8, 3, 16, 4, 4)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::KvHeadsNotDividing {
                heads: 8,
                kv_heads: 3
            }
        ),
        "{err}"
    );
    let config = OperatorConfig::new(1, 4, 2, 8, 4, 16);
    let mut op = AttentionOp::new(ctx(), &config).unwrap();
    let mut rng = Rng::new(7);
    let q = rng.tensor(&[1, 4, 4, 8], 1.0);
    let k = rng.tensor(&[1, 2, 16, 8], 1.0);
    let v = rng.tensor(&[1, 2, 16, 8], 1.0);
    // K heads of another width than Q's.
    let err = op
        .run(&OperatorInputs::new(
            q.clone(),
            rng.tensor(&[1, 2, 16, 6], 1.0),
            v.clone(),
        ))
        .unwrap_err();
    assert!(
        matches!(&err, Error::HeadDimMismatch { name, expected: 8, actual: 6 } if name == "k"),
        "{err}"
    );
    // More queries, or keys, than the operator was built for.
    let err = op
        .run(&OperatorInputs::new(
            rng.tensor(&[1, 4, 5, 8], 1.0),
            k.clone(),
            v.clone(),
        ))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthPastMaximum {
                name: "q_len",
                len: 5,
                max: 4
            }
        ),
        "{err}"
    );
    let long = rng.tensor(&[1, 2, 17, 8], 1.0);
    let err = op
        .run(&OperatorInputs::new(q.clone(), long.clone(), long))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthPastMaximum {
                name: "kv_len",
                len: 17,
                max: 16
            }
        ),
        "{err}"
    );
    // K and V of different lengths.
    let err = op
        .run(&OperatorInputs::new(
            q.clone(),
            k.clone(),
            rng.tensor(&[1, 2, 15, 8], 1.0),
        ))
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "v"),
        "{err}"
    );
    // A mask the configuration does not have, and a NaN.
    let err = op
        .run(
            &OperatorInputs::new(q.clone(), k.clone(), v.clone())
                .with_key_mask(Tensor::zeros([1, 16])),
        )
        .unwrap_err();
    assert!(matches!(err, Error::UnexpectedTensor { .. }), "{err}");
    let mut bad = q.data().to_vec();
    bad[5] = f32::NAN;
    let err = op
        .run(&OperatorInputs::new(
            Tensor::new([1, 4, 4, 8], bad).unwrap(),
            k,
            v,
        ))
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { name, .. } if name == "q"),
        "{err}"
    );

    // Buffers: too small, or without STORAGE usage; lengths past the maximum at encode.
    let device = ctx().device();
    let make = |bytes: u64, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let (q_buf, kv_buf, out_buf) = (make(512, storage), make(1024, storage), make(512, storage));
    let small = make(256, storage);
    let io = OperatorIo {
        q: &q_buf,
        k: &kv_buf,
        v: &kv_buf,
        key_mask: None,
        bias: None,
        out: &out_buf,
    };
    let err = op.bind(OperatorIo { k: &small, ..io }).unwrap_err();
    assert!(matches!(err, Error::BadBuffer { name: "k", .. }), "{err}");
    let uniform = make(512, wgpu::BufferUsages::UNIFORM);
    let err = op
        .bind(OperatorIo {
            out: &uniform,
            ..io
        })
        .unwrap_err();
    assert!(matches!(err, Error::BadBuffer { name: "out", .. }), "{err}");
    let err = op
        .bind(OperatorIo {
            bias: Some(&small),
            ..io
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::BadBuffer { name: "bias", .. }),
        "{err}"
    );
    let bindings = op.bind(io).unwrap();
    let mut encoder = device.create_command_encoder(&Default::default());
    let err = op
        .encode(
            &mut encoder,
            &bindings,
            Lengths {
                q_len: 4,
                kv_len: 17,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::LengthPastMaximum { name: "kv_len", .. }),
        "{err}"
    );
}

#[test]
fn fused_calls_of_other_lengths_on_the_apps_buffers_allocate_nothing() {
    calls_of_other_lengths_allocate_nothing(KernelChoice::Fused, 8);
}

#[test]
fn staged_calls_of_other_lengths_on_the_apps_buffers_allocate_nothing() {
    calls_of_other_lengths_allocate_nothing(KernelChoice::Staged, 28);
}

/// Calls of four lengths on the application's own buffers, recorded into one encoder, then the
/// operator's own runs: after the first round nothing is created, and every output matches the
/// reference. The staged kernel keeps its intermediates, so each call also copies its scores
/// aside and normalises them in the one score matrix.
fn calls_of_other_lengths_allocate_nothing(kernel: KernelChoice, seed: u64) {
    // A device of its own: tests running beside this one must not move its counters.
    let (device, queue) = common::app_device(|_| {});
    let app = GpuContext::from_device(device.clone(), queue.clone());
    let (b, h, kvh, d) = (1, 4, 2, 8);
    let (max_q, max_kv) = (12, 40);
    let mut config = OperatorConfig::new(b, h, kvh, d, max_q, max_kv)
        .causal()
        .with_key_padding_mask()
        .with_kernel(kernel);
    if kernel == KernelChoice::Staged {
        config = config.with_intermediates();
    }
    let mut op = AttentionOp::new(&app, &config).unwrap();
    assert_eq!(op.kernel(), kernel);
    let mut rng = Rng::new(seed);
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    // Each call's tensors packed at its own lengths, in buffers sized for the maxima.
    let calls = [(12, 40), (3, 17), (1, 40), (7, 7)];
    let inputs: Vec<OperatorInputs> = calls
        .iter()
        .map(|&(nq, nk)| {
            let m = (0..b * nk).map(|j| (j % 5 != 1) as u8 as f32).collect();
            OperatorInputs::new(
                rng.tensor(&[b, h, nq, d], 1.0),
                rng.tensor(&[b, kvh, nk, d], 1.0),
                rng.tensor(&[b, kvh, nk, d], 1.0),
            )
            .with_key_mask(Tensor::new([b, nk], m).unwrap())
        })
        .collect();
    let buffer = |data: &[u8], bytes: usize| {
        let mut contents = data.to_vec();
        contents.resize(bytes, 0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &contents,
            usage: storage,
        })
    };
    let sets: Vec<_> = inputs
        .iter()
        .map(|x| {
            let mask: Vec<u32> = x
                .key_mask
                .as_ref()
                .unwrap()
                .data()
                .iter()
                .map(|&m| m as u32)
                .collect();
            [
                buffer(bytemuck::cast_slice(x.q.data()), b * h * max_q * d * 4),
                buffer(bytemuck::cast_slice(x.k.data()), b * kvh * max_kv * d * 4),
                buffer(bytemuck::cast_slice(x.v.data()), b * kvh * max_kv * d * 4),
                buffer(bytemuck::cast_slice(&mask), b * max_kv * 4),
                buffer(&[], b * h * max_q * d * 4),
            ]
        })
        .collect();
    let bindings: Vec<_> = sets
        .iter()
        .map(|[q, k, v, m, out]| {
            op.bind(OperatorIo {
                q,
                k,
                v,
                key_mask: Some(m),
                bias: None,
                out,
            })
            .unwrap()
        })
        .collect();
    let counters = || common::object_counts(&device);
    // The buffers made with contents stage them through temporaries that the next submission
    // frees: submit nothing once, so that they are gone before counting.
    queue.submit([]);
    let before = counters();
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "counters are not counting: {before:?}"
    );
    // Every call of every length recorded into one encoder, one submission.
    let mut encoder = device.create_command_encoder(&Default::default());
    for (&(q_len, kv_len), bind) in calls.iter().zip(&bindings) {
        op.encode(&mut encoder, bind, Lengths { q_len, kv_len })
            .unwrap();
    }
    queue.submit([encoder.finish()]);
    assert_eq!(
        counters(),
        before,
        "a call of another length created wgpu objects"
    );
    for ((x, set), &(nq, _)) in inputs.iter().zip(&sets).zip(&calls) {
        let out = common::read_buffer(&device, &queue, &set[4])[..b * h * nq * d].to_vec();
        let gpu = Tensor::new([b, h, nq, d], out).unwrap();
        check(&config, x, &gpu);
    }
    // The operator's own run, at changing lengths: after one round (which fills the upload
    // belt), further rounds create nothing either.
    let first: Vec<Tensor> = inputs.iter().map(|x| op.run(x).unwrap()).collect();
    let after_first = counters();
    for _ in 0..2 {
        for (x, expected) in inputs.iter().zip(&first) {
            assert_eq!(&op.run(x).unwrap(), expected, "same inputs, same bits");
        }
        assert_eq!(
            counters(),
            after_first,
            "a run of another length created wgpu objects"
        );
    }
}

#[test]
fn a_call_split_into_bounded_submissions_gives_the_same_bits() {
    let mut rng = Rng::new(9);
    let (b, h, kvh, d, nq, nk) = (2, 4, 2, 8, 40, 50);
    let config = OperatorConfig::new(b, h, kvh, d, nq, nk)
        .causal()
        .with_bias(BiasShape {
            per_batch: false,
            per_head: true,
        });
    let inputs = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
    )
    .with_bias(rng.tensor(&[1, h, nq, nk], 1.0));
    let mut op = AttentionOp::new(op_ctx(&config), &config).unwrap();
    let whole = op.run_within(&inputs, f64::INFINITY).unwrap();
    check(&config, &inputs, &whole);
    // A budget of one FLOP: every workgroup in a submission of its own.
    let split = op.run_within(&inputs, 1.0).unwrap();
    assert_eq!(
        split, whole,
        "each workgroup computes the same wherever it runs"
    );
}

#[test]
fn k_and_v_laid_out_for_a_capacity_give_the_packed_results() {
    // A KV cache: K and V hold room for 32 keys per head whatever the call's kv_len.
    let mut rng = Rng::new(10);
    let (b, h, kvh, d) = (2, 4, 2, 12);
    for token_major in [false, true] {
        let mut packed = OperatorConfig::new(b, h, kvh, d, 3, 24).causal();
        if token_major {
            packed = packed.token_major();
        }
        let cache = packed.clone().with_kv_capacity(32);
        let mut packed_op = AttentionOp::new(ctx(), &packed).unwrap();
        let mut cache_op = AttentionOp::new(ctx(), &cache).unwrap();
        for nk in [24, 9] {
            let shape = |heads: usize, n: usize| {
                if token_major {
                    vec![b, n, heads * d]
                } else {
                    vec![b, heads, n, d]
                }
            };
            let inputs = OperatorInputs::new(
                rng.tensor(&shape(h, 3), 1.0),
                rng.tensor(&shape(kvh, nk), 1.0),
                rng.tensor(&shape(kvh, nk), 1.0),
            );
            let want = packed_op.run(&inputs).unwrap();
            check(&packed, &inputs, &want);
            assert_eq!(cache_op.run(&inputs).unwrap(), want, "kv_len {nk}");
        }
    }
    let err = AttentionOp::new(
        ctx(),
        &OperatorConfig::new(1, 1, 1, 4, 1, 8).with_kv_capacity(7),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}
