//! Compiled kernels of one device: shader modules, bind group layouts and pipelines, each made
//! once per device and override set and shared by every plan on it; the device's dispatch-chunk
//! table; its measured arithmetic rate; and the lock its plans take on OpenGL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use wgpu::util::DeviceExt;

use super::{Binding, CHUNK_BINDING, Chunk, Kernel};
use crate::error::Result;
use crate::gpu::scoped_async;

#[derive(PartialEq, Eq, Hash)]
struct PipelineKey {
    kernel: Kernel,
    overrides: Vec<(&'static str, u64)>,
}

#[derive(Default)]
struct CacheState {
    modules: HashMap<Kernel, wgpu::ShaderModule>,
    layouts: HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    /// Pipelines that have run once (see [`KernelCache::first_use`]).
    used: std::collections::HashSet<wgpu::ComputePipeline>,
}

/// Compiled kernels of one device.
pub(crate) struct KernelCache {
    device: wgpu::Device,
    state: Mutex<CacheState>,
    chunks: OnceLock<ChunkTable>,
    /// The device's measured arithmetic rate in FLOP/s (f64 bits), which sizes submissions.
    rate: AtomicU64,
    /// Taken around everything a plan does with the device, where the backend has one context
    /// per adapter (OpenGL): see [`KernelCache::exclusive`].
    serial: Option<Mutex<()>>,
    /// The autotuner's mode and winners on this device.
    tune: Mutex<super::tune::TuneState>,
}

/// How long one submission of a plan's or operator's `run` should take at most, at the
/// device's measured rate. Well under the few seconds after which a GL context's waiting
/// threads give up and watchdogs reset a GPU; long enough that the round trip between
/// submissions (tens of microseconds) costs little.
const SUBMISSION_SECONDS: f64 = 0.1;

/// Most chunks one dispatch is split into (see `shaders/dispatch.wgsl`).
pub(crate) const MAX_CHUNKS: u32 = 1024;

/// The FLOP/s assumed before anything was measured: a CPU-class rate (a CPU Vulkan driver on
/// two cores reaches 2-10 GFLOP/s), so that a first call on a slow device still makes
/// submissions of about a second at most; one measured call corrects it. Lower would cost
/// more: every extra submission holds on to driver memory until the device is idle (1 GFLOP/s
/// made a 16384-token layer peak at 244 MB instead of 105 MB on lavapipe).
const ASSUMED_RATE: f64 = 1e10;

/// The per-device table of chunk numbers that `dispatch.wgsl` reads at a dynamic offset, with
/// its bind group: made once, so splitting a dispatch allocates nothing.
#[derive(Debug, Clone)]
pub(crate) struct ChunkTable {
    pub layout: wgpu::BindGroupLayout,
    pub group: wgpu::BindGroup,
    /// Bytes between entries: the device's uniform offset alignment.
    pub stride: u32,
}

/// A compiled kernel specialisation and the layout its bind groups use.
#[derive(Clone, Debug)]
pub(crate) struct Pipeline {
    pub kernel: Kernel,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Pipeline {
    /// The bind group of the kernel's group 0: `resources` in binding order, each put at the
    /// kernel's own binding number ([`Kernel::group0`]: a variant that binds fewer buffers
    /// leaves gaps, so positions are not binding numbers).
    pub fn bind_group<'a>(
        &self,
        device: &wgpu::Device,
        label: &str,
        resources: impl IntoIterator<Item = wgpu::BindingResource<'a>>,
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = self
            .kernel
            .group0()
            .into_iter()
            .zip(resources)
            .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &self.layout,
            entries: &entries,
        })
    }
}

impl KernelCache {
    pub fn new(device: &wgpu::Device) -> Self {
        KernelCache {
            device: device.clone(),
            state: Mutex::new(CacheState::default()),
            chunks: OnceLock::new(),
            rate: AtomicU64::new(ASSUMED_RATE.to_bits()),
            serial: (device.adapter_info().backend == wgpu::Backend::Gl).then(Mutex::default),
            tune: Mutex::default(),
        }
    }

