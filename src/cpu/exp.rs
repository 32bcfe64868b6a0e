//! The online softmax's inner step and the vectorisable `exp` it is built on, compiled per
//! instruction set behind runtime detection.

/// One online-softmax step: scaled scores of a query block against a chunk of keys, turned into
/// unnormalised probabilities in place, with the rows' running max and sum brought up to date.
pub(super) struct ScoreBlock<'a> {
    /// `[rows, cols]` scores in, `exp(score - max)` out (0 where masked).
    pub(super) s: &'a mut [f32],
    pub(super) cols: usize,
    /// Position of row 0 in the sequence.
    pub(super) first_query: usize,
    /// Position of column 0 in the sequence.
    pub(super) first_key: usize,
    pub(super) causal: bool,
    /// The chunk's key mask, `[cols]`.
    pub(super) mask: Option<&'a [f32]>,
    pub(super) max: &'a mut [f32],
    pub(super) sum: &'a mut [f32],
    /// Out: `exp(old max - new max)` per row, the factor for earlier chunks' contributions.
    pub(super) corr: &'a mut [f32],
}

/// Lanes of the accumulators in the row loops: two AVX2 registers, so consecutive additions
/// into the running sum do not wait on each other.
const LANES: usize = 16;

/// The softmax step, written so LLVM vectorises its row loops; inlined into each target-feature
/// variant. `FMA` selects fused multiply-adds in [`exp_shifted`] (a library call without
/// hardware FMA, so the baseline does without).
#[inline(always)]
fn softmax_step_impl<const FMA: bool>(blk: ScoreBlock) {
    let cols = blk.cols;
    for (r, row) in blk.s.chunks_exact_mut(cols).enumerate() {
        let allowed = if blk.causal {
            (blk.first_query + r + 1)
                .saturating_sub(blk.first_key)
                .min(cols)
        } else {
            cols
        };
        let (live, dead) = row.split_at_mut(allowed);
        dead.fill(0.0);
        let chunk_max = match blk.mask {
            Some(mask) => mask_and_max(live, &mask[..allowed]),
            None => max_of(live),
        };
        let old = blk.max[r];
        let new = if chunk_max > old { chunk_max } else { old };
        if new == f32::NEG_INFINITY {
            // Nothing allowed so far: no maximum to subtract, every weight is 0.
            live.fill(0.0);
            blk.corr[r] = 1.0;
            continue;
        }
        let sum = exp_shifted_sum::<FMA>(live, new);
        let corr = if old == new {
            1.0
        } else {
            exp_shifted::<FMA>(old - new)
        };
        blk.corr[r] = corr;
        blk.sum[r] = blk.sum[r] * corr + sum;
        blk.max[r] = new;
    }
}

#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Sets masked-out scores to `-inf` and returns the maximum.
#[inline(always)]
fn mask_and_max(xs: &mut [f32], mask: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    let mut masks = mask.chunks_exact(LANES);
    for (c, m) in (&mut chunks).zip(&mut masks) {
        for ((a, x), &m) in acc.iter_mut().zip(c).zip(m) {
            *x = if m == 0.0 { f32::NEG_INFINITY } else { *x };
            *a = if *x > *a { *x } else { *a };
        }
    }
    let mut max = acc.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for (x, &m) in chunks.into_remainder().iter_mut().zip(masks.remainder()) {
        if m == 0.0 {
            *x = f32::NEG_INFINITY;
        }
        max = max.max(*x);
    }
    max
}

/// `x ← exp(x - shift)` over the slice; returns the sum.
#[inline(always)]
fn exp_shifted_sum<const FMA: bool>(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp_shifted::<FMA>(*x - shift);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_shifted::<FMA>(*x - shift);
        sum += *x;
    }
    sum
}

