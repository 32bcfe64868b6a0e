//! `wgpu-attention run` on a file holding `q`, `k`, `v`: one call of the attention operator,
//! checked against its f64 reference like the layer before anything is written.

use indicatif::MultiProgress;
use wgpu_attention::{
    AttentionOp, BiasShape, Comparison, DeviceLimits, GpuContext, KernelChoice, OperatorConfig,
    OperatorInputs, Tensor, Tolerance, compare, compare_bounded, reference,
};

use super::super::check::{CHECK_BUDGET, spread};
use super::super::files::{self, Output, TensorFile};
use super::super::operator::{self, OperatorCall, OperatorOptions};
use super::super::{AdapterArgs, CliError};
use super::{
    CheckRule, Checked, Estimate, REFERENCE_RATE, RunArgs, failures, gpu_spinner, print_results,
    print_rule,
};

/// Runs the operator on `file`'s tensors (and its backward when the file holds `grad_out`),
/// checks the output and every gradient, and writes them if all pass.
pub fn main(
    adapter: &AdapterArgs,
    args: &RunArgs,
    mut file: TensorFile,
    rule: CheckRule,
    progress: &MultiProgress,
) -> Result<(), CliError> {
    refuse_layer_flags(args)?;
    let options = OperatorOptions {
        heads: args.heads.map(|h| h as usize),
        scale: args.scale,
        causal: args.causal,
        allow_masked_rows: args.allow_masked_rows,
    };
    let mut call = operator::build(&mut file, &options)?;
    call.config.precision = args.precision;
    files::check_destination(&args.output)?;
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    print_call(&ctx, &call);
    print_rule(rule);
    if call.grad_out.is_some() {
        print_gradient_rule(rule);
    }
    let sample = Sample::choose(&call, args.check_all);
    println!("check      {}", sample.describe(&call));
    let c = &call.config;
    let forward_flops = 2.0
        * (c.batch * c.heads) as f64
        * call.q_len() as f64
        * call.kv_len() as f64
        * (c.head_dim + c.head_dim_v) as f64;
    // The backward forms q·k and dO·v twice and adds to dQ, dK and dV: about 2.5 forwards.
    let flops = forward_flops * if call.grad_out.is_some() { 3.5 } else { 1.0 };
    let estimate = Estimate {
        gpu_seconds: flops / Estimate::rate(&ctx),
        check_seconds: sample.work / REFERENCE_RATE,
    };
    if estimate.worth_telling() {
        println!("estimate   {estimate}; Ctrl-C stops cleanly");
    }
    let spinner = gpu_spinner(progress, estimate.gpu_seconds);
    let gpu = run_gpu(&ctx, &call);
    spinner.finish_and_clear();
    progress.remove(&spinner);
    let gpu = gpu?;
    let comparisons = sample.check(&call, &gpu, rule)?;
    let checked: Vec<Checked> = gpu
        .into_iter()
        .zip(comparisons)
        .map(|((name, gpu), comparison)| Checked {
            name,
            gpu,
            comparison,
        })
        .collect();
    print_results(&checked, false);
    if let Some(message) = failures(&checked) {
        return Err(CliError::Mismatch(message));
    }
    let tensors: Vec<(&str, Tensor)> = checked.into_iter().map(|c| (c.name, c.gpu)).collect();
    Output::write(&args.output, &tensors)?;
    let names: Vec<&str> = tensors.iter().map(|(name, _)| *name).collect();
    println!("wrote {} ({})", args.output.display(), names.join(", "));
    Ok(())
}

/// The tensors the GPU computed, by the names they are written under: `out`, then, when the
/// call has `grad_out`, `grad_q`, `grad_k` and `grad_v` (the backward reads the logsumexp its
/// own forward saved, as training would).
fn run_gpu(ctx: &GpuContext, call: &OperatorCall) -> Result<Vec<(&'static str, Tensor)>, CliError> {
    let mut op = AttentionOp::new(ctx, &call.config)?;
    Ok(match &call.grad_out {
        None => vec![("out", op.run(&call.inputs)?)],
        Some(grad_out) => {
            let (out, grads) = op.run_with_grad(&call.inputs, grad_out)?;
            vec![
                ("out", out),
                ("grad_q", grads.q),
                ("grad_k", grads.k),
                ("grad_v", grads.v),
            ]
        }
    })
}

