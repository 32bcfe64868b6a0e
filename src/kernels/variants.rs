//! Every (kernel, override set) the host can emit for given limits, found by running the host's
//! own tile choices over the shapes that reach each of their outcomes. Test tooling (the naga
//! checks in tests/shaders.rs and the Tint check in tests/tint.rs) compiles exactly these, so a
//! new tile choice is checked as soon as the host can make it.

use std::collections::HashSet;
use std::hash::Hash;

use super::{Binding, Kernel, Overrides};

/// One specialisation of one kernel, as the host would compile it.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Variant {
    /// The kernel.
    pub kernel: Kernel,
    /// The composed WGSL module ([`Kernel::source`]).
    pub source: &'static str,
    /// The pipeline's override constants, as (name, value) pairs.
    pub overrides: Vec<(&'static str, f64)>,
    /// The explicit pipeline layout ([`Kernel::bindings`]).
    pub bindings: Vec<Binding>,
    /// The device features it needs ([`Kernel::features`]): a check compiles it only on a
    /// device that has them (f16 variants need `SHADER_F16`).
    pub features: wgpu::Features,
}

/// Every kernel specialisation the host can emit on a device with `limits`: each kernel's
/// distinct override sets, in the order first reached. Storage variants (f32, f16) each get
/// the same override sets; f16 ones say in [`Variant::features`] that they need `SHADER_F16`.
#[doc(hidden)]
pub fn variants(limits: &wgpu::Limits) -> Vec<Variant> {
    Kernel::all()
        .into_iter()
        .flat_map(|kernel| {
            let sets = match kernel {
                Kernel::Gemm(_) => super::gemm::override_sets(limits),
                Kernel::GemmCache(_) => super::gemm::cache_override_sets(limits),
                Kernel::Scores(_) => super::staged::score_override_sets(limits),
                Kernel::Softmax => super::staged::softmax_override_sets(limits),
                Kernel::WeightedSum(_) => super::staged::sum_override_sets(limits),
                Kernel::Fused(_) => super::fused_tiles::shared_override_sets(limits),
                Kernel::FusedRows(_) => super::fused_tiles::row_override_sets(limits),
                Kernel::BackwardPrep => vec![super::backward::prep_overrides()],
                Kernel::BackwardKv | Kernel::BackwardQ => super::backward::override_sets(limits),
                Kernel::DecodeSplit { .. } => super::decode::override_sets(limits),
                Kernel::DecodeCombine(_) => vec![vec![("WG", super::decode::COMBINE_WG as f64)]],
                Kernel::StreamRead => vec![vec![("WG", super::decode::STREAM_WG as f64)]],
            };
            sets.into_iter().map(move |overrides| Variant {
                kernel,
                source: kernel.source(),
                overrides,
                bindings: kernel.bindings(),
                features: kernel.features(),
            })
        })
        .collect()
}

/// Sizes to try for one input of a tile choice, ascending: every multiple of `step` up to 256,
/// then each power of two to 2^20 and its neighbours. The choices turn on `div_ceil`,
/// `next_power_of_two` and comparisons, which change outcome only at small sizes or at powers
/// of two, so these reach every outcome while staying few enough to try all combinations.
pub(super) fn sizes(step: u32) -> impl Iterator<Item = u32> + Clone {
    let dense = (1..=256 / step).map(move |i| i * step);
    let powers = (9..=20).flat_map(move |k| {
        let p = 1u32 << k;
        [p - step, p, p + step]
    });
    dense.chain(powers)
}

/// Distinct values in the order first added: each kernel's tile choices, deduplicated before
/// they become override lists (a million choices are tried, a few dozen differ).
pub(super) struct Distinct<T> {
    seen: HashSet<T>,
    order: Vec<T>,
}

impl<T> Default for Distinct<T> {
    fn default() -> Self {
        Distinct {
            seen: HashSet::new(),
            order: Vec::new(),
        }
    }
}

impl<T: Copy + Eq + Hash> Distinct<T> {
    pub fn add(&mut self, value: T) {
        if self.seen.insert(value) {
            self.order.push(value);
        }
    }

    /// The values, each turned into its override set.
    pub fn overrides(self, to: impl Fn(T) -> Overrides) -> Vec<Overrides> {
        self.order.into_iter().map(to).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_ascend_and_reach_past_a_million() {
        for step in [1, 4] {
            let s: Vec<u32> = sizes(step).collect();
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{step}: {s:?}");
            assert!(s.iter().all(|n| n.is_multiple_of(step)));
            assert_eq!(s[0], step);
            assert_eq!(*s.last().unwrap(), (1 << 20) + step);
        }
    }

    #[test]
    fn variants_reach_the_choices_of_shapes_between_the_sizes_tried() {
        use super::super::{fused, gemm, staged};
        use crate::precision::Precision;
        // Shapes that `sizes` does not list (not in the dense range, not near a power of two).
        let odd = [3, 77, 300, 1000, 5000, 70_000];
        let odd4 = [4, 12, 68, 300, 1000, 5004];
        for limits in [
            wgpu::Limits::default(),
            wgpu::Limits::downlevel_defaults(),
            wgpu::Limits {
                max_compute_workgroup_storage_size: 32768,
                max_compute_invocations_per_workgroup: 1024,
                ..wgpu::Limits::default()
            },
        ] {
            let all = variants(&limits);
            let has = |kernel: Kernel, overrides: Overrides| {
                assert!(
                    all.iter()
                        .any(|v| v.kernel == kernel && v.overrides == overrides),
                    "{kernel:?} {overrides:?} missing under {limits:?}"
                );
            };
            for seq in odd {
                for keys in odd {
                    has(
                        Kernel::Scores(Precision::F32),
                        staged::score_tiles(seq, keys, &limits).overrides("DK"),
                    );
                }
                for n in odd4 {
                    has(
                        Kernel::Gemm(Precision::F32),
                        gemm::overrides(gemm::tiles(seq, n, &limits), gemm::FORWARD[1]),
                    );
                    has(
                        Kernel::Gemm(Precision::F16),
                        gemm::overrides(gemm::tiles(seq, n, &limits), gemm::BACKWARD[1]),
                    );
                    has(
                        Kernel::Softmax,
                        vec![("WG", staged::softmax_size(n, &limits) as f64)],
                    );
                    has(
                        Kernel::WeightedSum(Precision::F32),
                        staged::sum_tiles(seq, n, &limits).overrides("TK"),
                    );
                    for dvp in [4, 36, 100, 132, 256] {
                        if let Ok(t) = fused::FusedTiles::choose(seq, seq, n, dvp, &limits) {
                            has(Kernel::Fused(fused::FusedIo::ALL[0]), t.overrides());
                            has(Kernel::Fused(fused::FusedIo::ALL[8]), t.overrides());
                        }
                    }
                }
            }
            // The combine and the read ceiling have one workgroup size.
            for kernel in Kernel::all()
                .into_iter()
                .filter(|&k| !matches!(k, Kernel::DecodeCombine(_) | Kernel::StreamRead))
            {
                let n = all.iter().filter(|v| v.kernel == kernel).count();
                // The D pass has one workgroup shape.
                let least = if kernel == Kernel::BackwardPrep { 1 } else { 2 };
                assert!(n >= least, "{kernel:?}: only {n} override sets");
            }
        }
    }
}
