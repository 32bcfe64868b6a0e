//! The GPU context: a device and queue, either created from the environment or handed over by
//! an application that already has them, plus the compiled kernels shared by every plan on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::kernels::{Autotune, KernelCache};

/// Which device limits to ask the adapter for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceLimits {
    /// wgpu's portable defaults (128 MiB storage bindings, 256 MiB buffers), lowered only where
    /// the adapter has less: the same sizes work, or fail, on every machine.
    #[default]
    WgpuDefault,
    /// Everything the adapter offers: the largest sizes this machine can run.
    Adapter,
}

/// How to pick the adapter. [`AdapterOptions::from_env`] reads wgpu's usual variables.
///
/// ```
/// use wgpu_attention::AdapterOptions;
/// let opts = AdapterOptions {
///     backends: Some(wgpu::Backends::VULKAN),
///     adapter_name: Some("llvmpipe".into()),
///     ..AdapterOptions::default()
/// };
/// assert!(opts.describe().contains("llvmpipe"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterOptions {
    /// Backends to search; `None` means all that are compiled in.
    pub backends: Option<wgpu::Backends>,
    /// Take the first adapter whose name contains this (case-insensitive).
    pub adapter_name: Option<String>,
    /// Power preference when no name is given.
    pub power_preference: wgpu::PowerPreference,
    /// Which limits the device gets.
    pub limits: DeviceLimits,
}

impl AdapterOptions {
    /// Options from `WGPU_BACKEND` (e.g. `vulkan`, `gl`, `metal`, `dx12`, or a comma list),
    /// `WGPU_ADAPTER_NAME` (a substring of the adapter's name) and `WGPU_POWER_PREF` (`low`,
    /// `high`, `none`).
    pub fn from_env() -> Self {
        AdapterOptions {
            backends: wgpu::Backends::from_env(),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME")
                .ok()
                .filter(|s| !s.is_empty()),
            power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
            limits: DeviceLimits::WgpuDefault,
        }
    }

    /// The backends that will be searched.
    pub fn backends(&self) -> wgpu::Backends {
        self.backends.unwrap_or(wgpu::Backends::all())
    }

    /// A one-line description of the request, for messages.
    pub fn describe(&self) -> String {
        let mut s = format!("backends {:?}", self.backends());
        if let Some(name) = &self.adapter_name {
            s.push_str(&format!(", adapter name containing {name:?}"));
        }
        s.push_str(&format!(", power preference {:?}", self.power_preference));
        s
    }
}

/// A wgpu device and queue with the crate's compiled kernels.
///
/// Cloning is cheap and shares the device, queue and kernels. The only state shared between
/// contexts is the process's list of adapters per backend set (so that resource ids never
/// repeat between contexts, see [`enumerate_adapters`]); two contexts are two devices, and a
/// buffer of one handed to a plan of the other is refused, never silently bound.
///
/// ```no_run
/// use wgpu_attention::GpuContext;
/// // From the environment (WGPU_BACKEND, WGPU_ADAPTER_NAME, WGPU_POWER_PREF):
/// let ctx = GpuContext::from_env()?;
/// println!("running on {}", ctx.adapter_info().name);
/// // Or from an application's own device and queue:
/// let app = GpuContext::from_device(ctx.device().clone(), ctx.queue().clone());
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Clone)]
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    kernels: Arc<KernelCache>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

