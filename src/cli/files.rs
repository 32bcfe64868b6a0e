//! Safetensors files for the program: reading named f32 tensors, writing results atomically.
//!
//! Reading is strict on purpose. A wrong dtype is refused rather than converted, because the
//! GPU result is checked against a reference computed from the very same values; an unknown
//! tensor name is refused rather than ignored, because a typo (`wq` for `w_q`) would otherwise
//! turn into a confusing "missing tensor" error, or worse, an optional tensor silently dropped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use wgpu_attention::{Shape, Tensor, unravel};

use super::CliError;

/// How a tensor's stored dtype is turned into f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only F32 is accepted: any conversion would change the values the check relies on.
    Float,
    /// 0/1 flags stored as BOOL, U8, I32, I64, F32 or F64, read as 0.0 and 1.0.
    Mask,
}

/// The dtypes a [`Kind::Mask`] tensor may have, in the order messages list them.
const MASK_DTYPES: [Dtype; 6] = [
    Dtype::BOOL,
    Dtype::U8,
    Dtype::I32,
    Dtype::I64,
    Dtype::F32,
    Dtype::F64,
];

/// The tensors of one input file, converted to f32 and taken out by name.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    /// Every name the file holds, kept for messages after tensors are taken.
    names: Vec<String>,
}

impl TensorFile {
    /// Takes the tensor `name` out of the file, if it is there.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Whether the file holds a tensor `name` (taken or not).
    pub fn holds(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The names the file holds, for messages: "x, w_q, w_v".
    pub fn names(&self) -> String {
        if self.names.is_empty() {
            "no tensors at all".into()
        } else {
            self.names.join(", ")
        }
    }

    /// An error about this file's contents, prefixed with its path.
    pub fn error(&self, message: impl Into<String>) -> CliError {
        CliError::File {
            path: self.path.clone(),
            message: message.into(),
        }
    }
}

/// Reads `path`, accepting exactly the tensors of `known` with their dtypes.
///
/// Every float tensor must be finite; checking here, before any transposition, lets the message
/// give the index as it is in the file.
pub fn read(path: &Path, known: &[(&str, Kind)]) -> Result<TensorFile, CliError> {
    let bytes = std::fs::read(path).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_error = |message: String| CliError::File {
        path: path.to_path_buf(),
        message,
    };
    let parsed = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(describe_parse_error(&bytes, &e)))?;
    let mut names: Vec<String> = parsed.names().into_iter().map(String::from).collect();
    names.sort();
    check_names(&names, known).map_err(file_error)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in parsed.iter() {
        let kind = known
            .iter()
            .find(|(known, _)| *known == name)
            .map_or(Kind::Float, |&(_, kind)| kind);
        let tensor = convert(name, &view, kind).map_err(file_error)?;
        tensors.insert(name.to_string(), tensor);
    }
    Ok(TensorFile {
        path: path.to_path_buf(),
        tensors,
        names,
    })
}

/// Refuses names outside `known`, suggesting the closest known name for each.
fn check_names(names: &[String], known: &[(&str, Kind)]) -> Result<(), String> {
    let unknown: Vec<String> = names
        .iter()
        .filter(|n| !known.iter().any(|(k, _)| k == n))
        .map(|n| match closest(n, known) {
            Some(k) => format!("`{n}` (did you mean `{k}`?)"),
            None => format!("`{n}`"),
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let accepted: Vec<&str> = known.iter().map(|(k, _)| *k).collect();
    Err(format!(
        "unknown tensor{} {}; this program reads only {}",
        if unknown.len() > 1 { "s" } else { "" },
        unknown.join(", "),
        accepted.join(", ")
    ))
}

/// The known name within two edits of `name`, ignoring case and underscores.
fn closest<'a>(name: &str, known: &[(&'a str, Kind)]) -> Option<&'a str> {
    let squash = |s: &str| -> Vec<char> {
        s.chars()
            .filter(|c| *c != '_' && *c != '.')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let name = squash(name);
    known
        .iter()
        .map(|&(k, _)| (edit_distance(&name, &squash(k)), k))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance; names are short, so the quadratic table is nothing.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// One stored tensor as an f32 [`Tensor`], or a message saying why it cannot be one.
fn convert(name: &str, view: &TensorView<'_>, kind: Kind) -> Result<Tensor, String> {
    let data = match kind {
        Kind::Float => float_values(name, view)?,
        Kind::Mask => mask_values(name, view)?,
    };
    Tensor::named(name, view.shape().to_vec(), data).map_err(|e| e.to_string())
}

fn float_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!(
            "tensor `{name}` has dtype {}, expected F32; save it with tensor.float()",
            view.dtype()
        ));
    }
    let values = decode(view.data(), f32::from_le_bytes);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: inputs must be finite",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values)
}

