//! Semantic validation of a parsed [`Config`].

use std::collections::HashMap;

use crate::error::{FieldPath, Issue};
use crate::model::*;

/// Check every rule; the first problem found is returned. Order: reactors, buffer pool, each
/// bdev's own fields (in file order), duplicate names, base references, cycles, tracking
/// stores, the RPC socket, exports.
pub(crate) fn check_config(config: &Config) -> Result<(), Issue> {
    check_reactors(&config.reactors)?;
    check_pool(&config.buffer_pool)?;
    let list = FieldPath::root().key("bdevs");
    for (i, b) in config.bdevs.iter().enumerate() {
        let path = list.index(i);
        check_name(&b.name, &path.key("name"))?;
        check_body(&b.bdev, &path)?;
    }
    check_references(config, &list)?;
    check_tracking(config, &list)?;
    check_rpc_socket(config)?;
    check_exports(config)
}

/// The named bdevs under `name`, following bases (named or inline) down; `name` first.
fn stack_below<'a>(config: &'a Config, name: &'a str) -> Vec<&'a str> {
    let mut out = vec![name];
    let mut cur = name;
    while let Some(next) = config.bdev(cur).and_then(|b| b.bdev.base_name()) {
        if out.contains(&next) || out.len() > config.bdevs.len() {
            break;
        }
        out.push(next);
        cur = next;
    }
    out
}

/// Whether some bdev of `config` uses `name` as its (named) base.
fn user_of<'a>(config: &'a Config, name: &str) -> Option<&'a str> {
    config
        .bdevs
        .iter()
        .find(|b| b.bdev.base_name() == Some(name))
        .map(|b| b.name.as_str())
}

fn check_tracking(config: &Config, list: &FieldPath) -> Result<(), Issue> {
    // (store bdev, offset) -> the path of the first tracking that uses it.
    let mut stores: HashMap<(&str, u64), FieldPath> = HashMap::new();
    for (cow, t) in &config.tracking {
        let i = config.bdevs.iter().position(|b| &b.name == cow);
        let path = match i {
            Some(i) => list.index(i).key("tracking"),
            None => FieldPath::root().key("tracking").key(cow),
        };
        match config.bdev(cow).map(|b| &b.bdev) {
            Some(BdevConfig::Cow { .. }) => {}
            Some(other) => {
                return Err(Issue::new(
                    path,
                    format!(
                        "change tracking belongs to cow bdevs; {cow:?} is a {} bdev",
                        other.type_name()
                    ),
                ))
            }
            None => return Err(Issue::new(path, format!("unknown cow bdev {cow:?}"))),
        }
        if !t.offset.bytes().is_multiple_of(TRACKING_ALIGN) {
            return Err(Issue::new(
                path.key("offset"),
                format!(
                    "offset {} is not a multiple of {TRACKING_ALIGN} (the store's header is one \
                     4 KiB block)",
                    t.offset.bytes()
                ),
            ));
        }
        let store = match &t.bdev {
            BaseRef::Inline(inner) => {
                check_body(inner, &path.key("bdev"))?;
                match inner.base_name() {
                    // An anonymous store stacked on a named bdev: that one must be free too.
                    Some(n) => n,
                    None => continue,
                }
            }
            BaseRef::Name(n) => n.as_str(),
        };
        let at = path.key("bdev");
        if config.bdev(store).is_none() {
            let names: Vec<&str> = config.bdevs.iter().map(|b| b.name.as_str()).collect();
            return Err(Issue::new(
                at,
                format!("unknown bdev {store:?} (defined: {})", names.join(", ")),
            ));
        }
        if stack_below(config, cow).contains(&store) {
            return Err(Issue::new(
                at,
                format!(
                    "bdev {store:?} is under the cow bdev {cow:?}: the tracking of its writes \
                     cannot be kept on the volume itself"
                ),
            ));
        }
        if stack_below(config, store).contains(&cow.as_str()) {
            return Err(Issue::new(
                at,
                format!("bdev {store:?} is stacked on the cow bdev {cow:?}"),
            ));
        }
        if let Some(user) = user_of(config, store) {
            return Err(Issue::new(
                at,
                format!(
                    "bdev {store:?} is the base of {user:?}, which claims it: the tracking store \
                     needs a bdev nothing else writes"
                ),
            ));
        }
        if let Some(e) = config
            .exports
            .iter()
            .find(|e| e.bdev == store && !e.read_only)
        {
            return Err(Issue::new(
                at,
                format!(
                    "bdev {store:?} is exported writable as {:?}: the tracking store needs a bdev \
                     nothing else writes",
                    e.name
                ),
            ));
        }
        if matches!(t.bdev, BaseRef::Name(_)) {
            if let Some(first) = stores.get(&(store, t.offset.bytes())) {
                return Err(Issue::new(
                    at,
                    format!(
                        "another cow bdev keeps its tracking on {store:?} at offset {}; give \
                         each store its own offset",
                        t.offset.bytes()
                    ),
                )
                .with_note("first used by", first.clone()));
            }
            stores.insert((store, t.offset.bytes()), at);
        }
    }
    Ok(())
}

