//! Storage precision: f32, or f16 storage with f32 arithmetic, and the host conversions into f16.
//!
//! With [`Precision::F16`] every tensor a kernel reads or writes in storage (x, the weights, Q, K,
//! V, a KV cache, the output) holds IEEE binary16 values, which halves the bytes a decoding step
//! reads. Everything a kernel computes stays f32: dot products accumulate in f32, and so do the
//! softmax's running maximum and sum, its exponentials and the output accumulator. A score is
//! therefore never rounded to f16 and cannot overflow its 65504, whatever the scale.
//!
//! Every forward kernel has f16 storage: the GEMM, the fused kernel, the staged kernels (whose
//! score and probability matrices stay f32), split-K decode (whose partials stay f32) and the
//! KV cache ([`crate::KvCache::with_precision`]). The backward stores f32 only: an f16
//! operator with gradients is [`Error::F16NeedsFused`].
//!
//! Values are rounded to f16 once, on the host, when they are uploaded (round to nearest, ties to
//! even, as `half` does it). A finite value past f16's range would become an infinity there; it is
//! refused instead, naming the tensor and the index ([`Error::OutsideF16Range`]). bf16 data (the
//! format many checkpoints ship in) is taken as it is and rounded to f16 on upload the same way:
//! bf16 has f32's range and a shorter significand than f16, so only its magnitude can fail.
//!
//! Kernels need the device feature `SHADER_F16`. [`crate::GpuContext`] requests it whenever the
//! adapter has it; on a device without it (llvmpipe's OpenGL, many WebGPU adapters) building an
//! f16 plan or operator fails with [`Error::NoShaderF16`] rather than running emulated.

use half::{bf16, f16};

use crate::error::{Error, Result, Shape};
use crate::tensor::unravel;

/// f16's unit roundoff, `2^-11`: the largest relative error of rounding a value in f16's normal
/// range to the nearest f16 (11 significant bits); the host rounds this way on upload.
pub const F16_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// The largest relative error of a kernel's store of an f32 value into f16: one f16 ulp,
/// `2 · 2^-11`, because WGSL leaves the rounding mode of a conversion to the implementation
/// (either neighbour of an inexact value is a valid result, as WebGPU's conformance tests
/// accept); below f16's normal range, one subnormal step `2^-24` absolute. The f16 error bounds
/// ([`crate::reference::error_bound`], [`crate::reference::operator_error_bound`]) add one such
/// error wherever a kernel stores a computed value and carry it through every later reduction.
pub const F16_STORE_ERROR: f64 = 2.0 * F16_UNIT_ROUNDOFF;

/// How tensors are stored on the GPU. Arithmetic is f32 with either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Precision {
    /// IEEE binary32 storage.
    #[default]
    #[cfg_attr(feature = "cli", value(help = "f32 storage and arithmetic"))]
    F32,
    /// IEEE binary16 storage (inputs, weights, Q/K/V, the KV cache, the output); f32 arithmetic.
    /// Needs the device feature `SHADER_F16`.
    #[cfg_attr(
        feature = "cli",
        value(help = "f16 storage, f32 arithmetic (needs the adapter's shader-f16)")
    )]
    F16,
}

impl Precision {
    /// Bytes of one stored element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }

    /// The name used in messages and tables: `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }

    /// Refuses F16 on a device without `SHADER_F16` ([`Error::NoShaderF16`], naming the
    /// adapter); F32 always passes.
    pub fn check_device(self, ctx: &crate::GpuContext) -> Result<()> {
        if self == Precision::F16 && !ctx.has_f16() {
            return Err(Error::NoShaderF16 {
                adapter: ctx.adapter_info().name.clone(),
            });
        }
        Ok(())
    }

    /// `values` as this precision's little-endian storage bytes: the f32 values themselves, or
    /// each rounded to f16 (see [`to_f16`], whose errors name `name` and `shape`).
    pub fn encode(self, name: &str, shape: &[usize], values: &[f32]) -> Result<Vec<u8>> {
        Ok(match self {
            Precision::F32 => bytemuck::cast_slice(values).to_vec(),
            Precision::F16 => bytemuck::cast_slice(&to_f16(name, shape, values)?).to_vec(),
        })
    }

    /// Storage bytes read back from the GPU as f32 values (f16 widens exactly).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Precision::F32 => bytemuck::pod_collect_to_vec(bytes),
            Precision::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
                .into_iter()
                .map(f16::to_f32)
                .collect(),
        }
    }

    /// `values` as the GPU will see them: unchanged for F32, rounded to f16 and widened back
    /// for F16. A reference computed from these is checked against exactly the data the kernels
    /// read, so the comparison measures the kernels' arithmetic, not the input rounding.
    pub fn round(self, name: &str, shape: &[usize], values: &[f32]) -> Result<Vec<f32>> {
        Ok(match self {
            Precision::F32 => values.to_vec(),
            Precision::F16 => to_f16(name, shape, values)?
                .into_iter()
                .map(f16::to_f32)
                .collect(),
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Each value rounded to the nearest f16. A NaN or infinity is [`Error::NonFinite`]; a finite
/// value that rounds past f16's largest finite value (65504) is [`Error::OutsideF16Range`],
/// both naming the tensor `name` and the index of the first such value in `shape`.
///
/// ```
/// use wgpu_attention::{precision::to_f16, Error};
/// let h = to_f16("x", &[2], &[1.0, 65504.0]).unwrap();
/// assert_eq!(h[1].to_f32(), 65504.0);
/// assert!(matches!(to_f16("x", &[2], &[1.0, 1e5]), Err(Error::OutsideF16Range { .. })));
/// ```
pub fn to_f16(name: &str, shape: &[usize], values: &[f32]) -> Result<Vec<f16>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    name: name.to_string(),
                    index: Shape(unravel(shape, i)),
                    value: v,
                });
            }
            let h = f16::from_f32(v);
            if h.is_infinite() {
                return Err(Error::OutsideF16Range {
                    name: name.to_string(),
                    index: Shape(unravel(shape, i)),
                    value: v,
                });
            }
            Ok(h)
        })
        .collect()
}

