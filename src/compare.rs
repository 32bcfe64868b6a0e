//! Comparing a GPU result with the CPU reference, element by element, under one of two rules:
//!
//! - a per-element error bound (the default of the program), derived by the reference from a
//!   forward error analysis of an f32 computation of the layer ([`crate::reference::error_bound`]):
//!
//!   ```text
//!   |gpu - ref| <= bound
//!   ```
//!
//!   With f16 storage ([`crate::Precision::F16`]) the same analysis adds one f16 ulp (twice
//!   f16's unit roundoff `2^-11`: WGSL may round a conversion either way) for each value a
//!   kernel stores (Q, K, V, the heads' output, the layer's output),
//!   carried through the reductions that follow (dot products of `head_dim` terms, softmax sums
//!   over the keys, the output projection over `heads · head_dim_v`); arithmetic stays f32, so
//!   the f32 terms are unchanged. The reference is computed from the f16-rounded inputs, so
//!   the bound judges the kernels, not the rounding of the data;
//!
//!   It scales with the inputs: large activations and long reductions get a wider allowance,
//!   small ones a tighter one, so neither a correct large result is refused nor a wrong small one
//!   let through;
//! - a fixed tolerance the user chooses ([`Tolerance`]):
//!
//!   ```text
//!   |gpu - ref| <= atol + rtol * |ref|
//!   ```
//!
//! Equal infinities (the `-inf` of masked scores) pass with error 0; a NaN on either side fails.

use std::fmt;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, unravel};

/// The bounds of the fixed tolerance rule `|gpu - ref| <= atol + rtol * |ref|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

impl Tolerance {
    /// A tolerance of `atol + rtol * |ref|`.
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }

    /// A fixed tolerance for f32 GPU results against the f64 reference, for inputs of order 1:
    /// `atol = 1e-5`, `rtol = 1e-4`. f32 carries about 7 significant digits; sums of a few
    /// hundred products keep 5 to 6 of them. For larger inputs or longer reductions, compare
    /// against [`crate::reference::error_bound`] with [`compare_bounded`], which scales.
    pub const F32: Tolerance = Tolerance::new(1e-5, 1e-4);

    /// A fixed tolerance for f16-stored GPU results ([`crate::Precision::F16`]: f32 arithmetic)
    /// against the f64 reference on the f16-rounded inputs, for inputs of order 1 and heads up
    /// to 64 wide: `atol = 2^-10`, `rtol = 2^-8`, from f16's unit roundoff `u = 2^-11`
    /// ([`crate::precision::F16_UNIT_ROUNDOFF`]). The f32 arithmetic is negligible beside it;
    /// what remains is one rounding per stored tensor: Q, K and V (whose errors reach a score
    /// through a dot product of `head_dim` terms, `≈ √head_dim · u` relative for random signs,
    /// `4u` at 64), the attention output and the layer's output (`u` each), `8u = 2^-8` in all,
    /// with `2u` absolute for outputs near zero. The per-element bound of
    /// [`crate::reference::error_bound`] derives the same roundings for the actual shape and
    /// values, and is what the program and the tests use.
    pub const F16: Tolerance = Tolerance::new(1.0 / 1024.0, 1.0 / 256.0);

    /// The allowance for one element: `atol + rtol * |reference|`.
    pub fn allowance(&self, reference: f64) -> f64 {
        self.atol + self.rtol * reference.abs()
    }

    /// How much of the allowance an error uses: at most 1 passes.
    pub fn ratio(&self, gpu: f64, reference: f64) -> f64 {
        share(gpu, reference, self.allowance(reference))
    }
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance::F32
    }
}

/// `|gpu - reference| / allowance`; infinite where the two can never be close (a NaN, unequal
/// infinities, or an error where nothing is allowed).
fn share(gpu: f64, reference: f64, allowance: f64) -> f64 {
    if gpu == reference {
        return 0.0;
    }
    let diff = (gpu - reference).abs();
    if !diff.is_finite() || !reference.is_finite() || allowance <= 0.0 || allowance.is_nan() {
        return f64::INFINITY;
    }
    diff / allowance
}

/// Which rule a [`Comparison`] applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The fixed rule `|gpu - ref| <= atol + rtol * |ref|`.
    Fixed(Tolerance),
    /// A bound per element, `|gpu - ref| <= bound`; `largest` is the widest of them.
    ErrorBound {
        /// The largest per-element bound.
        largest: f64,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Fixed(t) => write!(f, "|gpu-ref| <= {:e} + {:e}*|ref|", t.atol, t.rtol),
            Rule::ErrorBound { largest } => write!(
                f,
                "|gpu-ref| <= the forward error bound (at most {largest:.3e})"
            ),
        }
    }
}

