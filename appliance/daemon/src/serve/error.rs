//! The daemon's errors, and the one table that maps them to JSON-RPC codes.

use hotcopy_bdev::BdevError;

/// JSON-RPC 2.0: the request is not valid JSON.
pub const PARSE_ERROR: i32 = -32700;
/// JSON-RPC 2.0: valid JSON, but not a request object (or an empty batch).
pub const INVALID_REQUEST: i32 = -32600;
/// JSON-RPC 2.0: no method by that name.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// JSON-RPC 2.0: a parameter is missing, unknown or of the wrong kind.
pub const INVALID_PARAMS: i32 = -32602;
/// JSON-RPC 2.0: a bug in the daemon (a handler panicked); the daemon keeps serving.
pub const INTERNAL_ERROR: i32 = -32603;

/// Why a method failed. Each variant is one JSON-RPC code ([`ServeError::code`]); the message
/// says what was wrong, with the underlying error's text.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A parameter is missing, unknown, of the wrong type or out of range. The message starts
    /// with the parameter's name.
    #[error("{0}")]
    InvalidParams(String),
    /// The bdev, job, generation or restore named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object is in use: a job is running, the bdev is claimed, exported or a repository
    /// that a backup writes.
    #[error("{0}")]
    Busy(String),
    /// Something by that name exists already.
    #[error("{0}")]
    Exists(String),
    /// The operation was tried and failed (I/O, the module refused, ...).
    #[error("{0}")]
    Failed(String),
    /// The repository could not be read or written, or is damaged.
    #[error("{0}")]
    Repository(String),
    /// The daemon is stopping and takes no new work.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl ServeError {
    /// The JSON-RPC error code. Domain errors use the server range from -32000 down:
    ///
    /// | code | meaning |
    /// |---|---|
    /// | -32602 | invalid params |
    /// | -32000 | the operation failed |
    /// | -32001 | not found |
    /// | -32002 | busy: in use, claimed, a job running |
    /// | -32003 | already exists |
    /// | -32004 | repository error |
    /// | -32005 | shutting down |
    pub fn code(&self) -> i32 {
        match self {
            ServeError::InvalidParams(_) => INVALID_PARAMS,
            ServeError::Failed(_) => -32000,
            ServeError::NotFound(_) => -32001,
            ServeError::Busy(_) => -32002,
            ServeError::Exists(_) => -32003,
            ServeError::Repository(_) => -32004,
            ServeError::ShuttingDown => -32005,
        }
    }

    /// An invalid-params error about `param`: "`param`: why".
    pub fn param(param: &str, why: impl std::fmt::Display) -> ServeError {
        ServeError::InvalidParams(format!("{param}: {why}"))
    }
}

impl From<BdevError> for ServeError {
    fn from(e: BdevError) -> ServeError {
        match e {
            BdevError::NotFound { .. } => ServeError::NotFound(e.to_string()),
            BdevError::Exists(_) => ServeError::Exists(e.to_string()),
            BdevError::Claimed { .. } => ServeError::Busy(e.to_string()),
            BdevError::InvalidName(_) | BdevError::InvalidGeometry { .. } => {
                ServeError::InvalidParams(e.to_string())
            }
            BdevError::Create { .. } | BdevError::Channel { .. } => {
                ServeError::Failed(error_chain(&e))
            }
        }
    }
}

impl From<hotcopy_cow::repo::RepoError> for ServeError {
    fn from(e: hotcopy_cow::repo::RepoError) -> ServeError {
        use hotcopy_cow::repo::RepoError;
        match e {
            RepoError::NoSuchGeneration(_) => ServeError::NotFound(e.to_string()),
            RepoError::NotARepository => ServeError::Repository(format!(
                "{e}: a blank namespace becomes a repository with hotcopy_repo_format"
            )),
            e => ServeError::Repository(error_chain(&e)),
        }
    }
}

impl From<hotcopy_cow::repo_bdev::RepoBdevError> for ServeError {
    fn from(e: hotcopy_cow::repo_bdev::RepoBdevError) -> ServeError {
        use hotcopy_cow::repo_bdev::RepoBdevError;
        match e {
            RepoBdevError::Bdev(b) => b.into(),
            RepoBdevError::Repo { .. } | RepoBdevError::Checksum { .. } => {
                ServeError::Repository(error_chain(&e))
            }
            RepoBdevError::Invalid { .. } => ServeError::InvalidParams(e.to_string()),
            RepoBdevError::Reactor { .. } | RepoBdevError::Io { .. } => {
                ServeError::Failed(error_chain(&e))
            }
        }
    }
}

impl From<hotcopy_cow::CowError> for ServeError {
    fn from(e: hotcopy_cow::CowError) -> ServeError {
        use hotcopy_cow::CowError;
        match e {
            CowError::NotCow(_) | CowError::Config(_) => ServeError::InvalidParams(e.to_string()),
            CowError::Busy(_) => ServeError::Busy(e.to_string()),
            CowError::Target(_) => ServeError::Repository(error_chain(&e)),
            CowError::Start(_) => ServeError::Failed(e.to_string()),
        }
    }
}

/// An error and its sources, `outer: inner: innermost` (each said once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

pub type Result<T, E = ServeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_the_server_range() {
        let all = [
            ServeError::InvalidParams(String::new()),
            ServeError::Failed(String::new()),
            ServeError::NotFound(String::new()),
            ServeError::Busy(String::new()),
            ServeError::Exists(String::new()),
            ServeError::Repository(String::new()),
            ServeError::ShuttingDown,
        ];
        let mut codes: Vec<i32> = all.iter().map(ServeError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for e in &all[1..] {
            assert!((-32099..=-32000).contains(&e.code()), "{e:?}");
        }
    }

    #[test]
    fn bdev_errors_map_by_kind() {
        let e: ServeError = BdevError::Exists("a".into()).into();
        assert_eq!(e.code(), -32003);
        let e: ServeError = BdevError::Claimed {
            bdev: "a".into(),
            by: "b".into(),
        }
        .into();
        assert_eq!(e.code(), -32002);
        assert!(e.to_string().contains("claimed by \"b\""));
    }
}