fn check_rpc_socket(config: &Config) -> Result<(), Issue> {
    let Some(p) = &config.rpc_socket else {
        return Ok(());
    };
    let path = FieldPath::root().key("rpc_socket");
    let len = p.as_os_str().len();
    if len == 0 {
        return Err(Issue::new(path, "rpc_socket is empty"));
    }
    if len > crate::listen::MAX_UNIX_PATH {
        return Err(Issue::new(
            path,
            format!(
                "a Unix socket path is at most {} bytes; this one has {len}",
                crate::listen::MAX_UNIX_PATH
            ),
        ));
    }
    Ok(())
}

fn check_exports(config: &Config) -> Result<(), Issue> {
    let list = FieldPath::root().key("exports");
    let mut seen: HashMap<(String, &str), usize> = HashMap::new();
    for (i, e) in config.exports.iter().enumerate() {
        let path = list.index(i);
        if e.name.is_empty() {
            return Err(Issue::new(path.key("name"), "the export name is empty"));
        }
        if e.name.len() > MAX_EXPORT_NAME || e.name.chars().any(char::is_control) {
            return Err(Issue::new(
                path.key("name"),
                format!(
                    "invalid export name {:?}: at most {MAX_EXPORT_NAME} bytes, no control \
                     characters",
                    e.name
                ),
            ));
        }
        if config.bdev(&e.bdev).is_none() {
            let names: Vec<&str> = config.bdevs.iter().map(|b| b.name.as_str()).collect();
            let defined = if names.is_empty() {
                "no bdevs are defined".to_string()
            } else {
                format!("defined: {}", names.join(", "))
            };
            return Err(Issue::new(
                path.key("bdev"),
                format!("unknown bdev {:?} ({defined})", e.bdev),
            ));
        }
        if !e.read_only {
            if let Some(user) = user_of(config, &e.bdev) {
                return Err(Issue::new(
                    path.key("bdev"),
                    format!(
                        "bdev {:?} is the base of {user:?}, which claims it: export {user:?} \
                         instead, or set `read_only: true`",
                        e.bdev
                    ),
                ));
            }
        }
        let key = (e.listen.to_string(), e.name.as_str());
        if let Some(&j) = seen.get(&key) {
            return Err(Issue::new(
                path.key("name"),
                format!("duplicate export {:?} on {}", e.name, e.listen),
            )
            .with_note(
                format!("first defined by exports[{j}]"),
                list.index(j).key("name"),
            ));
        }
        seen.insert(key, i);
    }
    Ok(())
}

fn check_reactors(r: &ReactorsConfig) -> Result<(), Issue> {
    let path = FieldPath::root().key("reactors").key("cores");
    match &r.cores {
        CoreList::Count(0) => Err(Issue::new(path, "reactor count must be at least 1")),
        CoreList::Count(n) if *n > MAX_CPUS => Err(Issue::new(
            path,
            format!("reactor count {n} is too large (at most {MAX_CPUS})"),
        )),
        CoreList::Count(_) => Ok(()),
        CoreList::List(cpus) if cpus.is_empty() => Err(Issue::new(
            path,
            "core list is empty: list at least one CPU id, e.g. [0]",
        )),
        CoreList::List(cpus) => {
            let mut first: HashMap<usize, usize> = HashMap::new();
            for (j, &cpu) in cpus.iter().enumerate() {
                if cpu >= MAX_CPUS {
                    return Err(Issue::new(
                        path.index(j),
                        format!("CPU id {cpu} is out of range (must be below {MAX_CPUS})"),
                    ));
                }
                if let Some(&k) = first.get(&cpu) {
                    return Err(
                        Issue::new(path.index(j), format!("CPU {cpu} is listed twice"))
                            .with_note(format!("first listed as cores[{k}]"), path.index(k)),
                    );
                }
                first.insert(cpu, j);
            }
            Ok(())
        }
    }
}

