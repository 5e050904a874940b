//! Configuration for hotcopy: the YAML schema as serde types, validation with precise error
//! locations, and the `--bdev-spec` shorthand.
//!
//! Read a file with [`load`] (or text with [`parse_str`]); both parse **and** validate, and
//! every error says which file, line, column and field is wrong.
//!
//! # Schema reference
//!
//! ```yaml
//! reactors:                # optional; defaults shown
//!   cores: 1               # reactor count (CPUs 0..n) or explicit CPU ids: [0, 2]
//!   idle: poll             # poll (busy-poll) | sleep
//!
//! buffer_pool:             # optional; defaults shown
//!   hugepages: auto        # auto | on | off
//!   buffer_size: 128KiB    # non-zero multiple of 4096
//!   count: 1024            # non-zero
//!
//! bdevs:                   # list; names are unique, order does not matter for references
//!   - name: vol0           # letters, digits, '_', '.', '-'
//!     type: malloc         # RAM disk
//!     size: 1GiB           # required, non-zero, a multiple of block_size
//!     block_size: 512      # optional, default 512; power of two in 512..=65536
//!
//!   - name: nul
//!     type: null           # discards writes, reads zeroes; same fields as malloc
//!     size: 1GiB
//!
//!   - name: disk
//!     type: uring          # file or block device through io_uring
//!     path: /var/tmp/disk.img  # required
//!     size: 4GiB           # optional: create/extend the file to this size if smaller or missing
//!     block_size: 4096     # optional: default = detected (512 for regular files)
//!     direct: true         # optional, default true (O_DIRECT)
//!     preallocate: false   # optional: write zeros over what `size` creates or extends, so
//!                          # its blocks exist before the first writes (default false: sparse)
//!
//!   - name: pt
//!     type: passthru       # forwards I/O unchanged
//!     base: vol0           # the name of another bdev...
//!
//!   - name: flaky
//!     type: fault          # error/latency injection
//!     base:                # ...or an inline, anonymous bdev (a mapping with `type`, no `name`)
//!       type: malloc
//!       size: 64MiB
//!     read_error_rate: 0.0   # optional, in [0, 1]
//!     write_error_rate: 0.0  # optional, in [0, 1]
//!     latency_us: 0          # optional, added to every completion
//!     volatile_cache: false  # optional: unflushed writes are lost on a power cut
//!
//!   - name: vol
//!     type: cow            # copy-on-write backup module (online backups of its base)
//!     base: disk
//!     tracking:            # optional: changed-block tracking kept across clean restarts
//!       bdev: uring:/var/tmp/vol.cbt@1M  # a bdev name, a spec string, or an inline mapping
//!       offset: 0          # optional, default 0; a multiple of 4096
//!
//! rpc_socket: /var/tmp/hotcopy.sock  # optional: where `hotcopy serve` takes JSON-RPC
//!
//! exports:                 # optional: bdevs `hotcopy serve` exports over NBD
//!   - bdev: vol            # required: an entry of `bdevs:`
//!     name: vol            # optional: the export name clients ask for (default: the bdev's)
//!     listen: 127.0.0.1:10809  # optional, this default; HOST:PORT, [IPv6]:PORT or unix:PATH
//!     read_only: false     # optional, default false
//! ```
//!
//! **Tracking stores.** A store takes 4 KiB plus one bit per chunk (64 KiB chunks) rounded up
//! to 4 KiB. Its bdev must not be stacked under or over the cow bdev, nor be the base of any
//! bdev, nor be exported writable; two stores on one bdev need different offsets. **Exports.**
//! Each export's bdev must be defined; a writable export's bdev must not be the base of another
//! bdev (it is claimed); names are unique per listen address.
//!
//! **Sizes** are an integer number of bytes or a string with a case-insensitive suffix, with
//! an optional space: `4096`, `"4K"`, `512 MiB`, `1G`, `2TiB`. **All suffixes are binary**
//! (1024-based): `K` = `KB` = `KiB` = 1024, `M`/`MB`/`MiB` = 1024², `G`/`GB`/`GiB` = 1024³,
//! `T`/`TB`/`TiB` = 1024⁴. See [`ByteSize`].
//!
//! **Bases.** A `passthru` or `fault` bdev sits on a base, named or inline. A named bdev can be
//! the base of at most one other bdev, and references may not form cycles. Bdevs used as
//! bases are still listed in `bdevs:`; [`Config::build_order`] lists them before their users.
//!
//! Unknown or misplaced fields are errors (a `path:` on a `malloc` bdev, a misspelt
//! `blok_size:`), as are duplicate keys. Keywords (`type`, `idle`, `hugepages`) are
//! case-insensitive; `hugepages` also takes `true`/`false` for `on`/`off`. Reactor counts and
//! CPU ids must be below 1024. An empty file is the default config (no bdevs).
//!
//! # Errors
//!
//! [`ConfigError`] displays as `FILE:LINE:COLUMN: FIELD: MESSAGE`:
//!
//! ```text
//! config.yaml:7:11: bdevs[1].size: invalid size "12X": expected a number with an optional K/M/G/T suffix
//! config.yaml:12:11: bdevs[2].base: unknown bdev "vol9" (defined: vol0, pt)
//! config.yaml:3:9: reactors.idle: unknown variant "spin", expected one of poll, sleep
//! config.yaml:5:5: bdevs[0].blok_size: unknown field "blok_size", expected one of: name, type, size, block_size (did you mean "block_size"?)
//! config.yaml:4:11: bdevs[0].base: reference cycle: a -> b -> a
//! config.yaml:8:11: bdevs[2].name: duplicate bdev name "vol0" (first defined by bdevs[0] at line 2)
//! config.yaml:3:3: did not find expected '-' indicator, while parsing a block collection at line 2 column 3
//! cfg.yaml: cannot read config file: No such file or directory (os error 2)
//! ```
//!
//! Semantic errors (duplicate names, unknown bases, cycles, bad block sizes, ...) point at the
//! offending value in the file just like type errors do; misplaced or unknown fields point at
//! the key. Syntax errors have no field path. The fields of [`ConfigError`] give the same
//! information for programs, and [`ConfigError::kind`] says which kind of problem it is.
//!
//! # Bdev specs
//!
//! [`parse_spec`] turns a one-line spec into a [`BdevConfig`]: `malloc:1G`, `null:4G:4096`,
//! `uring:/var/tmp/disk.img@4G`, `passthru:fault:malloc:64M`. See [`SPEC_FORMS`].
//!
//! ```
//! let config = hotcopy_config::parse_str(
//!     "bdevs:\n  - {name: vol0, type: malloc, size: 1G}\n  - {name: pt, type: passthru, base: vol0}\n",
//!     "inline.yaml",
//! )
//! .unwrap();
//! let order: Vec<&str> = config.build_order().iter().map(|b| b.name.as_str()).collect();
//! assert_eq!(order, ["vol0", "pt"]);
//!
//! let err = hotcopy_config::parse_str("reactors:\n  idle: spin\n", "config.yaml").unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "config.yaml:2:9: reactors.idle: unknown variant \"spin\", expected one of poll, sleep"
//! );
//! ```