/// How each gradient is judged: a gradient element sums terms of both signs over every key
/// (or query), so its error follows the size of those terms, not its own size, and an
/// element-relative rule would fail on cancellations f32 cannot avoid. Under the default rule
/// every element is held to `GRAD_RTOL · max|reference| + GRAD_ATOL` of its tensor (of the
/// checked group when the check samples), as tests/backward.rs holds the GPU's gradients.
const GRAD_RTOL: f64 = 1e-4;
/// See [`GRAD_RTOL`].
const GRAD_ATOL: f64 = 1e-5;

fn print_gradient_rule(rule: CheckRule) {
    match rule {
        CheckRule::Bound => println!(
            "gradients  `grad_out` given: grad_q, grad_k, grad_v by the backward, each element \
             within {GRAD_RTOL:e} * max|ref| + {GRAD_ATOL:e} of its tensor (f64 reference)"
        ),
        CheckRule::Fixed(_) => println!(
            "gradients  `grad_out` given: grad_q, grad_k, grad_v by the backward, under the \
             same fixed rule"
        ),
    }
}

/// The gradient rule for a tensor whose reference is `expected`.
fn gradient_tolerance(expected: &Tensor) -> Tolerance {
    let scale = expected
        .data()
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64));
    Tolerance::new(GRAD_RTOL * scale + GRAD_ATOL, 0.0)
}

/// The flags that only mean something for a layer, refused rather than ignored.
fn refuse_layer_flags(args: &RunArgs) -> Result<(), CliError> {
    let refused = [
        (args.layout.is_some(), "--layout"),
        (args.torch_layout, "--torch-layout"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        return Err(CliError::Usage(format!(
            "{flag} says how a layer's weight matrices are stored, but this file holds an \
             operator's q, k and v, which have none: drop it"
        )));
    }
    if args.intermediates {
        return Err(CliError::Usage(
            "--intermediates writes a layer's projections, scores and probabilities; the \
             operator runs the fused kernel, which never stores scores: drop it"
                .into(),
        ));
    }
    if args.kernel == KernelChoice::Staged {
        return Err(CliError::Usage(
            "--kernel staged: the attention operator has only the fused kernel so far; use \
             --kernel fused or auto"
                .into(),
        ));
    }
    Ok(())
}

fn print_call(ctx: &GpuContext, call: &OperatorCall) {
    let info = ctx.adapter_info();
    let c = &call.config;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "adapter    {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    let sharing = match c.kv_heads {
        k if k == c.heads => "MHA".to_string(),
        1 => "MQA".to_string(),
        k => format!("GQA, {} query heads a key/value head", c.heads / k),
    };
    println!(
        "operator   batch {}, heads {} over kv_heads {} ({sharing}), q_len {}, kv_len {}, \
         head_dim {}, head_dim_v {}",
        c.batch,
        c.heads,
        c.kv_heads,
        call.q_len(),
        call.kv_len(),
        c.head_dim,
        c.head_dim_v
    );
    println!(
        "options    scale {}, causal {}{}",
        c.scale_value(),
        yes_no(c.causal),
        if c.causal {
            " (aligned to the end of the keys: query i sees keys j <= i + kv_len - q_len)"
        } else {
            ""
        }
    );
    match &call.kept {
        Some(kept) => {
            let shown: Vec<String> = kept.iter().take(16).map(usize::to_string).collect();
            println!(
                "mask       `key_mask`: keys kept per batch row (of {}): {}{}",
                call.kv_len(),
                shown.join(", "),
                if kept.len() > 16 { ", ..." } else { "" }
            );
        }
        None => println!("mask       none"),
    }
    match &call.inputs.bias {
        Some(b) => println!(
            "bias       `attn_bias` {:?}, added to the scaled scores",
            b.shape()
        ),
        None => println!("bias       none"),
    }
}

