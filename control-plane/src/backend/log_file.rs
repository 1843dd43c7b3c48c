//! A runtime's log file, bounded: past `max_bytes` it is renamed to `{name}.1` (replacing
//! the one before) and a new one begun, so a runtime that logs without end fills at most
//! twice that.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Largest runtime log before it is rotated (16 MiB; with the previous one, 32 MiB).
pub const MAX_LOG_BYTES: u64 = 16 << 20;

async fn open(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let len = file.metadata().await?.len();
    Ok((file, len))
}

/// The rotated file's name: `runtime.log` → `runtime.log.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Copies `from` (a runtime's stderr) into `path` until it ends, rotating as said above.
pub async fn copy_bounded(
    mut from: impl AsyncRead + Unpin,
    path: &Path,
    max_bytes: u64,
) -> std::io::Result<()> {
    let (mut file, mut written) = open(path).await?;
    let mut buffer = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return file.flush().await;
        }
        let mut chunk = &buffer[..n];
        while !chunk.is_empty() {
            if written >= max_bytes {
                file.flush().await?;
                tokio::fs::rename(path, rotated(path)).await?;
                (file, written) = open(path).await?;
            }
            let room =
                usize::try_from(max_bytes.saturating_sub(written).max(1)).unwrap_or(usize::MAX);
            let (now, rest) = chunk.split_at(chunk.len().min(room));
            file.write_all(now).await?;
            written += now.len() as u64;
            chunk = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_log_past_its_size_is_rotated_once_and_never_grows_past_twice_it() {
        let dir = std::env::temp_dir().join(format!("warren-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("runtime.log");
        // 100 lines of 100 bytes into a log of at most 1000 bytes.
        let lines: String = (0..100).map(|n| format!("{n:099}\n")).collect();
        copy_bounded(lines.as_bytes(), &path, 1000)
            .await
            .expect("copy");
        let current = std::fs::read_to_string(&path).expect("log");
        let previous = std::fs::read_to_string(rotated(&path)).expect("rotated");
        assert!(current.len() <= 1000 && previous.len() <= 1000);
        assert!(
            current.ends_with(&format!("{:099}\n", 99)),
            "the newest lines are in the current file"
        );
        assert!(!dir.join("runtime.log.2").exists());
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
