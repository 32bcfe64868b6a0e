//! The bench's table on the terminal.

use wgpu_attention::{Stage, Tolerance};

use super::{CPU_MAX_REPEATS, Report};

pub(super) fn print_table(r: &Report) {
    println!(
        "adapter {} ({}, {}); GPU stage times from {}; median of {} runs after {} warm-up",
        r.adapter, r.backend, r.device_type, r.timing, r.repeats, r.warmup
    );
    println!(
        "layer: batch {}, heads {}, head_dim {}, d_model {}, output projection to {}, causal {}",
        r.batch, r.heads, r.head_dim, r.d_model, r.d_model, r.causal
    );
    println!("GFLOP/s: attention {}", r.flops_attention);
    println!("         layer     {}", r.flops_layer);
    if let Some(c) = r.cpu.first() {
        println!(
            "cpu: {} threads, median of {} runs after {} warm-up (the CPU takes at most {CPU_MAX_REPEATS} runs)",
            c.threads, c.samples, c.warmup
        );
    }
    println!(
        "errors: max over {} output rows per shape against the f64 reference; tol used: the \
         largest share of the allowance {:e} + {:e}*|ref| (1 = at the limit)",
        r.checked_rows,
        Tolerance::F32.atol,
        Tolerance::F32.rtol
    );
    println!();
    println!(
        "{:>6} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "seq",
        "path",
        "proj ms",
        "attn ms",
        "out ms",
        "gpu ms",
        "e2e ms",
        "attn GF",
        "layer GF",
        "fus/stg",
        "max abs",
        "tol used",
        "MiB",
        "vs cpu"
    );
    let ms = |s: f64| s * 1e3;
    for row in &r.gpu {
        let stage = |name: &str| {
            row.stages
                .iter()
                .find(|(s, _)| *s == name)
                .map_or(0.0, |(_, t)| t.median)
        };
        let staged = r
            .gpu
            .iter()
            .find(|o| o.seq == row.seq && o.kernel == "staged");
        let ratio = match (row.kernel, staged) {
            ("fused", Some(s)) => format!("{:.2}", row.attention.median / s.attention.median),
            _ => String::new(),
        };
        let vs_cpu = r
            .cpu
            .iter()
            .find(|c| c.seq == row.seq)
            .map_or(String::new(), |c| {
                format!("{:.2}x", c.layer.median / row.end_to_end.median)
            });
        println!(
            "{:>6} {:<7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>8} {:>9.2e} {:>9.3} {:>9.1} {:>9}",
            row.seq,
            row.kernel,
            ms(stage(Stage::Projection.label())),
            ms(row.attention.median),
            ms(stage(Stage::OutputProjection.label())),
            ms(row.gpu.median),
            ms(row.end_to_end.median),
            row.attention_gflops,
            row.layer_gflops,
            ratio,
            row.error.max_abs,
            row.error.tolerance_used,
            row.memory_bytes as f64 / (1 << 20) as f64,
            vs_cpu
        );
    }
    for row in &r.cpu {
        println!(
            "{:>6} {:<7} {:>9} {:>9.3} {:>9} {:>9} {:>9.3} {:>8.2} {:>8.2} {:>8} {:>9.2e} {:>9.3} {:>9} {:>9}",
            row.seq,
            "cpu",
            "",
            ms(row.attention.median),
            "",
            "",
            ms(row.layer.median),
            row.attention_gflops,
            row.layer_gflops,
            "",
            row.error.max_abs,
            row.error.tolerance_used,
            "",
            format!("n={}", row.samples)
        );
    }
    for s in &r.skipped {
        println!("{:>6} {:<7} skipped: {}", s.seq, s.kernel, s.reason);
    }
    println!();
    println!(
        "proj/attn/out: GPU time of the q|k|v projection, of softmax(QK^T)V, of the output projection; \
         gpu: their sum; e2e: run() with upload and read-back (for cpu: the whole layer); \
         fus/stg: fused attention time over staged; vs cpu: CPU layer time over the GPU's e2e time; \
         cpu attn: on already-projected inputs; n: timed CPU runs"
    );
    if !r.operator.is_empty() {
        print_operator(r);
    }
    println!();
    println!("fused kernel tiles (autotune {}):", r.autotune);
    for (class, tiles) in &r.tuned {
        println!("  {class:<50} {tiles}");
    }
    if r.tuned.is_empty() {
        println!("  the limits rule's, for every shape (nothing timed)");
    }
}

/// The attention operator's rows, after the layer's.
fn print_operator(r: &Report) {
    println!();
    println!(
        "operator: AttentionOp on buffers bound as an application's, its pass timed with {}; \
         GFLOP/s {}",
        if r.timing == "timestamp queries" {
            "the application's timestamp queries (encode_with)"
        } else {
            "the wall clock around a submission"
        },
        r.flops_operator
    );
    println!(
        "{:<6} {:>5} {:>8} {:>4} {:>6} {:>7} {:>6} {:>9} {:>9} {:>8} {:>9} {:>9} {:>7}",
        "row",
        "batch",
        "heads",
        "dim",
        "q_len",
        "kv_len",
        "causal",
        "pass ms",
        "e2e ms",
        "GFLOP/s",
        "max abs",
        "tol used",
        "checked"
    );
    for row in &r.operator {
        let s = &row.shape;
        println!(
            "{:<6} {:>5} {:>8} {:>4} {:>6} {:>7} {:>6} {:>9.3} {:>9.3} {:>8.2} {:>9.2e} {:>9.3} {:>7}",
            s.name,
            s.batch,
            format!("{}/{}", s.heads, s.kv_heads),
            s.head_dim,
            s.q_len,
            s.kv_len,
            if s.causal { "yes" } else { "no" },
            row.gpu.median * 1e3,
            row.end_to_end.median * 1e3,
            row.gflops,
            row.error.max_abs,
            row.error.tolerance_used,
            format!("{} h", row.checked_heads)
        );
    }
    println!(
        "heads: query/key-value; pass: the operator's compute pass; e2e: run() with upload and \
         read-back; checked: query heads compared with the f64 reference (those of the first \
         and last key/value heads)"
    );
}
