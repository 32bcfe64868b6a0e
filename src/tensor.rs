//! A small owned f32 tensor: a shape and its row-major data.
//!
//! The crate needs shapes only to check inputs and to name positions in error messages and
//! comparisons, so this is deliberately no more than a shaped `Vec<f32>`.

use crate::error::{Error, Result, Shape};

/// A row-major f32 tensor.
///
/// ```
/// use wgpu_attention::Tensor;
/// let t = Tensor::new([2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
/// assert_eq!(t.get(&[1, 0]), Some(4.0));
/// assert!(Tensor::new([2, 3], vec![1.0]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `data` in row-major order; the length must match the shape.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Self> {
        Self::named("tensor", shape, data)
    }

    /// Like [`Tensor::new`], naming the tensor in the error if the length is wrong.
    pub fn named(name: &str, shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Self> {
        let shape = shape.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::DataLength {
                name: name.to_string(),
                shape: Shape(shape),
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The row-major data.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Takes the data out.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The element at a multi-dimensional index, or `None` outside the shape.
    pub fn get(&self, index: &[usize]) -> Option<f32> {
        if index.len() != self.shape.len() || index.iter().zip(&self.shape).any(|(i, d)| i >= d) {
            return None;
        }
        let flat = index
            .iter()
            .zip(&self.shape)
            .fold(0, |acc, (i, d)| acc * d + i);
        self.data.get(flat).copied()
    }

    /// The multi-dimensional index of a flat position.
    pub fn unravel(&self, flat: usize) -> Vec<usize> {
        unravel(&self.shape, flat)
    }

    /// A copy with another shape of the same size.
    pub fn reshape(&self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::new(shape, self.data.clone())
    }

    /// Fails with [`Error::NonFinite`] naming the first NaN or infinity.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite {
                name: name.to_string(),
                index: Shape(self.unravel(i)),
                value: self.data[i],
            }),
        }
    }
}

/// The multi-dimensional index of `flat` in a row-major tensor of `shape`, for naming a
/// position in data that is not (yet) a [`Tensor`], such as a file's raw values.
///
/// ```
/// assert_eq!(wgpu_attention::unravel(&[2, 3], 4), vec![1, 1]);
/// ```
pub fn unravel(shape: &[usize], mut flat: usize) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    index
}
