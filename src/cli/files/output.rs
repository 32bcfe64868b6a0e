//! Results written atomically: a temporary file beside the destination, renamed over it only
//! once every tensor is in it.

use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError};
use wgpu_attention::Tensor;

use super::super::CliError;

/// An output file being prepared: a temporary file beside the final path, renamed over it only
/// when every tensor is written, so a failure never leaves a partial file behind, and an older
/// file at the path stays as it was.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
}

/// Checks, before any work, that an output can be written at `path`: its directory exists and
/// takes a new file. The trial file is removed at once; the real one is made only when the
/// result is ready (see [`Output::write`]).
pub fn check_destination(path: &Path) -> Result<(), CliError> {
    // The rename at the end would fail on a directory, after all the work.
    if path.is_dir() {
        return Err(CliError::File {
            path: path.to_path_buf(),
            message: "is a directory; give a file name for the output".into(),
        });
    }
    let _writing = crate::cli::signals::writing();
    drop(Output::create(path)?);
    Ok(())
}

impl Output {
    /// Writes `tensors` to `path` atomically, holding off Ctrl-C and SIGTERM meanwhile so that
    /// an interruption never leaves the temporary file behind.
    pub fn write(path: &Path, tensors: &[(&str, Tensor)]) -> Result<(), CliError> {
        let _writing = crate::cli::signals::writing();
        Output::create(path)?.commit(tensors)
    }

    /// Creates the temporary file beside `path`.
    fn create(path: &Path) -> Result<Self, CliError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Checked here because tempfile's own error would name its random file, not the output.
        if !dir.is_dir() {
            return Err(CliError::File {
                path: path.to_path_buf(),
                message: format!("cannot write there: `{}` is not a directory", dir.display()),
            });
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix(".wgpu-attention-").suffix(".tmp");
        // A temporary file is private by default; the result should get the permissions any
        // new file gets (umask applies).
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let temp = builder.tempfile_in(dir).map_err(|source| CliError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Output {
            path: path.to_path_buf(),
            temp,
        })
    }

    /// Writes `tensors` as F32 and moves the file to its final path.
    fn commit(mut self, tensors: &[(&str, Tensor)]) -> Result<(), CliError> {
        let bytes = serialize(tensors).map_err(|e| CliError::File {
            path: self.path.clone(),
            message: format!("cannot encode the results: {e}"),
        })?;
        let io_error = |source| CliError::Io {
            path: self.path.clone(),
            source,
        };
        self.temp.write_all(&bytes).map_err(io_error)?;
        self.temp.as_file().sync_all().map_err(io_error)?;
        self.temp
            .persist(&self.path)
            .map_err(|e| io_error(e.error))?;
        Ok(())
    }
}

fn serialize(tensors: &[(&str, Tensor)]) -> Result<Vec<u8>, SafeTensorError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), data)| {
            Ok((
                *name,
                TensorView::new(Dtype::F32, t.shape().to_vec(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, SafeTensorError>>()?;
    safetensors::serialize(views, None)
}

#[cfg(test)]
mod tests {
    use safetensors::SafeTensors;

    use super::super::decode;
    use super::*;

    #[test]
    fn written_tensors_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let t = Tensor::new([2, 2], vec![1.0, f32::NEG_INFINITY, 0.5, -2.0]).unwrap();
        Output::create(&path)
            .unwrap()
            .commit(&[("out", t.clone())])
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = SafeTensors::deserialize(&bytes).unwrap();
        let view = parsed.tensor("out").unwrap();
        assert_eq!(view.dtype(), Dtype::F32);
        assert_eq!(view.shape(), &[2, 2]);
        assert_eq!(decode(view.data(), f32::from_le_bytes), t.data());
        // Nothing but the output is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_is_no_destination() {
        let dir = tempfile::tempdir().unwrap();
        let message = check_destination(dir.path()).unwrap_err().to_string();
        assert!(message.ends_with("is a directory; give a file name for the output"));
        check_destination(&dir.path().join("out.safetensors")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_output_never_committed_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        drop(Output::create(&dir.path().join("out.safetensors")).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
