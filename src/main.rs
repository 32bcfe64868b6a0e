//! The `wgpu-attention` program: the worked example's walkthrough, attention on safetensors
//! files, and the GPU-against-CPU benchmark. `cargo run --release` with no arguments runs the
//! walkthrough and a short benchmark sweep.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_headless_vulkan();
    let progress = cli::init_logging();
    match cli::main(progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select` asks Wayland which GPU drives the
/// display, and on a machine without one libwayland prints "error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment." on every instance, on a run that then succeeds. Without a
/// display there is nothing for the layer to select by, so it is turned off with its own
/// switch, unless the user set that switch or asked the layer for a device.
fn quiet_headless_vulkan() {
    let unset = |name: &str| std::env::var_os(name).is_none_or(|v| v.is_empty());
    if unset("XDG_RUNTIME_DIR")
        && unset("WAYLAND_DISPLAY")
        && std::env::var_os("NODEVICE_SELECT").is_none()
        && std::env::var_os("MESA_VK_DEVICE_SELECT").is_none()
    {
        // SAFETY: called first thing in main, before any other thread exists, so nothing can
        // read the environment while it changes.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
