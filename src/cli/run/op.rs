//! `wgpu-attention run` on a file holding `q`, `k`, `v`: one call of the attention operator,
//! checked against its f64 reference like the layer before anything is written.

use wgpu_attention::{
    AttentionOp, DeviceLimits, GpuContext, KernelChoice, compare, compare_bounded, reference,
};

use super::super::files::{self, Output, TensorFile};
use super::super::operator::{self, OperatorCall, OperatorOptions};
use super::super::{AdapterArgs, CliError};
use super::{CheckRule, Checked, RunArgs, failures, print_results, print_rule};

/// Runs the operator on `file`'s tensors, checks the output, and writes it if it passes.
pub fn main(
    adapter: &AdapterArgs,
    args: &RunArgs,
    mut file: TensorFile,
    rule: CheckRule,
) -> Result<(), CliError> {
    refuse_layer_flags(args)?;
    let options = OperatorOptions {
        heads: args.heads.map(|h| h as usize),
        scale: args.scale,
        causal: args.causal,
        allow_masked_rows: args.allow_masked_rows,
    };
    let call = operator::build(&mut file, &options)?;
    files::check_destination(&args.output)?;
    let ctx = adapter.context(DeviceLimits::Adapter)?;
    print_call(&ctx, &call);
    print_rule(rule);
    println!("check      every output row, against the f64 reference");
    let gpu = AttentionOp::new(&ctx, &call.config)?.run(&call.inputs)?;
    let expected = reference::operator(&call.config, &call.inputs)?;
    let comparison = match rule {
        CheckRule::Bound => compare_bounded(
            &gpu,
            &expected,
            &reference::operator_error_bound(&call.config, &call.inputs)?,
        )?,
        CheckRule::Fixed(tolerance) => compare(&gpu, &expected, tolerance)?,
    };
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