/// One element of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    /// Its multi-dimensional index.
    pub index: Vec<usize>,
    /// The value under test.
    pub actual: f32,
    /// The reference value.
    pub expected: f32,
    /// What this element was allowed to differ by.
    pub allowance: f64,
}

/// The outcome of comparing two tensors element by element.
///
/// ```
/// use wgpu_attention::{compare, Tensor, Tolerance};
/// let gpu = Tensor::new([2], vec![1.0, 2.0001]).unwrap();
/// let cpu = Tensor::new([2], vec![1.0, 2.0]).unwrap();
/// let c = compare(&gpu, &cpu, Tolerance::new(0.0, 1e-3)).unwrap();
/// assert!(c.passed());
/// assert!((c.max_abs - 1e-4).abs() < 1e-6);
/// assert_eq!(c.max_abs_at.index, vec![1]);
/// // 1e-4 of an allowance of 2e-3: about 5% used.
/// assert!((c.worst_ratio - 0.05).abs() < 1e-3);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The rule applied.
    pub rule: Rule,
    /// Number of elements compared.
    pub count: usize,
    /// Number of elements outside the allowance.
    pub failures: usize,
    /// Number of elements where the value under test is NaN or infinite and the reference is
    /// finite: a broken computation, which no wider tolerance should excuse.
    pub non_finite: usize,
    /// Largest `|gpu - ref|` (infinite where one side is NaN or the infinities differ).
    pub max_abs: f64,
    /// Where `max_abs` occurs.
    pub max_abs_at: Element,
    /// Largest `|gpu - ref| / |ref|` over elements with `ref != 0`. Near-zero references
    /// inflate it; `worst_ratio` is the figure that decides.
    pub max_rel: f64,
    /// Where `max_rel` occurs.
    pub max_rel_at: Element,
    /// The largest share of the allowance used, `|gpu - ref| / allowance`; the comparison
    /// passes when it is at most 1.
    pub worst_ratio: f64,
    /// Where `worst_ratio` occurs.
    pub worst_at: Element,
}

impl Comparison {
    /// Whether every element is within its allowance.
    pub fn passed(&self) -> bool {
        self.failures == 0
    }

    /// Whether a wider tolerance could ever make this comparison pass: false when it passed
    /// already, and false when the result holds NaN or infinities the reference does not
    /// have (a hint to loosen the check would then mislead).
    pub fn wider_tolerance_could_pass(&self) -> bool {
        !self.passed() && self.non_finite == 0
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |e: &Element| {
            format!(
                "{:?} (gpu {:e}, ref {:e}, allowed {:.3e})",
                e.index, e.actual, e.expected, e.allowance
            )
        };
        write!(
            f,
            "{} of {} elements outside {}",
            self.failures, self.count, self.rule
        )?;
        if self.non_finite > 0 {
            write!(
                f,
                "; {} NaN or infinite where the reference is finite",
                self.non_finite
            )?;
        }
        write!(
            f,
            "; {:.3} of the allowance used at {}; max abs err {:.3e} at {}; max rel err {:.3e} at {}",
            self.worst_ratio,
            at(&self.worst_at),
            self.max_abs,
            at(&self.max_abs_at),
            self.max_rel,
            at(&self.max_rel_at),
        )
    }
}

/// Compares `actual` with `expected` element by element under the fixed `tolerance`.
///
/// Fails only if the shapes differ.
pub fn compare(actual: &Tensor, expected: &Tensor, tolerance: Tolerance) -> Result<Comparison> {
    check_shape("compared tensor", expected, actual)?;
    Ok(compare_with(
        actual,
        expected,
        Rule::Fixed(tolerance),
        |_, e| tolerance.allowance(e),
    ))
}