fn mask_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let bytes = view.data();
    // Decoding to f64 is exact for every value a 0/1 check must tell apart, so a stored 0.5 or
    // 2 is reported as it is rather than after rounding to f32.
    let values: Vec<f64> = match view.dtype() {
        Dtype::BOOL | Dtype::U8 => bytes.iter().map(|&b| f64::from(b)).collect(),
        Dtype::I32 => decode(bytes, |b| f64::from(i32::from_le_bytes(b))),
        Dtype::I64 => decode(bytes, |b| i64::from_le_bytes(b) as f64),
        Dtype::F32 => decode(bytes, |b| f64::from(f32::from_le_bytes(b))),
        Dtype::F64 => decode(bytes, f64::from_le_bytes),
        other => {
            let accepted: Vec<String> = MASK_DTYPES.iter().map(Dtype::to_string).collect();
            return Err(format!(
                "tensor `{name}` has dtype {other}, expected one of {} (1 = real token, \
                 0 = padding)",
                accepted.join(", ")
            ));
        }
    };
    if let Some(i) = values.iter().position(|&v| v != 0.0 && v != 1.0) {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: use 1 for a real token and 0 for padding",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values.into_iter().map(|v| v as f32).collect())
}

/// Little-endian elements of `N` bytes; safetensors data need not be aligned for a cast.
fn decode<const N: usize, T>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from_le(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// What is wrong with a file the safetensors parser refused, in plain words.
fn describe_parse_error(bytes: &[u8], error: &SafeTensorError) -> String {
    let len = bytes.len();
    let header_len = bytes
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or(0);
    let detail = match error {
        SafeTensorError::HeaderTooSmall => {
            format!("the file is only {len} bytes, shorter than the 8-byte header length")
        }
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength
            if header_len > len as u64 =>
        {
            format!(
                "the first 8 bytes give a header of {header_len} bytes, but the file is only \
                 {len} bytes"
            )
        }
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("the header is not safetensors JSON ({error})")
        }
        SafeTensorError::MetadataIncompleteBuffer => match declared_data_len(bytes) {
            Some(declared) => format!(
                "the header describes {declared} bytes of tensor data, but {} bytes follow it",
                len - 8 - header_len as usize
            ),
            None => error.to_string(),
        },
        other => other.to_string(),
    };
    format!("truncated or not a safetensors file: {detail}")
}

/// The data length the header declares: the largest end offset of any tensor.
fn declared_data_len(bytes: &[u8]) -> Option<u64> {
    let header_len = usize::try_from(u64::from_le_bytes(*bytes.first_chunk::<8>()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(header_len)?)?;
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    json.as_object()?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, info)| info.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .or(Some(0))
}

/// An output file being prepared: a temporary file beside the final path, renamed over it only
/// when every tensor is written, so a failure never leaves a partial file behind, and an older
/// file at the path stays as it was.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
}

impl Output {
    /// Creates the temporary file now, so an unwritable destination is reported before any
    /// work is done.
    pub fn create(path: &Path) -> Result<Self, CliError> {
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

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `tensors` as F32 and moves the file to its final path.
    pub fn commit(mut self, tensors: &[(&str, Tensor)]) -> Result<(), CliError> {
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
    use super::*;

    const KNOWN: [(&str, Kind); 3] = [
        ("w_q", Kind::Float),
        ("w_k", Kind::Float),
        ("key_mask", Kind::Mask),
    ];

    #[test]
    fn typos_get_a_suggestion() {
        let message =
            check_names(&["wq".into(), "keymask".into(), "zzz".into()], &KNOWN).unwrap_err();
        assert!(message.contains("`wq` (did you mean `w_q`?)"), "{message}");
        assert!(
            message.contains("`keymask` (did you mean `key_mask`?)"),
            "{message}"
        );
        assert!(
            message.contains("`zzz`,") || message.contains("`zzz`;"),
            "{message}"
        );
        assert!(
            message.contains("reads only w_q, w_k, key_mask"),
            "{message}"
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edit_distance(&chars("wq"), &chars("wq")), 0);
        assert_eq!(edit_distance(&chars("wq"), &chars("wk")), 1);
        assert_eq!(edit_distance(&chars(""), &chars("abc")), 3);
        assert_eq!(edit_distance(&chars("kitten"), &chars("sitting")), 3);
    }

    #[test]
    fn masks_of_every_accepted_dtype_become_zero_and_one() {
        let cases: [(Dtype, Vec<u8>); 6] = [
            (Dtype::BOOL, vec![1, 0]),
            (Dtype::U8, vec![1, 0]),
            (
                Dtype::I32,
                [1i32, 0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                Dtype::I64,
                [1i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                Dtype::F32,
                [1f32, 0.].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                Dtype::F64,
                [1f64, 0.].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        for (dtype, bytes) in cases {
            let view = TensorView::new(dtype, vec![2], &bytes).unwrap();
            assert_eq!(
                mask_values("key_mask", &view).unwrap(),
                vec![1.0, 0.0],
                "{dtype}"
            );
        }
    }

    #[test]
    fn a_mask_value_close_to_one_is_not_rounded_into_one() {
        let bytes: Vec<u8> = [1.0f64, 1.0 - 1e-12]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F64, vec![2], &bytes).unwrap();
        let message = mask_values("key_mask", &view).unwrap_err();
        assert!(message.contains("at index [1]"), "{message}");
    }

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
    fn an_output_never_committed_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        drop(Output::create(&dir.path().join("out.safetensors")).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
