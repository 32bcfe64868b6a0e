//! Every bad input gets a named error with a message that says what is wrong: the variant and
//! the exact text are asserted here. None of these paths may panic.

mod common;

use common::{ctx, t, worked_example};
use wgpu_attention::{
    AdapterOptions, AttentionConfig, AttentionInputs, AttentionIo, AttentionPlan, AttentionWeights,
    Error, GpuContext, KernelChoice, Tensor, reference,
};

fn w(rows: usize, cols: usize) -> Tensor {
    Tensor::zeros([rows, cols])
}

#[test]
fn wrong_weight_shape_names_tensor_and_both_shapes() {
    let (config, mut weights, _) = worked_example(Some(1.0));
    weights.w_q = w(3, 4);
    let err = AttentionPlan::new(ctx(), &config, &weights).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    assert_eq!(
        err.to_string(),
        "tensor `w_q` has shape [3, 4], expected [4, 3]"
    );
    let err = reference::run(
        &config,
        &weights,
        &AttentionInputs::new(Tensor::zeros([1, 3, 4])),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `w_q` has shape [3, 4], expected [4, 3]"
    );
}

#[test]
fn wrong_input_shape_names_x() {
    let (config, weights, _) = worked_example(Some(1.0));
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let err = plan
        .run(&AttentionInputs::new(Tensor::zeros([3, 4])))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    assert_eq!(
        err.to_string(),
        "tensor `x` has shape [3, 4], expected [1, 3, 4]"
    );
}

#[test]
fn wrong_bias_shape() {
    let (config, weights, _) = worked_example(Some(1.0));
    let weights = weights.with_qkv_bias(Tensor::zeros([3]), Tensor::zeros([2]), Tensor::zeros([3]));
    let err = AttentionPlan::new(ctx(), &config, &weights).unwrap_err();
    assert_eq!(err.to_string(), "tensor `b_k` has shape [2], expected [3]");
}

#[test]
fn data_that_does_not_fill_its_shape() {
    let err = Tensor::named("x", [2, 3], vec![1.0; 5]).unwrap_err();
    assert!(matches!(
        err,
        Error::DataLength {
            expected: 6,
            actual: 5,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "tensor `x` has shape [2, 3] (6 values) but 5 values were given"
    );
}

#[test]
fn missing_and_unexpected_tensors() {
    let (config, weights, inputs) = worked_example(Some(1.0));
    let projected = config.clone().with_output_projection(2);
    let err = AttentionPlan::new(ctx(), &projected, &weights).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }));
    assert_eq!(
        err.to_string(),
        "missing tensor `w_o` (expected shape [3, 2]): the configuration has an output projection"
    );

    let extra = weights.clone().with_output_projection(w(3, 2), None);
    let err = AttentionPlan::new(ctx(), &config, &extra).unwrap_err();
    assert!(matches!(err, Error::UnexpectedTensor { .. }));
    assert!(
        err.to_string()
            .starts_with("tensor `w_o` was given but the configuration has no output projection")
    );

    let mut orphan = weights.clone();
    orphan.b_o = Some(Tensor::zeros([3]));
    let err = AttentionPlan::new(ctx(), &config, &orphan).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `b_o` was given but there is no output projection `w_o` for it to bias"
    );

    let masked = config.clone().with_key_padding_mask();
    let mut plan = AttentionPlan::new(ctx(), &masked, &weights).unwrap();
    let err = plan.run(&inputs).unwrap_err();
    assert_eq!(
        err.to_string(),
        "missing tensor `key_mask` (expected shape [1, 3]): the configuration has a key-padding mask"
    );
    let mut plain = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let err = plain
        .run(&inputs.clone().with_key_mask(t(&[1, 3], &[1., 1., 1.])))
        .unwrap_err();
    assert!(matches!(err, Error::UnexpectedTensor { .. }));
}

#[test]
fn mask_values_other_than_zero_and_one() {
    let (config, weights, inputs) = worked_example(Some(1.0));
    let config = config.with_key_padding_mask();
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let err = plan
        .run(&inputs.with_key_mask(t(&[1, 3], &[1.0, 0.5, 0.0])))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidMask { value, .. } if value == 0.5));
    assert_eq!(
        err.to_string(),
        "key_mask holds 0.5 at index [0, 1]: use 1 for a real token and 0 for padding"
    );
}

#[test]
fn zero_sizes() {
    let (_, weights, _) = worked_example(Some(1.0));
    for (config, name) in [
        (AttentionConfig::new(0, 3, 4, 1, 3), "batch"),
        (AttentionConfig::new(1, 0, 4, 1, 3), "seq_len"),
        (AttentionConfig::new(1, 3, 0, 1, 3), "d_model"),
        (AttentionConfig::new(1, 3, 4, 0, 3), "heads"),
        (AttentionConfig::new(1, 3, 4, 1, 0), "head_dim"),
        (
            AttentionConfig::new(1, 3, 4, 1, 3).with_head_dim_v(0),
            "head_dim_v",
        ),
        (
            AttentionConfig::new(1, 3, 4, 1, 3).with_output_projection(0),
            "d_out",
        ),
    ] {
        let err = AttentionPlan::new(ctx(), &config, &weights).unwrap_err();
        assert!(
            matches!(err, Error::ZeroSize { name: n } if n == name),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("`{name}` is zero: every dimension of an attention layer must be at least 1")
        );
    }
}

