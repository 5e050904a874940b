//! Deserialization.
//!
//! Everything is hand-written (no derive) so that:
//! - every error is raised while the YAML deserializer is positioned on the offending key or
//!   value, which makes `serde_yaml` attach the right line and column;
//! - unknown and misplaced fields are rejected (`deny_unknown_fields` semantics) even though
//!   a bdev is a `name` plus an internally tagged body in one mapping, which serde's derive
//!   cannot combine with `deny_unknown_fields`;
//! - messages are consistent and name the accepted values.
//!
//! A bdev mapping is read into a [`RawBdev`] (every field of every type, all optional) and
//! then converted into a [`BdevConfig`] by [`convert_bdev`], which reports problems as an
//! [`Issue`] carrying a field path; `parse_str` locates that path in the text.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::check::check_config;
use crate::error::{FieldPath, Issue};
use crate::listen::Listen;
use crate::model::*;
use crate::size::ByteSize;

// ---------------------------------------------------------------------------------------------
// Field names and keys

/// `"unknown field "x", expected one of: a, b (did you mean "a"?)"`
fn unknown_field(key: &str, expected: &[&str]) -> String {
    let mut msg = format!(
        "unknown field {key:?}, expected one of: {}",
        expected.join(", ")
    );
    if let Some(guess) = did_you_mean(key, expected) {
        msg.push_str(&format!(" (did you mean {guess:?}?)"));
    }
    msg
}

fn did_you_mean<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&key, c), *c))
        .filter(|(d, c)| *d <= 2 && *d < c.len() / 2 + 1)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads a mapping key, checks it, and returns its index in `fields`.
///
/// Errors are raised inside the key's own deserialization, so they point at the key.
struct KeySeed<'a> {
    fields: &'static [&'static str],
    seen: u64,
    /// Returns an error message if `key` is not acceptable here.
    check: &'a dyn Fn(&str) -> Option<String>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a field name (one of: {})", self.fields.join(", "))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<usize, E> {
        if let Some(msg) = (self.check)(key) {
            return Err(E::custom(msg));
        }
        let Some(index) = self.fields.iter().position(|f| *f == key) else {
            return Err(E::custom(unknown_field(key, self.fields)));
        };
        if self.seen & (1 << index) != 0 {
            return Err(E::custom(format!("duplicate field {key:?}")));
        }
        Ok(index)
    }
}

/// Next key of a struct-like mapping, as an index into `fields`; rejects duplicates.
fn next_field<'de, A: MapAccess<'de>>(
    map: &mut A,
    fields: &'static [&'static str],
    seen: &mut u64,
    check: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<usize>, A::Error> {
    let key = map.next_key_seed(KeySeed {
        fields,
        seen: *seen,
        check,
    })?;
    if let Some(i) = key {
        *seen |= 1 << i;
    }
    Ok(key)
}

/// Accepts only the listed fields.
fn plain_fields(fields: &'static [&'static str]) -> impl Fn(&str) -> Option<String> {
    move |key| (!fields.contains(&key)).then(|| unknown_field(key, fields))
}

// ---------------------------------------------------------------------------------------------
// Keywords (enum variants written as plain strings)

/// Reads a string that must be one of `options` (ASCII case-insensitive); returns its index.
struct Keyword {
    /// `"variant"`, `"bdev type"`, ...
    what: &'static str,
    options: &'static [&'static str],
    /// Extra accepted spellings and the index they map to.
    aliases: &'static [(&'static str, usize)],
}

impl<'de> DeserializeSeed<'de> for Keyword {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for Keyword {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "one of {}", self.options.join(", "))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        if let Some(i) = self.options.iter().position(|o| o.eq_ignore_ascii_case(v)) {
            return Ok(i);
        }
        if let Some((_, i)) = self.aliases.iter().find(|(a, _)| a.eq_ignore_ascii_case(v)) {
            return Ok(*i);
        }
        Err(E::custom(format!(
            "unknown {} {v:?}, expected one of {}",
            self.what,
            self.options.join(", ")
        )))
    }
}