fn check_pool(pool: &BufferPoolConfig) -> Result<(), Issue> {
    let path = FieldPath::root().key("buffer_pool");
    let size = pool.buffer_size.bytes();
    if size == 0 {
        return Err(Issue::new(
            path.key("buffer_size"),
            "buffer_size must be greater than 0",
        ));
    }
    if !size.is_multiple_of(BUFFER_ALIGN) {
        return Err(Issue::new(
            path.key("buffer_size"),
            format!("buffer_size {size} is not a multiple of {BUFFER_ALIGN}"),
        ));
    }
    if pool.count == 0 {
        return Err(Issue::new(
            path.key("count"),
            "count must be greater than 0",
        ));
    }
    Ok(())
}

/// Whether `name` is a valid bdev name (non-empty, `[A-Za-z0-9_.-]`).
pub(crate) fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("bdev name is empty".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Some(format!(
            "invalid bdev name {name:?}: use only letters, digits, '_', '.' and '-'"
        ));
    }
    None
}

fn check_name(name: &str, path: &FieldPath) -> Result<(), Issue> {
    match name_problem(name) {
        Some(msg) => Err(Issue::new(path.clone(), msg)),
        None => Ok(()),
    }
}

fn check_block_size(bs: u32, path: &FieldPath) -> Result<(), Issue> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(Issue::new(
            path.key("block_size"),
            format!(
                "invalid block_size {bs}: must be a power of two between \
                 {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            ),
        ))
    }
}

fn check_size(size: u64, block_size: Option<u32>, path: &FieldPath) -> Result<(), Issue> {
    if size == 0 {
        return Err(Issue::new(path.key("size"), "size must be greater than 0"));
    }
    if let Some(bs) = block_size {
        if !size.is_multiple_of(u64::from(bs)) {
            return Err(Issue::new(
                path.key("size"),
                format!("size {size} is not a multiple of the block size ({bs})"),
            ));
        }
    }
    Ok(())
}

fn check_rate(rate: f64, field: &str, path: &FieldPath) -> Result<(), Issue> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(Issue::new(
            path.key(field),
            format!("{field} {rate} is outside [0, 1]"),
        ))
    }
}

/// Check one bdev body found at `path` (and its inline bases).
pub(crate) fn check_body(bdev: &BdevConfig, path: &FieldPath) -> Result<(), Issue> {
    match bdev {
        BdevConfig::Null { size, block_size } | BdevConfig::Malloc { size, block_size } => {
            check_block_size(*block_size, path)?;
            check_size(size.bytes(), Some(*block_size), path)
        }
        BdevConfig::Uring {
            path: file,
            size,
            block_size,
            direct: _,
            preallocate: _,
        } => {
            if file.as_os_str().is_empty() {
                return Err(Issue::new(path.key("path"), "path is empty"));
            }
            if let Some(bs) = block_size {
                check_block_size(*bs, path)?;
            }
            match size {
                Some(size) => check_size(size.bytes(), *block_size, path),
                None => Ok(()),
            }
        }
        BdevConfig::Passthru { base } | BdevConfig::Cow { base } => check_base(base, path),
        BdevConfig::Fault {
            base,
            read_error_rate,
            write_error_rate,
            latency_us: _,
            volatile_cache: _,
        } => {
            check_rate(*read_error_rate, "read_error_rate", path)?;
            check_rate(*write_error_rate, "write_error_rate", path)?;
            check_base(base, path)
        }
    }
}

