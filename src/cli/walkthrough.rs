//! `wgpu-attention walkthrough`: the worked example's eight steps, each computed on the GPU and
//! printed beside the CPU reference with the largest difference between them.

use clap::Args;
use wgpu_attention::{
    AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, DeviceLimits, Precision,
    Tensor, Tolerance, compare, compare_bounded, reference,
};

use super::{AdapterArgs, CliError};

/// Arguments of `wgpu-attention walkthrough`.
#[derive(Debug, Clone, Args)]
pub struct WalkthroughArgs {
    /// Score scale; the worked example is unscaled (1). A transformer uses 1/sqrt(3) here.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub scale: f32,
    /// Storage precision. With f16, steps 1 to 8 still show the staged kernels in f32 (their
    /// intermediates beside the reference's f32 ones), and a last step runs the whole
    /// layer with x, the weights, Q/K/V and the output stored in f16 (f32 arithmetic) and
    /// checks it against the reference under the f16 error bound.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl Default for WalkthroughArgs {
    fn default() -> Self {
        WalkthroughArgs {
            scale: 1.0,
            precision: Precision::F32,
        }
    }
}

const X: [f32; 12] = [1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.];
const W_KEY: [f32; 12] = [0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.];
const W_QUERY: [f32; 12] = [1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.];
const W_VALUE: [f32; 12] = [0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.];

/// Digits printed: all that f32 holds for values of this size.
const DECIMALS: usize = 6;

pub fn main(adapter: &AdapterArgs, args: &WalkthroughArgs) -> Result<(), CliError> {
    let tensor = |shape: &[usize], data: &[f32]| Tensor::new(shape.to_vec(), data.to_vec());
    let config = AttentionConfig::new(1, 3, 4, 1, 3)
        .with_scale(args.scale)
        .with_intermediates();
    let weights = AttentionWeights::new(
        tensor(&[4, 3], &W_QUERY)?,
        tensor(&[4, 3], &W_KEY)?,
        tensor(&[4, 3], &W_VALUE)?,
    );
    let inputs = AttentionInputs::new(tensor(&[1, 3, 4], &X)?);

    let ctx = adapter.context(DeviceLimits::WgpuDefault)?;
    let mut plan = AttentionPlan::new(&ctx, &config, &weights)?;
    plan.run(&inputs)?;
    let gpu = plan.read_intermediates()?;
    let cpu = reference::run(&config, &weights, &inputs)?;
    let info = ctx.adapter_info();

    println!(
        "Self-attention in eight steps, on {} ({:?}), beside the CPU reference (f64).",
        info.name, info.backend
    );
    println!(
        "Scale {}{}.",
        args.scale,
        if args.scale == 1.0 {
            " (unscaled, as in the worked example; --scale sets another)"
        } else {
            ""
        }
    );
    let mut steps = Steps::default();

    println!("\nStep 1: prepare the inputs: 3 tokens of dimension 4");
    print_matrix("x", &rows(&X, 4));

    println!("\nStep 2: initialise the weights: 4 x 3 each, a key, a query and a value per input");
    print_side_by_side(&[
        ("w_key", rows(&W_KEY, 3)),
        ("w_query", rows(&W_QUERY, 3)),
        ("w_value", rows(&W_VALUE, 3)),
    ]);

    println!("\nStep 3: project every input into a key, a query and a value: x @ W");
    println!("        (GPU: gemm.wgsl, the three weights side by side in one dispatch)");
    steps.compare("keys", &gpu.k, &cpu.k)?;
    steps.compare("queries", &gpu.q, &cpu.q)?;
    steps.compare("values", &gpu.v, &cpu.v)?;

    println!("\nStep 4: score every query against every key: scale * queries @ keys^T");
    println!("        (GPU: scores.wgsl)");
    steps.compare("scores", &gpu.scores, &cpu.scores)?;

    println!("\nStep 5: softmax over each row: exp(s - row max) / sum");
    println!("        (GPU: softmax.wgsl; the row max keeps exp from overflowing)");
    steps.compare("softmax", &gpu.probs, &cpu.probs)?;

    println!("\nStep 6: weight each value by input 1's softmax weights: p_1j * value_j");
    println!("        (the GPU fuses steps 6 and 7 in weighted_sum.wgsl; shown here from its");
    println!("        softmax and values)");
    steps.compare(
        "weighted",
        &weighted_values(&gpu.probs, &gpu.v)?,
        &weighted_values(&cpu.probs, &cpu.v)?,
    )?;

    println!("\nStep 7: sum the weighted values: output 1");
    let first = |t: &Tensor| Tensor::new([1, 3], t.data()[..3].to_vec());
    steps.compare("output 1", &first(&gpu.output)?, &first(&cpu.output)?)?;

    println!("\nStep 8: repeat for every input: all outputs");
    println!("        (GPU: weighted_sum.wgsl does every input at once)");
    steps.compare("outputs", &gpu.output, &cpu.output)?;

    let f16 = match args.precision {
        Precision::F32 => None,
        Precision::F16 => Some(f16_outputs(&ctx, &config, &weights, &inputs)?),
    };
    steps.finish()?;
    match f16 {
        Some(c) if !c.passed() => Err(CliError::Mismatch(format!("f16 outputs: {c}"))),
        _ => Ok(()),
    }
}

