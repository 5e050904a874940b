//! The config types. Their `Deserialize` impls live in `de.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::listen::Listen;
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
/// Where `hotcopy serve` listens for JSON-RPC when neither the config nor `--rpc-socket` says.
/// `/var/tmp` rather than `/run`: the daemon runs unprivileged in tests and on developer
/// machines, and `/var/tmp` survives reboots no worse than the socket's own stale-file check.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/hotcopy.sock";
/// Where an export listens when it names no `listen:`: loopback on NBD's IANA port.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
/// Longest NBD export name (the protocol's limit on a name in `NBD_OPT_GO`).
pub const MAX_EXPORT_NAME: usize = 4096;
/// A change-tracking store's offset must be a multiple of this (its header is one 4 KiB block).
pub const TRACKING_ALIGN: u64 = 4096;

/// A whole hotcopy config file. See the [crate docs](crate) for the YAML schema.
///
/// Its `Deserialize` impl checks everything [`load`](crate::load) checks, but its errors
/// carry no line numbers for semantic problems; use [`load`](crate::load) or
/// [`parse_str`](crate::parse_str) to read config files.
///
/// It serializes back to the YAML it was read from (a cow bdev's `tracking:` inside its own
/// entry of `bdevs:`; `rpc_socket:` and `exports:` only when set).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// Reactor threads (one per CPU).
    pub reactors: ReactorsConfig,
    /// The I/O buffer pool.
    pub buffer_pool: BufferPoolConfig,
    /// The block devices, in file order.
    pub bdevs: Vec<NamedBdev>,
    /// `rpc_socket:` the Unix socket `hotcopy serve` takes JSON-RPC on (`None`: the
    /// `--rpc-socket` flag, else [`DEFAULT_RPC_SOCKET`]).
    pub rpc_socket: Option<PathBuf>,
    /// `exports:` the bdevs `hotcopy serve` exports over NBD.
    pub exports: Vec<ExportConfig>,
    /// Change tracking of cow bdevs, by the cow bdev's name. Written as `tracking:` in the cow
    /// bdev's entry of `bdevs:`.
    pub tracking: BTreeMap<String, TrackingConfig>,
}

/// One entry of `exports:`: a bdev served over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportConfig {
    /// The export name clients ask for (`NBD_OPT_GO`). Default: the bdev's name.
    pub name: String,
    /// The bdev exported (an entry of `bdevs:`).
    pub bdev: String,
    /// `HOST:PORT` or `unix:PATH`. Default: [`DEFAULT_NBD_LISTEN`].
    pub listen: Listen,
    /// Refuse writes, trims and write-zeroes. Default: false.
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// `tracking:` of a cow bdev: where its changed-block tracking is kept across restarts, so
/// that the first incremental after a clean restart copies only the chunks written since the
/// last backup. A crash or a power cut makes the store untrusted (the next backup is full).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackingConfig {
    /// The bdev holding the store: the name of another entry of `bdevs:` (not one stacked
    /// under or over the cow bdev, and not the base of any bdev), or an anonymous bdev written
    /// as a spec string (`uring:/var/tmp/vol.cbt@1M`) or an inline mapping.
    pub bdev: BaseRef,
    /// Byte offset of the store on that bdev: a multiple of 4096. Default: 0.
    pub offset: ByteSize,
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
        /// Write zeros over the part of the file that `size` creates or
        /// extends, so its blocks exist before the first writes reach them
        /// (default false: that part stays sparse).
        #[serde(skip_serializing_if = "is_false")]
        preallocate: bool,
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

/// A `bdevs:` entry as written: the bdev and, for a cow bdev, its `tracking:`.
#[derive(Serialize)]
struct BdevEntry<'a> {
    name: &'a str,
    #[serde(flatten)]
    bdev: &'a BdevConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracking: Option<&'a TrackingConfig>,
}

impl Serialize for Config {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let extra = usize::from(self.rpc_socket.is_some()) + usize::from(!self.exports.is_empty());
        let mut map = serializer.serialize_map(Some(3 + extra))?;
        map.serialize_entry("reactors", &self.reactors)?;
        map.serialize_entry("buffer_pool", &self.buffer_pool)?;
        let bdevs: Vec<BdevEntry<'_>> = self
            .bdevs
            .iter()
            .map(|b| BdevEntry {
                name: &b.name,
                bdev: &b.bdev,
                tracking: self.tracking.get(&b.name),
            })
            .collect();
        map.serialize_entry("bdevs", &bdevs)?;
        if let Some(sock) = &self.rpc_socket {
            map.serialize_entry("rpc_socket", sock)?;
        }
        if !self.exports.is_empty() {
            map.serialize_entry("exports", &self.exports)?;
        }
        map.end()
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

    /// Every bdev in an order that creates each one after its base and after the bdev that
    /// holds its change-tracking store (a cow bdev opens its tracking before it takes writes).
    /// Otherwise like [`Config::build_order`]: file order, inline bases not listed, never
    /// loops (on a cycle, the bdevs on it come in file order).
    pub fn creation_order(&self) -> Vec<&NamedBdev> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, b) in self.bdevs.iter().enumerate() {
            index.entry(b.name.as_str()).or_insert(i);
        }
        let deps = |i: usize| -> Vec<usize> {
            let b = &self.bdevs[i];
            let mut d = Vec::new();
            if let Some(j) = b.bdev.base_name().and_then(|n| index.get(n)) {
                d.push(*j);
            }
            if let Some(t) = self.tracking.get(&b.name) {
                let store = match &t.bdev {
                    BaseRef::Name(n) => Some(n.as_str()),
                    BaseRef::Inline(inner) => inner.base_name(),
                };
                if let Some(j) = store.and_then(|n| index.get(n)) {
                    d.push(*j);
                }
            }
            d
        };
        // 0 = not seen, 1 = being visited, 2 = emitted.
        let mut state = vec![0u8; self.bdevs.len()];
        let mut out = Vec::with_capacity(self.bdevs.len());
        for start in 0..self.bdevs.len() {
            // Iterative depth-first search: (bdev, its dependencies not yet visited).
            let mut stack: Vec<(usize, Vec<usize>)> = Vec::new();
            if state[start] == 0 {
                state[start] = 1;
                stack.push((start, deps(start)));
            }
            while let Some((i, pending)) = stack.last_mut() {
                match pending.pop() {
                    Some(j) if state[j] == 0 => {
                        state[j] = 1;
                        let d = deps(j);
                        stack.push((j, d));
                    }
                    Some(_) => {}
                    None => {
                        let i = *i;
                        state[i] = 2;
                        out.push(&self.bdevs[i]);
                        stack.pop();
                    }
                }
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
