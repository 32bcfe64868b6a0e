//! Safetensors files for the program: reading named f32 tensors, writing results atomically.
//!
//! Reading is strict on purpose. A wrong dtype is refused rather than converted, because the
//! GPU result is checked against a reference computed from the very same values; an unknown
//! tensor name is refused rather than ignored, because a typo (`wq` for `w_q`) would otherwise
//! turn into a confusing "missing tensor" error, or worse, an optional tensor silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use wgpu_attention::{Shape, Tensor, unravel};

use super::CliError;

mod header;
mod output;

pub use output::{Output, check_destination};

use header::{ReadError, describe_parse_error, read_checked};

/// How a tensor's stored dtype is turned into f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// F32, F16 or BF16, each widened to f32 exactly: no conversion changes the values the check
    /// relies on.
    Float,
    /// 0/1 flags, 1 = attend (this program's `key_mask`, Hugging Face's `attention_mask`),
    /// stored as BOOL, U8, I32, I64, F32 or F64, read as 0.0 and 1.0.
    Mask,
    /// PyTorch's `key_padding_mask`, in PyTorch's own conventions: BOOL or U8 with
    /// True = padding, or F32/F64 added to the scores (0 = keep, -inf = drop). Read as the
    /// keep flags 1.0 and 0.0.
    PaddingMask,
    /// An additive mask, F32 or F64: 0 = keep, -inf (or the dtype's lowest value, as Hugging
    /// Face writes it) = drop. Read as the keep flags 1.0 and 0.0.
    Additive,
    /// The operator's `key_mask`: nonzero = attend, as PyTorch's boolean `attn_mask` means
    /// True. BOOL, U8, I32, I64, F32 or F64, read as 0.0 and 1.0; a negative or non-finite
    /// value is refused, as it marks an additive mask, which would be read inverted.
    Attend,
    /// The operator's additive `attn_bias`: F32, where `-inf` masks a key and NaN or `+inf`
    /// are refused.
    Bias,
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

    /// Puts `tensor` back under `name`, as when a tensor saved under PyTorch's name is read
    /// under this program's.
    pub fn put(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
    }

    /// The shape of tensor `name`, if it is there and not yet taken.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape().to_vec())
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