/// The layer again with every tensor stored in f16 (the fused kernel; f32 arithmetic), printed
/// beside the reference on the f16-rounded inputs (the worked example's are exact in f16), with
/// how much of the f16 error bound the largest difference uses.
fn f16_outputs(
    ctx: &wgpu_attention::GpuContext,
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
) -> Result<wgpu_attention::Comparison, CliError> {
    let config = AttentionConfig {
        keep_intermediates: false,
        ..config.clone()
    }
    .with_precision(Precision::F16);
    println!("\nf16 storage: all outputs again, with x, the weights, Q, K, V and the outputs");
    println!("        stored in f16 and every sum, max and exp in f32 (GPU: gemm.wgsl and");
    println!("        fused_attention.wgsl in their f16 variants)");
    let gpu = AttentionPlan::new(ctx, &config, weights)?.run(inputs)?;
    let cpu = reference::run(&config, weights, inputs)?.output;
    let bound = reference::error_bound(&config, weights, inputs)?;
    let c = compare_bounded(&gpu, &cpu, &bound)?;
    print_side_by_side(&[
        ("outputs, f16 (GPU)", rows(gpu.data(), 3)),
        ("outputs (CPU)", rows(cpu.data(), 3)),
    ]);
    println!(
        "    max |GPU - CPU| = {:.2e}, {:.3} of the f16 error bound (one f16 ulp, 2^-10 \
         relative, per stored tensor, carried through)",
        c.max_abs, c.worst_ratio
    );
    Ok(c)
}

/// The running verdict over the steps.
#[derive(Default)]
struct Steps {
    failures: Vec<String>,
    worst: f64,
}

impl Steps {
    /// Prints a step's matrix from the GPU beside the CPU's, with their largest difference.
    fn compare(&mut self, name: &str, gpu: &Tensor, cpu: &Tensor) -> Result<(), CliError> {
        let c = compare(gpu, cpu, Tolerance::F32)?;
        let width = *gpu.shape().last().unwrap_or(&1);
        print_side_by_side(&[
            (&format!("{name} (GPU)"), rows(gpu.data(), width)),
            (&format!("{name} (CPU)"), rows(cpu.data(), width)),
        ]);
        println!("    max |GPU - CPU| = {:.2e}", c.max_abs);
        self.worst = self.worst.max(c.max_abs);
        if !c.passed() {
            self.failures.push(format!("{name}: {c}"));
        }
        Ok(())
    }

    fn finish(self) -> Result<(), CliError> {
        let t = Tolerance::F32;
        if self.failures.is_empty() {
            println!(
                "\nEvery step agrees: largest difference {:.2e}, within |gpu - ref| <= {:e} + {:e} * |ref|.",
                self.worst, t.atol, t.rtol
            );
            Ok(())
        } else {
            Err(CliError::Mismatch(self.failures.join("; ")))
        }
    }
}

/// `probs[0, j] * values[j]` for every key j: the terms of output 1.
fn weighted_values(probs: &Tensor, values: &Tensor) -> Result<Tensor, CliError> {
    let v = values.data();
    let data = (0..3)
        .flat_map(|j| (0..3).map(move |d| (j, d)))
        .map(|(j, d)| probs.data()[j] * v[j * 3 + d])
        .collect();
    Ok(Tensor::new([3, 3], data)?)
}

fn rows(data: &[f32], width: usize) -> Vec<Vec<f32>> {
    data.chunks(width.max(1)).map(<[f32]>::to_vec).collect()
}

fn format_row(row: &[f32]) -> String {
    let cells: Vec<String> = row
        .iter()
        .map(|v| {
            if *v == f32::NEG_INFINITY {
                format!("{:>w$}", "-inf", w = DECIMALS + 4)
            } else if v.fract() == 0.0 && v.abs() < 1e6 {
                format!("{:>w$}", *v as i64, w = DECIMALS + 4)
            } else {
                format!("{v:>w$.DECIMALS$}", w = DECIMALS + 4)
            }
        })
        .collect();
    format!("[{} ]", cells.join(""))
}

fn print_matrix(name: &str, rows: &[Vec<f32>]) {
    print_side_by_side(&[(name, rows.to_vec())]);
}

/// Prints matrices next to each other, their names above them.
fn print_side_by_side(blocks: &[(&str, Vec<Vec<f32>>)]) {
    let formatted: Vec<Vec<String>> = blocks
        .iter()
        .map(|(_, rows)| rows.iter().map(|r| format_row(r)).collect())
        .collect();
    let widths: Vec<usize> = blocks
        .iter()
        .zip(&formatted)
        .map(|((name, _), lines)| {
            lines
                .iter()
                .map(String::len)
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header: Vec<String> = blocks
        .iter()
        .zip(&widths)
        .map(|((name, _), w)| format!("{name:<w$}"))
        .collect();
    println!("    {}", header.join("   ").trim_end());
    let height = formatted.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..height {
        let line: Vec<String> = formatted
            .iter()
            .zip(&widths)
            .map(|(lines, w)| format!("{:<w$}", lines.get(r).map_or("", |s| s.as_str())))
            .collect();
        println!("    {}", line.join("   ").trim_end());
    }
}
