//! Per-instance labels in a pool: replicas of one compose service (same image, same
//! environment) each find their own entry in `RUNNER_INSTANCE_LABELS`, as the seed's board
//! runners each had their own labels.
//!
//! The entry is found by key, in this order: `RUNNER_INSTANCE` when set; else this host's name
//! (compose's `hostname:`); else a replica index claimed at boot: the lowest `i` whose
//! `<RUNNER_LOCK_DIR>/instances/<i>.lock` this container can `flock`, held for its whole life,
//! so two live replicas never share an index and a crashed one's index is free at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `RUNNER_INSTANCE_LABELS`, parsed: `key:label,label;key:label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceLabels {
    pub table: Vec<(String, Vec<String>)>,
    /// `RUNNER_INSTANCE`, when given.
    pub explicit: Option<String>,
    /// Where replica indexes are claimed (`RUNNER_LOCK_DIR`).
    pub dir: PathBuf,
}

/// An instance's key and labels; `claim` holds the replica index's lock while it lives.
#[derive(Debug)]
pub struct Resolved {
    pub key: String,
    pub labels: Vec<String>,
    pub claim: Option<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("RUNNER_INSTANCE={0:?} has no entry in RUNNER_INSTANCE_LABELS (keys: {1})")]
    UnknownKey(String, String),
    #[error("every replica index of RUNNER_INSTANCE_LABELS ({0}) is claimed by a live container in {1}: more replicas than entries")]
    AllClaimed(String, PathBuf),
    #[error("failed to claim a replica index in {path}")]
    Claim {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `key:label,label;key:label`; `None` for a malformed table.
pub fn parse_table(v: &str) -> Option<Vec<(String, Vec<String>)>> {
    let mut table: Vec<(String, Vec<String>)> = Vec::new();
    for entry in v.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (key, labels) = entry.split_once(':')?;
        let key = key.trim();
        let labels: Vec<String> =
            labels.split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        let valid_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid_key
            || labels.is_empty()
            || labels.iter().any(|l| l.len() > 256 || l.contains(','))
            || table.iter().any(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            return None;
        }
        table.push((key.to_string(), labels));
    }
    (!table.is_empty()).then_some(table)
}

impl InstanceLabels {
    fn entry(&self, key: &str) -> Option<&(String, Vec<String>)> {
        self.table.iter().find(|(k, _)| k.eq_ignore_ascii_case(key))
    }

    fn keys(&self) -> String {
        self.table.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Finds this instance's entry (see the module doc), claiming a replica index if it comes
    /// to that.
    pub fn resolve(&self, hostname: &str) -> Result<Resolved, InstanceError> {
        if let Some(key) = &self.explicit {
            let (key, labels) = self.entry(key).ok_or_else(|| InstanceError::UnknownKey(key.clone(), self.keys()))?;
            return Ok(Resolved { key: key.clone(), labels: labels.clone(), claim: None });
        }
        if let Some((key, labels)) = self.entry(hostname) {
            return Ok(Resolved { key: key.clone(), labels: labels.clone(), claim: None });
        }
        let dir = self.dir.join("instances");
        let io = |source| InstanceError::Claim { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Every container's claim file must be lockable by the others (root or not).
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
        for (key, labels) in &self.table {
            if let Some(file) = try_claim(&dir, key).map_err(io)? {
                return Ok(Resolved { key: key.clone(), labels: labels.clone(), claim: Some(file) });
            }
        }
        Err(InstanceError::AllClaimed(self.keys(), dir))
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `<dir>/<key>.lock`: `Some` when this process now holds it.
fn try_claim(dir: &Path, key: &str) -> std::io::Result<Option<File>> {
    let path = dir.join(format!("{key}.lock"));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666));
    // SAFETY: flock on a valid, open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_parse_and_bad_ones_are_refused() {
        let t = parse_table("1: board, phytiumpi ;2:board,rk3568;").unwrap();
        assert_eq!(t[0], ("1".into(), vec!["board".into(), "phytiumpi".into()]));
        assert_eq!(t[1].0, "2");
        for bad in ["", "1", "1:", ":a", "a b:x", "1:a;1:b", "../x:a"] {
            assert!(parse_table(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn explicit_then_hostname_then_a_claimed_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = InstanceLabels {
            table: parse_table("1:a;2:b;box-7:c").unwrap(),
            explicit: Some("2".into()),
            dir: dir.path().to_path_buf(),
        };
        assert_eq!(t.resolve("box-7").unwrap().labels, vec!["b"]);
        t.explicit = Some("9".into());
        assert!(matches!(t.resolve("x"), Err(InstanceError::UnknownKey(..))));
        t.explicit = None;
        assert_eq!(t.resolve("BOX-7").unwrap().key, "box-7");
        // Two live replicas get two indexes; a third finds the hostname entry's lock free
        // too (it is a key like the others), a fourth finds none.
        let first = t.resolve("h1").unwrap();
        let second = t.resolve("h2").unwrap();
        assert_eq!((first.key.as_str(), second.key.as_str()), ("1", "2"));
        let third = t.resolve("h3").unwrap();
        assert_eq!(third.key, "box-7");
        assert!(matches!(t.resolve("h4"), Err(InstanceError::AllClaimed(..))));
        // A replica that goes away frees its index at once.
        drop(first);
        assert_eq!(t.resolve("h5").unwrap().key, "1");
    }
}
