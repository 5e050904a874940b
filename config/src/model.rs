//! The config types. Their `Deserialize` impls live in `de.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::size::ByteSize;

/// Default block size of `null` and `malloc` bdevs.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// Smallest accepted block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted block size.
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Buffer sizes must be a multiple of this.
pub const BUFFER_ALIGN: u64 = 4096;
/// Reactor counts and CPU ids must be below this (the size of a Linux `cpu_set_t`).
pub const MAX_CPUS: usize = 1024;

/// A whole hotcopy config file. See the [crate docs](crate) for the YAML schema.
///
/// Its `Deserialize` impl checks everything [`load`](crate::load) checks, but its errors
/// carry no line numbers for semantic problems; use [`load`](crate::load) or
/// [`parse_str`](crate::parse_str) to read config files.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Config {
    /// Reactor threads (one per CPU).
    pub reactors: ReactorsConfig,
    /// The I/O buffer pool.
    pub buffer_pool: BufferPoolConfig,
    /// The block devices, in file order.
    pub bdevs: Vec<NamedBdev>,
}

/// The `reactors:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ReactorsConfig {
    /// Which CPUs run a reactor. Default: 1 (CPU 0).
    pub cores: CoreList,
    /// What an idle reactor does. Default: poll.
    pub idle: IdleMode,
}

/// `reactors.cores`: a count (`2` = CPUs 0 and 1) or an explicit CPU list (`[2, 3]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CoreList {
    /// Reactors on CPUs `0..n`.
    Count(usize),
    /// Reactors on exactly these CPUs.
    List(Vec<usize>),
}

impl Default for CoreList {
    fn default() -> Self {
        CoreList::Count(1)
    }
}

impl CoreList {
    /// The CPU ids to run reactors on, in order.
    pub fn cpus(&self) -> Vec<usize> {
        match self {
            CoreList::Count(n) => (0..*n).collect(),
            CoreList::List(list) => list.clone(),
        }
    }
}

/// `reactors.idle`: what a reactor does when it has no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleMode {
    /// Busy-poll (lowest latency, burns the CPU).
    #[default]
    Poll,
    /// Sleep briefly when idle.
    Sleep,
}

/// The `buffer_pool:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BufferPoolConfig {
    /// Whether to back the pool with huge pages. Default: auto.
    pub hugepages: HugepagesMode,
    /// Size of each buffer; a non-zero multiple of 4096. Default: 128KiB.
    pub buffer_size: ByteSize,
    /// Number of buffers; non-zero. Default: 1024.
    pub count: usize,
}

impl Default for BufferPoolConfig {
    fn default() -> Self {
        BufferPoolConfig {
            hugepages: HugepagesMode::Auto,
            buffer_size: ByteSize::kib(128),
            count: 1024,
        }
    }
}

/// `buffer_pool.hugepages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HugepagesMode {
    /// Use huge pages if available, else normal pages.
    #[default]
    Auto,
    /// Require huge pages (fail if unavailable).
    On,
    /// Never use huge pages.
    Off,
}

/// One entry of `bdevs:`: a name plus the type-specific body (`type:` and its fields, written
/// in the same mapping as `name:`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedBdev {
    /// Unique name, made of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The bdev itself.
    #[serde(flatten)]
    pub bdev: BdevConfig,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_true(v: &bool) -> bool {
    *v
}

/// A block device definition, tagged by its `type:` field.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BdevConfig {
    /// Discards writes, reads zeroes.
    Null {
        /// Capacity.
        size: ByteSize,
        /// Block size (default 512).
        block_size: u32,
    },
    /// RAM-backed.
    Malloc {
        /// Capacity.
        size: ByteSize,
        /// Block size (default 512).
        block_size: u32,
    },
    /// A file or block device driven through io_uring.
    Uring {
        /// File or device path.
        path: PathBuf,
        /// Create the file, or extend it, to this size if it is missing or smaller.
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<ByteSize>,
        /// Block size; `None` = detect (512 for regular files).
        #[serde(skip_serializing_if = "Option::is_none")]
        block_size: Option<u32>,
        /// Open with `O_DIRECT` (default true).
        #[serde(skip_serializing_if = "is_true")]
        direct: bool,
    },
    /// Forwards every I/O to its base unchanged.
    Passthru {
        /// The bdev underneath.
        base: BaseRef,
    },
    /// Copy-on-write backup module: passthrough while idle; online backups of
    /// its base by interception while a job runs.
    Cow {
        /// The source volume being protected.
        base: BaseRef,
    },
    /// Injects errors, latency and volatile-cache behaviour in front of its base.
    Fault {
        /// The bdev underneath.
        base: BaseRef,
        /// Probability in `[0, 1]` that a read fails.
        #[serde(skip_serializing_if = "is_zero_f64")]
        read_error_rate: f64,
        /// Probability in `[0, 1]` that a write fails.
        #[serde(skip_serializing_if = "is_zero_f64")]
        write_error_rate: f64,
        /// Microseconds added to every completion.
        #[serde(skip_serializing_if = "is_zero_u64")]
        latency_us: u64,
        /// Writes not yet flushed are lost on a simulated power cut.
        #[serde(skip_serializing_if = "is_false")]
        volatile_cache: bool,
    },
}

