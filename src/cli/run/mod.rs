//! `wgpu-attention run`: a layer (or an operator call, see `op`) on tensors from a safetensors
//! file, run on the GPU, checked against the CPU reference, and written to another safetensors
//! file only if they agree.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use wgpu_attention::{
    AttentionPlan, Comparison, DeviceLimits, GpuContext, Intermediates, KernelChoice, Precision,
    Tensor, Tolerance, compare, compare_bounded, reference,
};

use super::check::{self, CHECK_BUDGET, RowPlan};
use super::files::{self, Output};
use super::layer::{self, Layer, LayerOptions, WeightLayout};
use super::operator;
use super::{AdapterArgs, CliError};

mod grads;
mod op;

/// Arguments of `wgpu-attention run`. The file format is described in docs/safetensors.md.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Safetensors file with a layer: `x` [batch, seq, d_model] or [seq, d_model], `w_q`,
    /// `w_k`, `w_v`, and optionally `b_q`, `b_k`, `b_v`, `w_o`, `b_o` and a key mask
    /// [batch, seq]; PyTorch's names (`in_proj_weight`, `query.weight`, `key_padding_mask`,
    /// ...) are read too, in PyTorch's conventions. Or one call of the attention operator:
    /// `q` [batch, heads, q_len, head_dim], `k` [batch, kv_heads, kv_len, head_dim], `v`
    /// [batch, kv_heads, kv_len, head_dim_v], optionally `key_mask` [batch, kv_len] (nonzero =
    /// attend) and `attn_bias` [batch or 1, heads or 1, q_len, kv_len]. Either kind may also
    /// hold `grad_out` (shaped like `out`) to run the backward too. Floats are F32, F16 or BF16
    /// (read exactly). See docs/safetensors.md.
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Where to write `out` [batch, seq, d_out] as F32 (without the batch axis for a 2-D `x`;
    /// [batch, heads, q_len, head_dim_v] for an operator call), and with `grad_out` a
    /// `grad_<name>` for every input tensor (`grad_x`, `grad_w_q`, ... or `grad_q`, `grad_k`,
    /// `grad_v`). Written only if the GPU agrees with the CPU reference; an existing file is replaced
    /// atomically. Never the input file.
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Number of heads; the widths of `w_q` and `w_v` must divide by it. Required unless only
    /// one count divides both. An operator call reads its head counts from `q` and `k`, and
    /// refuses a --heads that disagrees.
    #[arg(long, value_name = "H", value_parser = clap::value_parser!(u32).range(1..))]
    pub heads: Option<u32>,
    /// Score scale [default: 1/sqrt(head_dim)].
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = parse_scale)]
    pub scale: Option<f32>,
    /// Query i attends only keys j <= i; for an operator call, keys j <= i + kv_len - q_len
    /// (aligned to the end of the keys, as a KV cache needs).
    #[arg(long)]
    pub causal: bool,
    /// How `w_q`, `w_k`, `w_v`, `w_o` are stored: `torch` for nn.Linear weights
    /// [out_features, in_features], `xw` for [in, out]. Required when every one is square;
    /// PyTorch's tensor names fix it.
    #[arg(
        long,
        value_enum,
        value_name = "LAYOUT",
        conflicts_with = "torch_layout"
    )]
    pub layout: Option<LayoutArg>,
    /// The same as --layout torch.
    #[arg(long)]
    pub torch_layout: bool,
    /// Run even when the mask leaves a batch row or a query with no key at all (its output is
    /// zeros). Without it such a mask is refused, as it is most often saved in the opposite
    /// convention.
    #[arg(long)]
    pub allow_masked_rows: bool,
    /// Check every output row against the reference, however long that takes. By default all
    /// rows are checked while that fits the check's budget, and an even sample past it.
    #[arg(long)]
    pub check_all: bool,
    /// Also write `q`, `k`, `v` [batch, heads, seq, head_dim], `scores` and `probs`
    /// [batch, heads, seq, seq] (masked scores are -inf) and `attention`
    /// [batch, seq, heads*head_dim_v], the heads before the output projection.
    #[arg(long)]
    pub intermediates: bool,
    /// GPU kernels: the staged ones (scores, softmax, weighted sum), the fused one, or auto
    /// (fused, except with --intermediates or a value head wider than 256).
    #[arg(long, value_enum, default_value_t = KernelChoice::Auto)]
    pub kernel: KernelChoice,
    /// Storage on the GPU: f32, or f16 (x, weights, Q/K/V and the output in f16, arithmetic
    /// in f32; needs an adapter with shader-f16). F16 and BF16 tensors in the file are taken as
    /// they are, F32 ones rounded to f16; the check's reference starts from the rounded values
    /// and its bound adds f16's rounding of each stored tensor.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Absolute part of the check |gpu - ref| <= atol + rtol*|ref| [default: 1e-5].
    #[arg(long, value_name = "ATOL", allow_negative_numbers = true)]
    pub tolerance_atol: Option<f64>,
    /// Relative part of the check |gpu - ref| <= atol + rtol*|ref| [default: 1e-4].
    #[arg(long, value_name = "RTOL", allow_negative_numbers = true)]
    pub tolerance_rtol: Option<f64>,
}

