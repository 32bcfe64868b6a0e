//! `wgpu-attention adapters`: every adapter wgpu finds, what each offers that matters here, and
//! which one the other subcommands would use, and why.

use wgpu_attention::{DeviceLimits, GpuContext};

use super::{AdapterArgs, CliError};

pub fn main(args: &AdapterArgs) -> Result<(), CliError> {
    let options = args.options(DeviceLimits::WgpuDefault);
    let adapters = wgpu_attention::enumerate_adapters(options.backends());
    if adapters.is_empty() {
        println!("no adapters on {:?}", options.backends());
    }
    for (i, adapter) in adapters.iter().enumerate() {
        print_adapter(i, adapter);
    }
    println!();
    match GpuContext::from_options(&options) {
        Ok(ctx) => {
            let info = ctx.adapter_info();
            println!(
                "chosen: {} ({:?}, {:?})",
                info.name, info.backend, info.device_type
            );
            println!("   why: {}", reason(args, &options));
        }
        Err(e) => println!("chosen: none: {e}"),
    }
    Ok(())
}

fn print_adapter(i: usize, adapter: &wgpu::Adapter) {
    let info = adapter.get_info();
    let features = adapter.features();
    let limits = adapter.limits();
    let has = |f: wgpu::Features| if features.contains(f) { "yes" } else { "no" };
    let mib = |b: u64| format!("{} MiB", b >> 20);
    println!("[{i}] {}", info.name);
    println!(
        "    backend {:?}, type {:?}, vendor {:#06x}, device {:#06x}",
        info.backend, info.device_type, info.vendor, info.device
    );
    println!("    driver {} {}", info.driver, info.driver_info);
    println!(
        "    timestamp queries {}, shader f16 {}, subgroups {} (size {}..{})",
        has(wgpu::Features::TIMESTAMP_QUERY),
        has(wgpu::Features::SHADER_F16),
        has(wgpu::Features::SUBGROUP),
        info.subgroup_min_size,
        info.subgroup_max_size
    );
    println!(
        "    storage binding {}, buffer {}, workgroup memory {} KiB, invocations {}, \
         workgroups per dimension {}",
        mib(limits.max_storage_buffer_binding_size),
        mib(limits.max_buffer_size),
        limits.max_compute_workgroup_storage_size / 1024,
        limits.max_compute_invocations_per_workgroup,
        limits.max_compute_workgroups_per_dimension
    );
}

fn reason(args: &AdapterArgs, options: &wgpu_attention::AdapterOptions) -> String {
    let source = |flag: bool| if flag { "flag" } else { "environment" };
    let mut why = match &options.adapter_name {
        Some(name) => format!(
            "the first adapter whose name contains {name:?} (from the {})",
            source(args.adapter.is_some())
        ),
        None => format!(
            "wgpu's pick for power preference {:?}: discrete GPUs rank above integrated, \
             virtual and CPU adapters",
            options.power_preference
        ),
    };
    match options.backends {
        Some(b) => why.push_str(&format!(
            ", among {b:?} (from the {})",
            source(args.backend.is_some())
        )),
        None => why
            .push_str(", among Vulkan, Metal and DX12 first, OpenGL only if none of them has one"),
    }
    why
}