#[test]
fn non_finite_scale() {
    let (config, weights, _) = worked_example(Some(f32::NAN));
    let err = AttentionPlan::new(ctx(), &config, &weights).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: scale must be finite, got NaN"
    );
}

#[test]
fn score_matrix_past_the_binding_limit() {
    // seq 16384, one head: the score matrix alone is 1 GiB; wgpu's default binding limit is
    // 128 MiB.
    let config = AttentionConfig::new(1, 16384, 8, 1, 8).with_kernel(KernelChoice::Staged);
    let weights = AttentionWeights::new(w(8, 8), w(8, 8), w(8, 8));
    let err = AttentionPlan::new(ctx(), &config, &weights).unwrap_err();
    let limit = ctx().limits().max_storage_buffer_binding_size;
    assert!(
        matches!(err, Error::LimitExceeded { limit: "max_storage_buffer_binding_size", requested: 1073741824, max, .. } if max == limit),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("the score matrix (batch 1 x heads 1 x seq 16384 x 16384 keys, padded to 16384) at 1073741824 bytes needs 1073741824, past the device limit `max_storage_buffer_binding_size` = "),
        "{msg}"
    );
    assert!(
        msg.contains("use the fused kernel (KernelChoice::Fused, or Auto)"),
        "{msg}"
    );
}

#[test]
fn no_adapter_says_how_to_get_one() {
    let options = AdapterOptions {
        adapter_name: Some("no-such-adapter-anywhere".into()),
        ..AdapterOptions::default()
    };
    let err = GpuContext::from_options(&options).unwrap_err();
    assert!(matches!(err, Error::NoAdapter { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with("no GPU adapter found (backends"), "{msg}");
    assert!(
        msg.contains("adapter name containing \"no-such-adapter-anywhere\""),
        "{msg}"
    );
    assert!(msg.contains("adapters found: "), "{msg}");
    assert!(msg.contains("mesa-vulkan-drivers"), "{msg}");
}

#[test]
fn intermediates_not_kept() {
    let (mut config, weights, inputs) = worked_example(Some(1.0));
    config.keep_intermediates = false;
    let mut plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    plan.run(&inputs).unwrap();
    let err = plan.read_intermediates().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: intermediates were not kept: build the plan with AttentionConfig::with_intermediates()"
    );
}

#[test]
fn bad_application_buffers() {
    let (config, weights, _) = worked_example(Some(1.0));
    let plan = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let device = ctx().device();
    let make = |size: u64, usage: wgpu::BufferUsages| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let (x, out) = (make(48, storage), make(36, storage));
    let not_storage = make(48, wgpu::BufferUsages::COPY_DST);
    let err = plan
        .bind(AttentionIo {
            x: &not_storage,
            key_mask: None,
            output: &out,
        })
        .unwrap_err();
    assert!(matches!(err, Error::BadBuffer { name: "x", .. }));
    assert_eq!(
        err.to_string(),
        "buffer `x`: needs STORAGE usage, has BufferUsages(COPY_DST)"
    );
    let small = make(32, storage);
    let err = plan
        .bind(AttentionIo {
            x: &x,
            key_mask: None,
            output: &small,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "buffer `output`: is 32 bytes, needs at least 36"
    );
    let err = plan
        .bind(AttentionIo {
            x: &x,
            key_mask: Some(&x),
            output: &out,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "buffer `key_mask`: given, but the configuration has no key-padding mask"
    );

    // Bindings belong to the plan that made them.
    let other = AttentionPlan::new(ctx(), &config, &weights).unwrap();
    let bindings = other
        .bind(AttentionIo {
            x: &x,
            key_mask: None,
            output: &out,
        })
        .unwrap();
    let mut encoder = device.create_command_encoder(&Default::default());
    let err = plan.encode(&mut encoder, &bindings).unwrap_err();
    assert!(matches!(err, Error::ForeignBindings));
    assert_eq!(
        err.to_string(),
        "these bindings were made by another AttentionPlan; bind the buffers with this plan"
    );
}

#[test]
fn wgpu_validation_errors_are_captured_and_returned() {
    // An application device limited to 3 storage buffers per stage cannot lay out the GEMM
    // kernel (it binds 4): wgpu's validation error comes back as Error::Wgpu, not a panic.
    let (device, queue) = common::app_device(|l| l.max_storage_buffers_per_shader_stage = 3);
    let app = GpuContext::from_device(device, queue);
    let (config, weights, _) = worked_example(Some(1.0));
    let err = AttentionPlan::new(&app, &config, &weights).unwrap_err();
    let Error::Wgpu { stage, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(stage, "laying out gemm.wgsl");
    assert!(message.contains("limit is 3"), "{message}");
    assert!(
        err.to_string()
            .starts_with("wgpu error while laying out gemm.wgsl: "),
        "{err}"
    );
}

/// The suite's context has exactly the limits its profile names (WGPU_ATTENTION_TEST_LIMITS), so
/// a run under `webgpu` shows the crate within WebGPU's defaults and not the adapter's more.
#[test]
fn the_suite_runs_on_the_limits_its_profile_names() {
    let want = match common::Profile::from_env() {
        common::Profile::WebGpu => wgpu::Limits::default(),
        common::Profile::Downlevel => wgpu::Limits::downlevel_defaults(),
        common::Profile::Adapter => common::env_adapter().limits(),
    };
    assert_eq!(ctx().limits(), want);
    assert_eq!(
        common::adapter_ctx().limits(),
        common::env_adapter().limits()
    );
}
