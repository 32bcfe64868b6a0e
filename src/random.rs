//! Seeded random layers and tensors for tests, benchmarks and the program (feature `random`).
//!
//! One generator for all of them, so a seed printed by a failing test, a benchmark or the
//! `bench` command names the same data everywhere. The stream is ChaCha8, which `rand_chacha`
//! documents as reproducible across platforms and releases; normals come from `rand_distr`.
//!
//! Values are shaped like a trained layer's: inputs N(0, 1), weights N(0, 1/fan_in) so that
//! every projection keeps unit variance, biases N(0, 0.1²).

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{AttentionInputs, AttentionWeights};

/// Standard deviation of the random biases: small beside the projections' unit-variance
/// outputs, yet large enough that a kernel which drops a bias fails the comparison.
const BIAS_STD: f32 = 0.1;

/// A seeded generator of test data.
///
/// ```
/// use wgpu_attention::{AttentionConfig, Random};
/// let config = AttentionConfig::new(1, 4, 8, 2, 4);
/// let mut a = Random::new(7);
/// let mut b = Random::new(7);
/// assert_eq!(a.inputs(&config).unwrap(), b.inputs(&config).unwrap());
/// assert_ne!(a.next_u64(), Random::new(8).next_u64());
/// ```
#[derive(Debug, Clone)]
pub struct Random {
    rng: ChaCha8Rng,
}

impl Random {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Random {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random()
    }

    /// Standard normal, N(0, 1).
    pub fn normal(&mut self) -> f32 {
        self.rng.sample(StandardNormal)
    }

    /// A tensor of `shape` with N(0, `std`²) elements.
    ///
    /// Fails with [`Error::InvalidConfig`] when the shape holds more elements than memory can
    /// address.
    pub fn tensor(&mut self, shape: impl Into<Vec<usize>>, std: f32) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "a random tensor of shape {shape:?} has more elements than fit in memory"
                ))
            })?;
        let data = (0..n).map(|_| std * self.normal()).collect();
        Tensor::new(shape, data)
    }

    /// Weights for `config`: projections N(0, 1/fan_in), query, key and value biases N(0, 0.01),
    /// and the output projection with its bias when the configuration has one.
    pub fn weights(&mut self, config: &AttentionConfig) -> Result<AttentionWeights> {
        config.validate()?;
        let dm = config.d_model;
        let qk = config.heads * config.head_dim;
        let hv = config.heads * config.head_dim_v;
        let std = 1.0 / (dm as f32).sqrt();
        let mut weights = AttentionWeights::new(
            self.tensor([dm, qk], std)?,
            self.tensor([dm, qk], std)?,
            self.tensor([dm, hv], std)?,
        )
        .with_qkv_bias(
            self.tensor([qk], BIAS_STD)?,
            self.tensor([qk], BIAS_STD)?,
            self.tensor([hv], BIAS_STD)?,
        );
        if config.output_projection.is_some() {
            let d_out = config.d_out();
            weights = weights.with_output_projection(
                self.tensor([hv, d_out], 1.0 / (hv as f32).sqrt())?,
                Some(self.tensor([d_out], BIAS_STD)?),
            );
        }
        Ok(weights)
    }

    /// Inputs for `config`: `x` N(0, 1), and when the configuration has a key-padding mask,
    /// one whose rows each pad a random tail of up to a quarter of the sequence (the first
    /// token is always real).
    pub fn inputs(&mut self, config: &AttentionConfig) -> Result<AttentionInputs> {
        config.validate()?;
        let inputs = AttentionInputs::new(self.tensor(config.x_shape(), 1.0)?);
        if !config.key_padding_mask {
            return Ok(inputs);
        }
        let seq = config.seq_len;
        let mut mask = Vec::with_capacity(config.batch * seq);
        for _ in 0..config.batch {
            let padded = (self.uniform() * (seq / 4 + 1) as f64) as usize;
            let real = seq - padded.min(seq - 1);
            mask.extend((0..seq).map(|t| if t < real { 1.0 } else { 0.0 }));
        }
        Ok(inputs.with_key_mask(Tensor::new(config.key_mask_shape(), mask)?))
    }
}

impl Tensor {
    /// A tensor of `shape` with N(0, `std`²) elements from `seed` (see [`Random::tensor`]).
    ///
    /// ```
    /// use wgpu_attention::Tensor;
    /// let t = Tensor::random([2, 3], 1.0, 42).unwrap();
    /// assert_eq!(t, Tensor::random([2, 3], 1.0, 42).unwrap());
    /// ```
    pub fn random(shape: impl Into<Vec<usize>>, std: f32, seed: u64) -> Result<Tensor> {
        Random::new(seed).tensor(shape, std)
    }
}

impl AttentionWeights {
    /// Random weights for `config` from `seed` (see [`Random::weights`]).
    pub fn random(config: &AttentionConfig, seed: u64) -> Result<AttentionWeights> {
        Random::new(seed).weights(config)
    }
}

impl AttentionInputs {
    /// Random inputs for `config` from `seed` (see [`Random::inputs`]).
    pub fn random(config: &AttentionConfig, seed: u64) -> Result<AttentionInputs> {
        Random::new(seed).inputs(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_fixes_the_stream_and_seeds_differ() {
        let mut a = Random::new(1);
        let mut b = Random::new(1);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut c = Random::new(2);
        assert_ne!(xs[0], c.next_u64());
    }

    #[test]
    fn moments_match_the_requested_distribution() {
        let t = Tensor::random([200, 100], 0.5, 3).unwrap();
        let n = t.len() as f64;
        let mean = t.data().iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = t
            .data()
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        // 20 000 draws: the mean's standard error is 0.0035, the variance's about 0.0025.
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 0.25).abs() < 0.0125, "variance {var}");
        let mut r = Random::new(4);
        let u: Vec<f64> = (0..10_000).map(|_| r.uniform()).collect();
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().sum::<f64>() / u.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "uniform mean {mean}");
    }

    #[test]
    fn layers_fit_their_config() {
        let config = AttentionConfig::new(3, 9, 12, 2, 5)
            .with_head_dim_v(7)
            .with_output_projection(6)
            .with_key_padding_mask();
        let weights = AttentionWeights::random(&config, 5).unwrap();
        weights.validate(&config).unwrap();
        assert!(weights.named().iter().any(|(name, _)| *name == "b_o"));
        let inputs = AttentionInputs::random(&config, 5).unwrap();
        inputs.validate(&config).unwrap();
        let mask = inputs.key_mask.as_ref().unwrap();
        for row in mask.data().chunks(9) {
            // A real prefix, then padding: never a fully padded row.
            assert_eq!(row[0], 1.0);
            assert!(row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
        }
        let plain = AttentionConfig::new(1, 4, 8, 2, 4);
        assert!(AttentionWeights::random(&plain, 1).unwrap().w_o.is_none());
        assert!(
            AttentionInputs::random(&plain, 1)
                .unwrap()
                .key_mask
                .is_none()
        );
    }

    #[test]
    fn bad_shapes_are_named_errors() {
        let zero = AttentionConfig::new(1, 0, 8, 2, 4);
        assert!(matches!(
            AttentionWeights::random(&zero, 1),
            Err(Error::ZeroSize { .. })
        ));
        assert!(matches!(
            Tensor::random([usize::MAX, 2], 1.0, 1),
            Err(Error::InvalidConfig(_))
        ));
    }
}