mod check;
mod de;
mod error;
mod listen;
mod locate;
mod model;
mod size;
mod spec;

use std::path::Path;

pub use error::{ConfigError, ErrorKind};
pub use listen::{Listen, MAX_UNIX_PATH};
pub use model::{
    BaseRef, BdevConfig, BufferPoolConfig, Config, CoreList, ExportConfig, HugepagesMode, IdleMode,
    NamedBdev, ReactorsConfig, TrackingConfig, BDEV_TYPES, BUFFER_ALIGN, DEFAULT_BLOCK_SIZE,
    DEFAULT_NBD_LISTEN, DEFAULT_RPC_SOCKET, MAX_BLOCK_SIZE, MAX_CPUS, MAX_EXPORT_NAME,
    MIN_BLOCK_SIZE, TRACKING_ALIGN,
};
pub use size::{ByteSize, ParseSizeError};
pub use spec::{parse_spec, SpecError, MAX_SPEC_DEPTH, SPEC_FORMS};

use error::Issue;

/// Read, parse and validate the config file at `path`. Errors name the file as `path` was
/// given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigError::io(&origin, &err))?;
    match String::from_utf8(bytes) {
        Ok(text) => parse_str(&text, &origin),
        Err(err) => {
            let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            Err(ConfigError {
                kind: ErrorKind::Syntax,
                file: origin,
                line: Some(line),
                column: Some(column),
                field: String::new(),
                message: "the file is not valid UTF-8".to_string(),
            })
        }
    }
}

/// Parse and validate config text. `origin` is the file name shown in errors.
pub fn parse_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    // Syntax first, so that YAML syntax errors are reported as such (with no field path)
    // wherever they are in the file.
    if let Err(err) = serde_yaml::from_str::<serde::de::IgnoredAny>(text) {
        return Err(yaml_error(origin, err, String::new(), ErrorKind::Syntax));
    }
    let raw: de::RawConfig = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
        text,
    ))
    .map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." { String::new() } else { field };
        yaml_error(origin, err.into_inner(), field, ErrorKind::Schema)
    })?;
    let config = raw
        .convert()
        .map_err(|issue| issue_error(origin, text, &issue, ErrorKind::Schema))?;
    check::check_config(&config)
        .map_err(|issue| issue_error(origin, text, &issue, ErrorKind::Invalid))?;
    Ok(config)
}

/// A located error from `serde_yaml`, with its own position and path text stripped from the
/// message (they are in the other fields).
fn yaml_error(origin: &str, err: serde_yaml::Error, field: String, kind: ErrorKind) -> ConfigError {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        message = message.replacen(&suffix, "", 1);
    }
    if let Some((head, tail)) = message.split_once(": ") {
        let path_like = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '[' | ']' | '?'));
        if head == field || path_like {
            message = tail.to_string();
        }
    }
    ConfigError {
        kind,
        file: origin.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        field,
        message,
    }
}

/// Locate a post-parse issue in `text`.
fn issue_error(origin: &str, text: &str, issue: &Issue, kind: ErrorKind) -> ConfigError {
    let position = locate::locate(text, &issue.path, issue.at_key);
    let message = issue.full_message(|path| locate::locate(text, path, false).map(|(l, _)| l));
    ConfigError {
        kind,
        file: origin.to_string(),
        line: position.map(|p| p.0),
        column: position.map(|p| p.1),
        field: issue.path.to_string(),
        message,
    }
}
