//! `wgpu-attention run` on a file holding `q`, `k`, `v`: one call of the attention operator,
//! checked against its f64 reference like the layer before anything is written.

use indicatif::MultiProgress;
use wgpu_attention::{
    AttentionOp, BiasShape, Comparison, DeviceLimits, GpuContext, KernelChoice, OperatorConfig,
    OperatorInputs, Tensor, compare, compare_bounded, reference,
};

use super::super::check::{CHECK_BUDGET, spread};
use super::super::files::{self, Output, TensorFile};
use super::super::operator::{self, OperatorCall, OperatorOptions};
use super::super::{AdapterArgs, CliError};
use super::{
    CheckRule, Checked, Estimate, REFERENCE_RATE, RunArgs, failures, gpu_spinner, print_results,
    print_rule,
};

/// Runs the operator on `file`'s tensors, checks the output, and writes it if it passes.
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
    let sample = Sample::choose(&call, args.check_all);
    println!("check      {}", sample.describe(&call));
    let c = &call.config;
    let flops = 2.0
        * (c.batch * c.heads) as f64
        * call.q_len() as f64
        * call.kv_len() as f64
        * (c.head_dim + c.head_dim_v) as f64;
    let estimate = Estimate {
        gpu_seconds: flops / Estimate::rate(&ctx),
        check_seconds: sample.work / REFERENCE_RATE,
    };
    if estimate.worth_telling() {
        println!("estimate   {estimate}; Ctrl-C stops cleanly");
    }
    let spinner = gpu_spinner(progress, estimate.gpu_seconds);
    let gpu = AttentionOp::new(&ctx, &call.config).and_then(|mut op| op.run(&call.inputs));
    spinner.finish_and_clear();
    progress.remove(&spinner);
    let gpu = gpu?;
    let comparison = sample.check(&call, &gpu, rule)?;
    let checked = [Checked {
        name: "out",
        gpu,
        comparison,
    }];
    print_results(&checked, false);
    if let Some(message) = failures(&checked) {
        return Err(CliError::Mismatch(message));
    }
    let [Checked { gpu, .. }] = checked;
    Output::write(&args.output, &[("out", gpu)])?;
    println!("wrote {} (out)", args.output.display());
    Ok(())
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
            * (c.head_dim + c.head_dim_v) as f64;
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
            return format!(
                "every output row, against the f64 reference ({:.1e} multiply-adds)",
                self.work
            );
        }
        format!(
            "the query heads of {} of {} (batch row, key/value head) groups, evenly spread \
             (every one would take {:.1e} multiply-adds, over the check's budget of \
             {CHECK_BUDGET:.0e}; --check-all checks them all)",
            self.groups.len(),
            c.batch * c.kv_heads,
            self.all_work
        )
    }

    /// The GPU's output against the reference, over the sampled groups.
    fn check(
        &self,
        call: &OperatorCall,
        gpu: &Tensor,
        rule: CheckRule,
    ) -> Result<Comparison, CliError> {
        let judge = |config: &OperatorConfig,
                     inputs: &OperatorInputs,
                     gpu: &Tensor|
         -> Result<Comparison, CliError> {
            let expected = reference::operator(config, inputs)?;
            Ok(match rule {
                CheckRule::Bound => compare_bounded(
                    gpu,
                    &expected,
                    &reference::operator_error_bound(config, inputs)?,
                )?,
                CheckRule::Fixed(tolerance) => compare(gpu, &expected, tolerance)?,
            })
        };
        if self.all {
            return judge(&call.config, &call.inputs, gpu);
        }
        let c = &call.config;
        let group = c.heads / c.kv_heads;
        let mut worst: Option<Comparison> = None;
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
            let mut comparison = judge(&config, &inputs, &slab(gpu, b, heads)?)?;
            // Point back into the whole output: [0, g, i, c] of this group is [b, kh*group + g].
            for element in [
                &mut comparison.max_abs_at,
                &mut comparison.max_rel_at,
                &mut comparison.worst_at,
            ] {
                if let [_, g, ..] = element.index[..] {
                    element.index[0] = b;
                    element.index[1] = kh * group + g;
                }
            }
            worst = Some(match worst {
                None => comparison,
                Some(w) => merge(w, comparison),
            });
        }
        Ok(worst.expect("a sample holds at least one group"))
    }
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
