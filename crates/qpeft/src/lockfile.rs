//! Lock files: one writer per run directory and per study cell. A lock is a file created exclusively that holds
//! "host pid", removed when its holder drops it. A lock whose holder is a process of this host that no longer exists
//! (killed, crashed) is stale and is taken over; one held by another host cannot be checked and is respected.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct LockFile {
    path: PathBuf,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Whether the holder written in a lock ("host pid") is a process of this host that is gone.
fn stale(owner: &str) -> bool {
    match owner.split_once(' ') {
        Some((h, pid)) => h == host() && !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        None => false,
    }
}

impl LockFile {
    /// Takes the lock at `path` for this process, or returns its holder ("host pid") if another live process holds
    /// it.
    pub fn try_acquire(path: &Path) -> Result<std::result::Result<LockFile, String>> {
        // Threads of one process (a study's workers) take locks one at a time: otherwise two of them could both judge
        // a stale lock stale, and the second remove the lock the first had just taken over.
        static ACQUIRING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = ACQUIRING.lock().unwrap_or_else(|e| e.into_inner());
        let mut owner = String::new();
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    write!(f, "{} {}", host(), std::process::id()).map_err(|e| Error::io(path, e))?;
                    return Ok(Ok(LockFile { path: path.to_path_buf() }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    owner = std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
                    if !stale(&owner) {
                        return Ok(Err(owner));
                    }
                    // Another process of this host may take the stale lock over first: then the next exclusive
                    // create finds its lock.
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
                        _ => {}
                    }
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Ok(Err(owner))
    }

    /// Takes the lock at `path` for writing `what`, or says who holds it.
    pub fn acquire(path: &Path, what: &Path) -> Result<LockFile> {
        LockFile::try_acquire(path)?.map_err(|owner| {
            let who = match owner.split_once(' ') {
                Some((h, pid)) => format!("process {pid} on host {h}"),
                None => "another process".to_string(),
            };
            Error::Invalid(format!(
                "{} is in use: {who} is writing it (lock file {}). Wait for it to finish; if that process is gone \
                 (another host, or a reused process id), remove the lock file",
                what.display(),
                path.display()
            ))
        })
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
