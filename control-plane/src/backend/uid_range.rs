//! Which uids a local root gives its workspaces: a range of [`RANGE`] uids of its own,
//! claimed machine-wide, so that two roots on one machine (two installations, parallel
//! tests) never hand out the same uid. A shared uid would let one root's workspace read the
//! other's files, and one root's clean-up kill the other's processes.
//!
//! A root's range is recorded in `{root}/uid-base`; the claim is a file `{base}` in
//! [`CLAIMS`] naming the root. A claim is stale (and taken over) when its root no longer
//! records that base, and it is older than a minute (a claim being made right now is not).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Where roots claim their ranges (root only: per-workspace users need root anyway).
pub const CLAIMS: &str = "/run/warren/uid-ranges";
/// The first range's base; the base itself is the workspaces' common group.
pub const FIRST_BASE: u32 = 420_000;
/// Uids per root: the base (the group) and one per workspace after it.
pub const RANGE: u32 = 1000;

/// The base of `root`'s range: the one it recorded, or the first free one, claimed.
pub fn base_for(root: &Path) -> std::io::Result<u32> {
    base_in(root, Path::new(CLAIMS))
}

/// [`base_for`] with the claims kept in `claims`.
pub fn base_in(root: &Path, claims: &Path) -> std::io::Result<u32> {
    let root = std::fs::canonicalize(root)?;
    std::fs::create_dir_all(claims)?;
    let recorded = root.join("uid-base");
    if let Some(base) = std::fs::read_to_string(&recorded)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        && claim(claims, base, &root)?
    {
        return Ok(base);
    }
    for n in 0..1000 {
        let base = FIRST_BASE + n * RANGE;
        if claim(claims, base, &root)? {
            std::fs::write(&recorded, format!("{base}\n"))?;
            return Ok(base);
        }
    }
    Err(std::io::Error::other(
        "no free uid range for the local backend's workspaces",
    ))
}

/// Claims `base` for `root`; false when another live root holds it.
fn claim(claims: &Path, base: u32, root: &Path) -> std::io::Result<bool> {
    let path = claims.join(base.to_string());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(root.as_os_str().as_encoded_bytes())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                if Path::new(&holder) == root {
                    return Ok(true);
                }
                if !is_stale(&path, Path::new(&holder), base) {
                    return Ok(false);
                }
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

fn is_stale(claim: &Path, holder: &Path, base: u32) -> bool {
    let still_recorded = std::fs::read_to_string(holder.join("uid-base"))
        .is_ok_and(|t| t.trim() == base.to_string());
    let old = std::fs::metadata(claim)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(60));
    !still_recorded && old
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_roots_get_two_ranges_and_each_keeps_its_own() {
        let dir = std::env::temp_dir().join(format!("warren-uids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b, claims) = (dir.join("a"), dir.join("b"), dir.join("claims"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).expect("dir");
        }
        let base_a = base_in(&a, &claims).expect("a");
        let base_b = base_in(&b, &claims).expect("b");
        assert_ne!(base_a, base_b);
        assert_eq!(base_a.abs_diff(base_b) % RANGE, 0);
        assert_eq!(base_in(&a, &claims).expect("a again"), base_a, "kept");
        // A fresh claim of a root that is gone is not taken over (it may be being made)...
        std::fs::remove_dir_all(&a).expect("rm a");
        let c = dir.join("c");
        std::fs::create_dir_all(&c).expect("dir");
        assert_ne!(base_in(&c, &claims).expect("c"), base_a);
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