impl GpuContext {
    /// A context on the adapter the environment asks for (see [`AdapterOptions::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::from_options(&AdapterOptions::from_env())
    }

    /// A context on the adapter `options` describe; blocks until the device is ready.
    pub fn from_options(options: &AdapterOptions) -> Result<Self> {
        pollster::block_on(Self::from_options_async(options))
    }

    /// The async form of [`GpuContext::from_options`].
    ///
    /// Without an explicit backend, Vulkan, Metal and DX12 are tried first and OpenGL only if
    /// none of them has an adapter.
    pub async fn from_options_async(options: &AdapterOptions) -> Result<Self> {
        let adapter = match options.backends {
            Some(backends) => choose_adapter(backends, options).await?,
            None => match choose_adapter(wgpu::Backends::PRIMARY, options).await {
                Ok(adapter) => adapter,
                Err(_) => choose_adapter(wgpu::Backends::SECONDARY, options).await?,
            },
        };
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        let required_limits = match options.limits {
            DeviceLimits::WgpuDefault => {
                wgpu::Limits::default().or_worse_values_from(&adapter_limits)
            }
            DeviceLimits::Adapter => adapter_limits,
        };
        // Timestamps let the benchmark time each kernel; subgroups speed up reductions; f16
        // storage (`Precision::F16`) needs SHADER_F16. All are optional: the kernels have paths
        // without the first two, and f16 plans are refused by name without the third.
        let wanted =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
        let required_features = adapter.features() & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-attention"),
                required_features,
                required_limits,
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|source| Error::RequestDevice {
                adapter: info.name.clone(),
                source,
            })?;
        Ok(Self::with_info(device, queue, info))
    }

    /// A context on an application's existing device and queue. Nothing is created until a
    /// plan is built; the application keeps using its device as before.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        Self::with_info(device, queue, info)
    }

    fn with_info(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let kernels = Arc::new(KernelCache::new(&device));
        GpuContext {
            device,
            queue,
            info,
            kernels,
        }
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The adapter's name, backend, type and driver.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits.
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// Sets how plans and operators built on this context from now on choose the fused
    /// kernel's tiles ([`Autotune::Full`] by default): shared by every clone of the context.
    ///
    /// ```no_run
    /// use wgpu_attention::{Autotune, GpuContext};
    /// let ctx = GpuContext::from_env()?;
    /// // Winners of earlier runs on this adapter and driver; new ones are added to the file.
    /// ctx.autotune_file("attention-tuning.txt")?;
    /// ctx.set_autotune(Autotune::Full);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn set_autotune(&self, mode: Autotune) {
        self.kernels.tune().mode = mode;
    }

    /// The autotuner's mode on this context.
    pub fn autotune(&self) -> Autotune {
        self.kernels.tune().mode
    }

    /// Reads the autotuner's winners for this adapter and driver from `path` (a file that does
    /// not exist yet counts as empty) and appends every later winner to it, so a later process
    /// never tunes the same class again. Lines of other adapters or drivers are left alone; a
    /// line that does not parse, or tiles that do not fit this device, are
    /// [`Error::InvalidConfig`] naming the line.
    pub fn autotune_file(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let adapter = crate::kernels::tune::adapter_key(&self.info);
        self.kernels
            .tune()
            .load(path.as_ref(), adapter, &self.device.limits())
    }

    /// Pins the fused kernel's tiles for a shape class, in the autotune file's text: what tests
    /// do to run each candidate. Takes effect under [`Autotune::Cached`] and `Full`.
    #[doc(hidden)]
    pub fn pin_tiles(&self, class: &str, tiles: &str) -> Result<()> {
        self.kernels.tune().pin(class, tiles, &self.device.limits())
    }

    /// How many shape classes the autotuner has timed on this device.
    #[doc(hidden)]
    pub fn autotune_trials(&self) -> u64 {
        self.kernels.tune().trials
    }

    /// Every fused-kernel tile choice the autotuner knows on this device, as (shape class,
    /// override constants) text: what `bench` prints.
    pub fn tuned(&self) -> Vec<(String, String)> {
        self.kernels.tune().winners()
    }

    /// Whether kernels can be timed with timestamp queries.
    pub fn has_timestamps(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Whether the device can run f16 storage ([`crate::Precision::F16`]): it has the
    /// `SHADER_F16` feature (requested whenever the adapter offers it).
    pub fn has_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    pub(crate) fn kernels(&self) -> &KernelCache {
        &self.kernels
    }
}

/// The process's adapters on `backends`: one wgpu instance per backend set, enumerated once.
///
/// wgpu identifies buffers, bind groups and devices by an index that is unique only within an
/// instance, and compares them by that index alone. Two contexts made from two instances can
/// therefore hold different buffers that compare equal, and a buffer of one context handed to
/// the other would silently bind whichever buffer shares its index there. One instance per
/// backend set keeps every index unique, so wgpu's own validation catches such a mix-up.
///
/// The adapters are kept, not enumerated again: on OpenGL every adapter object of an instance
/// shares the instance's one EGL context but locks it with a lock of its own, so a second
/// adapter object used (or dropped) on another thread would make the context current under a
/// different lock. Every device the crate makes on an adapter comes from the same object.
async fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    type Cache = Mutex<HashMap<wgpu::Backends, Vec<wgpu::Adapter>>>;
    static ADAPTERS: OnceLock<Cache> = OnceLock::new();
    let cache = ADAPTERS.get_or_init(Default::default);
    let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = lock().get(&backends) {
        return found.clone();
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let found = wgpu::Instance::new(desc).enumerate_adapters(backends).await;
    // Another thread may have enumerated meanwhile: the first list stays the only one.
    lock().entry(backends).or_insert(found).clone()
}

/// Every adapter on the given backends, for listing (the same adapter objects that contexts
/// are made on).
pub fn enumerate_adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(adapters(backends))
}

/// Rank of an adapter type for a power preference, as wgpu's `request_adapter` orders them
/// (lower is better).
fn rank(kind: wgpu::DeviceType, preference: wgpu::PowerPreference) -> u8 {
    use wgpu::DeviceType::*;
    match (preference, kind) {
        (wgpu::PowerPreference::LowPower, IntegratedGpu) => 0,
        (wgpu::PowerPreference::LowPower, DiscreteGpu) => 1,
        (_, DiscreteGpu) => 0,
        (_, IntegratedGpu) => 1,
        (_, VirtualGpu) => 2,
        (_, Cpu) => 3,
        (_, Other) => 4,
    }
}

async fn choose_adapter(
    backends: wgpu::Backends,
    options: &AdapterOptions,
) -> Result<wgpu::Adapter> {
    let adapters = adapters(backends).await;
    let names: Vec<String> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?})", i.name, i.backend)
        })
        .collect();
    let found = match &options.adapter_name {
        Some(name) => {
            let wanted = name.to_lowercase();
            adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
        }
        None => adapters
            .into_iter()
            .min_by_key(|a| rank(a.get_info().device_type, options.power_preference)),
    };
    found.ok_or_else(|| Error::NoAdapter {
        request: format!(
            "{}; adapters found: {}",
            options.describe(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ),
    })
}
