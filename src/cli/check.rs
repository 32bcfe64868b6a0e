//! The run's check of the GPU output against the f64 reference, linear in memory at any length.
//!
//! `reference::run` keeps `[batch, heads, seq, seq]` matrices in f64, 414 MB at seq 4096 and an
//! abort long before seq 100000. The output alone needs none of them: rows are streamed through
//! `reference::for_each_output_row`, which holds one batch row's keys and values at a time. Time
//! still grows with `seq²`, so every row is checked only while the work fits [`CHECK_BUDGET`];
//! past it, a spread of rows is, and the report says which was done.

use std::ops::ControlFlow;

use indicatif::{ProgressBar, ProgressStyle};
use wgpu_attention::{AttentionConfig, Comparison, Tensor, compare, compare_bounded, reference};

use super::run::CheckRule;

use super::CliError;
use super::layer::Layer;

/// Multiply-adds the check may spend on its own: a few seconds of the f64 reference on one
/// core of a laptop. Past it, rows are sampled.
pub const CHECK_BUDGET: f64 = 1e9;

/// The fewest rows a sample holds, however long each row takes, even past the budget.
const MIN_SAMPLE: usize = 32;

/// Which output rows the check computes.
#[derive(Debug, Clone)]
pub struct RowPlan {
    /// `(batch, position)` of every row to check, grouped by batch row.
    pub rows: Vec<(usize, usize)>,
    /// Whether that is every row of the output.
    pub all: bool,
    /// Multiply-adds of the reference for these rows.
    pub work: f64,
    /// Multiply-adds checking every row would take.
    pub all_work: f64,
}

/// Multiply-adds of the reference for one batch row's keys and values.
fn keys_values_work(c: &AttentionConfig) -> f64 {
    c.seq_len as f64 * c.d_model as f64 * (c.heads * (c.head_dim + c.head_dim_v)) as f64
}

/// Multiply-adds of the reference for one output row, once its batch row's keys and values
/// are known: the query, its scores and weighted sum over every key, and the projection.
fn row_work(c: &AttentionConfig) -> f64 {
    let h = c.heads as f64;
    c.d_model as f64 * h * c.head_dim as f64
        + c.seq_len as f64 * h * (c.head_dim + c.head_dim_v) as f64
        + if c.output_projection.is_some() {
            h * c.head_dim_v as f64 * c.d_out() as f64
        } else {
            0.0
        }
}

impl RowPlan {
    /// Every row if that fits `budget` multiply-adds (or `all` is asked for), else an even
    /// spread over batch rows and positions, always with each sampled batch row's first and
    /// last token.
    pub fn choose(c: &AttentionConfig, all: bool, budget: f64) -> Self {
        let (kv, row) = (keys_values_work(c), row_work(c));
        let total = c.batch * c.seq_len;
        let all_work = c.batch as f64 * kv + total as f64 * row;
        if all || all_work <= budget {
            let rows = (0..c.batch)
                .flat_map(|b| (0..c.seq_len).map(move |t| (b, t)))
                .collect();
            return RowPlan {
                rows,
                all: true,
                work: all_work,
                all_work,
            };
        }
        // Half the budget at most on keys and values, the rest on rows.
        let batches = ((budget / 2.0 / kv) as usize).clamp(1, c.batch);
        let per_batch = (((budget - batches as f64 * kv) / row / batches as f64) as usize)
            .clamp(MIN_SAMPLE.div_ceil(batches).min(c.seq_len), c.seq_len);
        let rows: Vec<(usize, usize)> = spread(c.batch, batches)
            .into_iter()
            .flat_map(|b| {
                spread(c.seq_len, per_batch)
                    .into_iter()
                    .map(move |t| (b, t))
            })
            .collect();
        let work = batches as f64 * kv + rows.len() as f64 * row;
        RowPlan {
            all: rows.len() == total,
            rows,
            work,
            all_work,
        }
    }

    /// One line for the report: what is checked, and why not more.
    pub fn describe(&self, total: usize) -> String {
        if self.all {
            let why = if self.work <= CHECK_BUDGET {
                format!("within the check's budget of {CHECK_BUDGET:.0e}")
            } else {
                format!("over the check's budget of {CHECK_BUDGET:.0e}, as --check-all asks")
            };
            format!(
                "all {total} output rows, streamed through the f64 reference ({:.1e} \
                 multiply-adds, {why})",
                self.work
            )
        } else {
            format!(
                "a sample of {} of {total} output rows, evenly spread (every row would take \
                 {:.1e} multiply-adds, over the check's budget of {CHECK_BUDGET:.0e}; \
                 --check-all checks them all)",
                self.rows.len(),
                self.all_work
            )
        }
    }
}