/// The base of a stacked bdev: the name of another entry of `bdevs:`, or an anonymous
/// bdev defined in place.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum BaseRef {
    /// `base: vol0`
    Name(String),
    /// `base: { type: malloc, size: 64MiB }`
    Inline(Box<BdevConfig>),
}

/// The names of the bdev types, as written in `type:`.
pub const BDEV_TYPES: [&str; 6] = ["null", "malloc", "uring", "passthru", "fault", "cow"];

impl BdevConfig {
    /// The `type:` name: `"null"`, `"malloc"`, `"uring"`, `"passthru"` or `"fault"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            BdevConfig::Null { .. } => "null",
            BdevConfig::Malloc { .. } => "malloc",
            BdevConfig::Uring { .. } => "uring",
            BdevConfig::Passthru { .. } => "passthru",
            BdevConfig::Fault { .. } => "fault",
            BdevConfig::Cow { .. } => "cow",
        }
    }

    /// The base of a stacked bdev (`passthru`, `fault`); `None` for leaf bdevs.
    pub fn base(&self) -> Option<&BaseRef> {
        match self {
            BdevConfig::Passthru { base }
            | BdevConfig::Cow { base }
            | BdevConfig::Fault { base, .. } => Some(base),
            _ => None,
        }
    }

    /// The name this bdev depends on, following inline bases down to the first named one.
    pub fn base_name(&self) -> Option<&str> {
        let mut cur = self;
        loop {
            match cur.base()? {
                BaseRef::Name(name) => return Some(name),
                BaseRef::Inline(inner) => cur = inner,
            }
        }
    }
}

impl Config {
    /// Serialize to YAML; [`parse_str`](crate::parse_str) on the result gives back an equal
    /// config.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self)
            .unwrap_or_else(|err| format!("# cannot serialize this config: {err}\n"))
    }

    /// The bdev called `name`.
    pub fn bdev(&self, name: &str) -> Option<&NamedBdev> {
        self.bdevs.iter().find(|b| b.name == name)
    }

    /// All bdevs, each after the bdev it uses as base (bases first). Otherwise keeps file
    /// order. Inline bases are part of their user and are not listed separately. Never loops,
    /// even on an unvalidated config with cycles; unknown base names are ignored.
    pub fn build_order(&self) -> Vec<&NamedBdev> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, b) in self.bdevs.iter().enumerate() {
            index.entry(b.name.as_str()).or_insert(i);
        }
        // 0 = not seen, 1 = on the current chain, 2 = emitted.
        let mut state = vec![0u8; self.bdevs.len()];
        let mut out = Vec::with_capacity(self.bdevs.len());
        for start in 0..self.bdevs.len() {
            let mut chain = Vec::new();
            let mut cur = Some(start);
            while let Some(i) = cur {
                if state[i] != 0 {
                    break;
                }
                state[i] = 1;
                chain.push(i);
                cur = self.bdevs[i]
                    .bdev
                    .base_name()
                    .and_then(|name| index.get(name).copied());
            }
            for i in chain.into_iter().rev() {
                state[i] = 2;
                out.push(&self.bdevs[i]);
            }
        }
        out
    }

    /// Check the semantic rules (unique names, known bases, no cycles, sizes, ...) on a config
    /// built in code. Errors have no line numbers; [`load`](crate::load) and
    /// [`parse_str`](crate::parse_str) run the same checks and add them.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        crate::check::check_config(self).map_err(|issue| issue.to_config_error("<config>"))
    }
}
