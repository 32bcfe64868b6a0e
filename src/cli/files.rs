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

/// Safetensors' own limit on the header, checked before the header is read.
const MAX_HEADER: u64 = 100_000_000;

/// Reads `path`, accepting exactly the tensors of `known` with their dtypes.
///
/// Only a regular file is read, and only after its header has been checked against its size,
/// so `/dev/zero` or a lying header cannot make the program read or allocate without end.
/// Every float tensor must be finite; checking here, before any transposition, lets the
/// message give the index as it is in the file.
pub fn read(path: &Path, known: &[(&str, Kind)]) -> Result<TensorFile, CliError> {
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

enum ReadError {
    Io(std::io::Error),
    Format(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// The whole file, read only once its header has been checked against `len`, its size.
fn read_checked(file: &mut std::fs::File, len: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let format = |message: String| {
        ReadError::Format(format!("truncated or not a safetensors file: {message}"))
    };
    if len < 8 {
        return Err(format(format!(
            "the file is only {len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > len - 8 {
        return Err(format(format!(
            "the first 8 bytes give a header of {header_len} bytes, but the file is only {len} \
             bytes"
        )));
    }
    if header_len > MAX_HEADER {
        return Err(format(format!(
            "the first 8 bytes give a header of {header_len} bytes, over safetensors' limit of \
             {MAX_HEADER}"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    bytes.extend_from_slice(&prefix);
    Read::by_ref(file)
        .take(header_len)
        .read_to_end(&mut bytes)?;
    let data_len = len - 8 - header_len;
    check_header(&bytes[8..], data_len).map_err(format)?;
    // The size was checked above, but a file can grow while it is read: read no more than it
    // had, and notice if it shrank.
    file.take(data_len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(format(format!(
            "the file changed size while it was read ({len} bytes, then {})",
            bytes.len()
        )));
    }
    Ok(bytes)
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

/// A header's entries in the order written, duplicates kept, which `serde_json::Value` and the
/// safetensors parser would silently merge (the last one winning).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// One tensor's entry in the header.
#[derive(serde::Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Checks the header's entries against each other and against the `data_len` bytes that follow
/// it, naming the tensor at fault: duplicates, sizes that do not match shapes, gaps, overlaps.
fn check_header(header: &[u8], data_len: u64) -> Result<(), String> {
    let Entries(entries) = serde_json::from_slice(header)
        .map_err(|e| format!("the header is not safetensors JSON ({e})"))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut spans = Vec::new();
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(format!(
                "the header names `{name}` twice; a tensor name must be unique, or which one is \
                 meant cannot be known"
            ));
        }
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| format!("the header's entry for tensor `{name}` is not valid: {e}"))?;
        let [start, end] = entry.data_offsets;
        let needed = entry
            .shape
            .iter()
            .try_fold(entry.dtype.bitsize() as u64, |n, &d| {
                n.checked_mul(d as u64)
            })
            .map(|bits| bits.div_ceil(8));
        let shape = Shape(entry.shape.clone());
        match needed {
            None => {
                return Err(format!(
                    "tensor `{name}` has shape {shape}, too large to exist"
                ));
            }
            Some(_) if end < start => {
                return Err(format!(
                    "tensor `{name}` has data_offsets [{start}, {end}], which end before they \
                     start"
                ));
            }
            Some(needed) if end - start != needed => {
                return Err(format!(
                    "tensor `{name}` has shape {shape} of {} ({needed} bytes), but its \
                     data_offsets [{start}, {end}] span {} bytes",
                    entry.dtype,
                    end - start
                ));
            }
            Some(_) => spans.push((start, end, name)),
        }
    }
    spans.sort();
    let mut at = (0u64, None::<&str>);
    for (start, end, name) in &spans {
        if *start != at.0 {
            let after =
                at.1.map_or("the start of the data".to_string(), |p| format!("`{p}`"));
            let what = if *start > at.0 { "a gap" } else { "an overlap" };
            return Err(format!(
                "tensor `{name}` has data_offsets [{start}, {end}], but {after} ends at byte {}: \
                 {what} in the data",
                at.0
            ));
        }
        at = (*end, Some(name));
    }
    if at.0 != data_len {
        return Err(format!(
            "the header describes {} bytes of tensor data, but {data_len} bytes follow it",
            at.0
        ));
    }
    Ok(())
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
    let _writing = super::signals::writing();
    drop(Output::create(path)?);
    Ok(())
}

impl Output {
    /// Writes `tensors` to `path` atomically, holding off Ctrl-C and SIGTERM meanwhile so that
    /// an interruption never leaves the temporary file behind.
    pub fn write(path: &Path, tensors: &[(&str, Tensor)]) -> Result<(), CliError> {
        let _writing = super::signals::writing();
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
