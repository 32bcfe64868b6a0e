//! `wgpu-attention run` on a layer file that also holds `grad_out`: the layer's backward end
//! to end, every written gradient against the f64 reference (`reference::layer_backward`),
//! in the file's own layout, and bad `grad_out`s refused by name with nothing written.

use super::*;

/// Random N(0, 1/2) values from a small deterministic generator.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::new(shape.to_vec(), values(shape.iter().product(), seed)).unwrap()
}

/// Every gradient within the rule `run` applies: `1e-4 · max|reference| + 1e-5`.
fn assert_grad(name: &str, gpu: &Tensor, cpu: &Tensor) {
    assert_eq!(gpu.shape(), cpu.shape(), "{name}");
    let largest = cpu.data().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        largest > 0.0,
        "{name}: an all-zero reference checks nothing"
    );
    for (i, (g, c)) in gpu.data().iter().zip(cpu.data()).enumerate() {
        assert!(
            (g - c).abs() <= 1e-4 * largest + 1e-5,
            "{name} at {i}: {g} vs {c}"
        );
    }
}

#[test]
fn a_layer_with_grad_out_writes_every_gradient_checked() {
    let (b, n, dm, h, d, d_out) = (2, 5, 6, 2, 4, 5);
    let config = AttentionConfig::new(b, n, dm, h, d)
        .with_key_padding_mask()
        .with_output_projection(d_out);
    let mask = Tensor::new(
        [b, n],
        (0..b * n).map(|e| (e % 4 != 3) as u8 as f32).collect(),
    )
    .unwrap();
    let weights = AttentionWeights::new(
        tensor(&[dm, h * d], 1),
        tensor(&[dm, h * d], 2),
        tensor(&[dm, h * d], 3),
    )
    .with_qkv_bias(
        tensor(&[h * d], 4),
        tensor(&[h * d], 5),
        tensor(&[h * d], 6),
    )
    .with_output_projection(tensor(&[h * d, d_out], 7), Some(tensor(&[d_out], 8)));
    let inputs = AttentionInputs::new(tensor(&[b, n, dm], 9)).with_key_mask(mask.clone());
    let grad_out = tensor(&[b, n, d_out], 10);
    let mut file: Vec<(&str, Stored)> = weights
        .named()
        .into_iter()
        .map(|(name, t)| (name, from_tensor(t)))
        .collect();
    file.extend([
        ("x", from_tensor(&inputs.x)),
        ("key_mask", from_tensor(&mask)),
        ("grad_out", from_tensor(&grad_out)),
    ]);
    let case = Case::new(file);
    let written = case.ok(&["--heads", "2"]);
    let cpu = reference::layer_backward(&config, &weights, &inputs, &grad_out).unwrap();
    let expected = [
        ("grad_x", Some(&cpu.x)),
        ("grad_w_q", Some(&cpu.w_q)),
        ("grad_w_k", Some(&cpu.w_k)),
        ("grad_w_v", Some(&cpu.w_v)),
        ("grad_b_q", cpu.b_q.as_ref()),
        ("grad_b_k", cpu.b_k.as_ref()),
        ("grad_b_v", cpu.b_v.as_ref()),
        ("grad_w_o", cpu.w_o.as_ref()),
        ("grad_b_o", cpu.b_o.as_ref()),
    ];
    let mut names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    names.push("out");
    names.sort();
    assert_eq!(written.keys().collect::<Vec<_>>(), names);
    for (name, cpu) in expected {
        assert_grad(name, &written[name], cpu.unwrap());
    }
}

#[test]
fn gradients_of_pytorch_layout_weights_are_written_in_that_layout_without_a_batch_axis() {
    // 2-D x, nn.Linear weights [out, in], no biases, no output projection.
    let (n, dm, h, d) = (4, 6, 2, 3);
    let config = AttentionConfig::new(1, n, dm, h, d).causal();
    let w: Vec<Tensor> = (0..3).map(|s| tensor(&[dm, h * d], 20 + s)).collect();
    let weights = AttentionWeights::new(w[0].clone(), w[1].clone(), w[2].clone());
    let x = tensor(&[1, n, dm], 30);
    let grad_out = tensor(&[1, n, h * d], 31);
    let case = Case::new(vec![
        ("x", f32s(&[n, dm], x.data())),
        ("w_q", transposed(dm, h * d, w[0].data())),
        ("w_k", transposed(dm, h * d, w[1].data())),
        ("w_v", transposed(dm, h * d, w[2].data())),
        ("grad_out", f32s(&[n, h * d], grad_out.data())),
    ]);
    let written = case.ok(&["--torch-layout", "--heads", "2", "--causal"]);
    let cpu =
        reference::layer_backward(&config, &weights, &AttentionInputs::new(x), &grad_out).unwrap();
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        ["grad_w_k", "grad_w_q", "grad_w_v", "grad_x", "out"]
    );
    let unbatched = Tensor::new([n, dm], cpu.x.data().to_vec()).unwrap();
    assert_grad("grad_x", &written["grad_x"], &unbatched);
    for (name, g) in [
        ("grad_w_q", &cpu.w_q),
        ("grad_w_k", &cpu.w_k),
        ("grad_w_v", &cpu.w_v),
    ] {
        let as_torch = Tensor::new(
            [h * d, dm],
            (0..dm * h * d)
                .map(|i| g.data()[(i % dm) * h * d + i / dm])
                .collect(),
        )
        .unwrap();
        assert_grad(name, &written[name], &as_torch);
    }
}

#[test]
fn a_grad_out_unlike_the_output_is_refused_by_name() {
    let mut file = worked_example();
    file.push(("grad_out", f32s(&[3, 4], &[0.0; 12])));
    Case::new(file).fails(
        &["--heads", "1"],
        "tensor `grad_out` has shape [3, 4], expected [3, 3]",
    );
}

#[test]
fn grad_out_with_the_staged_kernels_is_a_usage_error() {
    let mut file = worked_example();
    file.push(("grad_out", f32s(&[3, 3], &[1.0; 9])));
    let case = Case::new(file);
    case.fails(
        &["--heads", "1", "--kernel", "staged"],
        "needs the fused kernel",
    );
    case.fails(
        &["--heads", "1", "--intermediates"],
        "needs the fused kernel",
    );
}