    /// Exclusive use of the device by this crate's plans, on backends that have one context per
    /// adapter (OpenGL); `None` (no lock) elsewhere.
    ///
    /// wgpu locks an OpenGL adapter's context for every call that touches it, and a thread that
    /// waits for that lock for more than a few seconds aborts the process. A driver's shader
    /// compile or a long submission can hold the lock that long, so plans used from several
    /// threads first queue here, where waiting has no limit.
    pub fn exclusive(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The autotuner's state on this device.
    pub fn tune(&self) -> std::sync::MutexGuard<'_, super::tune::TuneState> {
        self.tune.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// FLOPs one submission should hold: [`SUBMISSION_SECONDS`] at the measured rate.
    pub fn submission_budget(&self) -> f64 {
        self.rate() * SUBMISSION_SECONDS
    }

    /// The device's arithmetic rate, as last measured by a run (FLOP/s).
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Whether `pipeline` is used here for the first time; marks it used.
    ///
    /// Some drivers compile a pipeline's machine code at its first dispatch, inside the
    /// submission that holds it (seconds, for a large kernel on a CPU driver). Plans therefore
    /// run each new pipeline once, alone, when they are built, so that no later submission pays
    /// for a compile and none holds the device for longer than its own work.
    pub fn first_use(&self, pipeline: &wgpu::ComputePipeline) -> bool {
        self.lock().used.insert(pipeline.clone())
    }

    /// Records a measured rate: `flops` of work took `seconds` from submission to completion.
    /// Runs shorter than a few milliseconds are mostly overhead and are not counted.
    pub fn measured(&self, flops: f64, seconds: f64) {
        if seconds > 0.005 && flops > 0.0 {
            self.rate
                .store((flops / seconds).to_bits(), Ordering::Relaxed);
        }
    }

    /// The chunk table, made on first use.
    pub async fn chunks(&self) -> Result<ChunkTable> {
        if let Some(t) = self.chunks.get() {
            return Ok(t.clone());
        }
        let table = scoped_async(&self.device, "creating the dispatch-chunk table", || {
            let align = self.device.limits().min_uniform_buffer_offset_alignment;
            let size = std::mem::size_of::<Chunk>();
            let stride = align.max(size as u32);
            let mut bytes = vec![0u8; (MAX_CHUNKS * stride) as usize];
            for index in 0..MAX_CHUNKS {
                let at = (index * stride) as usize;
                let chunk = Chunk {
                    index,
                    ..Chunk::default()
                };
                bytes[at..at + size].copy_from_slice(bytemuck::bytes_of(&chunk));
            }
            let buffer = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("dispatch chunks"),
                    contents: &bytes,
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("dispatch chunk"),
                    entries: &[CHUNK_BINDING.layout_entry()],
                });
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("dispatch chunk"),
                layout: &layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: CHUNK_BINDING.binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &buffer,
                        offset: 0,
                        size: CHUNK_BINDING.min_binding_size,
                    }),
                }],
            });
            ChunkTable {
                layout,
                group,
                stride,
            }
        })
        .await?;
        Ok(self.chunks.get_or_init(|| table).clone())
    }

    /// The pipeline of `kernel` specialised with `overrides`, compiled on first use. Never
    /// blocks: wgpu's error scopes are awaited, so this works on the web too.
    pub async fn pipeline(
        &self,
        kernel: Kernel,
        overrides: &[(&'static str, f64)],
    ) -> Result<Pipeline> {
        let key = PipelineKey {
            kernel,
            overrides: overrides.iter().map(|&(n, v)| (n, v.to_bits())).collect(),
        };
        // The lock is never held across an await: two threads may compile the same
        // specialisation at once, and the second insert simply wins.
        let (layouts, module, cached) = {
            let state = self.lock();
            (
                state.layouts.get(&kernel).cloned(),
                state.modules.get(&kernel).cloned(),
                state.pipelines.get(&key).cloned(),
            )
        };
        let (bgl, layout) = match layouts {
            Some(l) => l,
            None => {
                let l = self.create_layouts(kernel).await?;
                self.lock().layouts.insert(kernel, l.clone());
                l
            }
        };
        if let Some(pipeline) = cached {
            return Ok(Pipeline {
                kernel,
                pipeline,
                layout: bgl,
            });
        }
        let module = match module {
            Some(m) => m,
            None => {
                let m = scoped_async(
                    &self.device,
                    &format!("compiling {}", kernel.name()),
                    || {
                        self.device
                            .create_shader_module(wgpu::ShaderModuleDescriptor {
                                label: Some(kernel.file_name()),
                                source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
                            })
                    },
                )
                .await?;
                self.lock().modules.insert(kernel, m.clone());
                m
            }
        };
        let stage = format!("building the {} pipeline with {overrides:?}", kernel.name());
        let pipeline = scoped_async(&self.device, &stage, || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.file_name()),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: overrides,
                        // Every kernel writes its workgroup tiles before reading them.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })
        .await?;
        self.lock().pipelines.insert(key, pipeline.clone());
        Ok(Pipeline {
            kernel,
            pipeline,
            layout: bgl,
        })
    }

    /// Drops the cache's hold on the pipeline of `kernel` with `overrides` (a plan that uses it
    /// keeps it alive). The autotuner forgets the candidates that lost, so that their compiled
    /// code (tens of MB each on a CPU driver) does not stay for the life of the device; a
    /// later plan that wants one compiles it again.
    pub fn forget(&self, kernel: Kernel, overrides: &[(&'static str, f64)]) {
        let key = PipelineKey {
            kernel,
            overrides: overrides.iter().map(|&(n, v)| (n, v.to_bits())).collect(),
        };
        let mut state = self.lock();
        if let Some(pipeline) = state.pipelines.remove(&key) {
            state.used.remove(&pipeline);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A poisoned lock only means another thread panicked mid-insert; the maps stay valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn create_layouts(
        &self,
        kernel: Kernel,
    ) -> Result<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let chunks = self.chunks().await?;
        // Group 1 is the shared chunk table's layout (CHUNK_BINDING, made once per device).
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings()
            .iter()
            .filter(|b| b.group == 0)
            .map(Binding::layout_entry)
            .collect();
        scoped_async(
            &self.device,
            &format!("laying out {}", kernel.name()),
            || {
                let bgl = self
                    .device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(kernel.file_name()),
                        entries: &entries,
                    });
                let layout = self
                    .device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(kernel.file_name()),
                        bind_group_layouts: &[Some(&bgl), Some(&chunks.layout)],
                        immediate_size: 0,
                    });
                (bgl, layout)
            },
        )
        .await
    }
}
