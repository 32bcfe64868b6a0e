//! The cached layer (`CachedAttention`): a prompt, then steps of one token and of seven, every
//! step's output equal to the same rows of one causal forward of the whole sequence (the f64
//! reference), for MHA, GQA and MQA, with and without biases and an output projection, batch
//! rows at different lengths, a prompt longer than split-K decode takes; the cache exactly
//! full works and one token past it is a named error; bad shapes are named errors; and steps
//! allocate nothing.

mod common;

use common::cached::{D_MODEL, tokens, weights};
use common::{Rng, ctx};
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionWeights, CachedAttention, CachedIo,
    CachedLayerConfig, Error, Tensor, Tolerance, compare, reference,
};

/// Output rows `from .. from + n` of batch row `b` of a step's or forward's output, in either
/// output layout (`[batch, seq, d_out]` or head-major `[batch, heads, seq, dv]`).
fn rows(out: &Tensor, b: usize, from: usize, n: usize) -> Vec<f32> {
    match *out.shape() {
        [_, seq, w] => out.data()[(b * seq + from) * w..(b * seq + from + n) * w].to_vec(),
        [_, h, seq, w] => (0..h)
            .flat_map(|head| {
                let at = ((b * h + head) * seq + from) * w;
                out.data()[at..at + n * w].to_vec()
            })
            .collect(),
        _ => panic!("output of shape {:?}", out.shape()),
    }
}

/// Compares the step's rows of every batch row with the reference's rows at `from[b]`.
fn check_step(what: &str, got: &Tensor, want: &[Tensor], from: &[usize], n: usize) {
    for (b, (reference, &at)) in want.iter().zip(from).enumerate() {
        let g = Tensor::new([rows(got, b, 0, n).len()], rows(got, b, 0, n)).unwrap();
        let w = Tensor::new([g.data().len()], rows(reference, 0, at, n)).unwrap();
        let cmp = compare(&g, &w, Tolerance::F32).unwrap();
        assert!(cmp.passed(), "{what}, batch row {b} at {at}: {cmp}");
    }
}

/// A prompt of `prompt` tokens in both batch rows; then row 1 rewinds 4 tokens (its last 4
/// prompt tokens were junk, overwritten by the steps) so that the rows differ in length; then
/// steps of `chunk` tokens until each row has at least 64 more. Every step's output must equal
/// the rows of one causal forward of each row's own sequence.
fn steps_equal_the_causal_forward(
    heads: usize,
    kv_heads: usize,
    prompt: usize,
    chunk: usize,
    biases: bool,
    projection: bool,
    (d, dv): (usize, usize),
) {
    let what = format!(
        "{heads}/{kv_heads} heads of {d}/{dv}, prompt {prompt}, chunks of {chunk}, biases \
         {biases}, projection {projection}"
    );
    let mut rng = Rng::new((heads * 1000 + kv_heads * 100 + chunk * 10 + prompt) as u64);
    let (batch, rewind) = (2, 4);
    let new_tokens = 64usize.next_multiple_of(chunk);
    let capacity = prompt + new_tokens;
    let mut config = CachedLayerConfig::new(
        batch,
        D_MODEL,
        heads,
        kv_heads,
        d,
        capacity,
        prompt.max(chunk),
    )
    .with_head_dim_v(dv);
    if projection {
        config = config.with_output_projection(16);
    }
    let w = weights(&mut rng, &config, biases);
    let mut layer = CachedAttention::new(ctx(), &config, &w).unwrap();
    // Each row's whole sequence, and the reference forward of each on its own.
    let seqs: Vec<Tensor> = (0..batch)
        .map(|_| rng.tensor(&[1, capacity, D_MODEL], 1.0))
        .collect();
    let one_row = CachedLayerConfig {
        batch: 1,
        ..config.clone()
    };
    let want: Vec<Tensor> = seqs
        .iter()
        .map(|x| reference::cached_layer(&one_row, &w, x).unwrap())
        .collect();

    // The prompt: row 1's last `rewind` tokens are junk, forgotten below.
    let mut x = tokens(&seqs[0], 0, prompt);
    x.extend(tokens(&seqs[1], 0, prompt - rewind));
    x.extend(rng.tensor(&[rewind, D_MODEL], 1.0).data());
    let out = layer
        .step(&Tensor::new([batch, prompt, D_MODEL], x).unwrap())
        .unwrap();
    assert_eq!(out.shape(), config.output_shape(prompt));
    check_step(&format!("{what}, prompt"), &out, &want[..1], &[0], prompt);
    check_step(
        &format!("{what}, prompt"),
        &out,
        &want,
        &[0, 0],
        prompt - rewind,
    );
    let ctx = ctx();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    layer
        .cache_mut()
        .set_lengths(&mut encoder, &[prompt, prompt - rewind])
        .unwrap();
    ctx.queue().submit([encoder.finish()]);

    let mut steps = 0;
    while layer.cache().lens()[1] < prompt - rewind + new_tokens {
        let from = layer.cache().lens().to_vec();
        let x: Vec<f32> = (0..batch)
            .flat_map(|b| tokens(&seqs[b], from[b], chunk))
            .collect();
        let out = layer
            .step(&Tensor::new([batch, chunk, D_MODEL], x).unwrap())
            .unwrap();
        check_step(&format!("{what}, step {steps}"), &out, &want, &from, chunk);
        steps += 1;
    }
    assert!(steps * chunk >= 64, "{what}: {steps} steps");
    assert_eq!(
        layer.cache().lens(),
        [prompt + steps * chunk, prompt - rewind + steps * chunk]
    );
}

