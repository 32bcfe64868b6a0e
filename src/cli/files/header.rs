//! The safetensors header, checked against the file's size and against itself before any
//! tensor data is read or trusted, and the parser's refusals put in plain words.

use safetensors::{Dtype, SafeTensorError};
use wgpu_attention::Shape;

/// Safetensors' own limit on the header, checked before the header is read.
const MAX_HEADER: u64 = 100_000_000;

pub(super) enum ReadError {
    Io(std::io::Error),
    Format(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// The whole file, read only once its header has been checked against `len`, its size.
pub(super) fn read_checked(file: &mut std::fs::File, len: u64) -> Result<Vec<u8>, ReadError> {
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

/// What is wrong with a file the safetensors parser refused, in plain words.
pub(super) fn describe_parse_error(bytes: &[u8], error: &SafeTensorError) -> String {
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