/// Reads `path`, accepting exactly the tensors `choose` gives, with their dtypes, for the
/// names the file holds (sorted); `choose` may refuse the names with a message (a file that
/// mixes two formats).
///
/// Only a regular file is read, and only after its header has been checked against its size,
/// so `/dev/zero` or a lying header cannot make the program read or allocate without end.
/// Every float tensor must be finite; checking here, before any transposition, lets the
/// message give the index as it is in the file.
pub fn read<'k>(
    path: &Path,
    choose: impl FnOnce(&[String]) -> Result<&'k [(&'k str, Kind)], String>,
) -> Result<TensorFile, CliError> {
    let io_error = |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_error = |message: String| CliError::File {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let meta = file.metadata().map_err(io_error)?;
    if !meta.is_file() {
        return Err(file_error(format!(
            "not a regular file ({}); give a .safetensors file",
            describe_file_type(&meta.file_type())
        )));
    }
    let bytes = read_checked(&mut file, meta.len()).map_err(|e| match e {
        ReadError::Io(source) => io_error(source),
        ReadError::Format(message) => file_error(message),
    })?;
    let parsed = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(describe_parse_error(&bytes, &e)))?;
    let mut names: Vec<String> = parsed.names().into_iter().map(String::from).collect();
    names.sort();
    let known = choose(&names).map_err(file_error)?;
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

fn describe_file_type(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a pipe";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// Refuses an output that is the input itself (same path, a link to it, or the same file by
/// another name): writing it would replace the weights with the result.
pub fn refuse_same_file(input: &Path, output: &Path) -> Result<(), CliError> {
    let same = match (std::fs::metadata(input), std::fs::metadata(output)) {
        (Ok(a), Ok(b)) => same_file(&a, &b),
        _ => false,
    };
    if same || input == output {
        return Err(CliError::Usage(format!(
            "--output {} is the input file itself; writing it would replace the weights with \
             the result: choose another path",
            output.display()
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
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
        Kind::PaddingMask => padding_mask_values(name, view)?,
        Kind::Additive => additive_values(name, view)?,
        Kind::Attend => attend_values(name, view)?,
        Kind::Bias => bias_values(name, view)?,
    };
    Tensor::named(name, view.shape().to_vec(), data).map_err(|e| e.to_string())
}

fn float_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    // F16 and BF16 widen to f32 exactly, so the reference sees the stored values themselves;
    // with f16 precision they are rounded (F16: unchanged) once more on upload.
    let values = match view.dtype() {
        Dtype::F32 => decode(view.data(), f32::from_le_bytes),
        Dtype::F16 => decode(view.data(), |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => decode(view.data(), |b| half::bf16::from_le_bytes(b).to_f32()),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other}, expected F32, F16 or BF16; save it with \
                 tensor.float()"
            ));
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: inputs must be finite",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values)
}

/// Every value of a mask as f64, which is exact for every value a check must tell apart, so a
/// stored 0.5 or 2 is reported as it is rather than after rounding to f32.
fn mask_as_f64(view: &TensorView<'_>) -> Option<Vec<f64>> {
    let bytes = view.data();
    Some(match view.dtype() {
        Dtype::BOOL | Dtype::U8 => bytes.iter().map(|&b| f64::from(b)).collect(),
        Dtype::I32 => decode(bytes, |b| f64::from(i32::from_le_bytes(b))),
        Dtype::I64 => decode(bytes, |b| i64::from_le_bytes(b) as f64),
        Dtype::F32 => decode(bytes, |b| f64::from(f32::from_le_bytes(b))),
        Dtype::F64 => decode(bytes, f64::from_le_bytes),
        _ => return None,
    })
}

fn mask_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let Some(values) = mask_as_f64(view) else {
        let accepted: Vec<String> = MASK_DTYPES.iter().map(Dtype::to_string).collect();
        return Err(format!(
            "tensor `{name}` has dtype {}, expected one of {} (1 = real token, 0 = padding)",
            view.dtype(),
            accepted.join(", ")
        ));
    };
    if let Some(i) = values.iter().position(|&v| v != 0.0 && v != 1.0) {
        let additive = if values[i] < 0.0 {
            "; an additive mask (0 = keep, -inf = drop) must be named `additive_key_mask`"
        } else {
            ""
        };
        return Err(format!(
            "tensor `{name}` holds {} at index {}: use 1 for a real token and 0 for \
             padding{additive}",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values.into_iter().map(|v| v as f32).collect())
}

fn padding_mask_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    match view.dtype() {
        // PyTorch adds a float key_padding_mask to the scores.
        Dtype::F32 | Dtype::F64 => additive_values(name, view),
        Dtype::BOOL | Dtype::U8 => {
            let values = mask_as_f64(view).expect("BOOL and U8 decode");
            if let Some(i) = values.iter().position(|&v| v != 0.0 && v != 1.0) {
                return Err(format!(
                    "tensor `{name}` holds {} at index {}: PyTorch's key_padding_mask is True \
                     for padding and False for a real token",
                    values[i],
                    Shape(unravel(view.shape(), i))
                ));
            }
            Ok(values.into_iter().map(|v| (1.0 - v) as f32).collect())
        }
        other => Err(format!(
            "tensor `{name}` has dtype {other}; PyTorch's key_padding_mask is BOOL (True = \
             padding) or F32 added to the scores (0 = keep, -inf = drop)"
        )),
    }
}

fn additive_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let (values, lowest) = match view.dtype() {
        Dtype::F32 => (
            decode(view.data(), |b| f64::from(f32::from_le_bytes(b))),
            f64::from(f32::MIN),
        ),
        Dtype::F64 => (decode(view.data(), f64::from_le_bytes), f64::MIN),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other}, but an additive mask is F32 or F64 (0 = \
                 keep, -inf = drop); a 0/1 mask with 1 = real token is named `key_mask`"
            ));
        }
    };
    let drop = |v: f64| v == f64::NEG_INFINITY || v == lowest;
    if let Some(i) = values.iter().position(|&v| v != 0.0 && !drop(v)) {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: an additive mask may hold only 0 (keep) and \
             -inf or the dtype's lowest value (drop); other biases would change the scores, \
             which this program cannot do",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values
        .into_iter()
        .map(|v| if v == 0.0 { 1.0 } else { 0.0 })
        .collect())
}

fn attend_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let Some(values) = mask_as_f64(view) else {
        let accepted: Vec<String> = MASK_DTYPES.iter().map(Dtype::to_string).collect();
        return Err(format!(
            "tensor `{name}` has dtype {}, expected one of {} (nonzero = attend, 0 = padding)",
            view.dtype(),
            accepted.join(", ")
        ));
    };
    if let Some(i) = values.iter().position(|&v| !(v.is_finite() && v >= 0.0)) {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: a key mask is nonzero to attend and 0 for \
             padding; an additive mask (0 = keep, -inf = drop) goes in `attn_bias` \
             [batch or 1, heads or 1, q_len, kv_len] instead",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values
        .into_iter()
        .map(|v| if v != 0.0 { 1.0 } else { 0.0 })
        .collect())
}

fn bias_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        let hint = if matches!(view.dtype(), Dtype::BOOL | Dtype::U8) {
            "; a boolean mask over keys goes in `key_mask` [batch, kv_len], and any other as \
             its additive form, torch.zeros(m.shape).masked_fill(~m, float(\"-inf\"))"
        } else {
            "; save it with tensor.float()"
        };
        return Err(format!(
            "tensor `{name}` has dtype {}, expected F32 (added to the scores){hint}",
            view.dtype()
        ));
    }
    let values = decode(view.data(), f32::from_le_bytes);
    // -inf masks a key; NaN and +inf have no meaning as a bias.
    if let Some(i) = values
        .iter()
        .position(|&v| v.is_nan() || v == f32::INFINITY)
    {
        return Err(format!(
            "tensor `{name}` holds {} at index {}: a bias must be finite, or -inf to mask a key",
            values[i],
            Shape(unravel(view.shape(), i))
        ));
    }
    Ok(values)
}

/// Little-endian elements of `N` bytes; safetensors data need not be aligned for a cast.
fn decode<const N: usize, T>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from_le(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
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
}