fn check_base(base: &BaseRef, path: &FieldPath) -> Result<(), Issue> {
    match base {
        BaseRef::Inline(inner) => check_body(inner, &path.key("base")),
        BaseRef::Name(_) => Ok(()),
    }
}

/// The named base of a bdev at `path` and the path of the `base:` field naming it.
fn named_ref<'a>(bdev: &'a BdevConfig, path: &FieldPath) -> Option<(&'a str, FieldPath)> {
    let mut cur = bdev;
    let mut path = path.key("base");
    loop {
        match cur.base()? {
            BaseRef::Name(name) => return Some((name, path)),
            BaseRef::Inline(inner) => {
                cur = inner;
                path = path.key("base");
            }
        }
    }
}

fn check_references(config: &Config, list: &FieldPath) -> Result<(), Issue> {
    let bdevs = &config.bdevs;
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, b) in bdevs.iter().enumerate() {
        if let Some(&j) = index.get(b.name.as_str()) {
            return Err(Issue::new(
                list.index(i).key("name"),
                format!("duplicate bdev name {:?}", b.name),
            )
            .with_note(
                format!("first defined by bdevs[{j}]"),
                list.index(j).key("name"),
            ));
        }
        index.insert(&b.name, i);
    }

    // The single named base of each bdev (stacked bdevs have one base; inline chains end in
    // at most one name), as (index of the base, path of the `base:` naming it).
    let mut refs: Vec<Option<(usize, FieldPath)>> = Vec::with_capacity(bdevs.len());
    let mut claimed_by: HashMap<usize, usize> = HashMap::new();
    for (i, b) in bdevs.iter().enumerate() {
        let Some((name, path)) = named_ref(&b.bdev, &list.index(i)) else {
            refs.push(None);
            continue;
        };
        let Some(&target) = index.get(name) else {
            // The bdevs it could have meant: all the others.
            let names: Vec<&str> = bdevs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, b)| b.name.as_str())
                .collect();
            let defined = if names.is_empty() {
                "no other bdevs are defined".to_string()
            } else {
                format!("defined: {}", names.join(", "))
            };
            return Err(Issue::new(
                path,
                format!("unknown bdev {name:?} ({defined})"),
            ));
        };
        if let Some(&owner) = claimed_by.get(&target) {
            let first_path = refs
                .get(owner)
                .and_then(|r| r.as_ref())
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| list.index(owner));
            return Err(Issue::new(
                path,
                format!(
                    "bdev {name:?} is already the base of {:?}; a bdev can be the base of only \
                     one other bdev",
                    bdevs[owner].name
                ),
            )
            .with_note(format!("claimed by bdevs[{owner}]"), first_path));
        }
        claimed_by.insert(target, i);
        refs.push(Some((target, path)));
    }

    // Every bdev has at most one base and (now) is the base of at most one other, so the
    // reference graph is made of simple chains and rings. Walk each chain once.
    let mut walk_of: Vec<Option<usize>> = vec![None; bdevs.len()];
    for start in 0..bdevs.len() {
        let mut cur = start;
        while walk_of[cur].is_none() {
            walk_of[cur] = Some(start);
            match &refs[cur] {
                Some((next, _)) => cur = *next,
                None => break,
            }
        }
        if walk_of[cur] == Some(start) && refs[cur].is_some() {
            // Reached a bdev of this same walk again: `cur` is on a ring. Report it at the
            // ring member that comes first in the file.
            let mut ring = vec![cur];
            let mut next = refs[cur].as_ref().map(|(n, _)| *n);
            while let Some(n) = next {
                if n == cur || ring.len() > bdevs.len() {
                    break;
                }
                ring.push(n);
                next = refs[n].as_ref().map(|(n, _)| *n);
            }
            let first_pos = ring
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| **i)
                .map(|(pos, _)| pos)
                .unwrap_or(0);
            ring.rotate_left(first_pos);
            let head = ring[0];
            let mut names: Vec<&str> = ring.iter().map(|&i| bdevs[i].name.as_str()).collect();
            names.push(&bdevs[head].name);
            let path = refs[head]
                .as_ref()
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| list.index(head));
            return Err(Issue::new(
                path,
                format!("reference cycle: {}", names.join(" -> ")),
            ));
        }
    }
    Ok(())
}