impl<'de> Deserialize<'de> for IdleMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let i = Keyword {
            what: "variant",
            options: &["poll", "sleep"],
            aliases: &[],
        }
        .deserialize(deserializer)?;
        Ok(if i == 0 {
            IdleMode::Poll
        } else {
            IdleMode::Sleep
        })
    }
}

impl<'de> Deserialize<'de> for HugepagesMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let i = Keyword {
            what: "variant",
            options: &["auto", "on", "off"],
            aliases: &[("true", 1), ("false", 2)],
        }
        .deserialize(deserializer)?;
        Ok(match i {
            0 => HugepagesMode::Auto,
            1 => HugepagesMode::On,
            _ => HugepagesMode::Off,
        })
    }
}

/// The `type:` of a bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BdevType {
    Null,
    Malloc,
    Uring,
    Passthru,
    Fault,
    Cow,
}

impl BdevType {
    const ALL: [BdevType; 6] = [
        BdevType::Null,
        BdevType::Malloc,
        BdevType::Uring,
        BdevType::Passthru,
        BdevType::Fault,
        BdevType::Cow,
    ];

    fn name(self) -> &'static str {
        BDEV_TYPES[self as usize]
    }

    /// Fields a bdev of this type may have (besides `name` and `type`).
    fn fields(self) -> &'static [&'static str] {
        match self {
            BdevType::Null | BdevType::Malloc => &["size", "block_size"],
            BdevType::Uring => &["path", "size", "block_size", "direct", "preallocate"],
            BdevType::Passthru => &["base"],
            BdevType::Cow => &["base", "tracking"],
            BdevType::Fault => &[
                "base",
                "read_error_rate",
                "write_error_rate",
                "latency_us",
                "volatile_cache",
            ],
        }
    }

    fn valid_fields(self, inline: bool) -> Vec<&'static str> {
        let mut all = if inline {
            vec!["type"]
        } else {
            vec!["name", "type"]
        };
        all.extend_from_slice(self.fields());
        all
    }

    fn misplaced_field(self, key: &str, inline: bool) -> String {
        format!(
            "field {key:?} is not valid for a {} bdev (valid fields: {})",
            self.name(),
            self.valid_fields(inline).join(", ")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Bdevs

const BDEV_FIELDS: &[&str] = &[
    "name",
    "type",
    "size",
    "block_size",
    "path",
    "direct",
    "preallocate",
    "base",
    "read_error_rate",
    "write_error_rate",
    "latency_us",
    "volatile_cache",
    "tracking",
];

/// A bdev mapping as written: every field any type can have.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawBdev {
    pub(crate) ty: BdevType,
    pub(crate) name: Option<String>,
    pub(crate) size: Option<ByteSize>,
    pub(crate) block_size: Option<u32>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) direct: Option<bool>,
    pub(crate) preallocate: Option<bool>,
    pub(crate) base: Option<RawBase>,
    pub(crate) read_error_rate: Option<f64>,
    pub(crate) write_error_rate: Option<f64>,
    pub(crate) latency_us: Option<u64>,
    pub(crate) volatile_cache: Option<bool>,
    pub(crate) tracking: Option<RawTracking>,
}

/// `tracking:` as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawTracking {
    pub(crate) bdev: Option<RawBase>,
    pub(crate) offset: Option<ByteSize>,
}

const TRACKING_FIELDS: &[&str] = &["bdev", "offset"];