#[test]
fn one_token_at_a_time_equals_the_causal_forward() {
    steps_equal_the_causal_forward(4, 4, 9, 1, true, true, (8, 12));
    steps_equal_the_causal_forward(4, 2, 9, 1, false, true, (8, 12));
    steps_equal_the_causal_forward(4, 1, 9, 1, true, false, (8, 12));
}

#[test]
fn chunks_of_seven_equal_the_causal_forward() {
    steps_equal_the_causal_forward(4, 2, 9, 7, true, true, (8, 12));
    steps_equal_the_causal_forward(2, 2, 9, 7, false, false, (8, 12));
    steps_equal_the_causal_forward(6, 2, 9, 7, true, true, (8, 12));
}

#[test]
fn heads_of_widths_not_multiples_of_four_are_stored_without_their_padding() {
    // The projections compute heads padded to whole vec4 and store only the real columns.
    steps_equal_the_causal_forward(4, 2, 9, 3, true, true, (6, 5));
}

#[test]
fn a_prompt_longer_than_decode_takes_runs_the_prefill_kernels() {
    // 20 tokens: past split-K decode's 16, so the prompt runs the prefill kernels on the cache.
    steps_equal_the_causal_forward(4, 2, 20, 1, true, true, (8, 12));
}

#[test]
fn the_cached_layer_reference_equals_the_layer_reference_for_mha() {
    // Two routes apart: the layer's own f64 loops, and the cached layer's projections with
    // reference::operator. Equal heads counts (the layer has no kv_heads), causal, biases,
    // output projection.
    let mut rng = Rng::new(30);
    let (batch, seq, heads, d, dv, d_out) = (2, 11, 3, 6, 5, 7);
    let cached = CachedLayerConfig::new(batch, D_MODEL, heads, heads, d, seq, seq)
        .with_head_dim_v(dv)
        .with_output_projection(d_out);
    let w = weights(&mut rng, &cached, true);
    let x = rng.tensor(&[batch, seq, D_MODEL], 1.0);
    let layer = AttentionConfig::new(batch, seq, D_MODEL, heads, d)
        .with_head_dim_v(dv)
        .with_output_projection(d_out)
        .causal();
    let want = reference::run(&layer, &w, &AttentionInputs::new(x.clone()))
        .unwrap()
        .output;
    let got = reference::cached_layer(&cached, &w, &x).unwrap();
    let cmp = compare(&got, &want, Tolerance::F32).unwrap();
    assert!(cmp.passed(), "{cmp}");
}