/// `count` indices spread evenly over `0..len`, first and last included.
pub fn spread(len: usize, count: usize) -> Vec<usize> {
    let count = count.clamp(1, len);
    if count == 1 {
        return vec![0];
    }
    let mut picked: Vec<usize> = (0..count)
        .map(|i| (i as f64 * (len - 1) as f64 / (count - 1) as f64).round() as usize)
        .collect();
    picked.dedup();
    picked
}

/// A bar counting the rows `plan` checks.
pub fn progress_bar(plan: &RowPlan) -> ProgressBar {
    ProgressBar::new(plan.rows.len() as u64).with_style(
        ProgressStyle::with_template(
            "checking   {bar:30} {pos}/{len} rows, {elapsed} spent, about {eta} left",
        )
        .expect("the template is valid"),
    )
}

/// Compares the GPU `output` `[batch, seq, d_out]` with the reference rows `plan` names,
/// streaming them so memory stays linear in `seq`.
pub fn output(
    layer: &Layer,
    output: &Tensor,
    plan: &RowPlan,
    rule: CheckRule,
    progress: &ProgressBar,
) -> Result<Comparison, CliError> {
    let c = &layer.config;
    let d_out = c.d_out();
    let mut expected = Vec::with_capacity(plan.rows.len() * d_out);
    let flow = reference::for_each_output_row::<()>(
        c,
        &layer.weights,
        &layer.inputs,
        &plan.rows,
        |_, row| {
            expected.extend_from_slice(row);
            progress.inc(1);
            ControlFlow::Continue(())
        },
    )?;
    debug_assert!(flow.is_continue());
    progress.finish_and_clear();
    // The bounds of the same rows, linear in memory like the rows themselves.
    let bound: Vec<f32> = match rule {
        CheckRule::Bound => {
            reference::output_row_bounds(c, &layer.weights, &layer.inputs, &plan.rows)?
                .into_iter()
                .flatten()
                .collect()
        }
        CheckRule::Fixed(_) => Vec::new(),
    };
    let judge = |actual: &Tensor, expected: &Tensor| -> Result<Comparison, CliError> {
        Ok(match rule {
            CheckRule::Bound => compare_bounded(
                actual,
                expected,
                &Tensor::new(expected.shape().to_vec(), bound.clone())?,
            )?,
            CheckRule::Fixed(tolerance) => compare(actual, expected, tolerance)?,
        })
    };
    if plan.all {
        let expected = Tensor::new(output.shape().to_vec(), expected)?;
        return judge(output, &expected);
    }
    let actual: Vec<f32> = plan
        .rows
        .iter()
        .flat_map(|&(b, t)| {
            let start = (b * c.seq_len + t) * d_out;
            output.data()[start..start + d_out].iter().copied()
        })
        .collect();
    let shape = [plan.rows.len(), d_out];
    let mut comparison = judge(&Tensor::new(shape, actual)?, &Tensor::new(shape, expected)?)?;
    // Point back into the output: sample row k is token plan.rows[k].
    for element in [
        &mut comparison.max_abs_at,
        &mut comparison.max_rel_at,
        &mut comparison.worst_at,
    ] {
        if let [k, col] = element.index[..] {
            let (b, t) = plan.rows[k];
            element.index = vec![b, t, col];
        }
    }
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_keeps_both_ends() {
        assert_eq!(spread(10, 3), vec![0, 5, 9]);
        assert_eq!(spread(10, 1), vec![0]);
        assert_eq!(spread(3, 10), vec![0, 1, 2]);
    }

    #[test]
    fn short_runs_check_every_row_and_long_ones_a_sample_within_budget() {
        let short = AttentionConfig::new(2, 64, 8, 1, 8);
        let plan = RowPlan::choose(&short, false, CHECK_BUDGET);
        assert!(plan.all);
        assert_eq!(plan.rows.len(), 128);
        let long = AttentionConfig::new(1, 100_000, 64, 4, 16);
        let plan = RowPlan::choose(&long, false, CHECK_BUDGET);
        assert!(!plan.all);
        // Each row costs so much here that the smallest sample goes past the budget.
        assert_eq!(plan.rows.len(), MIN_SAMPLE);
        assert_eq!(plan.rows.first(), Some(&(0, 0)));
        assert_eq!(plan.rows.last(), Some(&(0, 99_999)));
        assert!(RowPlan::choose(&long, true, CHECK_BUDGET).all);
        let tiny_heads = AttentionConfig::new(2, 16384, 8, 1, 8);
        let plan = RowPlan::choose(&tiny_heads, false, CHECK_BUDGET);
        assert!(!plan.all && plan.work <= CHECK_BUDGET, "{}", plan.work);
        assert!(plan.rows.len() > 1000, "{}", plan.rows.len());
        assert_eq!(plan.rows.last(), Some(&(1, 16383)));
    }
}
