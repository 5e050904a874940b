//! [`ByteSize`]: byte counts written as `4096`, `"128KiB"`, `"1 GiB"`, ...

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a size string must look like; part of every size error message.
pub(crate) const SIZE_FORMS: &str = "expected a number with an optional K/M/G/T suffix";

/// A size in bytes.
///
/// Parses from an integer (bytes) or a string made of a decimal number, optional spaces, and an
/// optional, case-insensitive suffix. **All suffixes are binary (powers of 1024)**, whether or not
/// they contain an `i`:
///
/// | suffix | multiplier |
/// |---|---|
/// | none, `B` | 1 |
/// | `K`, `KB`, `KiB` | 1024 |
/// | `M`, `MB`, `MiB` | 1024² |
/// | `G`, `GB`, `GiB` | 1024³ |
/// | `T`, `TB`, `TiB` | 1024⁴ |
///
/// So `"1G"`, `"1 GB"`, `"1gib"` and `1073741824` are the same size.
///
/// [`Display`](fmt::Display) and [`Serialize`] use the largest binary unit that divides the
/// value exactly (`"1GiB"`, `"1536MiB"`, `"4KiB"`), and a plain integer otherwise (`1000`,
/// `0`), so the output is the shortest exact form and parses back to the same value.
///
/// ```
/// use hotcopy_config::ByteSize;
/// let s: ByteSize = "512 MiB".parse().unwrap();
/// assert_eq!(s, ByteSize(512 << 20));
/// assert_eq!(s.to_string(), "512MiB");
/// assert_eq!(ByteSize(1000).to_string(), "1000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size string could not be parsed (see [`ByteSize`] for the accepted forms).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}")]
pub struct ParseSizeError {
    /// The text that was rejected.
    pub input: String,
    /// What was wrong with it.
    pub reason: String,
}

const UNITS: [(u64, &str); 4] = [
    (1 << 40, "TiB"),
    (1 << 30, "GiB"),
    (1 << 20, "MiB"),
    (1 << 10, "KiB"),
];

impl ByteSize {
    /// One kibibyte (1024 bytes).
    pub const KIB: u64 = 1 << 10;
    /// One mebibyte.
    pub const MIB: u64 = 1 << 20;
    /// One gibibyte.
    pub const GIB: u64 = 1 << 30;
    /// One tebibyte.
    pub const TIB: u64 = 1 << 40;

    /// `n` kibibytes (saturating).
    pub const fn kib(n: u64) -> Self {
        ByteSize(n.saturating_mul(Self::KIB))
    }

    /// `n` mebibytes (saturating).
    pub const fn mib(n: u64) -> Self {
        ByteSize(n.saturating_mul(Self::MIB))
    }

    /// `n` gibibytes (saturating).
    pub const fn gib(n: u64) -> Self {
        ByteSize(n.saturating_mul(Self::GIB))
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Whether the value is written with a unit suffix (it is a non-zero multiple of 1024).
    fn has_unit(self) -> bool {
        self.0 != 0 && self.0.is_multiple_of(Self::KIB)
    }
}

impl From<u64> for ByteSize {
    fn from(v: u64) -> Self {
        ByteSize(v)
    }
}

impl From<ByteSize> for u64 {
    fn from(v: ByteSize) -> Self {
        v.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (unit, name) in UNITS {
                if self.0.is_multiple_of(unit) {
                    return write!(f, "{}{}", self.0 / unit, name);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseSizeError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits == 0 {
            return Err(fail(SIZE_FORMS));
        }
        let (number, rest) = t.split_at(digits);
        let multiplier = match rest.trim_start().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::TIB,
            _ => return Err(fail(SIZE_FORMS)),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| fail("the number does not fit in 64 bits"))?;
        n.checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| fail("the size does not fit in 64 bits"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.has_unit() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: a number of bytes, or a string such as \"512MiB\" or \"1G\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("invalid size {v}: a size cannot be negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
        Err(E::custom(format!(
            "invalid size {v}: expected a whole number of bytes or a K/M/G/T suffix"
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<u64, ParseSizeError> {
        s.parse::<ByteSize>().map(|b| b.0)
    }

    #[test]
    fn parses_all_suffixes() {
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("12b"), Ok(12));
        for (s, m) in [
            ("k", 1u64 << 10),
            ("m", 1 << 20),
            ("g", 1 << 30),
            ("t", 1 << 40),
        ] {
            for suffix in [s.to_string(), format!("{s}b"), format!("{s}ib")] {
                assert_eq!(p(&format!("3{suffix}")), Ok(3 * m), "{suffix}");
                let upper = suffix.to_uppercase();
                assert_eq!(p(&format!("3 {upper}")), Ok(3 * m), "{upper}");
            }
        }
        assert_eq!(p("512 MiB"), Ok(512 << 20));
        assert_eq!(p("  1G  "), Ok(1 << 30));
        assert_eq!(p("1GiB"), Ok(1 << 30));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", " ", "G", "12X", "1.5G", "-1", "1 G B", "1e3", "0x10", "1_000", "1PiB",
        ] {
            let err = p(bad).unwrap_err();
            assert_eq!(err.input, bad);
            assert!(err.to_string().starts_with("invalid size "), "{err}");
        }
        assert_eq!(
            p("12X").unwrap_err().to_string(),
            "invalid size \"12X\": expected a number with an optional K/M/G/T suffix"
        );
        assert!(p("99999999999999999999")
            .unwrap_err()
            .reason
            .contains("64 bits"));
        assert!(p("16777216T").unwrap_err().reason.contains("64 bits"));
    }

    #[test]
    fn display_is_shortest_exact() {
        assert_eq!(ByteSize(0).to_string(), "0");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(4096).to_string(), "4KiB");
        assert_eq!(ByteSize(128 << 10).to_string(), "128KiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(1 << 40).to_string(), "1TiB");
        assert_eq!(ByteSize(u64::MAX).to_string(), u64::MAX.to_string());
    }

    #[test]
    fn display_round_trips() {
        for v in [
            0,
            1,
            511,
            512,
            1024,
            4096,
            1 << 20,
            3 << 30,
            5 << 40,
            u64::MAX,
            1 << 63,
        ] {
            let s = ByteSize(v).to_string();
            assert_eq!(p(&s), Ok(v), "{s}");
        }
    }

    #[test]
    fn serde_forms() {
        let y = serde_yaml::to_string(&ByteSize(1 << 30)).unwrap();
        assert_eq!(y.trim(), "1GiB");
        let y = serde_yaml::to_string(&ByteSize(1000)).unwrap();
        assert_eq!(y.trim(), "1000");
        let b: ByteSize = serde_yaml::from_str("1G").unwrap();
        assert_eq!(b, ByteSize(1 << 30));
        let b: ByteSize = serde_yaml::from_str("'4096'").unwrap();
        assert_eq!(b, ByteSize(4096));
        let b: ByteSize = serde_yaml::from_str("4096").unwrap();
        assert_eq!(b, ByteSize(4096));
        assert!(serde_yaml::from_str::<ByteSize>("-4").is_err());
        assert!(serde_yaml::from_str::<ByteSize>("1.5").is_err());
        assert!(serde_yaml::from_str::<ByteSize>("[1]").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_value_round_trips(v: u64) {
            let b = ByteSize(v);
            proptest::prop_assert_eq!(b.to_string().parse::<ByteSize>(), Ok(b));
            let y = serde_yaml::to_string(&b).unwrap();
            proptest::prop_assert_eq!(serde_yaml::from_str::<ByteSize>(&y).unwrap(), b);
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = s.parse::<ByteSize>();
        }
    }
}
