//! The one safe door to `gemm`'s raw-pointer matrix product, for the projections and the
//! attention core's score and weighted-sum blocks.

use gemm::Parallelism;

/// A matrix in a slice: element `(i, j)` at `i·rs + j·cs`.
pub(super) struct Mat<T> {
    pub(super) data: T,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<T> Mat<T> {
    /// Rows `rs` apart, columns adjacent.
    pub(super) fn row_major(data: T, rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
}

/// Sizes and factors of `dst[m×n] = scale · lhs[m×k] · rhs[k×n] (+ dst if accumulate)`.
pub(super) struct Gemm {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) scale: f32,
    pub(super) accumulate: bool,
}

/// The one door to `gemm::gemm`: checks that every element the product touches lies inside its
/// slice, which is what makes the raw-pointer call sound.
pub(super) fn matmul(
    g: Gemm,
    dst: Mat<&mut [f32]>,
    lhs: Mat<&[f32]>,
    rhs: Mat<&[f32]>,
    par: Parallelism,
) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    // Callers derive every extent from validated shapes; a failure here is a bug in this module.
    // Rows of `dst` must not overlap: the parallel GEMM writes them from several threads.
    assert!(
        dst.cs == 1 && (g.m == 1 || dst.rs >= g.n),
        "gemm dst rows overlap"
    );
    assert!(
        last(g.m, g.n, dst.rs, dst.cs) < dst.data.len(),
        "gemm dst out of bounds"
    );
    if g.k > 0 {
        assert!(
            last(g.m, g.k, lhs.rs, lhs.cs) < lhs.data.len(),
            "gemm lhs out of bounds"
        );
        assert!(
            last(g.k, g.n, rhs.rs, rhs.cs) < rhs.data.len(),
            "gemm rhs out of bounds"
        );
    }
    let s = |x: usize| x as isize;
    // SAFETY: the asserts above keep every access of the m×n×k product inside the three
    // slices and every element of `dst` distinct; `dst` is borrowed mutably, so it cannot
    // alias `lhs` or `rhs`; gemm reads `dst` only when `accumulate` is set, and writes nothing
    // else.
    unsafe {
        gemm::gemm(
            g.m,
            g.n,
            g.k,
            dst.data.as_mut_ptr(),
            s(dst.cs),
            s(dst.rs),
            g.accumulate,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            1.0,
            g.scale,
            false,
            false,
            false,
            par,
        );
    }
}