/// `--layout`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// PyTorch nn.Linear.weight: [out_features, in_features].
    Torch,
    /// [in, out], applied as x @ W.
    Xw,
}

/// A scale must be a finite number; refused here so the message names the flag, not the file.
fn parse_scale(s: &str) -> Result<f32, String> {
    let value: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("the scale must be a finite number, got {s}"))
    }
}

/// The most elements of one `[batch, heads, seq, seq]` intermediate that --intermediates
/// takes on: the full reference keeps four such matrices (scores and probabilities, in f64
/// and f32) and the GPU two, 32 bytes an element, so this is 2 GiB in all.
const MAX_INTERMEDIATE_ELEMENTS: usize = 1 << 26;

/// How the GPU's output is judged against the reference.
#[derive(Debug, Clone, Copy)]
pub enum CheckRule {
    /// Each element within its f32 forward error bound (`reference::output_row_bounds`): the
    /// allowance grows with the activations and reduction lengths, as f32's own error does.
    Bound,
    /// `|gpu - ref| <= atol + rtol·|ref|`, as the user asked.
    Fixed(Tolerance),
}

impl RunArgs {
    fn layer_options(&self) -> LayerOptions {
        LayerOptions {
            heads: self.heads.map(|h| h as usize),
            scale: self.scale,
            causal: self.causal,
            layout: match (self.layout, self.torch_layout) {
                (Some(LayoutArg::Torch), _) | (None, true) => Some(WeightLayout::Torch),
                (Some(LayoutArg::Xw), _) => Some(WeightLayout::XW),
                (None, false) => None,
            },
            allow_masked_rows: self.allow_masked_rows,
        }
    }