/// Compares `actual` with `expected` element by element, allowing element `i` to differ by
/// `bound.data()[i]`, typically the f32 forward error bound of
/// [`crate::reference::error_bound`].
///
/// Fails only if the shapes differ.
///
/// ```
/// use wgpu_attention::{compare_bounded, Tensor};
/// let cpu = Tensor::new([2], vec![20.0, 0.0]).unwrap();
/// let bound = Tensor::new([2], vec![2e-4, 1e-6]).unwrap();
/// let gpu = Tensor::new([2], vec![20.0001, 2e-6]).unwrap();
/// let c = compare_bounded(&gpu, &cpu, &bound).unwrap();
/// // The first element is well inside its bound; the second uses twice its own.
/// assert_eq!(c.failures, 1);
/// assert_eq!(c.worst_at.index, vec![1]);
/// ```
pub fn compare_bounded(actual: &Tensor, expected: &Tensor, bound: &Tensor) -> Result<Comparison> {
    check_shape("compared tensor", expected, actual)?;
    check_shape("error bound", expected, bound)?;
    let largest = bound.data().iter().fold(0.0f64, |m, &b| m.max(b as f64));
    let bounds = bound.data();
    Ok(compare_with(
        actual,
        expected,
        Rule::ErrorBound { largest },
        |i, _| bounds[i] as f64,
    ))
}

fn check_shape(name: &str, expected: &Tensor, actual: &Tensor) -> Result<()> {
    if actual.shape() != expected.shape() {
        return Err(Error::shape(name, expected.shape(), actual.shape()));
    }
    Ok(())
}

/// The comparison proper, for tensors of equal shape; `allowance(i, expected)` gives what
/// element `i` may differ by.
fn compare_with(
    actual: &Tensor,
    expected: &Tensor,
    rule: Rule,
    allowance: impl Fn(usize, f64) -> f64,
) -> Comparison {
    let shape = expected.shape();
    let element = |i: usize| {
        let e = expected.data().get(i).copied().unwrap_or(0.0);
        Element {
            index: unravel(shape, i),
            actual: actual.data().get(i).copied().unwrap_or(0.0),
            expected: e,
            allowance: if i < expected.len() {
                allowance(i, e as f64)
            } else {
                0.0
            },
        }
    };
    let (mut max_abs, mut max_abs_i) = (0.0f64, 0);
    let (mut max_rel, mut max_rel_i) = (0.0f64, 0);
    let (mut worst, mut worst_i) = (0.0f64, 0);
    let (mut failures, mut non_finite) = (0, 0);
    for (i, (&a, &e)) in actual.data().iter().zip(expected.data()).enumerate() {
        let (a, e) = (a as f64, e as f64);
        let diff = if a == e {
            0.0
        } else {
            let d = (a - e).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        };
        if !a.is_finite() && e.is_finite() {
            non_finite += 1;
        }
        if diff > max_abs {
            (max_abs, max_abs_i) = (diff, i);
        }
        if e != 0.0 && e.is_finite() && diff / e.abs() > max_rel {
            (max_rel, max_rel_i) = (diff / e.abs(), i);
        }
        let ratio = share(a, e, allowance(i, e));
        if ratio > worst {
            (worst, worst_i) = (ratio, i);
        }
        if ratio > 1.0 {
            failures += 1;
        }
    }
    Comparison {
        rule,
        count: expected.len(),
        failures,
        non_finite,
        max_abs,
        max_abs_at: element(max_abs_i),
        max_rel,
        max_rel_at: element(max_rel_i),
        worst_ratio: worst,
        worst_at: element(worst_i),
    }
}

#[cfg(test)]
mod tests {
    //! The judge judged: every way a result can be wrong must fail, however wide the allowance.
    use super::*;

    fn t(data: &[f32]) -> Tensor {
        Tensor::new([data.len()], data.to_vec()).unwrap()
    }

    /// A very wide fixed tolerance and a very wide bound: only non-finite mismatches fail.
    fn both_rules(actual: f32, expected: f32) -> [Comparison; 2] {
        let (a, e) = (t(&[actual, 1.0]), t(&[expected, 1.0]));
        [
            compare(&a, &e, Tolerance::new(1e30, 1e30)).unwrap(),
            compare_bounded(&a, &e, &t(&[1e30, 1e30])).unwrap(),
        ]
    }

    #[test]
    fn nan_against_a_value_fails_under_any_allowance() {
        for c in both_rules(f32::NAN, 1.5) {
            assert_eq!(c.failures, 1, "{c}");
            assert_eq!(c.non_finite, 1);
            assert!(!c.wider_tolerance_could_pass());
            assert_eq!(c.worst_at.index, vec![0]);
            assert!(c.to_string().contains("1 NaN or infinite"), "{c}");
        }
        // NaN on both sides is no agreement either.
        for c in both_rules(f32::NAN, f32::NAN) {
            assert_eq!(c.failures, 1, "{c}");
        }
        // A NaN in the reference is not the result's fault, but still fails.
        for c in both_rules(1.5, f32::NAN) {
            assert_eq!((c.failures, c.non_finite), (1, 0), "{c}");
        }
    }

