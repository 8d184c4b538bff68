//! The IDX format of MNIST and Fashion-MNIST, gzipped or raw.
//!
//! An IDX file is a 4-byte magic number (two zero bytes, an element-type code, the
//! number of dimensions), one big-endian `u32` per dimension, then the elements in
//! row-major order. Only unsigned bytes (type `0x08`) are supported, which is what the
//! MNIST family uses.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use ndarray::Array2;

use super::Dataset;
use crate::error::{Error, Result};

/// Where Debian's `dataset-fashion-mnist` package installs Fashion-MNIST.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TYPE_U8: u8 = 0x08;

/// The contents of an IDX file: its dimensions and its unsigned-byte elements.
///
/// ```
/// use modelfusion::nn::data::parse_idx;
/// // Two 1x2 "images": magic 0x00000803, dims 2, 1, 2, then four bytes.
/// let bytes = [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 255, 51, 102];
/// let idx = parse_idx(&bytes)?;
/// assert_eq!(idx.dims, vec![2, 1, 2]);
/// let images = idx.into_images()?;
/// assert_eq!(images.row(0).to_vec(), vec![0.0, 1.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions from the header, outermost first.
    pub dims: Vec<usize>,
    /// The elements in row-major order (`dims.iter().product()` of them).
    pub data: Vec<u8>,
    path: Option<PathBuf>,
}

impl IdxArray {
    /// Interprets the array as images: `(n, rows, cols, ...)` becomes an
    /// `(n, rows * cols * ...)` matrix of pixels scaled from `0..=255` to `[0, 1]`.
    /// Errors unless there are at least two dimensions.
    ///
    /// ```
    /// use modelfusion::nn::data::parse_idx;
    /// let labels = parse_idx(&[0, 0, 8, 1, 0, 0, 0, 1, 7])?;
    /// assert!(labels.into_images().is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn into_images(self) -> Result<Array2<f32>> {
        if self.dims.len() < 2 {
            return Err(self.format_error(format!(
                "expected images (at least 2 dimensions), got dimensions {:?}",
                self.dims
            )));
        }
        let n = self.dims[0];
        let features: usize = self.dims[1..].iter().product();
        let pixels = self.data.iter().map(|&b| f32::from(b) / 255.0).collect();
        Array2::from_shape_vec((n, features), pixels)
            .map_err(|e| Error::invalid("dims", e.to_string()))
    }

    /// Interprets the array as labels; errors unless it has exactly one dimension.
    ///
    /// ```
    /// use modelfusion::nn::data::parse_idx;
    /// let labels = parse_idx(&[0, 0, 8, 1, 0, 0, 0, 2, 7, 3])?;
    /// assert_eq!(labels.into_labels()?, vec![7, 3]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn into_labels(self) -> Result<Vec<usize>> {
        if self.dims.len() != 1 {
            return Err(self.format_error(format!(
                "expected labels (1 dimension), got dimensions {:?}",
                self.dims
            )));
        }
        Ok(self.data.iter().map(|&b| usize::from(b)).collect())
    }

    fn format_error(&self, reason: String) -> Error {
        format_error(self.path.as_deref(), reason)
    }
}

fn format_error(path: Option<&Path>, reason: impl Into<String>) -> Error {
    Error::Format {
        format: "IDX",
        path: path.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// Parses an IDX file held in memory, gzipped (detected by its magic bytes) or raw.
///
/// Errors ([`Error::Format`]) on a bad magic number, an unsupported element type, a
/// truncated header or body, data beyond the declared size, or a header whose declared
/// size overflows. The declared size is never allocated up front: the body is read as
/// it arrives and compared with the header afterwards.
///
/// ```
/// use modelfusion::nn::data::parse_idx;
/// let e = parse_idx(&[0, 0, 8, 1, 0, 0, 0, 5, 1, 2]).unwrap_err();
/// assert!(e.to_string().contains("truncated"), "{e}");
/// ```
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray> {
    decode(bytes, None)
}

/// Reads an IDX file, gzipped (detected by its magic bytes, whatever the file name) or
/// raw. Errors as [`parse_idx`] does, with the path in the message, and with
/// [`Error::Io`] when the file cannot be read.
///
/// ```
/// use modelfusion::nn::data::read_idx;
/// let dir = std::env::temp_dir().join("modelfusion-doc-read-idx");
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("labels-idx1-ubyte");
/// std::fs::write(&path, [0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]).unwrap();
/// assert_eq!(read_idx(&path)?.into_labels()?, vec![1, 2, 3]);
/// assert!(read_idx(&dir.join("missing")).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(BufReader::new(file), Some(path))
}

fn decode<R: BufRead>(mut reader: R, path: Option<&Path>) -> Result<IdxArray> {
    let head = reader.fill_buf().map_err(|e| io_error(e, path, false))?;
    if head.starts_with(&GZIP_MAGIC) {
        read_body(BufReader::new(GzDecoder::new(reader)), path, true)
    } else {
        read_body(reader, path, false)
    }
}

/// Maps an I/O error while reading: a gzip stream that fails to decode is a format
/// error; a failing file is an I/O error.
fn io_error(e: io::Error, path: Option<&Path>, gzip: bool) -> Error {
    match path {
        Some(p) if !gzip => Error::Io {
            path: p.to_path_buf(),
            source: e,
        },
        _ => format_error(path, format!("corrupt gzip stream: {e}")),
    }
}

/// Reads exactly `buf.len()` bytes of the header, naming `what` when the input ends.
fn read_header<R: Read>(
    reader: &mut R,
    buf: &mut [u8],
    what: &str,
    path: Option<&Path>,
    gzip: bool,
) -> Result<()> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            format_error(
                path,
                format!("truncated header: the input ends inside the {what}"),
            )
        } else {
            io_error(e, path, gzip)
        }
    })
}