    /// The check's rule: the f32 forward error bound of every element, unless the user gave a
    /// fixed tolerance.
    fn rule(&self) -> Result<CheckRule, CliError> {
        if self.tolerance_atol.is_none() && self.tolerance_rtol.is_none() {
            return Ok(CheckRule::Bound);
        }
        self.tolerance().map(CheckRule::Fixed)
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
pub fn main(
    adapter: &AdapterArgs,
    args: &RunArgs,
    progress: &MultiProgress,
) -> Result<(), CliError> {
    super::signals::install()?;
    let rule = args.rule()?;
    files::refuse_same_file(&args.input, &args.output)?;
    if args.intermediates && args.kernel == KernelChoice::Fused {
        return Err(CliError::Usage(
            "--intermediates needs the staged kernels, which keep them; the fused kernel never \
             stores scores or probabilities: use --kernel staged (or auto)"
                .into(),
        ));
    }
    let mut file = files::read(&args.input, |names| {
        operator::choose_tensors(names, &layer::TENSORS)
    })?;
    if operator::OWN.iter().any(|name| file.holds(name)) {
        return op::main(adapter, args, file, rule, progress);
    }
    let mut layer = layer::build(&mut file, &args.layer_options())?;
    layer.config.precision = args.precision;
    if layer.grad_out.is_some() && (args.intermediates || args.kernel == KernelChoice::Staged) {
        return Err(CliError::Usage(
            "the file holds `grad_out`, so the backward runs, and it needs the fused kernel \
             (whose forward saves the logsumexp the backward reads): drop --intermediates and \
             --kernel staged"
                .into(),
        ));
    }
    if args.intermediates {
        refuse_huge_intermediates(&layer)?;
    }
    // Checked before the GPU work so an unwritable destination fails fast; the output file
    // itself is made only once the result is ready.
    files::check_destination(&args.output)?;
    let rows =
        (!args.intermediates).then(|| RowPlan::choose(&layer.config, args.check_all, CHECK_BUDGET));
    // The user's file decides the sizes, so take everything the adapter offers rather than
    // wgpu's portable defaults.
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    print_layer(&ctx, &layer, rule);
    let total = layer.config.batch * layer.config.seq_len;
    if let Some(rows) = &rows {
        println!("check      {}", rows.describe(total));
    } else {
        println!("check      every tensor, against the full f64 reference");
    }
    if layer.grad_out.is_some() {
        println!(
            "backward   the file holds `grad_out`: every gradient is computed on the GPU and \
             checked, each element against the f64 reference backward"
        );
    }
    let estimate = Estimate::new(&ctx, &layer, rows.as_ref());
    if estimate.worth_telling() {
        println!("estimate   {estimate}; Ctrl-C stops cleanly");
    }
    let spinner = gpu_spinner(progress, estimate.gpu_seconds);
    let gpu = run_gpu(&ctx, &layer, args);
    spinner.finish_and_clear();
    progress.remove(&spinner);
    let (gpu, gpu_grads) = gpu?;
    report_peak_memory("after the GPU");
    let mut checked = match &rows {
        Some(rows) => {
            let (name, output) = gpu.into_iter().next().expect("the output comes first");
            let bar = if estimate.check_seconds > 2.0 {
                progress.add(check::progress_bar(rows))
            } else {
                ProgressBar::hidden()
            };
            let comparison = check::output(&layer, &output, rows, rule, &bar)?;
            progress.remove(&bar);
            vec![Checked {
                name,
                gpu: output,
                comparison,
            }]
        }
        None => {
            let cpu = written(
                reference::run(&layer.config, &layer.weights, &layer.inputs)?,
                true,
            );
            check_all(&layer, gpu, cpu, rule)?
        }
    };
    if let Some(g) = gpu_grads {
        checked.extend(grads::check_layer(&layer, g, rule)?);
    }
    print_results(&checked, layer.unbatched);
    if let Some(message) = failures(&checked) {
        return Err(CliError::Mismatch(message));
    }
    let tensors: Vec<(&str, Tensor)> = checked
        .into_iter()
        .map(|c| {
            (
                c.name,
                unbatch(c.gpu, layer.unbatched && grads::batched(c.name)),
            )
        })
        .collect();
    Output::write(&args.output, &tensors)?;
    let names: Vec<&str> = tensors.iter().map(|(name, _)| *name).collect();
    println!("wrote {} ({})", args.output.display(), names.join(", "));
    report_peak_memory("at the end");
    Ok(())
}

/// With WGPU_ATTENTION_REPORT_PEAK_RSS set, prints the process's peak resident memory so far
/// (Linux's VmHWM) to stderr, so a test can hold the run, and the check's share of it, to a
/// bound.
fn report_peak_memory(when: &str) {
    if std::env::var_os("WGPU_ATTENTION_REPORT_PEAK_RSS").is_none() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find(|l| l.starts_with("VmHWM:")) {
        Some(line) => eprintln!("peak memory {when}: {}", line["VmHWM:".len()..].trim()),
        None => eprintln!("peak memory {when}: unknown"),
    }
}

/// Refuses --intermediates whose `[batch, heads, seq, seq]` tensors would not fit, before
/// anything that large is allocated.
fn refuse_huge_intermediates(layer: &Layer) -> Result<(), CliError> {
    let c = &layer.config;
    let elements = [c.batch, c.heads, c.seq_len, c.seq_len]
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    match elements {
        Some(n) if n <= MAX_INTERMEDIATE_ELEMENTS => Ok(()),
        _ => Err(CliError::Usage(format!(
            "--intermediates at batch {}, heads {}, seq {} writes scores and probs of \
             {} elements each, over the {MAX_INTERMEDIATE_ELEMENTS} this program checks in \
             memory; drop --intermediates (the output alone is checked in linear memory) or \
             shorten the sequence",
            c.batch,
            c.heads,
            c.seq_len,
            elements.map_or("more than 2^64".to_string(), |n| n.to_string())
        ))),
    }
}

/// The GPU call gives no progress of its own: past two seconds, a spinner shows it is alive.
fn gpu_spinner(progress: &MultiProgress, gpu_seconds: f64) -> ProgressBar {
    if gpu_seconds <= 2.0 {
        return ProgressBar::hidden();
    }
    let spinner = progress.add(
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} running on the GPU, {elapsed} so far")
                .expect("the template is valid"),
        ),
    );
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner
}

