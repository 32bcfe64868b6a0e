//! Comparing a GPU result with the CPU reference under one tolerance rule.
//!
//! The rule, used by every test and by the benchmark: an element passes when
//!
//! ```text
//! |gpu - ref| <= atol + rtol * |ref|
//! ```
//!
//! Equal infinities (the `-inf` of masked scores) pass with error 0; a NaN on either side fails.

use std::fmt;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, unravel};

/// The bounds of the tolerance rule `|gpu - ref| <= atol + rtol * |ref|`.
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

    /// The tolerance for f32 GPU results against the f64 reference, for inputs of order 1:
    /// `atol = 1e-5`, `rtol = 1e-4`. f32 carries about 7 significant digits; sums of a few
    /// hundred products keep 5 to 6 of them.
    pub const F32: Tolerance = Tolerance::new(1e-5, 1e-4);

    /// How much of the allowance an error uses: at most 1 passes.
    pub fn ratio(&self, gpu: f64, reference: f64) -> f64 {
        if gpu == reference {
            return 0.0;
        }
        let diff = (gpu - reference).abs();
        // Unequal values where either is NaN or infinite can never be close.
        if !diff.is_finite() || !reference.is_finite() {
            return f64::INFINITY;
        }
        diff / (self.atol + self.rtol * reference.abs())
    }
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance::F32
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
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The rule applied.
    pub tolerance: Tolerance,
    /// Number of elements compared.
    pub count: usize,
    /// Number of elements outside the tolerance.
    pub failures: usize,
    /// Largest `|gpu - ref|` (infinite where one side is NaN or the infinities differ).
    pub max_abs: f64,
    /// Where `max_abs` occurs.
    pub max_abs_at: Element,
    /// Largest `|gpu - ref| / |ref|` over elements with `ref != 0`.
    pub max_rel: f64,
    /// Where `max_rel` occurs.
    pub max_rel_at: Element,
    /// The largest share of the allowance used, `|gpu - ref| / (atol + rtol·|ref|)`; the
    /// comparison passes when it is at most 1.
    pub worst_ratio: f64,
    /// Where `worst_ratio` occurs.
    pub worst_at: Element,
}

impl Comparison {
    /// Whether every element is within the tolerance.
    pub fn passed(&self) -> bool {
        self.failures == 0
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |e: &Element| format!("{:?} (gpu {:e}, ref {:e})", e.index, e.actual, e.expected);
        write!(
            f,
            "{} of {} elements outside |gpu-ref| <= {:e} + {:e}*|ref|; max abs err {:.3e} at {}; \
             max rel err {:.3e} at {}",
            self.failures,
            self.count,
            self.tolerance.atol,
            self.tolerance.rtol,
            self.max_abs,
            at(&self.max_abs_at),
            self.max_rel,
            at(&self.max_rel_at),
        )
    }
}

/// Compares `actual` with `expected` element by element under `tolerance`.
///
/// Fails only if the shapes differ.
pub fn compare(actual: &Tensor, expected: &Tensor, tolerance: Tolerance) -> Result<Comparison> {
    if actual.shape() != expected.shape() {
        return Err(Error::shape(
            "compared tensor",
            expected.shape(),
            actual.shape(),
        ));
    }
    let shape = expected.shape();
    let element = |i: usize| Element {
        index: unravel(shape, i),
        actual: actual.data().get(i).copied().unwrap_or(0.0),
        expected: expected.data().get(i).copied().unwrap_or(0.0),
    };
    let (mut max_abs, mut max_abs_i) = (0.0f64, 0);
    let (mut max_rel, mut max_rel_i) = (0.0f64, 0);
    let (mut worst, mut worst_i) = (0.0f64, 0);
    let mut failures = 0;
    for (i, (&a, &e)) in actual.data().iter().zip(expected.data()).enumerate() {
        let (a, e) = (a as f64, e as f64);
        let diff = if a == e {
            0.0
        } else {
            let d = (a - e).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        };
        if diff > max_abs {
            (max_abs, max_abs_i) = (diff, i);
        }
        if e != 0.0 && e.is_finite() && diff / e.abs() > max_rel {
            (max_rel, max_rel_i) = (diff / e.abs(), i);
        }
        let ratio = tolerance.ratio(a, e);
        if ratio > worst {
            (worst, worst_i) = (ratio, i);
        }
        if ratio > 1.0 {
            failures += 1;
        }
    }
    Ok(Comparison {
        tolerance,
        count: expected.len(),
        failures,
        max_abs,
        max_abs_at: element(max_abs_i),
        max_rel,
        max_rel_at: element(max_rel_i),
        worst_ratio: worst,
        worst_at: element(worst_i),
    })
}