fn read_body<R: Read>(mut reader: R, path: Option<&Path>, gzip: bool) -> Result<IdxArray> {
    let mut magic = [0u8; 4];
    read_header(&mut reader, &mut magic, "4-byte magic number", path, gzip)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(format_error(
            path,
            format!(
                "bad magic number 0x{:08x}: an IDX file starts with two zero bytes, a type code and the number of dimensions",
                u32::from_be_bytes(magic)
            ),
        ));
    }
    if magic[2] != TYPE_U8 {
        return Err(format_error(
            path,
            format!(
                "unsupported element type 0x{:02x} (only unsigned bytes, 0x08, are supported)",
                magic[2]
            ),
        ));
    }
    let ndims = usize::from(magic[3]);
    if ndims == 0 {
        return Err(format_error(path, "the header declares 0 dimensions"));
    }
    let mut raw = vec![0u8; 4 * ndims];
    read_header(&mut reader, &mut raw, "dimension sizes", path, gzip)?;
    let dims: Vec<usize> = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let declared = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n < usize::MAX)
        .ok_or_else(|| {
            format_error(
                path,
                format!("the header declares an absurd size: dimensions {dims:?} overflow"),
            )
        })?;
    // Read what is there (at most one byte more than declared), never allocating the
    // declared size before the data has arrived.
    let mut data = Vec::new();
    reader
        .take(declared as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_error(e, path, gzip))?;
    if data.len() < declared {
        return Err(format_error(
            path,
            format!(
                "truncated data: dimensions {dims:?} declare {declared} bytes, found {}",
                data.len()
            ),
        ));
    }
    if data.len() > declared {
        return Err(format_error(
            path,
            format!("more data than dimensions {dims:?} declare ({declared} bytes)"),
        ));
    }
    Ok(IdxArray {
        dims,
        data,
        path: path.map(Path::to_path_buf),
    })
}

/// Reads an image file and a label file into a [`Dataset`] with `num_classes` classes.
/// Errors when the counts differ or a label is out of range.
///
/// ```
/// use modelfusion::nn::data::load_idx_dataset;
/// let dir = std::env::temp_dir().join("modelfusion-doc-load-idx");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("img"), [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 255]).unwrap();
/// std::fs::write(dir.join("lbl"), [0, 0, 8, 1, 0, 0, 0, 2, 1, 0]).unwrap();
/// let d = load_idx_dataset(&dir.join("img"), &dir.join("lbl"), 2)?;
/// assert_eq!(d.y(), &[1, 0]);
/// assert_eq!(d.x()[[1, 0]], 1.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn load_idx_dataset(images: &Path, labels: &Path, num_classes: usize) -> Result<Dataset> {
    let x = read_idx(images)?.into_images()?;
    let y = read_idx(labels)?.into_labels()?;
    if x.nrows() != y.len() {
        return Err(format_error(
            Some(labels),
            format!(
                "{} labels for {} images in {}",
                y.len(),
                x.nrows(),
                images.display()
            ),
        ));
    }
    Dataset::new(x, y, num_classes)
}

/// Fashion-MNIST as `(train, test)`: 60,000 and 10,000 images of 28x28 = 784 features
/// in `[0, 1]`, 10 classes. Reads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each with or without `.gz`,
/// from `dir`, or from [`DEFAULT_FASHION_MNIST_DIR`] (Debian's
/// `dataset-fashion-mnist`) when `dir` is `None`. Errors ([`Error::Io`]) naming the
/// missing file when the data is absent.
///
/// ```no_run
/// let (train, test) = modelfusion::nn::data::fashion_mnist(None)?;
/// assert_eq!((train.len(), test.len(), train.num_features()), (60_000, 10_000, 784));
/// # Ok::<(), modelfusion::Error>(())
/// ```
///
/// ```
/// let e = modelfusion::nn::data::fashion_mnist(Some(std::path::Path::new("/nonexistent"))).unwrap_err();
/// assert!(e.to_string().contains("train-images-idx3-ubyte"));
/// ```
pub fn fashion_mnist(dir: Option<&Path>) -> Result<(Dataset, Dataset)> {
    let dir = dir.unwrap_or(Path::new(DEFAULT_FASHION_MNIST_DIR));
    let load = |prefix: &str| -> Result<Dataset> {
        let images = find_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        load_idx_dataset(&images, &labels, 10)
    };
    Ok((load("train")?, load("t10k")?))
}

/// `dir/stem.gz` or `dir/stem`, whichever exists.
fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    [&gz, &raw]
        .into_iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::Io {
            path: gz.clone(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "neither {} nor {} exists (install the Debian package dataset-fashion-mnist, or pass the directory holding the files)",
                    gz.display(),
                    raw.display()
                ),
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_raw_agree() {
        use flate2::{Compression, write::GzEncoder};
        use std::io::Write;
        let raw = [0u8, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4];
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&raw).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(parse_idx(&raw).unwrap(), parse_idx(&gz).unwrap());
        // A corrupted gzip stream is a format error.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        bad.truncate(n - 4);
        assert!(matches!(parse_idx(&bad), Err(Error::Format { .. })));
    }
}