#[test]
fn a_bidirectional_step_equals_the_last_rows_of_the_forward_so_far() {
    // Without causal masking a step's tokens also see each other: its output is the last
    // rows of the forward over the sequence up to the step's end (not of the whole sequence).
    let mut rng = Rng::new(35);
    let config = CachedLayerConfig::new(1, D_MODEL, 4, 2, 8, 30, 9)
        .with_output_projection(8)
        .with_causal(false);
    let w = weights(&mut rng, &config, true);
    let mut layer = CachedAttention::new(ctx(), &config, &w).unwrap();
    let x = rng.tensor(&[1, 30, D_MODEL], 1.0);
    let mut end = 0;
    for n in [9, 7, 1, 7] {
        let step = Tensor::new([1, n, D_MODEL], tokens(&x, end, n)).unwrap();
        let got = layer.step(&step).unwrap();
        end += n;
        let so_far = Tensor::new([1, end, D_MODEL], tokens(&x, 0, end)).unwrap();
        let want = reference::cached_layer(&config, &w, &so_far).unwrap();
        check_step(
            &format!("{n} tokens to {end}"),
            &got,
            &[want],
            &[end - n],
            n,
        );
    }
}

/// A small layer of `capacity` tokens, steps of up to 9.
fn small(rng: &mut Rng, capacity: usize) -> (CachedLayerConfig, AttentionWeights) {
    let config = CachedLayerConfig::new(1, D_MODEL, 2, 1, 4, capacity, 9).with_output_projection(8);
    let w = weights(rng, &config, true);
    (config, w)
}

#[test]
fn a_step_at_exactly_capacity_works_and_one_past_it_is_a_named_error() {
    let mut rng = Rng::new(31);
    let capacity = 12;
    let (config, w) = small(&mut rng, capacity);
    let mut layer = CachedAttention::new(ctx(), &config, &w).unwrap();
    let x = rng.tensor(&[1, capacity + 1, D_MODEL], 1.0);
    let want = reference::cached_layer(&config, &w, &x).unwrap();
    let part = |from, n| Tensor::new([1, n, D_MODEL], tokens(&x, from, n)).unwrap();
    let first = layer.step(&part(0, 9)).unwrap();
    check_step("first 9", &first, std::slice::from_ref(&want), &[0], 9);
    // Exactly to the capacity.
    let last = layer.step(&part(9, 3)).unwrap();
    check_step("last 3", &last, &[want], &[9], 3);
    assert_eq!(layer.cache().lens(), [capacity]);
    let err = layer.step(&part(12, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::KvCacheFull {
                row: 0,
                len: 12,
                adding: 1,
                capacity: 12
            }
        ),
        "{err}"
    );
    assert_eq!(
        layer.cache().lens(),
        [capacity],
        "a refused step moved the cache"
    );
}