/// `exp(x)` in f32 for the softmax's shifted scores, `x <= 0`: Cody-Waite range reduction and
/// Cephes' degree-6 polynomial, branch-free so that loops over it vectorise.
///
/// Accuracy: for `-87.3 <= x <= 88` the relative error is below `f32::EPSILON` (1.2e-7;
/// measured worst 0.82·ε with FMA, 0.78·ε without, on a 2-million-point grid), i.e. within
/// 1 ulp. Below -87.3 it returns 0 (the true value is under 1.3e-38, so that is also the
/// absolute error); `-inf` gives 0 and NaN gives NaN. Above 88 the result is wrong: the
/// softmax never gets there (it subtracts the row maximum first), and leaving out the clamp
/// for it saves work in the loop that dominates the softmax. The unit tests hold every
/// compiled variant to these bounds against f64 `exp`.
#[inline(always)]
fn exp_shifted<const FMA: bool>(x: f32) -> f32 {
    // Keeps n >= -126, so that 2^n below is a normal number.
    const LO: f32 = -87.3;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| <= 512.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to the nearest integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };

    let xc = if x < LO { LO } else { x };
    let t = fma(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = fma(n, -LN2_LO, fma(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = fma(p, r, 1.398_199_9e-3);
    p = fma(p, r, 8.333_452e-3);
    p = fma(p, r, 4.166_579_6e-2);
    p = fma(p, r, 1.666_666_5e-1);
    p = fma(p, r, 0.5);
    let y = fma(p, r * r, r) + 1.0;
    // t's low bits hold n (two's complement): shifting n + 127 into the exponent field builds
    // 2^n and drops ROUND's own bits off the top.
    let pow = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if x < LO { 0.0 } else { y * pow }
}

/// The instruction sets the softmax is compiled for.
///
/// x86-64 gets an AVX2+FMA variant behind runtime detection: one binary runs on any x86-64
/// (no global `target-cpu`) and still uses what the CPU has. There is no AVX-512 variant: its
/// target feature needs Rust 1.89, past the crate's `rust-version`, and on the Zen 4 this was
/// measured on (which splits 512-bit operations in two) it was within noise of AVX2, while the
/// SSE2 baseline was about 20% slower on the whole attention core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// The build's own target (SSE2 on x86-64, NEON on aarch64).
    Baseline,
}

impl Isa {
    /// The best this CPU supports. `is_x86_feature_detected!` caches its answer, so this is
    /// cheap enough to call per run.
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
        Isa::Baseline
    }

    /// Every variant this CPU can run (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let best = Isa::detect();
        if best == Isa::Baseline {
            vec![best]
        } else {
            vec![best, Isa::Baseline]
        }
    }

    pub(super) fn softmax_step(self, blk: ScoreBlock) {
        match self {
            // SAFETY: `detect` returns this variant only when the CPU has AVX2 and FMA, the
            // features the function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::softmax_step_avx2(blk) },
            Isa::Baseline => softmax_step_impl::<false>(blk),
        }
    }

    /// `exp` of every element, with this variant's code (for the tests).
    #[cfg(test)]
    fn exp_in_place(self, xs: &mut [f32]) {
        match self {
            // SAFETY: as in `softmax_step`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::exp_avx2(xs) },
            Isa::Baseline => xs.iter_mut().for_each(|x| *x = exp_shifted::<false>(*x)),
        }
    }
}

