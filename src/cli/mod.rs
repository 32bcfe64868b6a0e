//! The command line: arguments, adapter choice, and one module per subcommand.

mod adapters;
mod bench;
mod bench_backward;
mod bench_decode;
mod bench_precision;
mod check;
mod error;
mod files;
mod layer;
mod operator;
mod report;
mod run;
mod signals;
mod walkthrough;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::MultiProgress;
use wgpu_attention::{AdapterOptions, DeviceLimits, GpuContext};

pub use error::CliError;

/// Transformer self-attention in WGSL compute shaders, checked against a CPU reference.
///
/// With no subcommand: the worked example's eight steps on the GPU beside the CPU, then a
/// short benchmark sweep.
#[derive(Debug, Parser)]
#[command(name = "wgpu-attention", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every adapter wgpu finds, what it offers, and which one would be chosen.
    Adapters,
    /// The worked example's eight steps, GPU beside CPU.
    Walkthrough(walkthrough::WalkthroughArgs),
    /// Run a layer, or the attention operator on q, k, v, on tensors from a safetensors file
    /// and write the output to another.
    Run(run::RunArgs),
    /// Sweep shapes and time the GPU against the CPU.
    Bench(Box<bench::BenchArgs>),
}

/// Which adapter to use. The WGPU_BACKEND, WGPU_ADAPTER_NAME and WGPU_POWER_PREF variables
/// apply where these are not given.
#[derive(Debug, Clone, Args)]
pub struct AdapterArgs {
    /// Backend to use.
    #[arg(long, global = true, value_enum)]
    pub backend: Option<Backend>,
    /// Use the first adapter whose name contains this (case-insensitive).
    #[arg(long, global = true, value_name = "NAME-SUBSTRING")]
    pub adapter: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl Backend {
    pub fn backends(self) -> wgpu::Backends {
        match self {
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
            Backend::Gl => wgpu::Backends::GL,
        }
    }
}

impl AdapterArgs {
    /// The environment's choice, overridden by the flags.
    pub fn options(&self, limits: DeviceLimits) -> AdapterOptions {
        let mut options = AdapterOptions::from_env();
        if let Some(b) = self.backend {
            options.backends = Some(b.backends());
        }
        if let Some(name) = &self.adapter {
            options.adapter_name = Some(name.clone());
        }
        options.limits = limits;
        options
    }

    pub fn context(&self, limits: DeviceLimits) -> Result<GpuContext, CliError> {
        Ok(GpuContext::from_options(&self.options(limits))?)
    }
}

/// Routes log lines through indicatif so they never tear a progress bar.
pub fn init_logging() -> MultiProgress {
    let logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles::egl=off"),
    )
    .build();
    let level = logger.filter();
    let progress = MultiProgress::new();
    if indicatif_log_bridge::LogWrapper::new(progress.clone(), logger)
        .try_init()
        .is_ok()
    {
        log::set_max_level(level);
    }
    progress
}

pub fn main(progress: MultiProgress) -> Result<(), CliError> {
    let cli = Cli::parse();
    match cli.command {
        None => {
            walkthrough::main(&cli.adapter, &walkthrough::WalkthroughArgs::default())?;
            println!();
            bench::main(&cli.adapter, &bench::BenchArgs::quick_default(), &progress)
        }
        Some(Command::Adapters) => adapters::main(&cli.adapter),
        Some(Command::Walkthrough(args)) => walkthrough::main(&cli.adapter, &args),
        Some(Command::Run(args)) => run::main(&cli.adapter, &args, &progress),
        Some(Command::Bench(args)) => bench::main(&cli.adapter, &args, &progress),
    }
}
