//! `wgpu-attention run`: a layer on tensors from a safetensors file, run on the GPU, checked
//! against the CPU reference, and written to another safetensors file only if they agree.

use std::path::PathBuf;

use clap::Args;
use wgpu_attention::{
    AttentionPlan, Comparison, DeviceLimits, GpuContext, Intermediates, KernelChoice, Tensor,
    Tolerance, compare, reference,
};

use super::files::{self, Output};
use super::layer::{self, Layer, LayerOptions, WeightLayout};
use super::{AdapterArgs, CliError};

/// Arguments of `wgpu-attention run`. The file format is described in docs/safetensors.md.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Safetensors file with `x` [batch, seq, d_model] or [seq, d_model], `w_q`, `w_k`, `w_v`,
    /// and optionally `b_q`, `b_k`, `b_v`, `w_o`, `b_o` and `key_mask` [batch, seq] (1 = real
    /// token, 0 = padding). Floats must be F32.
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Where to write `out` [batch, seq, d_out] as F32 (without the batch axis for a 2-D `x`).
    /// Written only if the GPU agrees with the CPU reference; an existing file is replaced
    /// atomically.
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Number of heads; the widths of `w_q` and `w_v` must divide by it.
    #[arg(long, value_name = "H", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub heads: u32,
    /// Score scale [default: 1/sqrt(head_dim)].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// Query i attends only keys j <= i.
    #[arg(long)]
    pub causal: bool,
    /// Weights are PyTorch nn.Linear weights, [out_features, in_features], rather than the
    /// x @ W layout [in, out].
    #[arg(long)]
    pub torch_layout: bool,
    /// Also write `q`, `k`, `v` [batch, heads, seq, head_dim], `scores` and `probs`
    /// [batch, heads, seq, seq] (masked scores are -inf) and `attention`
    /// [batch, seq, heads*head_dim_v], the heads before the output projection.
    #[arg(long)]
    pub intermediates: bool,
    /// GPU kernels: the staged ones (scores, softmax, weighted sum), the fused one, or auto
    /// (fused, except with --intermediates or a value head wider than 256).
    #[arg(long, value_enum, default_value_t = KernelChoice::Auto)]
    pub kernel: KernelChoice,
    /// Absolute part of the check |gpu - ref| <= atol + rtol*|ref| [default: 1e-5].
    #[arg(long, value_name = "ATOL", allow_negative_numbers = true)]
    pub tolerance_atol: Option<f64>,
    /// Relative part of the check |gpu - ref| <= atol + rtol*|ref| [default: 1e-4].
    #[arg(long, value_name = "RTOL", allow_negative_numbers = true)]
    pub tolerance_rtol: Option<f64>,
}

impl RunArgs {
    fn layer_options(&self) -> LayerOptions {
        LayerOptions {
            heads: self.heads as usize,
            scale: self.scale,
            causal: self.causal,
            layout: if self.torch_layout {
                WeightLayout::Torch
            } else {
                WeightLayout::XW
            },
        }
    }

    fn tolerance(&self) -> Result<Tolerance, CliError> {
        let atol = self.tolerance_atol.unwrap_or(Tolerance::F32.atol);
        let rtol = self.tolerance_rtol.unwrap_or(Tolerance::F32.rtol);
        for (flag, value) in [("--tolerance-atol", atol), ("--tolerance-rtol", rtol)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(CliError::Usage(format!(
                    "{flag} must be a finite number >= 0, got {value}"
                )));
            }
        }
        Ok(Tolerance::new(atol, rtol))
    }
}

/// One written tensor with its check against the reference.
struct Checked {
    name: &'static str,
    gpu: Tensor,
    comparison: Comparison,
}

/// Runs the subcommand: read, check, run on both sides, compare, report, write.
pub fn main(adapter: &AdapterArgs, args: &RunArgs) -> Result<(), CliError> {
    let tolerance = args.tolerance()?;
    let mut file = files::read(&args.input, &layer::TENSORS)?;
    let layer = layer::build(&mut file, &args.layer_options())?;
    // Created before the GPU work so an unwritable destination fails fast; dropped (and
    // removed) on any error below.
    let output = Output::create(&args.output)?;
    // The user's file decides the sizes, so take everything the adapter offers rather than
    // wgpu's portable defaults.
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    let gpu = run_gpu(&ctx, &layer, args)?;
    let cpu = written(
        reference::run(&layer.config, &layer.weights, &layer.inputs)?,
        args.intermediates,
    );
    let checked = check(gpu, cpu, tolerance)?;
    print_report(&ctx, &layer, tolerance, &checked);
    if let Some(message) = failures(&checked) {
        return Err(CliError::Mismatch(message));
    }
    let tensors: Vec<(&str, Tensor)> = checked
        .into_iter()
        .map(|c| (c.name, unbatch(c.gpu, layer.unbatched)))
        .collect();
    let path = output.path().to_path_buf();
    output.commit(&tensors)?;
    let names: Vec<&str> = tensors.iter().map(|(name, _)| *name).collect();
    println!("wrote {} ({})", path.display(), names.join(", "));
    Ok(())
}