/// The softmax step compiled for AVX2 and FMA: the generic code inlined into a function with
/// those features enabled, so LLVM vectorises it 8 lanes wide with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ScoreBlock, softmax_step_impl};

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_step_avx2(blk: ScoreBlock) {
        softmax_step_impl::<true>(blk)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_avx2(xs: &mut [f32]) {
        xs.iter_mut()
            .for_each(|x| *x = super::exp_shifted::<true>(*x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst error of a variant's exp against f64 over `[lo, hi]`, in units of
    /// `f32::EPSILON · |exp x|` (at most one ulp of the true value).
    fn worst_ulps(isa: Isa, lo: f64, hi: f64, steps: usize) -> (f64, f32) {
        let xs: Vec<f32> = (0..=steps)
            .map(|i| (lo + (hi - lo) * i as f64 / steps as f64) as f32)
            .collect();
        let mut got = xs.clone();
        isa.exp_in_place(&mut got);
        let mut worst = (0.0, 0.0);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            let err = (g as f64 - want).abs() / ulp as f64;
            if err > worst.0 {
                worst = (err, x);
            }
        }
        worst
    }

    #[test]
    fn exp_is_within_one_ulp_over_its_range() {
        for isa in Isa::available() {
            let (ulps, at) = worst_ulps(isa, -87.3, 88.0, 2_000_000);
            assert!(ulps <= 1.0, "{isa:?}: {ulps} ulp at x = {at}");
            // The softmax's own range, densely.
            let (ulps, at) = worst_ulps(isa, -20.0, 0.0, 1_000_000);
            assert!(ulps <= 1.0, "{isa:?}: {ulps} ulp at x = {at}");
        }
    }

    #[test]
    fn exp_edges() {
        for isa in Isa::available() {
            let mut xs = [
                0.0,
                -1e4,
                -87.4,
                -200.0,
                f32::NEG_INFINITY,
                f32::MIN,
                f32::NAN,
            ];
            isa.exp_in_place(&mut xs);
            assert_eq!(xs[0], 1.0, "{isa:?}");
            // Large negatives flush to 0, never NaN.
            assert_eq!(&xs[1..6], &[0.0; 5], "{isa:?}");
            assert!(xs[6].is_nan(), "{isa:?}");
            // Just above the flush threshold the value is tiny but still accurate.
            let mut x = [-87.29f32, -87.3];
            isa.exp_in_place(&mut x);
            for (got, at) in x.into_iter().zip([-87.29f32, -87.3]) {
                let want = (at as f64).exp();
                let err = (got as f64 - want).abs();
                assert!(
                    err <= want * f32::EPSILON as f64,
                    "{isa:?}: {got:e} vs {want:e}"
                );
            }
        }
    }

    /// Every variant's softmax step gives the same numbers as the baseline.
    #[test]
    fn softmax_variants_agree() {
        let (rows, cols) = (5, 37);
        let base: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0)
            .collect();
        let mask: Vec<f32> = (0..cols)
            .map(|j| if j % 5 == 3 { 0.0 } else { 1.0 })
            .collect();
        let run = |isa: Isa, causal: bool| {
            let mut s = base.clone();
            let (mut max, mut sum, mut corr) = (vec![1.5; rows], vec![2.0; rows], vec![0.0; rows]);
            isa.softmax_step(ScoreBlock {
                s: &mut s,
                cols,
                first_query: 30,
                first_key: 10,
                causal,
                mask: Some(&mask),
                max: &mut max,
                sum: &mut sum,
                corr: &mut corr,
            });
            (s, max, sum, corr)
        };
        for causal in [false, true] {
            let (s0, m0, l0, c0) = run(Isa::Baseline, causal);
            // Masked keys and causal ones after the query weigh exactly 0.
            for (r, row) in s0.chunks(cols).enumerate() {
                for (j, &p) in row.iter().enumerate() {
                    let allowed = mask[j] == 1.0 && (!causal || 10 + j <= 30 + r);
                    assert_eq!(p == 0.0, !allowed, "row {r} col {j} p {p}");
                }
                let want: f32 = row.iter().sum::<f32>() + 2.0 * c0[r];
                assert!(
                    (l0[r] - want).abs() <= 1e-5 * want,
                    "row {r}: {} vs {want}",
                    l0[r]
                );
                assert!(m0[r] >= 1.5);
            }
            for isa in Isa::available() {
                let (s, m, l, c) = run(isa, causal);
                assert_eq!(m, m0, "{isa:?}");
                for (a, b) in s
                    .iter()
                    .chain(&l)
                    .chain(&c)
                    .zip(s0.iter().chain(&l0).chain(&c0))
                {
                    assert!(
                        (a - b).abs() <= 4.0 * f32::EPSILON * b.abs(),
                        "{isa:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