/// A rough forecast of how long the run takes, so a long one says so before it starts.
struct Estimate {
    gpu_seconds: f64,
    check_seconds: f64,
}

/// Multiply-adds a second of the f64 reference: what one core of a 2020s laptop does.
const REFERENCE_RATE: f64 = 4e8;

impl Estimate {
    fn new(ctx: &GpuContext, layer: &Layer, rows: Option<&RowPlan>) -> Self {
        let c = &layer.config;
        let (b, h, n) = (c.batch as f64, c.heads as f64, c.seq_len as f64);
        let width = (c.head_dim + c.head_dim_v) as f64;
        let flops = 2.0 * b * h * n * n * width
            + 2.0 * b * n * c.d_model as f64 * h * (2 * c.head_dim + c.head_dim_v) as f64;
        let rate = Self::rate(ctx);
        let mut check_work = rows.map_or(b * h * n * n * width, |r| r.work);
        // The backward costs about 2.5 forwards on the GPU, and its reference runs in full.
        let flops = if layer.grad_out.is_some() {
            check_work += 3.0 * b * h * n * n * width;
            3.5 * flops
        } else {
            flops
        };
        Estimate {
            gpu_seconds: flops / rate,
            check_seconds: check_work / REFERENCE_RATE,
        }
    }

    /// FLOP/s to expect: software adapters (lavapipe, llvmpipe) reach a few GFLOP/s; anything
    /// else far more.
    fn rate(ctx: &GpuContext) -> f64 {
        if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu {
            2e9
        } else {
            1e12
        }
    }

    fn worth_telling(&self) -> bool {
        self.gpu_seconds + self.check_seconds > 3.0
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "roughly {:.0} s on the GPU and {:.0} s for the check",
            self.gpu_seconds.max(1.0),
            self.check_seconds.max(1.0)
        )
    }
}

