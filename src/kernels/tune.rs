//! The autotuner's memory: which fused-kernel tiles won on this device for each class of
//! shapes, kept in memory per device and, where the application names a file, on disk per
//! adapter and driver, so that a plan of a class already tuned never tunes again. The timing
//! itself lives with the attention core (`operator::tune`), which owns what a trial runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::fused_tiles::{FusedTiles, RowTiles, SharedTiles};
use crate::error::{Error, Result};

/// How plans on a [`crate::GpuContext`] choose the fused kernel's tiles.
///
/// Real GPU libraries that run across vendors pick their kernel configurations by timing them
/// on the user's device (Burn's autotune, for one): the tile that is fastest on one GPU is not
/// on another, and a software driver differs again. `Full` does that when a plan is built for
/// a class of shapes not seen before on the device, within about a second on a slow one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Autotune {
    /// Tiles from the device's limits alone (the rule the fused kernel has always used);
    /// nothing is timed. Results are then the same on every run, which is what tests want.
    Off,
    /// Winners already known (from this context's earlier plans or a loaded file) are used;
    /// an unknown class takes the rule's tiles and is not timed.
    Cached,
    /// An unknown class is timed once when its first plan is built; the winner is remembered
    /// (and written to the file, if one was given).
    #[default]
    Full,
}

/// The class of shapes one winner serves: everything that changes the candidates or their
/// ranking, with the lengths bucketed (powers of two) so that nearby lengths share a winner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TuneClass {
    /// Query heads per key/value head.
    pub group: u32,
    /// Padded query/key and value head widths.
    pub dp: u32,
    pub dvp: u32,
    pub causal: bool,
    /// `rows_per_eight` of the packed rows (1..8) and the key count's power-of-two bucket.
    pub rows: u32,
    pub keys: u32,
}

impl std::fmt::Display for TuneClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "group={} dp={} dvp={} causal={} rows={} keys={}",
            self.group, self.dp, self.dvp, self.causal as u8, self.rows, self.keys
        )
    }
}

impl std::str::FromStr for TuneClass {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let v = fields(s, &["group", "dp", "dvp", "causal", "rows", "keys"])?;
        Ok(TuneClass {
            group: v[0],
            dp: v[1],
            dvp: v[2],
            causal: v[3] != 0,
            rows: v[4],
            keys: v[5],
        })
    }
}

/// Tiles as the file writes them ([`FusedTiles::text`]).
pub(crate) fn tiles_text(t: &FusedTiles) -> String {
    t.text()
}

/// Tiles from [`FusedTiles::text`]'s form: shared tiles when the text opens with `TX=`,
/// whole rows otherwise.
pub(crate) fn parse_tiles(s: &str) -> std::result::Result<FusedTiles, String> {
    if s.trim_start().starts_with("TX=") {
        let v = fields(s, &["TX", "TY", "NV", "DK", "VK"])?;
        return Ok(FusedTiles::Shared(SharedTiles {
            tx: v[0],
            ty: v[1],
            nv: v[2],
            dk: v[3],
            vk: v[4],
        }));
    }
    let v = fields(s, &["WG", "R", "DIRECT"])?;
    if v[2] > 1 {
        return Err(format!("DIRECT={} is neither 0 nor 1", v[2]));
    }
    Ok(FusedTiles::Rows(RowTiles {
        wg: v[0],
        r: v[1],
        direct: v[2] == 1,
    }))
}

/// The values of `name=value` pairs, separated by spaces, in exactly the order of `names`.
fn fields(s: &str, names: &[&str]) -> std::result::Result<Vec<u32>, String> {
    let pairs: Vec<&str> = s.split_whitespace().collect();
    if pairs.len() != names.len() {
        return Err(format!("expected {} fields {names:?}", names.len()));
    }
    pairs
        .iter()
        .zip(names)
        .map(|(pair, name)| {
            let value = pair
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
                .ok_or_else(|| format!("expected `{name}=` in `{pair}`"))?;
            value
                .parse()
                .map_err(|_| format!("`{value}` in `{pair}` is not a whole number"))
        })
        .collect()
}

/// One device's winners, its mode and its file.
#[derive(Debug, Default)]
pub(crate) struct TuneState {
    pub mode: Autotune,
    /// Where winners are read from and appended to, and the adapter they are keyed by there.
    file: Option<(PathBuf, String)>,
    winners: HashMap<TuneClass, FusedTiles>,
    /// Classes timed so far on this device.
    pub trials: u64,
}

