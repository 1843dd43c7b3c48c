//! Files for the agents' tools (`file_read`, `file_write`, `file_list`): in the workspace's
//! directory or the directory every workspace shares, and nowhere else.
//!
//! A path is relative to one of the two roots. An absolute path or a `..` is refused before
//! anything is opened ([`components`], pure). Then the path is walked one component at a
//! time from the root with `openat(O_NOFOLLOW)`, so no symlink is followed, wherever it
//! points, and a symlink swapped in while the walk runs is refused too: there is no moment
//! between a check and an open for it to slip into. Reads and writes are bounded.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat};
use serde::Serialize;

/// Most bytes `file_read` returns (a larger file is refused, not cut).
pub const MAX_READ_BYTES: i64 = 256 << 10;
/// Most bytes `file_write` writes.
pub const MAX_WRITE_BYTES: usize = 1 << 20;
/// Most entries `file_list` returns.
pub const MAX_LIST: usize = 500;
/// Longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a file tool did nothing.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path breaks a rule (it says which): nothing was opened.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io { path: String, source: Errno },
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub bytes: i64,
}

/// A listing, at most [`MAX_LIST`] entries in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub entries: Vec<Entry>,
    pub truncated: bool,
}

/// The components of a relative path: `.` and empty ones dropped; an absolute path, a `..`,
/// a NUL or an overlong path refused. Pure.
pub fn components(path: &str) -> Result<Vec<&str>, FileError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(FileError::Refused(format!(
            "the path is longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    if path.starts_with('/') {
        return Err(FileError::Refused(
            "absolute paths are refused: give a path inside the directory".into(),
        ));
    }
    if path.contains('\0') {
        return Err(FileError::Refused("the path contains a NUL byte".into()));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(FileError::Refused(
            "`..` is refused: paths stay inside the directory".into(),
        ));
    }
    Ok(parts)
}

fn io(path: &str) -> impl Fn(Errno) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory `dirs` below `root`, walked without following a symlink; missing ones are
/// made when `create`.
fn open_dir(root: &Path, dirs: &[&str], create: bool, path: &str) -> Result<OwnedFd, FileError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut fd = open(root, flags, Mode::empty()).map_err(io(path))?;
    for dir in dirs {
        let next = match openat(&fd, *dir, flags | OFlag::O_NOFOLLOW, Mode::empty()) {
            Err(Errno::ENOENT) if create => {
                match mkdirat(&fd, *dir, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io(path)(e)),
                }
                openat(&fd, *dir, flags | OFlag::O_NOFOLLOW, Mode::empty())
            }
            other => other,
        };
        fd = next.map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => FileError::Refused(format!(
                "{dir} in {path} is a symlink or not a directory: symlinks are not followed"
            )),
            e => io(path)(e),
        })?;
    }
    Ok(fd)
}