/// Checks that every value of `values` can be stored in f16 (the errors of [`to_f16`]),
/// without allocating: for inputs converted on every call.
pub fn check_f16_range(name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
    match values
        .iter()
        .position(|&v| !v.is_finite() || f16::from_f32(v).is_infinite())
    {
        None => Ok(()),
        Some(i) => to_f16(name, shape, &values[i..=i])
            .map(|_| ())
            .map_err(|e| match e {
                Error::NonFinite { name, value, .. } => Error::NonFinite {
                    name,
                    index: Shape(unravel(shape, i)),
                    value,
                },
                Error::OutsideF16Range { name, value, .. } => Error::OutsideF16Range {
                    name,
                    index: Shape(unravel(shape, i)),
                    value,
                },
                other => other,
            }),
    }
}

/// Hands `write` the f16 bytes of `values` piece by piece, as (byte offset, bytes), padded
/// with zeros to a whole number of 4-byte words: for filling write-only mapped memory
/// without a buffer per call. The caller has checked the values fit f16.
pub(crate) fn write_f16(values: &[f32], mut write: impl FnMut(usize, &[u8])) {
    const PIECE: usize = 256;
    let mut bytes = [0u8; 2 * PIECE + 2];
    for (k, piece) in values.chunks(PIECE).enumerate() {
        for (b, &v) in bytes.chunks_exact_mut(2).zip(piece) {
            b.copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        let mut n = 2 * piece.len();
        if n % 4 != 0 {
            // Only the last piece can be odd: its padding half-word is zero.
            bytes[n..n + 2].fill(0);
            n += 2;
        }
        write(2 * PIECE * k, &bytes[..n]);
    }
}

/// bf16 values rounded to f16, with the errors of [`to_f16`]. bf16 widens to f32 exactly, so
/// this rounds once, as a direct bf16-to-f16 conversion would.
///
/// ```
/// use half::bf16;
/// use wgpu_attention::{precision::bf16_to_f16, Error};
/// let h = bf16_to_f16("w_q", &[1, 2], &[bf16::from_f32(0.5), bf16::from_f32(-3.0)]).unwrap();
/// assert_eq!(h[1].to_f32(), -3.0);
/// let big = [bf16::from_f32(0.5), bf16::from_f32(1e6)];
/// match bf16_to_f16("w_q", &[1, 2], &big) {
///     Err(Error::OutsideF16Range { name, index, .. }) => {
///         assert_eq!((name.as_str(), index.0), ("w_q", vec![0, 1]))
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn bf16_to_f16(name: &str, shape: &[usize], values: &[bf16]) -> Result<Vec<f16>> {
    let wide: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
    to_f16(name, shape, &wide)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_edges_of_the_range() {
        // 65519.99 rounds down to 65504; 65520 is the first value that rounds to infinity.
        let ok = to_f16("t", &[3], &[65519.0, -65504.0, 6e-8]).unwrap();
        assert_eq!(ok[0].to_f32(), 65504.0);
        assert_eq!(ok[1].to_f32(), -65504.0);
        // The smallest subnormal is 2^-24 ≈ 5.96e-8; 6e-8 rounds to it rather than failing.
        assert_eq!(ok[2].to_f32(), 2f32.powi(-24));
        match to_f16("t", &[2, 2], &[0.0, 1.0, 2.0, -65520.0]) {
            Err(Error::OutsideF16Range { name, index, value }) => {
                assert_eq!(name, "t");
                assert_eq!(index.0, vec![1, 1]);
                assert_eq!(value, -65520.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            to_f16("t", &[1], &[f32::NAN]),
            Err(Error::NonFinite { .. })
        ));
    }

    #[test]
    fn encode_decode_round_trip() {
        let v = [1.0f32, -0.333_333_34, 1000.5];
        let bytes = Precision::F16.encode("v", &[3], &v).unwrap();
        assert_eq!(bytes.len(), 6);
        let back = Precision::F16.decode(&bytes);
        assert_eq!(back, Precision::F16.round("v", &[3], &v).unwrap());
        // f16 has 11 significant bits: the rounding error is at most 2^-11 relative.
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-11), "{a} {b}");
        }
        assert_eq!(back[2], 1000.5);
        let bytes = Precision::F32.encode("v", &[3], &v).unwrap();
        assert_eq!(Precision::F32.decode(&bytes), v);
    }
}