/// The written tensors as computed on the GPU, and the gradients when the file holds
/// `grad_out`.
type GpuResults = (Vec<(&'static str, Tensor)>, Option<reference::LayerGrads>);

fn run_gpu(ctx: &GpuContext, layer: &Layer, args: &RunArgs) -> Result<GpuResults, CliError> {
    let intermediates = args.intermediates;
    let mut config = layer.config.clone().with_kernel(args.kernel);
    config.keep_intermediates = intermediates;
    let mut plan = AttentionPlan::new(ctx, &config, &layer.weights)?;
    if let Some(grad_out) = &layer.grad_out {
        let (output, grads) = plan.run_with_grad(&layer.inputs, grad_out)?;
        return Ok((vec![("out", output)], Some(grads)));
    }
    let output = plan.run(&layer.inputs)?;
    if intermediates {
        Ok((written(plan.read_intermediates()?, true), None))
    } else {
        Ok((vec![("out", output)], None))
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

/// Every written tensor against the full reference. Under [`CheckRule::Bound`] the output is
/// judged by its forward error bound; the intermediates (q, k, v, scores, probabilities), short
/// reductions of inputs of order one, by the fixed f32 rule.
fn check_all(
    layer: &Layer,
    gpu: Vec<(&'static str, Tensor)>,
    cpu: Vec<(&'static str, Tensor)>,
    rule: CheckRule,
) -> Result<Vec<Checked>, CliError> {
    if gpu.len() != cpu.len() {
        return Err(CliError::Usage(format!(
            "{} tensors came from the GPU but {} from the reference",
            gpu.len(),
            cpu.len()
        )));
    }
    let bound = match rule {
        CheckRule::Bound => Some(reference::error_bound(
            &layer.config,
            &layer.weights,
            &layer.inputs,
        )?),
        CheckRule::Fixed(_) => None,
    };
    gpu.into_iter()
        .zip(cpu)
        .map(|((name, gpu), (_, cpu))| {
            let comparison = match (rule, &bound) {
                (CheckRule::Bound, Some(bound)) if name == "out" => {
                    compare_bounded(&gpu, &cpu, bound)?
                }
                (CheckRule::Fixed(tolerance), _) => compare(&gpu, &cpu, tolerance)?,
                _ => compare(&gpu, &cpu, Tolerance::F32)?,
            };
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
    let failed: Vec<&Checked> = checked.iter().filter(|c| !c.comparison.passed()).collect();
    if failed.is_empty() {
        return None;
    }
    let listed: Vec<String> = failed
        .iter()
        .map(|c| format!("`{}`: {}", c.name, c.comparison))
        .collect();
    // A wider rule can never excuse NaN or infinity, so it is offered only when it could help.
    let hint = if failed
        .iter()
        .all(|c| c.comparison.wider_tolerance_could_pass())
    {
        " (a fixed, wider rule can be given with --tolerance-atol and --tolerance-rtol)"
    } else {
        ""
    };
    Some(format!("{}; nothing was written{hint}", listed.join("; ")))
}

fn print_layer(ctx: &GpuContext, layer: &Layer, rule: CheckRule) {
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
    println!("weights    {}", layer.layout);
    println!(
        "options    scale {}, causal {}, output projection {}, precision {}",
        c.scale_value(),
        yes_no(c.causal),
        yes_no(c.output_projection.is_some()),
        match c.precision {
            Precision::F32 => "f32",
            Precision::F16 => "f16 storage, f32 arithmetic",
        }
    );
    match &layer.mask {
        Some((name, kept)) => {
            let shown: Vec<String> = kept.iter().take(16).map(usize::to_string).collect();
            println!(
                "mask       `{name}`: keys kept per batch row (of {}): {}{}",
                c.seq_len,
                shown.join(", "),
                if kept.len() > 16 { ", ..." } else { "" }
            );
        }
        None => println!(
            "mask       none: every query attends every key{}",
            if c.causal { " up to itself" } else { "" }
        ),
    }
    print_rule(rule);
}

/// The check's rule, as the report's `tolerance` line.
fn print_rule(rule: CheckRule) {
    match rule {
        CheckRule::Bound => println!(
            "tolerance  each output element within its f32 forward error bound, computed beside \
             the CPU reference (f64); --tolerance-atol/--tolerance-rtol give a fixed rule"
        ),
        CheckRule::Fixed(tolerance) => println!(
            "tolerance  |gpu - ref| <= {:e} + {:e} * |ref| against the CPU reference (f64)",
            tolerance.atol, tolerance.rtol
        ),
    }
}

fn print_results(checked: &[Checked], unbatched: bool) {
    println!(
        "{:<10} {:<16} {:>12} {:>12} {:>9}  result",
        "tensor", "shape", "max abs err", "max rel err", "used"
    );
    for checked in checked {
        let unbatched = unbatched && grads::batched(checked.name);
        let shape = unbatched_shape(checked.gpu.shape(), unbatched);
        println!(
            "{:<10} {:<16} {:>12.3e} {:>12.3e} {:>8.1}%  {}",
            checked.name,
            format!("{shape:?}"),
            checked.comparison.max_abs,
            checked.comparison.max_rel,
            100.0 * checked.comparison.worst_ratio,
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