/// Which (batch row, key/value head) groups of the output the check computes: every one while
/// the reference and the bound fit [`CHECK_BUDGET`] multiply-adds (or `--check-all` asks),
/// else an even spread, the first and last among them. A group is the query heads of one
/// key/value head in one batch row, which the reference computes on its own.
struct Sample {
    /// `(batch, kv_head)` of every checked group.
    groups: Vec<(usize, usize)>,
    all: bool,
    work: f64,
    all_work: f64,
}

impl Sample {
    fn choose(call: &OperatorCall, check_all: bool) -> Self {
        let c = &call.config;
        let group = (c.heads / c.kv_heads) as f64;
        // The reference and the bound each take a multiply-add per key, query and column.
        let per_group = 2.0
            * group
            * call.q_len() as f64
            * call.kv_len() as f64
            * (c.head_dim + c.head_dim_v) as f64
            * if call.grad_out.is_some() { 3.5 } else { 1.0 };
        let total = c.batch * c.kv_heads;
        let all_work = total as f64 * per_group;
        let count = if check_all || all_work <= CHECK_BUDGET {
            total
        } else {
            ((CHECK_BUDGET / per_group) as usize).clamp(2.min(total), total)
        };
        let groups: Vec<(usize, usize)> = spread(total, count)
            .into_iter()
            .map(|g| (g / c.kv_heads, g % c.kv_heads))
            .collect();
        Sample {
            all: groups.len() == total,
            work: groups.len() as f64 * per_group,
            groups,
            all_work,
        }
    }

    fn describe(&self, call: &OperatorCall) -> String {
        let c = &call.config;
        if self.all {
            let what = if call.grad_out.is_some() {
                "every output row and gradient"
            } else {
                "every output row"
            };
            return format!(
                "{what}, against the f64 reference ({:.1e} multiply-adds)",
                self.work
            );
        }
        let gradients = if call.grad_out.is_some() {
            ", with their gradients"
        } else {
            ""
        };
        format!(
            "the query heads of {} of {} (batch row, key/value head) groups{gradients}, evenly \
             spread (every one would take {:.1e} multiply-adds, over the check's budget of \
             {CHECK_BUDGET:.0e}; --check-all checks them all)",
            self.groups.len(),
            c.batch * c.kv_heads,
            self.all_work
        )
    }

