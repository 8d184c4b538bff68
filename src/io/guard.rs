//! Opening paths that come from users: regular files only, read with a size cap.
//!
//! Opening a FIFO for reading blocks until a writer appears, and a device such as
//! `/dev/zero` never ends, so every path the crate reads is opened without blocking
//! (`O_NONBLOCK` on Linux, which regular files ignore), checked to be a regular file
//! through the open handle (no window between the check and the use), and read through
//! [`Read::take`] so that even a file that grows while it is read cannot exceed its cap.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::reader::io_err;
use crate::error::{Error, Result};

fn kind_of(ft: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (links are followed); `what` names
/// it in the error, e.g. "checkpoint file" or "merge config". Never blocks on a FIFO.
pub(crate) fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        // No O_NONBLOCK constant without libc here: refuse special files before opening.
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        if !meta.is_file() {
            return Err(not_regular(path, what, meta.file_type()));
        }
    }
    let file = opts.open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, what, meta.file_type()));
    }
    Ok((file, meta.len()))
}

fn not_regular(path: &Path, what: &str, ft: std::fs::FileType) -> Error {
    Error::invalid(
        what,
        format!(
            "`{}` is {}, not a regular file; only regular files are read",
            path.display(),
            kind_of(ft)
        ),
    )
}

/// Reads the whole regular file at `path`, refusing special files (FIFOs, devices,
/// sockets, directories) and files above `limit` bytes. The size is checked from the
/// metadata before reading and again by reading at most `limit + 1` bytes, so a file
/// that grows meanwhile cannot exhaust memory. `what` names the file in errors.
///
/// ```
/// use modelfusion::io::read_capped;
/// let p = std::env::temp_dir().join("modelfusion-doc-read-capped.yml");
/// std::fs::write(&p, "merge_method: linear\n")?;
/// assert_eq!(read_capped(&p, 1 << 20, "merge config")?.len(), 21);
/// let err = read_capped(&p, 8, "merge config").unwrap_err().to_string();
/// assert!(err.contains("limit of 8 bytes"), "{err}");
/// # #[cfg(unix)]
/// assert!(read_capped("/dev/zero", 1 << 20, "merge config").unwrap_err().to_string().contains("character device"));
/// # std::fs::remove_file(&p).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_capped(path: impl AsRef<Path>, limit: u64, what: &str) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let (file, len) = open_regular(path, what)?;
    let too_big = |n: u64| {
        Error::invalid(
            what,
            format!(
                "`{}` is {n} bytes or more, above the limit of {limit} bytes",
                path.display()
            ),
        )
    };
    if len > limit {
        return Err(too_big(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| io_err(path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}
