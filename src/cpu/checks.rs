//! The fast CPU path's input checks: lengths, non-finite values and mask values, each a named
//! error. The all-finite scan is the one that runs on every call, so it is built to vectorise.

use crate::error::{Error, Result, Shape};
use crate::tensor::unravel;

/// The product of `dims`, or `None` past `usize`.
pub(super) fn checked_len(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

pub(super) fn check_input(name: &str, data: &[f32], dims: &[usize]) -> Result<()> {
    // `validate` has made sure the product fits.
    let expected = checked_len(dims).unwrap_or(usize::MAX);
    if data.len() != expected {
        return Err(Error::DataLength {
            name: name.to_string(),
            shape: Shape(dims.to_vec()),
            expected,
            actual: data.len(),
        });
    }
    match first_non_finite(data) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite {
            name: name.to_string(),
            index: Shape(unravel(dims, i)),
            value: data[i],
        }),
    }
}

/// Index of the first NaN or infinity. The all-finite case, the common one, is an OR over
/// chunks that vectorises; only a failing chunk is searched element by element.
pub(super) fn first_non_finite(data: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1024;
    data.chunks(CHUNK).enumerate().find_map(|(c, chunk)| {
        let bad = chunk.iter().fold(false, |acc, x| acc | !x.is_finite());
        if bad {
            chunk
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| c * CHUNK + i)
        } else {
            None
        }
    })
}

pub(super) fn check_mask(mask: &[f32], dims: [usize; 2]) -> Result<()> {
    let expected = dims[0] * dims[1];
    if mask.len() != expected {
        return Err(Error::DataLength {
            name: "key_mask".to_string(),
            shape: Shape(dims.to_vec()),
            expected,
            actual: mask.len(),
        });
    }
    match mask.iter().position(|&m| m != 0.0 && m != 1.0) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidMask {
            index: Shape(unravel(&dims, i)),
            value: mask[i],
        }),
    }
}