/// The written tensors as computed on the GPU.
fn run_gpu(
    ctx: &GpuContext,
    layer: &Layer,
    args: &RunArgs,
) -> Result<Vec<(&'static str, Tensor)>, CliError> {
    let intermediates = args.intermediates;
    let mut config = layer.config.clone().with_kernel(args.kernel);
    config.keep_intermediates = intermediates;
    let mut plan = AttentionPlan::new(ctx, &config, &layer.weights)?;
    let output = plan.run(&layer.inputs)?;
    if intermediates {
        Ok(written(plan.read_intermediates()?, true))
    } else {
        Ok(vec![("out", output)])
    }
}

/// The tensors the output file gets, by name: `out`, and the intermediates if asked for.
fn written(all: Intermediates, intermediates: bool) -> Vec<(&'static str, Tensor)> {
    let mut tensors = vec![("out", all.output)];
    if intermediates {
        tensors.extend([
            ("q", all.q),
            ("k", all.k),
            ("v", all.v),
            ("scores", all.scores),
            ("probs", all.probs),
            ("attention", all.attention),
        ]);
    }
    tensors
}

fn check(
    gpu: Vec<(&'static str, Tensor)>,
    cpu: Vec<(&'static str, Tensor)>,
    tolerance: Tolerance,
) -> Result<Vec<Checked>, CliError> {
    gpu.into_iter()
        .zip(cpu)
        .map(|((name, gpu), (_, cpu))| {
            let comparison = compare(&gpu, &cpu, tolerance)?;
            Ok(Checked {
                name,
                gpu,
                comparison,
            })
        })
        .collect()
}

/// The Mismatch message, if any tensor failed its check.
fn failures(checked: &[Checked]) -> Option<String> {
    let failed: Vec<String> = checked
        .iter()
        .filter(|c| !c.comparison.passed())
        .map(|c| format!("`{}`: {}", c.name, c.comparison))
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "{}; nothing was written (loosen the check with --tolerance-atol and \
             --tolerance-rtol if the inputs are large)",
            failed.join("; ")
        )
    })
}

fn print_report(ctx: &GpuContext, layer: &Layer, tolerance: Tolerance, checked: &[Checked]) {
    let info = ctx.adapter_info();
    let c = &layer.config;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "adapter    {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    println!(
        "layer      batch {}, seq {}, d_model {}, heads {}, head_dim {}, head_dim_v {}, d_out {}",
        c.batch,
        c.seq_len,
        c.d_model,
        c.heads,
        c.head_dim,
        c.head_dim_v,
        c.d_out()
    );
    println!(
        "options    scale {}, causal {}, key mask {}, output projection {}",
        c.scale_value(),
        yes_no(c.causal),
        yes_no(c.key_padding_mask),
        yes_no(c.output_projection.is_some())
    );
    println!(
        "check      |gpu - ref| <= {:e} + {:e} * |ref| against the CPU reference (f64)",
        tolerance.atol, tolerance.rtol
    );
    println!(
        "{:<10} {:<16} {:>12} {:>12}  result",
        "tensor", "shape", "max abs err", "max rel err"
    );
    for checked in checked {
        let shape = unbatched_shape(checked.gpu.shape(), layer.unbatched);
        println!(
            "{:<10} {:<16} {:>12.3e} {:>12.3e}  {}",
            checked.name,
            format!("{shape:?}"),
            checked.comparison.max_abs,
            checked.comparison.max_rel,
            if checked.comparison.passed() {
                "pass"
            } else {
                "FAIL"
            }
        );
    }
}

/// The shape a tensor is written with: without its leading batch axis of 1 for a 2-D `x`,
/// as PyTorch returns unbatched inputs.
fn unbatched_shape(shape: &[usize], unbatched: bool) -> &[usize] {
    if unbatched { &shape[1..] } else { shape }
}

fn unbatch(t: Tensor, unbatched: bool) -> Tensor {
    if !unbatched {
        return t;
    }
    let shape = unbatched_shape(t.shape(), true).to_vec();
    Tensor::new(shape, t.into_data()).expect("dropping an axis of 1 keeps the element count")
}
