//! The `wgpu-attention` program: the worked example's walkthrough, attention on safetensors
//! files, and the GPU-against-CPU benchmark. `cargo run --release` with no arguments runs the
//! walkthrough and a short benchmark sweep.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let progress = cli::init_logging();
    match cli::main(progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
