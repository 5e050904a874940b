//! Finding the line and column of a field path in YAML text.
//!
//! `serde_yaml` does not expose its event stream, but it attaches the position of the node
//! being deserialized to any custom error raised while deserializing that node. So to locate
//! `bdevs[2].base` we deserialize the text once more with a [`Probe`] that walks down that
//! path, skipping everything else, and raises a marker error on the target node (or on its key);
//! the error's location is the answer. This uses the real YAML parser, so flow style, quoting,
//! comments, anchors and aliases are all handled exactly as when the config was read.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use crate::error::{FieldPath, Seg};

/// The marker error message; contains characters that never occur in real messages.
const HIT: &str = "\u{1}hotcopy-config-locate\u{1}";

/// 1-based (line, column) of the value at `path` — or of its key, if `at_key` and the path
/// ends in a key. `None` if the path is not in the text.
fn locate_exact(text: &str, path: &FieldPath, at_key: bool) -> Option<(usize, usize)> {
    let probe = Probe {
        path: &path.0,
        at_key,
    };
    match probe.deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(()) => None,
        Err(err) => {
            if err.to_string().contains(HIT) {
                err.location().map(|l| (l.line(), l.column()))
            } else {
                None
            }
        }
    }
}

/// Like [`locate_exact`], but falls back to the value, then to the closest enclosing node
/// that is in the text (a defaulted field is absent, its section may not be).
pub(crate) fn locate(text: &str, path: &FieldPath, at_key: bool) -> Option<(usize, usize)> {
    if at_key {
        if let Some(pos) = locate_exact(text, path, true) {
            return Some(pos);
        }
    }
    let mut path = path.clone();
    loop {
        if let Some(pos) = locate_exact(text, &path, false) {
            return Some(pos);
        }
        path.0.pop()?;
    }
}

/// Walks down `path`, failing with [`HIT`] at the target.
struct Probe<'a> {
    path: &'a [Seg],
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

fn hit<E: de::Error>() -> E {
    E::custom(HIT)
}

macro_rules! scalar_visits {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, _v: $ty) -> Result<(), E> {
                if self.path.is_empty() { Err(hit()) } else { Ok(()) }
            }
        )*
    };
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    scalar_visits!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_i128(i128),
        visit_u128(u128),
        visit_f64(f64),
        visit_str(&str),
        visit_bytes(&[u8]),
    );

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(hit())
        } else {
            Ok(())
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag ...`).
        if self.path.is_empty() {
            return Err(hit());
        }
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want = match self.path.first() {
            None => return Err(hit()),
            Some(Seg::Index(i)) => Some(*i),
            Some(Seg::Key(_)) => None,
        };
        let mut i = 0;
        loop {
            let more = if Some(i) == want {
                seq.next_element_seed(Probe {
                    path: &self.path[1..],
                    at_key: self.at_key,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let want = match self.path.first() {
            None => return Err(hit()),
            Some(Seg::Key(k)) => Some(k.as_str()),
            Some(Seg::Index(_)) => None,
        };
        let rest = &self.path[1..];
        let mut found = false;
        loop {
            let key = match want {
                Some(want) if !found => map.next_key_seed(KeyMatch {
                    want,
                    hit: self.at_key && rest.is_empty(),
                })?,
                _ => map.next_key::<IgnoredAny>()?.map(|_| false),
            };
            match key {
                None => return Ok(()),
                Some(true) => {
                    found = true;
                    map.next_value_seed(Probe {
                        path: rest,
                        at_key: self.at_key,
                    })?;
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }
}

/// Reads a key; `true` if it is `want`. With `hit`, a match fails with [`HIT`] instead, at the
/// key's position.
struct KeyMatch<'a> {
    want: &'a str,
    hit: bool,
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl KeyMatch<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        if key != self.want {
            Ok(false)
        } else if self.hit {
            Err(hit())
        } else {
            Ok(true)
        }
    }
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<bool, A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant)?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, path: &str, at_key: bool) -> Option<(usize, usize)> {
        let mut p = FieldPath::root();
        for part in path.split('.') {
            if let Some((k, i)) = part.split_once('[') {
                if !k.is_empty() {
                    p = p.key(k);
                }
                p = p.index(i.trim_end_matches(']').parse().unwrap());
            } else {
                p = p.key(part);
            }
        }
        locate(text, &p, at_key)
    }

    const DOC: &str = "\
reactors:
  cores: [0, 1]
bdevs:
  - name: a
    type: malloc
    size: 1G
  - {name: b, type: passthru, base: a}
  - name: c
    type: fault
    base:
      type: null
      size: 4K
";

    #[test]
    fn finds_values_and_keys() {
        assert_eq!(at(DOC, "reactors.cores", false), Some((2, 10)));
        assert_eq!(at(DOC, "reactors.cores[1]", false), Some((2, 14)));
        assert_eq!(at(DOC, "bdevs[0].size", false), Some((6, 11)));
        assert_eq!(at(DOC, "bdevs[0].size", true), Some((6, 5)));
        assert_eq!(at(DOC, "bdevs[1].base", false), Some((7, 37)));
        assert_eq!(at(DOC, "bdevs[1]", false), Some((7, 5)));
        assert_eq!(at(DOC, "bdevs[2].base.size", false), Some((12, 13)));
        assert_eq!(at(DOC, "bdevs[2].base", false), Some((11, 7)));
    }

    #[test]
    fn falls_back_to_parent() {
        // `idle` is absent: point at the `reactors` mapping.
        assert_eq!(at(DOC, "reactors.idle", false), Some((2, 3)));
        assert_eq!(at(DOC, "bdevs[7].name", false), Some((4, 3)));
        // An empty document is a null root node at the very start.
        assert_eq!(at("", "reactors.idle", false), Some((1, 1)));
    }

    #[test]
    fn follows_aliases() {
        let doc = "x: &s 1G\nbdevs:\n  - size: *s\n";
        assert!(at(doc, "bdevs[0].size", false).is_some());
    }
}
