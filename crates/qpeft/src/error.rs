//! One error type for the library. Every variant names what the user has to look at: the file,
//! the field or tensor, and the offending value, so a bad input never ends in a bare panic.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file exists but its bytes do not follow the format (truncated, corrupt, inconsistent).
    #[error("{}: {msg}", file.display())]
    Format { file: PathBuf, msg: String },
    /// A configuration value is missing or invalid.
    #[error("{}: field `{field}`: {msg}", file.display())]
    Config { file: PathBuf, field: String, msg: String },
    /// Something well-formed that qpeft does not implement (an architecture, a tensor type).
    #[error("{}: unsupported {what}", file.display())]
    Unsupported { file: PathBuf, what: String },
    /// (The I/O error is part of the message and deliberately not a `source`, which error reporters would print
    /// a second time.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// Wrong arguments from a caller (shapes, token ids, options).
    #[error("{0}")]
    Invalid(String),
    /// The accelerator failed, whatever the input: its driver or libraries are missing, a driver or cuBLAS call
    /// failed, a kernel did not compile, or its memory ran out. `what` names what was attempted.
    #[error("{what}: {msg}")]
    Device { kind: DeviceFailure, what: String, msg: String },
    /// The work was asked to stop (SIGINT or SIGTERM) and stopped at a safe point; nothing unfinished was written.
    #[error("interrupted")]
    Interrupted,
}

/// Why a device call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFailure {
    /// No such device, or its driver or libraries cannot be loaded.
    Unavailable,
    /// A driver, cuBLAS or kernel-launch call returned an error.
    Driver,
    /// The run-time compilation of the kernels failed.
    Compile,
    /// An allocation did not fit the device's free memory.
    OutOfMemory,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(file: &Path, msg: impl Into<String>) -> Self {
        Error::Format { file: file.to_path_buf(), msg: msg.into() }
    }
    pub fn config(file: &Path, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { file: file.to_path_buf(), field: field.into(), msg: msg.into() }
    }
    pub fn unsupported(file: &Path, what: impl Into<String>) -> Self {
        Error::Unsupported { file: file.to_path_buf(), what: what.into() }
    }
    pub fn device(kind: DeviceFailure, what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Device { kind, what: what.into(), msg: msg.to_string() }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), err: source }
    }
}
