//! The fuzz targets' properties (fuzz/src/checks.rs) over every seed and every crash case
//! the fuzzer ever found (fuzz/seeds/, fuzz/regressions/): a case found once is replayed on
//! every test run. The fuzzing itself runs, bounded, in the drills (scripts/fuzz).

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn cases(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.expect("a directory entry").path();
            if path.is_file()
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(
        !found.is_empty(),
        "no cases for {target}: the seeds are missing"
    );
    found
}

fn replay(target: &str, check: fn(&[u8])) {
    for path in cases(target) {
        let data = std::fs::read(&path).expect("a case");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{} fails {target}'s checks", path.display());
        }
    }
}

#[test]
fn every_slack_case_holds() {
    replay("slack_request", checks::slack_request);
}

#[test]
fn every_webhook_case_holds() {
    replay("webhook_delivery", checks::webhook_delivery);
}