    /// The GPU's tensors (`out`, then the gradients if any) against the reference, over the
    /// sampled groups: one comparison per tensor, in order.
    fn check(
        &self,
        call: &OperatorCall,
        gpu: &[(&'static str, Tensor)],
        rule: CheckRule,
    ) -> Result<Vec<Comparison>, CliError> {
        let gpu: Vec<&Tensor> = gpu.iter().map(|(_, t)| t).collect();
        if self.all {
            return judge(
                &call.config,
                &call.inputs,
                call.grad_out.as_ref(),
                &gpu,
                rule,
            );
        }
        let c = &call.config;
        let group = c.heads / c.kv_heads;
        let mut worst: Vec<Comparison> = Vec::new();
        for &(b, kh) in &self.groups {
            let heads = kh * group..(kh + 1) * group;
            let bias_heads = |s: BiasShape| if s.per_head { heads.clone() } else { 0..1 };
            let config = OperatorConfig {
                batch: 1,
                heads: group,
                kv_heads: 1,
                bias: c.bias.map(|s| BiasShape {
                    per_batch: false,
                    ..s
                }),
                ..c.clone()
            };
            let i = &call.inputs;
            let inputs = OperatorInputs {
                q: slab(&i.q, b, heads.clone())?,
                k: slab(&i.k, b, kh..kh + 1)?,
                v: slab(&i.v, b, kh..kh + 1)?,
                key_mask: match &i.key_mask {
                    Some(m) => Some(slab(m, b, 0..1)?),
                    None => None,
                },
                bias: match (&i.bias, c.bias) {
                    (Some(t), Some(s)) => {
                        Some(slab(t, if s.per_batch { b } else { 0 }, bias_heads(s))?)
                    }
                    _ => None,
                },
            };
            let grad_out = match &call.grad_out {
                Some(g) => Some(slab(g, b, heads.clone())?),
                None => None,
            };
            // out and grad_q hold the group's query heads, grad_k and grad_v its kv head.
            let first_heads = [heads.start, heads.start, kh, kh];
            let counts = [group, group, 1, 1];
            let sliced = gpu
                .iter()
                .zip(first_heads.iter().zip(counts))
                .map(|(t, (&h, n))| slab(t, b, h..h + n))
                .collect::<Result<Vec<Tensor>, CliError>>()?;
            let sliced: Vec<&Tensor> = sliced.iter().collect();
            let comparisons = judge(&config, &inputs, grad_out.as_ref(), &sliced, rule)?;
            for (n, mut comparison) in comparisons.into_iter().enumerate() {
                // Point back into the whole tensor: [0, h, ...] of the slab is [b, first + h].
                for element in [
                    &mut comparison.max_abs_at,
                    &mut comparison.max_rel_at,
                    &mut comparison.worst_at,
                ] {
                    if let [_, h, ..] = element.index[..] {
                        element.index[0] = b;
                        element.index[1] = first_heads[n] + h;
                    }
                }
                match worst.get_mut(n) {
                    Some(w) => *w = merge(w.clone(), comparison),
                    None => worst.push(comparison),
                }
            }
        }
        Ok(worst)
    }
}

/// One call's (or one group's) tensors against the reference: `out` under `rule`, and with
/// `grad_out` the gradients of Q, K and V, under the gradient rule unless `rule` is fixed.
fn judge(
    config: &OperatorConfig,
    inputs: &OperatorInputs,
    grad_out: Option<&Tensor>,
    gpu: &[&Tensor],
    rule: CheckRule,
) -> Result<Vec<Comparison>, CliError> {
    let expected = reference::operator(config, inputs)?;
    let mut comparisons = vec![match rule {
        CheckRule::Bound => compare_bounded(
            gpu[0],
            &expected,
            &reference::operator_error_bound(config, inputs)?,
        )?,
        CheckRule::Fixed(tolerance) => compare(gpu[0], &expected, tolerance)?,
    }];
    if let Some(grad_out) = grad_out {
        let grads = reference::operator_backward(config, inputs, grad_out)?;
        for (gpu, expected) in gpu[1..].iter().zip([&grads.q, &grads.k, &grads.v]) {
            let tolerance = match rule {
                CheckRule::Bound => gradient_tolerance(expected),
                CheckRule::Fixed(tolerance) => tolerance,
            };
            comparisons.push(compare(gpu, expected, tolerance)?);
        }
    }
    Ok(comparisons)
}

/// Two groups' comparisons as one: counts added, the worst of each figure kept.
fn merge(a: Comparison, b: Comparison) -> Comparison {
    let mut m = Comparison {
        count: a.count + b.count,
        failures: a.failures + b.failures,
        non_finite: a.non_finite + b.non_finite,
        ..a.clone()
    };
    if b.max_abs > a.max_abs {
        (m.max_abs, m.max_abs_at) = (b.max_abs, b.max_abs_at.clone());
    }
    if b.max_rel > a.max_rel {
        (m.max_rel, m.max_rel_at) = (b.max_rel, b.max_rel_at.clone());
    }
    if b.worst_ratio > a.worst_ratio {
        (m.worst_ratio, m.worst_at) = (b.worst_ratio, b.worst_at.clone());
    }
    m
}

/// Batch row `b`, rows `rows` of its second axis, of a `[batch, n, ...]` tensor, as
/// `[1, rows.len(), ...]`; a `[batch, kv_len]` mask gives `[1, kv_len]` with `rows` 0..1.
fn slab(t: &Tensor, b: usize, rows: std::ops::Range<usize>) -> Result<Tensor, CliError> {
    let shape = t.shape();
    if shape.len() == 2 {
        let n = shape[1];
        return Ok(Tensor::new([1, n], t.data()[b * n..(b + 1) * n].to_vec())?);
    }
    let inner: usize = shape[2..].iter().product();
    let start = (b * shape[1] + rows.start) * inner;
    let data = t.data()[start..start + rows.len() * inner].to_vec();
    let mut sliced = shape.to_vec();
    sliced[0] = 1;
    sliced[1] = rows.len();
    Ok(Tensor::new(sliced, data)?)
}
