//! Crash-safe file replacement: every file the crate writes is first written under a
//! temporary dot-name in its target directory, flushed and fsynced, and only then renamed
//! over its final name (the directory is fsynced after). A rename replaces a directory
//! entry, so a symbolic or hard link at the final name is replaced, never written through.
//!
//! Temporary names are `.<final name>.mf-tmp-<pid>-<n>`: they start with a dot and do not
//! end in `.safetensors`, so no directory scan takes one for a checkpoint. Temporaries a
//! killed run left behind (their pid is no longer alive) are removed by the next write
//! into the same directory ([`clean_stale_temps`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::reader::io_err;
use crate::error::Result;

/// Marks a temporary file: `.<final name>.mf-tmp-<pid>-<n>`.
const TMP_TAG: &str = ".mf-tmp-";
/// Starts a backup link of a previous result's shard: `.mf-old-<pid>-<n>.<name>`.
pub(crate) const OLD_PREFIX: &str = ".mf-old-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The directory a file path lives in (`.` for a bare file name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh name for a backup link of `name` (which ends in `.safetensors`, so an index
/// may name the backup).
pub(crate) fn backup_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{OLD_PREFIX}{}.{name}", unique()))
}

/// Creates a new temporary file in `dir` for the final name `name`. It is created with
/// `O_EXCL` semantics, so it never opens an existing file or follows a link.
pub(crate) fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    let path = dir.join(format!(".{name}{TMP_TAG}{}", unique()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    Ok((path, file))
}

/// Writes `bytes` into a new fsynced temporary file in `dir` for the final name `name`
/// and returns its path (removed again on failure).
pub(crate) fn stage(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let (path, mut file) = create_temp(dir, name)?;
    match file.write_all(bytes).and_then(|()| file.sync_all()) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(io_err(&path, e))
        }
    }
}

/// Renames `from` over `to` (replacing whatever entry `to` is, link or file).
pub(crate) fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| io_err(to, e))
}

/// Fsyncs a directory, making the renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Replaces the file `path` by `bytes`: temporary file, fsync, rename, directory fsync.
/// A link at `path` is replaced, and the file it pointed to is left unchanged.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::Error::invalid("output file", format!("{}", path.display())))?;
    let tmp = stage(dir, name, bytes)?;
    if let Err(e) = rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// The pid in a temporary file's name, if `name` is one of ours.
fn temp_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let tail = &name[name.rfind(TMP_TAG)? + TMP_TAG.len()..];
    let (pid, n) = tail.split_once('-')?;
    (n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether process `pid` may still be running (and writing its temporaries).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        true // no cheap check: keep them
    }
}

/// Removes the temporaries that dead processes (killed runs) left in `dir`.
pub(crate) fn clean_stale_temps(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        if name
            .to_str()
            .and_then(temp_pid)
            .is_some_and(|pid| !alive(pid))
        {
            let p = entry.path();
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&p, e)),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(temp_pid(".model.safetensors.mf-tmp-123-4"), Some(123));
        assert_eq!(temp_pid(".config.json.mf-tmp-7-0"), Some(7));
        assert_eq!(temp_pid("model.safetensors.mf-tmp-123-4"), None);
        assert_eq!(temp_pid(".x.mf-tmp-123-"), None);
        assert_eq!(temp_pid(".x.mf-tmp-abc-1"), None);
        assert_eq!(
            temp_pid(".mf-old-1-2.model-00001-of-00002.safetensors"),
            None
        );
    }

    #[test]
    fn stale_temps_of_dead_pids_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 0 is never a user process: a dead run's temporary.
        let dead = dir.path().join(".model.safetensors.mf-tmp-0-0");
        std::fs::write(&dead, b"x").unwrap();
        let (mine, _f) = create_temp(dir.path(), "model.safetensors").unwrap();
        let other = dir.path().join("config.json");
        std::fs::write(&other, b"{}").unwrap();
        clean_stale_temps(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(mine.exists() && other.exists());
    }

    #[cfg(unix)]
    #[test]
    fn write_file_replaces_links() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"original").unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&target, &sym).unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&target, &hard).unwrap();
        write_file(&sym, b"new").unwrap();
        write_file(&hard, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"original");
        assert!(!std::fs::symlink_metadata(&sym).unwrap().is_symlink());
        assert_eq!(std::fs::read(&sym).unwrap(), b"new");
        assert_eq!(std::fs::read(&hard).unwrap(), b"new");
    }
}