#[test]
fn bad_shapes_and_steps_are_named_errors() {
    let mut rng = Rng::new(32);
    let (config, w) = small(&mut rng, 16);
    let c = ctx();
    // w_k as wide as the query heads: GQA's key projection has kv_heads heads.
    let wide = AttentionWeights {
        w_k: rng.tensor(&[D_MODEL, 8], 1.0),
        ..w.clone()
    };
    let err = CachedAttention::new(c, &config, &wide).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "w_k"),
        "{err}"
    );
    let no_out = AttentionWeights {
        w_o: None,
        b_o: None,
        ..w.clone()
    };
    let err = CachedAttention::new(c, &config, &no_out).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "w_o"),
        "{err}"
    );
    let err = CachedAttention::new(
        c,
        &CachedLayerConfig {
            kv_heads: 3,
            ..config.clone()
        },
        &w,
    )
    .unwrap_err();
    assert!(matches!(err, Error::KvHeadsNotDividing { .. }), "{err}");
    let err = CachedAttention::new(
        c,
        &CachedLayerConfig {
            max_step: 17,
            ..config.clone()
        },
        &w,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

    let mut layer = CachedAttention::new(c, &config, &w).unwrap();
    let err = layer.step(&rng.tensor(&[1, 10, D_MODEL], 1.0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthPastMaximum {
                name: "n_new",
                len: 10,
                max: 9
            }
        ),
        "{err}"
    );
    let err = layer
        .step(&rng.tensor(&[1, 2, D_MODEL + 1], 1.0))
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "x"),
        "{err}"
    );
    let err = layer.step(&Tensor::zeros([1, 0, D_MODEL])).unwrap_err();
    assert!(matches!(err, Error::ZeroSize { name: "n_new" }), "{err}");
    // Bindings of another layer, and buffers too small for the largest step.
    let other = CachedAttention::new(c, &config, &w).unwrap();
    let (x, out) = other.io_buffers();
    let foreign = other
        .bind(CachedIo {
            x: &x,
            output: &out,
        })
        .unwrap();
    let mut encoder = c.device().create_command_encoder(&Default::default());
    let err = layer.encode_step(&mut encoder, &foreign, 1).unwrap_err();
    assert!(matches!(err, Error::ForeignBindings), "{err}");
    let err = layer
        .bind(CachedIo {
            x: &out,
            output: &out,
        })
        .unwrap_err();
    assert!(matches!(err, Error::BadBuffer { name: "x", .. }), "{err}");
    assert_eq!(layer.cache().lens(), [0], "refused steps moved the cache");
}

#[test]
fn a_long_step_over_rows_of_different_lengths_is_a_named_error() {
    let mut rng = Rng::new(33);
    let config = CachedLayerConfig::new(2, D_MODEL, 2, 1, 4, 64, 20);
    let w = weights(&mut rng, &config, false);
    let mut layer = CachedAttention::new(ctx(), &config, &w).unwrap();
    let mut encoder = ctx().device().create_command_encoder(&Default::default());
    layer
        .cache_mut()
        .set_lengths(&mut encoder, &[3, 5])
        .unwrap();
    ctx().queue().submit([encoder.finish()]);
    let err = layer.step(&rng.tensor(&[2, 17, D_MODEL], 1.0)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("one length")),
        "{err}"
    );
    // 16 tokens run split-K decode, which takes rows of any length.
    layer.step(&rng.tensor(&[2, 16, D_MODEL], 1.0)).unwrap();
    assert_eq!(layer.cache().lens(), [19, 21]);
}

#[test]
fn steps_allocate_nothing() {
    // A device of its own: tests running beside this one must not move its counters.
    let (device, queue) = common::app_device(|_| {});
    let config = CachedLayerConfig::new(2, D_MODEL, 4, 2, 8, 40, 9).with_output_projection(8);
    let (w, token, last) = common::cached::steps_allocate_nothing(&device, &queue, &config, 34, 30);
    // Every step fed the same token: the last one's output is the forward's last row over 31
    // copies of it.
    let repeated: Vec<f32> = (0..2)
        .flat_map(|b| {
            let row = tokens(
                &Tensor::new([2, 1, D_MODEL], token.data().to_vec()).unwrap(),
                b,
                1,
            );
            std::iter::repeat_n(row, 31).flatten()
        })
        .collect();
    let want = reference::cached_layer(
        &config,
        &w,
        &Tensor::new([2, 31, D_MODEL], repeated).unwrap(),
    )
    .unwrap();
    let want: Vec<Tensor> = (0..2)
        .map(|b| Tensor::new([1, 1, 8], rows(&want, b, 30, 1)).unwrap())
        .collect();
    check_step("after 31 steps", &last, &want, &[0, 0], 1);
}
