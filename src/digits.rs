//! The 8x8 handwritten digits data set (UCI "Optical Recognition of Handwritten Digits", test
//! set as bundled by scikit-learn; E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), committed as
//! `data/digits.csv.gz`: 1797 rows of 64 pixel values 0..16 and a label 0..9.
//!
//! [`split`] is the one fixed train/test split that the digits training jobs
//! (`examples/training/digits.toml`: `split_seed = 1797`, `held_out = 0.2`) and the accuracy test
//! share.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Pixels per image.
pub const PIXELS: usize = 64;
/// Classes (digits 0..9).
pub const CLASSES: usize = 10;
/// The seed of the fixed train/test shuffle.
pub const SPLIT_SEED: u64 = 1797;
/// Rows held out for testing.
pub const TEST_ROWS: usize = 360;

/// Images and labels.
#[derive(Debug, Clone, Default)]
pub struct Digits {
    /// Row-major pixels, `PIXELS` per image, values 0..16.
    pub pixels: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
}

impl Digits {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`'s pixels.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }
}

/// The committed data file, relative to the repository root.
pub fn default_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz")
}

/// Reads a gzipped CSV of 64 pixels and a label per row.
pub fn load(path: &Path) -> anyhow::Result<Digits> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .with_context(|| format!("decompressing {}", path.display()))?;
    let mut d = Digits::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != PIXELS + 1 {
            bail!("{}:{}: expected {} fields, found {}", path.display(), n + 1, PIXELS + 1, fields.len());
        }
        for f in &fields[..PIXELS] {
            let v: f32 = f.parse().with_context(|| format!("{}:{}: bad pixel `{f}`", path.display(), n + 1))?;
            d.pixels.push(v);
        }
        let label: u32 = fields[PIXELS].parse().with_context(|| format!("{}:{}: bad label", path.display(), n + 1))?;
        if label as usize >= CLASSES {
            bail!("{}:{}: label {label} out of range", path.display(), n + 1);
        }
        d.labels.push(label);
    }
    Ok(d)
}

/// The fixed split: a seeded shuffle, the last [`TEST_ROWS`] rows held out. Returns (train, test).
pub fn split(all: &Digits) -> (Digits, Digits) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SPLIT_SEED));
    let cut = all.len().saturating_sub(TEST_ROWS);
    let take = |idx: &[usize]| {
        let mut d = Digits::default();
        for &i in idx {
            d.pixels.extend_from_slice(all.image(i));
            d.labels.push(all.labels[i]);
        }
        d
    };
    (take(&order[..cut]), take(&order[cut..]))
}
