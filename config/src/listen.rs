//! Listen addresses of exports: `HOST:PORT` (TCP) or `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// Where a server listens.
///
/// ```
/// use hotcopy_config::Listen;
/// let tcp: Listen = "127.0.0.1:10809".parse().unwrap();
/// assert_eq!(tcp, Listen::Tcp { host: "127.0.0.1".into(), port: 10809 });
/// let v6: Listen = "[::1]:10809".parse().unwrap();
/// assert_eq!(v6.to_string(), "[::1]:10809");
/// let unix: Listen = "unix:/run/hotcopy/nbd.sock".parse().unwrap();
/// assert_eq!(unix, Listen::Unix("/run/hotcopy/nbd.sock".into()));
/// assert!("10809".parse::<Listen>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Listen {
    /// A TCP address: an IP address or a host name, and a port (1..=65535).
    Tcp {
        /// `127.0.0.1`, `::1` (written `[::1]:PORT`), `localhost`, ...
        host: String,
        port: u16,
    },
    /// A Unix stream socket at this path.
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "invalid listen address {s:?}: the socket path after \"unix:\" is empty"
                ));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "invalid listen address {s:?}: a Unix socket path is at most {MAX_UNIX_PATH} bytes, this one has {}",
                    path.len()
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let expected = "expected HOST:PORT (e.g. 127.0.0.1:10809) or unix:PATH";
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("invalid listen address {s:?}: {expected}"));
        };
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(|| {
                format!("invalid listen address {s:?}: unbalanced '[' around an IPv6 address")
            })?,
            None if host.contains(':') => {
                let why = "write an IPv6 address in brackets, e.g. [::1]:10809";
                return Err(format!("invalid listen address {s:?}: {why}"));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(format!(
                "invalid listen address {s:?}: the host is empty; {expected}"
            ));
        }
        let host_ok = host.parse::<std::net::IpAddr>().is_ok()
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
        if !host_ok {
            return Err(format!(
                "invalid listen address {s:?}: {host:?} is neither an IP address nor a host name"
            ));
        }
        let port: u16 = port.parse().map_err(|_| {
            format!("invalid listen address {s:?}: the port {port:?} is not a number in 1..=65535")
        })?;
        if port == 0 {
            return Err(format!(
                "invalid listen address {s:?}: port 0 is not a fixed port clients can connect to"
            ));
        }
        Ok(Listen::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Listen::Tcp { host, port } => write!(f, "{host}:{port}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Default for Listen {
    fn default() -> Self {
        crate::model::DEFAULT_NBD_LISTEN
            .parse()
            .unwrap_or(Listen::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_round_trips() {
        for s in [
            "127.0.0.1:10809",
            "localhost:1",
            "[::1]:10809",
            "[fe80::1]:65535",
            "unix:/tmp/a.sock",
            "unix:relative.sock",
        ] {
            let l: Listen = s.parse().unwrap();
            assert_eq!(l.to_string(), s);
        }
        assert_eq!(
            Listen::default(),
            Listen::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            }
        );
    }

    #[test]
    fn bad_addresses_say_why() {
        for (s, why) in [
            ("10809", "expected HOST:PORT"),
            (":10809", "the host is empty"),
            ("h:0", "port 0"),
            ("h:70000", "not a number in 1..=65535"),
            ("h:x", "not a number"),
            ("::1:80", "brackets"),
            ("[::1:80", "unbalanced"),
            ("bad host:80", "neither an IP address nor a host name"),
            ("unix:", "is empty"),
        ] {
            let e = s.parse::<Listen>().unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
        let long = format!("unix:/{}", "x".repeat(200));
        assert!(long.parse::<Listen>().unwrap_err().contains("at most"));
    }
}
