//! The autotuner: every candidate tile shape it may pick gives the reference's answer, a shape
//! class is timed once per device and never again, and winners written to a file by one context
//! are used by the next on the same adapter and driver without timing.

mod common;

use common::Rng;
use wgpu_attention::{
    AttentionOp, Autotune, BiasShape, Error, GpuContext, OperatorConfig, OperatorInputs, Tolerance,
    compare, reference,
};

/// A context of its own (winners are per device), on the suite's adapter and limits profile.
fn fresh() -> GpuContext {
    GpuContext::from_device(
        common::ctx().device().clone(),
        common::ctx().queue().clone(),
    )
}

fn inputs(config: &OperatorConfig, rng: &mut Rng, nq: usize, nk: usize) -> OperatorInputs {
    let (b, h, kvh, d) = (config.batch, config.heads, config.kv_heads, config.head_dim);
    let mut io = OperatorInputs::new(
        rng.tensor(&[b, h, nq, d], 1.0),
        rng.tensor(&[b, kvh, nk, d], 1.0),
        rng.tensor(&[b, kvh, nk, config.head_dim_v], 1.0),
    );
    if config.bias.is_some() {
        io = io.with_bias(rng.tensor(&[1, h, nq, nk], 1.0));
    }
    io
}

#[test]
fn every_candidate_gives_the_reference_answer() {
    let mut rng = Rng::new(21);
    let bias = BiasShape {
        per_batch: false,
        per_head: true,
    };
    for config in [
        OperatorConfig::new(1, 4, 2, 16, 40, 70).causal(),
        OperatorConfig::new(2, 2, 2, 12, 9, 33)
            .with_head_dim_v(20)
            .with_bias(bias),
        OperatorConfig::new(1, 8, 1, 64, 8, 130),
    ] {
        let ctx = common::op_ctx(&config);
        let (class, candidates) = AttentionOp::tile_candidates(ctx, &config);
        assert!(candidates.len() >= 2, "{class}: {candidates:?}");
        let io = inputs(
            &config,
            &mut rng,
            config.max_q_len - 1,
            config.max_kv_len - 3,
        );
        let want = reference::operator(&config, &io).unwrap();
        let pinned = GpuContext::from_device(ctx.device().clone(), ctx.queue().clone());
        pinned.set_autotune(Autotune::Cached);
        for tiles in &candidates {
            pinned.pin_tiles(&class, tiles).unwrap();
            let mut op = AttentionOp::new(&pinned, &config).unwrap();
            assert_eq!(op.tiles().as_ref(), Some(tiles));
            let cmp = compare(&op.run(&io).unwrap(), &want, Tolerance::F32).unwrap();
            assert!(cmp.passed(), "{class} with {tiles}: {cmp}");
        }
        assert_eq!(pinned.autotune_trials(), 0, "Cached never times");
    }
}

#[test]
fn a_class_is_timed_once_and_a_new_class_again() {
    let ctx = fresh();
    assert_eq!(ctx.autotune(), Autotune::Full, "the default");
    let config = OperatorConfig::new(1, 2, 2, 16, 32, 64);
    let op = AttentionOp::new(&ctx, &config).unwrap();
    assert_eq!(ctx.autotune_trials(), 1);
    let tuned = ctx.tuned();
    assert_eq!(tuned.len(), 1, "{tuned:?}");
    assert_eq!(
        Some(&tuned[0].1),
        op.tiles().as_ref(),
        "the operator runs the winner"
    );
    // The same class (lengths in the same power-of-two bucket): no second timing.
    AttentionOp::new(&ctx, &OperatorConfig::new(1, 2, 2, 16, 30, 60)).unwrap();
    assert_eq!(ctx.autotune_trials(), 1);
    // Another head width, or causal masking, is another class.
    AttentionOp::new(&ctx, &OperatorConfig::new(1, 2, 2, 32, 32, 64)).unwrap();
    AttentionOp::new(&ctx, &config.clone().causal()).unwrap();
    assert_eq!(ctx.autotune_trials(), 3);
    assert_eq!(ctx.tuned().len(), 3);
    // Off never times, and takes the rule's tiles.
    ctx.set_autotune(Autotune::Off);
    let off = AttentionOp::new(&ctx, &OperatorConfig::new(1, 2, 2, 8, 32, 64)).unwrap();
    let (_, candidates) =
        AttentionOp::tile_candidates(&ctx, &OperatorConfig::new(1, 2, 2, 8, 32, 64));
    assert_eq!(off.tiles(), Some(candidates[0].clone()));
    assert_eq!(ctx.autotune_trials(), 3);
}

#[test]
fn winners_in_a_file_serve_the_next_context_on_the_same_adapter() {
    let dir = std::env::temp_dir().join(format!("wgpu-attention-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tuning.txt");
    let _ = std::fs::remove_file(&file);
    let config = OperatorConfig::new(1, 4, 4, 16, 16, 48).causal();

    let first = fresh();
    first.autotune_file(&file).unwrap();
    let tiles = AttentionOp::new(&first, &config).unwrap().tiles().unwrap();
    assert_eq!(first.autotune_trials(), 1);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(&tiles), "{text}");

    // Another adapter's or driver's line is left alone: prepend one with other tiles.
    let other = text.replacen(
        text.split('\t').next().unwrap(),
        "Vulkan 1234:5678 Some Other GPU | driver 1.0",
        1,
    );
    std::fs::write(&file, format!("{other}{text}")).unwrap();
    let second = fresh();
    second.autotune_file(&file).unwrap();
    assert_eq!(
        AttentionOp::new(&second, &config).unwrap().tiles(),
        Some(tiles)
    );
    assert_eq!(second.autotune_trials(), 0, "the file's winner was used");
    assert_eq!(second.tuned().len(), 1, "only this adapter's line");

    // A damaged line is a named error, not a silent fallback.
    std::fs::write(&file, format!("{text}garbage\n")).unwrap();
    let e = fresh().autotune_file(&file).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig(m) if m.contains("line 2")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