/// The last component of a file path, and the directories before it.
fn split<'a>(parts: &'a [&'a str]) -> Result<(&'a [&'a str], &'a str), FileError> {
    match parts.split_last() {
        Some((last, dirs)) => Ok((dirs, last)),
        None => Err(FileError::Refused("a file path is needed".into())),
    }
}

fn open_file(dir: &OwnedFd, name: &str, flags: OFlag, path: &str) -> Result<OwnedFd, FileError> {
    openat(
        dir,
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| match e {
        Errno::ELOOP => {
            FileError::Refused(format!("{path} is a symlink: symlinks are not followed"))
        }
        e => io(path)(e),
    })
}

/// The text of the file at `path` below `root`.
pub fn read(root: &Path, path: &str) -> Result<String, FileError> {
    let parts = components(path)?;
    let (dirs, name) = split(&parts)?;
    let dir = open_dir(root, dirs, false, path)?;
    let fd = open_file(&dir, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, path)?;
    let stat = fstat(&fd).map_err(io(path))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(FileError::Refused(format!("{path} is not a regular file")));
    }
    if stat.st_size > MAX_READ_BYTES {
        return Err(FileError::Refused(format!(
            "{path} has {} bytes; at most {MAX_READ_BYTES} are read",
            stat.st_size
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_READ_BYTES as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| io(path)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    String::from_utf8(bytes).map_err(|_| FileError::Refused(format!("{path} is not UTF-8 text")))
}

/// Writes `content` to `path` below `root` (replacing it; its directories are made).
/// Returns the bytes written.
pub fn write(root: &Path, path: &str, content: &str) -> Result<usize, FileError> {
    if content.len() > MAX_WRITE_BYTES {
        return Err(FileError::Refused(format!(
            "{} bytes; at most {MAX_WRITE_BYTES} are written",
            content.len()
        )));
    }
    write_bytes(root, path, content.as_bytes())
}

/// Writes `content` to `path` below `root` as [`write`] does, without its size limit: for
/// the runtime's own writes (a message's attached files), not an agent's.
pub fn write_bytes(root: &Path, path: &str, content: &[u8]) -> Result<usize, FileError> {
    let parts = components(path)?;
    let (dirs, name) = split(&parts)?;
    let dir = open_dir(root, dirs, true, path)?;
    let fd = open_file(
        &dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
        path,
    )?;
    std::fs::File::from(fd)
        .write_all(content)
        .map_err(|e| io(path)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(content.len())
}

/// The entries of the directory at `path` below `root` (`""`: the root itself).
pub fn list(root: &Path, path: &str) -> Result<Listing, FileError> {
    let parts = components(path)?;
    let dir = open_dir(root, &parts, false, path)?;
    let mut names: Vec<String> = nix::dir::Dir::from_fd(
        dir.try_clone()
            .map_err(|e| io(path)(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?,
    )
    .map_err(io(path))?
    .iter()
    .filter_map(Result::ok)
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n != "." && n != "..")
    .collect();
    names.sort();
    let truncated = names.len() > MAX_LIST;
    names.truncate(MAX_LIST);
    let entries = names
        .into_iter()
        .map(|name| {
            let stat = fstatat(
                &dir,
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            let (kind, bytes) = match stat {
                Ok(s) => {
                    let kind = match SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT {
                        SFlag::S_IFREG => "file",
                        SFlag::S_IFDIR => "dir",
                        SFlag::S_IFLNK => "symlink",
                        _ => "other",
                    };
                    (kind, s.st_size)
                }
                Err(_) => ("other", 0),
            };
            Entry { name, kind, bytes }
        })
        .collect();
    Ok(Listing { entries, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("warren-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn paths_are_relative_and_stay_inside() {
        assert_eq!(components("a/./b//c.txt").expect("ok"), ["a", "b", "c.txt"]);
        assert!(components("").expect("root").is_empty());
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "a\0b"] {
            assert!(
                matches!(components(bad), Err(FileError::Refused(_))),
                "{bad:?} refused"
            );
        }
        assert!(components(&"a/".repeat(3000)).is_err(), "overlong");
    }

    #[test]
    fn a_file_written_is_read_back_and_listed() {
        let root = root("rw");
        assert_eq!(
            write(&root, "notes/plan.md", "ship it\n").expect("write"),
            8
        );
        assert_eq!(read(&root, "notes/plan.md").expect("read"), "ship it\n");
        let listing = list(&root, "notes").expect("list");
        assert_eq!(
            listing.entries,
            [Entry {
                name: "plan.md".into(),
                kind: "file",
                bytes: 8
            }]
        );
        assert!(!listing.truncated);
        assert_eq!(list(&root, "").expect("root").entries[0].kind, "dir");
        assert!(
            matches!(read(&root, "notes"), Err(FileError::Refused(_))),
            "a directory"
        );
        assert!(matches!(
            read(&root, "missing.txt"),
            Err(FileError::Io { .. })
        ));
        let big = "x".repeat(MAX_WRITE_BYTES + 1);
        assert!(matches!(
            write(&root, "big", &big),
            Err(FileError::Refused(_))
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn symlinks_are_not_followed_out_of_the_directory() {
        let root = root("links");
        let outside = root.with_extension("outside");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("secret"), "key").expect("secret");
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("dir link");
        std::os::unix::fs::symlink(outside.join("secret"), root.join("secret")).expect("link");
        for (what, result) in [
            (
                "a file through a linked directory",
                read(&root, "escape/secret").err(),
            ),
            ("a linked file", read(&root, "secret").err()),
            (
                "a write through a linked directory",
                write(&root, "escape/new", "x").err(),
            ),
            (
                "a write over a linked file",
                write(&root, "secret", "x").err(),
            ),
            (
                "a listing of a linked directory",
                list(&root, "escape").err(),
            ),
        ] {
            assert!(
                matches!(result, Some(FileError::Refused(ref m)) if m.contains("symlink")),
                "{what}: {result:?}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).expect("kept"),
            "key"
        );
        assert!(!outside.join("new").exists(), "nothing written outside");
        let kinds: Vec<&str> = list(&root, "")
            .expect("list")
            .entries
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["symlink", "symlink"], "listed, not followed");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
