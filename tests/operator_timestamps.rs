//! `AttentionOp::encode_with`: the operator's compute pass writes an application's own
//! timestamp queries, as a profiler's guest does, and computes the same output as `encode`.

mod common;

use common::Rng;
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionOp, Error, GpuContext, Lengths, OperatorConfig, OperatorInputs, OperatorIo, Tolerance,
    compare, reference,
};

/// GQA 4/2 heads of width 8, causal, 5 queries over 23 keys (the maxima 8 and 32).
struct App {
    device: wgpu::Device,
    queue: wgpu::Queue,
    op: AttentionOp,
    bindings: wgpu_attention::OperatorBindings,
    out: wgpu::Buffer,
    inputs: OperatorInputs,
    config: OperatorConfig,
}

fn app(features: wgpu::Features) -> App {
    let adapter = common::env_adapter();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: features,
        required_limits: wgpu::Limits::default().or_worse_values_from(&adapter.limits()),
        ..Default::default()
    }))
    .expect("a device");
    let ctx = GpuContext::from_device(device.clone(), queue.clone());
    let config = OperatorConfig::new(1, 4, 2, 8, 8, 32).causal();
    let op = AttentionOp::new(&ctx, &config).unwrap();
    let mut rng = Rng::new(17);
    let inputs = OperatorInputs::new(
        rng.tensor(&[1, 4, 5, 8], 1.0),
        rng.tensor(&[1, 2, 23, 8], 1.0),
        rng.tensor(&[1, 2, 23, 8], 1.0),
    );
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buffer = |data: &[f32], elements: usize| {
        let mut contents = data.to_vec();
        contents.resize(elements, 0.0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&contents),
            usage,
        })
    };
    let q = buffer(inputs.q.data(), 4 * 8 * 8);
    let k = buffer(inputs.k.data(), 2 * 32 * 8);
    let v = buffer(inputs.v.data(), 2 * 32 * 8);
    let out = buffer(&[], 4 * 8 * 8);
    let bindings = op
        .bind(OperatorIo {
            q: &q,
            k: &k,
            v: &v,
            key_mask: None,
            bias: None,
            out: &out,
        })
        .unwrap();
    App {
        device,
        queue,
        op,
        bindings,
        out,
        inputs,
        config,
    }
}

/// `bytes` bytes of `buffer`, read back the way an application would.
fn read(app: &App, buffer: &wgpu::Buffer, bytes: u64) -> Vec<u8> {
    let staging = app.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = app.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    app.queue.submit([encoder.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    app.device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    staging.get_mapped_range(..).unwrap().to_vec()
}

const LENGTHS: Lengths = Lengths {
    q_len: 5,
    kv_len: 23,
};

/// A device with timestamp queries. Lavapipe and llvmpipe, which CI runs on, both have them; an
/// adapter without them fails here rather than passing untested.
fn app_with_timestamps() -> App {
    let adapter = common::env_adapter();
    assert!(
        adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY),
        "{} has no TIMESTAMP_QUERY: the timestamp hook cannot be tested on it",
        adapter.get_info().name
    );
    app(wgpu::Features::TIMESTAMP_QUERY)
}

#[test]
fn the_operators_pass_writes_the_applications_timestamps() {
    let app = app_with_timestamps();
    let queries = app.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("the application's queries"),
        ty: wgpu::QueryType::Timestamp,
        count: 4,
    });
    let resolved = app.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 32,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut encoder = app.device.create_command_encoder(&Default::default());
    // Indices 2 and 3: the operator writes where the application says, not at 0 and 1.
    app.op
        .encode_with(
            &mut encoder,
            &app.bindings,
            LENGTHS,
            Some(wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(2),
                end_of_pass_write_index: Some(3),
            }),
        )
        .unwrap();
    encoder.resolve_query_set(&queries, 2..4, &resolved, 0);
    app.queue.submit([encoder.finish()]);
    let stamps: Vec<u64> = bytemuck::cast_slice(&read(&app, &resolved, 16)).to_vec();
    assert!(
        stamps[0] > 0 && stamps[1] > stamps[0],
        "the pass's timestamps are not an interval: {stamps:?}"
    );
    let seconds =
        (stamps[1] - stamps[0]) as f64 * f64::from(app.queue.get_timestamp_period()) / 1e9;
    assert!(seconds < 10.0, "{seconds} s for a tiny call: {stamps:?}");
    // The timed pass computed the call.
    let out: Vec<f32> = bytemuck::cast_slice(&read(&app, &app.out, 4 * 5 * 8 * 4)).to_vec();
    let out = wgpu_attention::Tensor::new([1, 4, 5, 8], out).unwrap();
    let expected = reference::operator(&app.config, &app.inputs).unwrap();
    let check = compare(&out, &expected, Tolerance::F32).unwrap();
    assert!(check.passed(), "{check}");
}

#[test]
fn timestamps_on_a_device_without_the_feature_are_a_named_error() {
    // A query set can only come from a device with the feature: here, another device's, as a
    // mistake would hand over. The check comes before the set is used.
    let timed = app_with_timestamps();
    let queries = timed.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: None,
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let untimed = app(wgpu::Features::empty());
    let mut encoder = untimed.device.create_command_encoder(&Default::default());
    let err = untimed
        .op
        .encode_with(
            &mut encoder,
            &untimed.bindings,
            LENGTHS,
            Some(wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("TIMESTAMP_QUERY")),
        "{err}"
    );
}