    #[test]
    fn infinities_that_differ_fail() {
        for (actual, expected) in [
            (f32::NEG_INFINITY, 3.0),
            (f32::INFINITY, 3.0),
            (f32::INFINITY, f32::NEG_INFINITY),
            (f32::NEG_INFINITY, f32::INFINITY),
            (2.0, f32::NEG_INFINITY),
        ] {
            for c in both_rules(actual, expected) {
                assert_eq!(c.failures, 1, "{actual} vs {expected}: {c}");
                assert_eq!(c.worst_ratio, f64::INFINITY);
            }
        }
        // The masked scores' -inf against -inf is exact agreement.
        for c in both_rules(f32::NEG_INFINITY, f32::NEG_INFINITY) {
            assert!(c.passed(), "{c}");
            assert_eq!((c.max_abs, c.worst_ratio), (0.0, 0.0));
        }
    }

    #[test]
    fn an_error_of_1_01_allowances_fails_and_0_99_passes() {
        // Fixed rule at 20, BERT-sized activations: the allowance is 1e-5 + 1e-4 * 20.
        let tol = Tolerance::F32;
        let allowed = tol.allowance(20.0);
        assert!((allowed - 2.01e-3).abs() < 1e-12);
        for (factor, passes) in [(1.01, false), (0.99, true), (-1.01, false), (-0.99, true)] {
            let gpu = (20.0 + factor * allowed) as f32;
            let c = compare(&t(&[gpu]), &t(&[20.0]), tol).unwrap();
            assert_eq!(c.passed(), passes, "{factor}: {c}");
            assert!((c.worst_ratio - factor.abs()).abs() < 1e-3, "{c}");
            assert_eq!(c.wider_tolerance_could_pass(), !passes);
        }
        // Per-element bound: each element is judged by its own bound, not the largest.
        let expected = t(&[20.0, 0.5, -3.0]);
        let bound = t(&[1e-3, 1e-6, 2e-5]);
        for (i, factor, passes) in [(0, 1.01, false), (2, 1.01, false), (0, 0.99, true)]
            .into_iter()
            .chain([(2, 0.99, true), (2, -1.01, false), (2, -0.99, true)])
        {
            let mut gpu = expected.data().to_vec();
            gpu[i] = (gpu[i] as f64 + factor * bound.data()[i] as f64) as f32;
            let c = compare_bounded(&t(&gpu), &expected, &bound).unwrap();
            assert_eq!(c.passed(), passes, "element {i} x{factor}: {c}");
            if !passes {
                assert_eq!(c.worst_at.index, vec![i]);
                assert!(c.worst_ratio > 1.0 && c.worst_ratio < 1.02, "{c}");
            }
        }
    }

    #[test]
    fn zero_allowance_passes_only_exact_values() {
        let c = compare_bounded(&t(&[1.0, 2.0]), &t(&[1.0, 2.0]), &t(&[0.0, 0.0])).unwrap();
        assert!(c.passed(), "{c}");
        let next = f32::from_bits(2.0f32.to_bits() + 1);
        let c = compare_bounded(&t(&[1.0, next]), &t(&[1.0, 2.0]), &t(&[0.0, 0.0])).unwrap();
        assert_eq!(c.failures, 1, "{c}");
    }

    #[test]
    fn shapes_must_agree() {
        let err = compare(&t(&[1.0]), &t(&[1.0, 2.0]), Tolerance::F32).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `compared tensor` has shape [1], expected [2]"
        );
        let err = compare_bounded(&t(&[1.0, 2.0]), &t(&[1.0, 2.0]), &t(&[1.0])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `error bound` has shape [1], expected [2]"
        );
    }

    #[test]
    fn the_report_names_the_rule_and_the_share_used() {
        let c = compare_bounded(&t(&[1.0, 2.5]), &t(&[1.0, 2.0]), &t(&[1.0, 1.0])).unwrap();
        let s = c.to_string();
        assert!(
            s.starts_with(
                "0 of 2 elements outside |gpu-ref| <= the forward error bound (at most 1.000e0); \
                 0.500 of the allowance used at [1]"
            ),
            "{s}"
        );
    }
}