impl TuneState {
    pub fn winner(&self, class: &TuneClass) -> Option<FusedTiles> {
        self.winners.get(class).copied()
    }

    /// Every winner, as (class, tiles) text, sorted: what `bench` prints.
    pub fn winners(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .winners
            .iter()
            .map(|(c, t)| (c.to_string(), tiles_text(t)))
            .collect();
        all.sort();
        all
    }

    /// Remembers a winner, and appends it to the file if there is one.
    pub fn record(&mut self, class: TuneClass, tiles: FusedTiles) -> Result<()> {
        if let Some((path, adapter)) = &self.file {
            use std::io::Write;
            let line = format!("{adapter}\t{class}\t{}\n", tiles_text(&tiles));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .map_err(|e| Error::Io {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        self.winners.insert(class, tiles);
        Ok(())
    }

    /// Sets the winner of a class from text (`TuneClass` and tiles as the file writes them),
    /// checked against the device: how tests pin a configuration.
    pub fn pin(&mut self, class: &str, tiles: &str, limits: &wgpu::Limits) -> Result<()> {
        let bad = |why: String| Error::InvalidConfig(format!("pinned tiles: {why}"));
        let class: TuneClass = class.parse().map_err(bad)?;
        let tiles = parse_tiles(tiles).map_err(bad)?;
        if !tiles.fits(class.dp, class.dvp, limits) {
            return Err(bad(format!("{} do not fit", tiles_text(&tiles))));
        }
        self.winners.insert(class, tiles);
        Ok(())
    }

    /// Reads the winners of `adapter` from `path` (a missing file is an empty one) and keeps
    /// the file for later winners. Lines of other adapters or drivers are skipped; a line that
    /// does not parse, or tiles that do not fit this device, are a named error.
    pub fn load(&mut self, path: &Path, adapter: String, limits: &wgpu::Limits) -> Result<()> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    message: e.to_string(),
                });
            }
        };
        for (n, line) in text.lines().enumerate() {
            let bad = |why: String| {
                Error::InvalidConfig(format!(
                    "autotune file {}, line {}: {why}",
                    path.display(),
                    n + 1
                ))
            };
            let cols: Vec<&str> = line.split('\t').collect();
            let [who, class, tiles] = cols[..] else {
                return Err(bad(
                    "expected three tab-separated columns: adapter, class, tiles".into(),
                ));
            };
            if who != adapter {
                continue;
            }
            let class: TuneClass = class.parse().map_err(bad)?;
            let tiles = parse_tiles(tiles).map_err(bad)?;
            if !tiles.fits(class.dp, class.dvp, limits) {
                return Err(bad(format!(
                    "tiles {} do not fit this device's limits or heads {} wide",
                    tiles_text(&tiles),
                    class.dvp
                )));
            }
            self.winners.insert(class, tiles);
        }
        self.file = Some((path.to_path_buf(), adapter));
        Ok(())
    }
}

/// The adapter and driver a file's winners belong to: a new driver may rank tiles otherwise.
pub(crate) fn adapter_key(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{:?} {:04x}:{:04x} {} | {} {}",
        info.backend, info.vendor, info.device, info.name, info.driver, info.driver_info
    )
    .replace(['\t', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_tiles_read_back_as_written() {
        let class = TuneClass {
            group: 4,
            dp: 128,
            dvp: 64,
            causal: true,
            rows: 8,
            keys: 1024,
        };
        assert_eq!(class.to_string().parse::<TuneClass>().unwrap(), class);
        let t = FusedTiles::Shared(SharedTiles {
            tx: 8,
            ty: 4,
            nv: 2,
            dk: 16,
            vk: 8,
        });
        assert_eq!(parse_tiles(&tiles_text(&t)).unwrap(), t);
        let rows = FusedTiles::Rows(RowTiles {
            wg: 32,
            r: 8,
            direct: true,
        });
        assert_eq!(tiles_text(&rows), "WG=32 R=8 DIRECT=1");
        assert_eq!(parse_tiles(&tiles_text(&rows)).unwrap(), rows);
        assert!(parse_tiles("WG=32 R=8 DIRECT=2").is_err());
        assert!(parse_tiles("WG=32 R=8").is_err());
        assert!(parse_tiles("TX=8 TY=4").is_err());
        assert!(parse_tiles("TX=8 TY=x NV=2 DK=16 VK=8").is_err());
        assert!(parse_tiles("TY=8 TX=4 NV=2 DK=16 VK=8").is_err());
    }
}
