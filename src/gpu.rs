//! Small GPU utilities every other module uses: error scopes, buffer creation and read-back.
//! Nothing here knows about attention.

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

/// Usage of the buffers the kernels read and write: bindable, and copyable both ways so they
/// can be uploaded to and read back.
pub(crate) const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Runs `f` inside validation, out-of-memory and internal error scopes and returns the first
/// error wgpu reported as [`Error::Wgpu`], naming `stage`.
///
/// The scopes are popped with `pollster::block_on`: on native backends the futures are ready at
/// once. The async constructors use [`scoped_async`] instead, which never blocks.
pub(crate) fn scoped<T>(device: &wgpu::Device, stage: &str, f: impl FnOnce() -> T) -> Result<T> {
    pollster::block_on(scoped_async(device, stage, f))
}

/// The async form of [`scoped`], for code that must not block (the web).
pub(crate) async fn scoped_async<T>(
    device: &wgpu::Device,
    stage: &str,
    f: impl FnOnce() -> T,
) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = f();
    // Scopes pop in reverse order of their push.
    let errors = [
        validation.pop().await,
        internal.pop().await,
        oom.pop().await,
    ];
    match errors.into_iter().flatten().next() {
        None => Ok(value),
        Some(e) => Err(Error::Wgpu {
            stage: stage.to_string(),
            message: e.to_string(),
        }),
    }
}

/// Checks a buffer the caller hands in: `STORAGE` usage and at least `bytes` long (`sized_for`
/// says what that size holds, for the message).
pub(crate) fn check_storage(
    name: &'static str,
    buffer: &wgpu::Buffer,
    bytes: u64,
    sized_for: &str,
) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::BadBuffer {
            name,
            problem: format!("needs STORAGE usage, has {:?}", buffer.usage()),
        });
    }
    if buffer.size() < bytes {
        return Err(Error::BadBuffer {
            name,
            problem: format!(
                "is {} bytes, needs at least {bytes}{sized_for}",
                buffer.size()
            ),
        });
    }
    Ok(())
}

/// An uninitialised buffer of at least `bytes` (rounded up to 4; zero-sized buffers cannot be
/// bound, so four bytes stand in).
pub(crate) fn buffer(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).div_ceil(4) * 4,
        usage,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `bytes` (f32 or f16 elements), padded to a multiple of 4 bytes.
pub(crate) fn init_bytes(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: STORAGE,
    })
}

/// A uniform buffer holding `data`.
pub(crate) fn init_uniform(device: &wgpu::Device, label: &str, data: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: data,
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

/// Maps `buffer` (after the work that fills it was submitted), waits for the device, hands the
/// bytes to `read` and unmaps.
pub(crate) fn map_and_read<T>(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv().map_err(|_| wgpu::BufferAsyncError)??;
    read_mapped(buffer, read)
}

/// Hands the bytes of a mapped `buffer` to `read`, then unmaps it.
pub(crate) fn read_mapped<T>(buffer: &wgpu::Buffer, read: impl FnOnce(&[u8]) -> T) -> Result<T> {
    let value = {
        let view = buffer.get_mapped_range(..).map_err(|e| Error::Wgpu {
            stage: "reading results back".into(),
            message: e.to_string(),
        })?;
        read(&view)
    };
    buffer.unmap();
    Ok(value)
}

/// Copies `source` whole into a new mappable buffer and reads it back as f32. Allocates the
/// read-back buffer per call: for tests and teaching, not hot loops.
pub(crate) fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    source: &wgpu::Buffer,
) -> Result<Vec<f32>> {
    let size = source.size();
    let staging = scoped(device, "reading a buffer back", || {
        let staging = buffer(
            device,
            "read-back",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(source, 0, &staging, 0, size);
        queue.submit([encoder.finish()]);
        staging
    })?;
    map_and_read(device, &staging, |bytes| {
        bytemuck::cast_slice::<u8, f32>(bytes).to_vec()
    })
}