impl<'de> Deserialize<'de> for RawTracking {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TrackingVisitor;
        impl<'de> Visitor<'de> for TrackingVisitor {
            type Value = RawTracking;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a `tracking` mapping with fields bdev, offset")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTracking, A::Error> {
                let mut out = RawTracking {
                    bdev: None,
                    offset: None,
                };
                let mut seen = 0;
                let check = plain_fields(TRACKING_FIELDS);
                while let Some(i) = next_field(&mut map, TRACKING_FIELDS, &mut seen, &check)? {
                    match TRACKING_FIELDS[i] {
                        "bdev" => out.bdev = Some(map.next_value()?),
                        _ => out.offset = Some(map.next_value()?),
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_any(TrackingVisitor)
    }
}

/// `base:` as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawBase {
    Name(String),
    Inline(Box<RawBdev>),
}

/// Message for a `name:` inside an inline base.
const INLINE_NAME: &str = "field \"name\" is not allowed in an inline bdev: inline bases are \
                           anonymous (define the bdev in `bdevs:` to give it a name)";

fn visit_bdev_map<'de, A: MapAccess<'de>>(mut map: A, inline: bool) -> Result<RawBdev, A::Error> {
    let mut ty: Option<BdevType> = None;
    let mut seen = 0u64;
    let mut name = None;
    let mut size = None;
    let mut block_size = None;
    let mut path = None;
    let mut direct = None;
    let mut preallocate = None;
    let mut base = None;
    let mut read_error_rate = None;
    let mut write_error_rate = None;
    let mut latency_us = None;
    let mut volatile_cache = None;
    let mut tracking = None;
    loop {
        let known_ty = ty;
        let check = move |key: &str| -> Option<String> {
            if key == "name" && inline {
                return Some(INLINE_NAME.to_string());
            }
            match known_ty {
                _ if key == "name" || key == "type" => None,
                Some(t) if !t.fields().contains(&key) => Some(if BDEV_FIELDS.contains(&key) {
                    t.misplaced_field(key, inline)
                } else {
                    unknown_field(key, &t.valid_fields(inline))
                }),
                Some(_) => None,
                None if BDEV_FIELDS.contains(&key) => None,
                None => {
                    let fields = if inline {
                        &BDEV_FIELDS[1..]
                    } else {
                        BDEV_FIELDS
                    };
                    Some(unknown_field(key, fields))
                }
            }
        };
        let Some(field) = next_field(&mut map, BDEV_FIELDS, &mut seen, &check)? else {
            break;
        };
        match BDEV_FIELDS[field] {
            "name" => name = Some(map.next_value::<String>()?),
            "type" => {
                let i = map.next_value_seed(Keyword {
                    what: "bdev type",
                    options: &BDEV_TYPES,
                    aliases: &[],
                })?;
                ty = BdevType::ALL.get(i).copied();
            }
            "size" => size = Some(map.next_value::<ByteSize>()?),
            "block_size" => block_size = Some(map.next_value::<u32>()?),
            "path" => path = Some(map.next_value::<PathBuf>()?),
            "direct" => direct = Some(map.next_value::<bool>()?),
            "preallocate" => preallocate = Some(map.next_value::<bool>()?),
            "base" => base = Some(map.next_value::<RawBase>()?),
            "read_error_rate" => read_error_rate = Some(map.next_value::<f64>()?),
            "write_error_rate" => write_error_rate = Some(map.next_value::<f64>()?),
            "latency_us" => latency_us = Some(map.next_value::<u64>()?),
            "volatile_cache" => volatile_cache = Some(map.next_value::<bool>()?),
            _ => tracking = Some(map.next_value::<RawTracking>()?),
        }
    }
    let Some(ty) = ty else {
        return Err(A::Error::custom(format!(
            "missing field \"type\" (one of {})",
            BDEV_TYPES.join(", ")
        )));
    };
    Ok(RawBdev {
        ty,
        name,
        size,
        block_size,
        path,
        direct,
        preallocate,
        base,
        read_error_rate,
        write_error_rate,
        latency_us,
        volatile_cache,
        tracking,
    })
}

/// Reads one bdev mapping; `inline` for `base:` mappings (which have no name).
struct BdevSeed {
    inline: bool,
}

impl<'de> DeserializeSeed<'de> for BdevSeed {
    type Value = RawBdev;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawBdev, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BdevSeed {
    type Value = RawBdev;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inline {
            f.write_str("a bdev mapping with a `type` field")
        } else {
            f.write_str("a bdev mapping with `name` and `type` fields")
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBdev, A::Error> {
        visit_bdev_map(map, self.inline)
    }
}

impl<'de> Deserialize<'de> for RawBase {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BaseVisitor;
        impl<'de> Visitor<'de> for BaseVisitor {
            type Value = RawBase;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the name of another bdev, or an inline bdev mapping with a `type`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBase, E> {
                Ok(RawBase::Name(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawBase, E> {
                Ok(RawBase::Name(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawBase, E> {
                Ok(RawBase::Name(v.to_string()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBase, A::Error> {
                visit_bdev_map(map, true).map(|b| RawBase::Inline(Box::new(b)))
            }
        }
        deserializer.deserialize_any(BaseVisitor)
    }
}

/// Turn a [`RawBdev`] read at `path` into a [`BdevConfig`], checking that every field it has
/// belongs to its type and that required fields are there.
pub(crate) fn convert_bdev(
    raw: RawBdev,
    path: &FieldPath,
    inline: bool,
) -> Result<BdevConfig, Issue> {
    let present: [(&str, bool); 11] = [
        ("size", raw.size.is_some()),
        ("block_size", raw.block_size.is_some()),
        ("path", raw.path.is_some()),
        ("direct", raw.direct.is_some()),
        ("preallocate", raw.preallocate.is_some()),
        ("base", raw.base.is_some()),
        ("read_error_rate", raw.read_error_rate.is_some()),
        ("write_error_rate", raw.write_error_rate.is_some()),
        ("latency_us", raw.latency_us.is_some()),
        ("volatile_cache", raw.volatile_cache.is_some()),
        ("tracking", raw.tracking.is_some()),
    ];
    for (field, is_present) in present {
        if is_present && !raw.ty.fields().contains(&field) {
            return Err(
                Issue::new(path.key(field), raw.ty.misplaced_field(field, inline)).at_key(),
            );
        }
    }
    if inline && raw.tracking.is_some() {
        return Err(Issue::new(
            path.key("tracking"),
            "field \"tracking\" is only valid on a named cow bdev: define the cow bdev in \
             `bdevs:` to give it change tracking",
        )
        .at_key());
    }
    let missing = |field: &str, example: &str| {
        Issue::new(
            path.clone(),
            format!(
                "missing field {field:?}: a {} bdev needs one, e.g. `{field}: {example}`",
                raw.ty.name()
            ),
        )
    };
    let base = |raw_base: Option<RawBase>| -> Result<BaseRef, Issue> {
        match raw_base {
            None => Err(missing("base", "vol0")),
            Some(RawBase::Name(name)) => Ok(BaseRef::Name(name)),
            Some(RawBase::Inline(inner)) => Ok(BaseRef::Inline(Box::new(convert_bdev(
                *inner,
                &path.key("base"),
                true,
            )?))),
        }
    };
    Ok(match raw.ty {
        BdevType::Null | BdevType::Malloc => {
            let size = raw.size.ok_or_else(|| missing("size", "1GiB"))?;
            let block_size = raw.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
            if raw.ty == BdevType::Null {
                BdevConfig::Null { size, block_size }
            } else {
                BdevConfig::Malloc { size, block_size }
            }
        }
        BdevType::Uring => BdevConfig::Uring {
            path: raw
                .path
                .ok_or_else(|| missing("path", "/var/tmp/disk.img"))?,
            size: raw.size,
            block_size: raw.block_size,
            direct: raw.direct.unwrap_or(true),
            preallocate: raw.preallocate.unwrap_or(false),
        },
        BdevType::Passthru => BdevConfig::Passthru {
            base: base(raw.base)?,
        },
        BdevType::Cow => BdevConfig::Cow {
            base: base(raw.base)?,
        },
        BdevType::Fault => BdevConfig::Fault {
            base: base(raw.base)?,
            read_error_rate: raw.read_error_rate.unwrap_or(0.0),
            write_error_rate: raw.write_error_rate.unwrap_or(0.0),
            latency_us: raw.latency_us.unwrap_or(0),
            volatile_cache: raw.volatile_cache.unwrap_or(false),
        },
    })
}

/// Convert a top-level bdev entry (which must have a name), and its `tracking:` if it has one.
pub(crate) fn convert_named(
    mut raw: RawBdev,
    path: &FieldPath,
) -> Result<(NamedBdev, Option<TrackingConfig>), Issue> {
    let Some(name) = raw.name.take() else {
        return Err(Issue::new(
            path.clone(),
            "missing field \"name\": every entry of `bdevs` needs a unique name",
        ));
    };
    let tracking = match raw.ty {
        BdevType::Cow => raw.tracking.take(),
        // Reported as misplaced by `convert_bdev`.
        _ => None,
    };
    let bdev = convert_bdev(raw, path, false)?;
    let tracking = match tracking {
        None => None,
        Some(t) => Some(convert_tracking(t, &path.key("tracking"))?),
    };
    Ok((NamedBdev { name, bdev }, tracking))
}

/// A `tracking:` mapping: the store's bdev (a name, a spec string or an inline mapping) and
/// offset.
fn convert_tracking(raw: RawTracking, path: &FieldPath) -> Result<TrackingConfig, Issue> {
    let bdev = match raw.bdev {
        None => {
            return Err(Issue::new(
                path.clone(),
                "missing field \"bdev\": the bdev that keeps the change tracking, e.g. \
                 `bdev: uring:/var/tmp/vol.cbt@1M` or the name of a bdev in `bdevs:`",
            ))
        }
        // Bdev names have no ':'; a spec always has one.
        Some(RawBase::Name(s)) if s.contains(':') => match crate::spec::parse_spec(&s) {
            Ok(b) => BaseRef::Inline(Box::new(b)),
            Err(e) => return Err(Issue::new(path.key("bdev"), e.to_string())),
        },
        Some(RawBase::Name(s)) => BaseRef::Name(s),
        Some(RawBase::Inline(inner)) => {
            BaseRef::Inline(Box::new(convert_bdev(*inner, &path.key("bdev"), true)?))
        }
    };
    Ok(TrackingConfig {
        bdev,
        offset: raw.offset.unwrap_or(ByteSize(0)),
    })
}

/// Errors from conversion/validation inside a plain `Deserialize` impl (no source text to
/// locate them in): `path: message`.
fn issue_to_de<E: de::Error>(issue: Issue) -> E {
    let path = issue.path.to_string();
    let msg = issue.full_message(|_| None);
    if path.is_empty() {
        E::custom(msg)
    } else {
        E::custom(format!("{path}: {msg}"))
    }
}

impl<'de> Deserialize<'de> for BdevConfig {
    /// Reads a bdev body (`type:` and its fields). A `name:` field is rejected.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = BdevSeed { inline: true }.deserialize(deserializer)?;
        convert_bdev(raw, &FieldPath::root(), true).map_err(issue_to_de)
    }
}

impl<'de> Deserialize<'de> for NamedBdev {
    /// Reads one `bdevs:` entry. A `tracking:` field is rejected: it is kept in
    /// [`Config::tracking`], so read the whole config.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = BdevSeed { inline: false }.deserialize(deserializer)?;
        match convert_named(raw, &FieldPath::root()).map_err(issue_to_de)? {
            (b, None) => Ok(b),
            (_, Some(_)) => Err(D::Error::custom(
                "tracking: a lone bdev entry cannot keep its tracking; read the whole config",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for BaseRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match RawBase::deserialize(deserializer)? {
            RawBase::Name(name) => Ok(BaseRef::Name(name)),
            RawBase::Inline(raw) => convert_bdev(*raw, &FieldPath::root(), true)
                .map(|b| BaseRef::Inline(Box::new(b)))
                .map_err(issue_to_de),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sections

impl<'de> Deserialize<'de> for CoreList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CoresVisitor;
        impl<'de> Visitor<'de> for CoresVisitor {
            type Value = CoreList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a reactor count (e.g. 2) or a list of CPU ids (e.g. [0, 1])")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CoreList, E> {
                usize::try_from(v)
                    .map(CoreList::Count)
                    .map_err(|_| E::custom(format!("reactor count {v} is too large")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CoreList, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("reactor count {v} cannot be negative"))),
                }
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CoreList, A::Error> {
                let mut cpus = Vec::new();
                while let Some(cpu) = seq.next_element::<usize>()? {
                    cpus.push(cpu);
                }
                Ok(CoreList::List(cpus))
            }
        }
        deserializer.deserialize_any(CoresVisitor)
    }
}

/// A struct section (`reactors:`, `buffer_pool:`); `null` or an empty value means defaults.
trait Section: Default {
    const NAME: &'static str;
    const FIELDS: &'static [&'static str];
    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        field: &str,
        map: &mut A,
    ) -> Result<(), A::Error>;
}

impl Section for ReactorsConfig {
    const NAME: &'static str = "reactors";
    const FIELDS: &'static [&'static str] = &["cores", "idle"];

    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        field: &str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match field {
            "cores" => self.cores = map.next_value()?,
            _ => self.idle = map.next_value()?,
        }
        Ok(())
    }
}

impl Section for BufferPoolConfig {
    const NAME: &'static str = "buffer_pool";
    const FIELDS: &'static [&'static str] = &["hugepages", "buffer_size", "count"];

    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        field: &str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match field {
            "hugepages" => self.hugepages = map.next_value()?,
            "buffer_size" => self.buffer_size = map.next_value()?,
            _ => self.count = map.next_value()?,
        }
        Ok(())
    }
}

struct SectionVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Section> Visitor<'de> for SectionVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a `{}` mapping with fields {}",
            T::NAME,
            T::FIELDS.join(", ")
        )
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut out = T::default();
        let mut seen = 0;
        let check = plain_fields(T::FIELDS);
        while let Some(i) = next_field(&mut map, T::FIELDS, &mut seen, &check)? {
            out.read_field(T::FIELDS[i], &mut map)?;
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for ReactorsConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SectionVisitor(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for BufferPoolConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SectionVisitor(std::marker::PhantomData))
    }
}

/// The `bdevs:` list; `null` means empty.
struct BdevList;

impl<'de> DeserializeSeed<'de> for BdevList {
    type Value = Vec<RawBdev>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BdevList {
    type Value = Vec<RawBdev>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of bdevs")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(b) = seq.next_element_seed(BdevSeed { inline: false })? {
            out.push(b);
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenVisitor;
        impl Visitor<'_> for ListenVisitor {
            type Value = Listen;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a listen address: HOST:PORT or unix:PATH")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(ListenVisitor)
    }
}

/// An `exports:` entry as written.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawExport {
    pub(crate) name: Option<String>,
    pub(crate) bdev: Option<String>,
    pub(crate) listen: Option<Listen>,
    pub(crate) read_only: Option<bool>,
}

const EXPORT_FIELDS: &[&str] = &["name", "bdev", "listen", "read_only"];

impl<'de> Deserialize<'de> for RawExport {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExportVisitor;
        impl<'de> Visitor<'de> for ExportVisitor {
            type Value = RawExport;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an export mapping with fields name, bdev, listen, read_only")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawExport, A::Error> {
                let mut out = RawExport::default();
                let mut seen = 0;
                let check = plain_fields(EXPORT_FIELDS);
                while let Some(i) = next_field(&mut map, EXPORT_FIELDS, &mut seen, &check)? {
                    match EXPORT_FIELDS[i] {
                        "name" => out.name = Some(map.next_value()?),
                        "bdev" => out.bdev = Some(map.next_value()?),
                        "listen" => out.listen = Some(map.next_value()?),
                        _ => out.read_only = Some(map.next_value()?),
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_any(ExportVisitor)
    }
}

/// A list section whose `null` means empty.
struct ListOf<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ListOf<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            out.push(x);
        }
        Ok(out)
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for ListOf<T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// The whole document, before bdev conversion.
#[derive(Debug, Default)]
pub(crate) struct RawConfig {
    pub(crate) reactors: ReactorsConfig,
    pub(crate) buffer_pool: BufferPoolConfig,
    pub(crate) bdevs: Vec<RawBdev>,
    pub(crate) rpc_socket: Option<PathBuf>,
    pub(crate) exports: Vec<RawExport>,
}

const TOP_FIELDS: &[&str] = &["reactors", "buffer_pool", "bdevs", "rpc_socket", "exports"];

impl<'de> Deserialize<'de> for RawConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = RawConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a mapping with fields {}", TOP_FIELDS.join(", "))
            }

            fn visit_unit<E: de::Error>(self) -> Result<RawConfig, E> {
                Ok(RawConfig::default())
            }

            fn visit_none<E: de::Error>(self) -> Result<RawConfig, E> {
                Ok(RawConfig::default())
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawConfig, A::Error> {
                let mut out = RawConfig::default();
                let mut seen = 0;
                let check = plain_fields(TOP_FIELDS);
                while let Some(i) = next_field(&mut map, TOP_FIELDS, &mut seen, &check)? {
                    match TOP_FIELDS[i] {
                        "reactors" => out.reactors = map.next_value()?,
                        "buffer_pool" => out.buffer_pool = map.next_value()?,
                        "bdevs" => out.bdevs = map.next_value_seed(BdevList)?,
                        "rpc_socket" => out.rpc_socket = map.next_value()?,
                        _ => {
                            out.exports =
                                map.next_value_seed(ListOf::<RawExport>(std::marker::PhantomData))?
                        }
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_any(TopVisitor)
    }
}

impl RawConfig {
    /// Convert the bdevs and exports (first problem wins).
    pub(crate) fn convert(self) -> Result<Config, Issue> {
        let list = FieldPath::root().key("bdevs");
        let mut bdevs = Vec::with_capacity(self.bdevs.len());
        let mut tracking = std::collections::BTreeMap::new();
        for (i, raw) in self.bdevs.into_iter().enumerate() {
            let (b, t) = convert_named(raw, &list.index(i))?;
            if let Some(t) = t {
                // A duplicate name is reported by the checks; keep the first.
                tracking.entry(b.name.clone()).or_insert(t);
            }
            bdevs.push(b);
        }
        let list = FieldPath::root().key("exports");
        let exports = self
            .exports
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let Some(bdev) = raw.bdev else {
                    return Err(Issue::new(
                        list.index(i),
                        "missing field \"bdev\": the bdev to export, e.g. `bdev: vol0`",
                    ));
                };
                Ok(ExportConfig {
                    name: raw.name.unwrap_or_else(|| bdev.clone()),
                    bdev,
                    listen: raw.listen.unwrap_or_default(),
                    read_only: raw.read_only.unwrap_or(false),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            reactors: self.reactors,
            buffer_pool: self.buffer_pool,
            bdevs,
            rpc_socket: self.rpc_socket,
            exports,
            tracking,
        })
    }
}

impl<'de> Deserialize<'de> for Config {
    /// Reads and fully validates a config. Prefer [`parse_str`](crate::parse_str) or
    /// [`load`](crate::load): they report line numbers for semantic errors too.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let config = RawConfig::deserialize(deserializer)?
            .convert()
            .map_err(issue_to_de)?;
        check_config(&config).map_err(issue_to_de)?;
        Ok(config)
    }
}
