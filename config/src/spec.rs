//! The `--bdev-spec` shorthand: `malloc:1G`, `passthru:fault:null:4G:4096`, `uring:/dev/nvme0n1`.

use std::path::PathBuf;

use crate::check::check_body;
use crate::error::FieldPath;
use crate::model::*;
use crate::size::ByteSize;

/// The accepted spec forms, as shown in [`SpecError`] messages.
pub const SPEC_FORMS: &str =
    "null:SIZE[:BLOCK], malloc:SIZE[:BLOCK], uring:PATH[@SIZE[:prealloc]], passthru:SPEC, fault:SPEC, cow:SPEC";

/// How many `passthru:`/`fault:` layers a spec may stack.
pub const MAX_SPEC_DEPTH: usize = 32;

/// A `--bdev-spec` string that could not be parsed.
///
/// Displays as `invalid bdev spec "SPEC": MESSAGE (accepted forms: ...)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid bdev spec {spec:?}: {message} (accepted forms: {SPEC_FORMS})")]
pub struct SpecError {
    /// The whole spec that was given.
    pub spec: String,
    /// What is wrong with it.
    pub message: String,
}

enum Layer {
    Passthru,
    Fault,
    Cow,
}

/// Parse a bdev spec.
///
/// Grammar (type names are case-insensitive):
///
/// | spec | bdev |
/// |---|---|
/// | `null:SIZE[:BLOCK]` | `null` with that size and block size (default 512) |
/// | `malloc:SIZE[:BLOCK]` | `malloc`, likewise |
/// | `uring:PATH` | `uring` on `PATH` (everything after `uring:`, colons included, unless it ends in `@SIZE` or `@SIZE:WORD`), `O_DIRECT`, detected block size |
/// | `uring:PATH@SIZE` | same, creating or extending the file to `SIZE` (only if the text after the last `@` is a size) |
/// | `uring:PATH@SIZE:prealloc` | same, writing zeros over what `SIZE` creates or extends (YAML `preallocate: true`; `preallocate` is accepted too, in any case). Any other word after `@SIZE:` is an error |
/// | `passthru:SPEC` | `passthru` over the bdev `SPEC` describes (inline base) |
/// | `cow:SPEC` | the copy-on-write backup module over `SPEC` (the protected volume) |
/// | `fault:SPEC` | `fault` with default knobs (no errors, no latency, no volatile cache) over `SPEC` |
///
/// `SIZE` and `BLOCK` take the same forms as YAML sizes (`4096`, `4K`, `1GiB`, ...). Layers nest
/// up to [`MAX_SPEC_DEPTH`] deep: `passthru:fault:malloc:1G:4096`. The result is validated like
/// a config bdev (block size a power of two in 512..=65536, size non-zero and a multiple of the
/// block size).
///
/// ```
/// use hotcopy_config::{parse_spec, BaseRef, BdevConfig, ByteSize};
/// let b = parse_spec("passthru:malloc:1G").unwrap();
/// assert_eq!(
///     b,
///     BdevConfig::Passthru {
///         base: BaseRef::Inline(Box::new(BdevConfig::Malloc { size: ByteSize::gib(1), block_size: 512 })),
///     }
/// );
/// assert_eq!(b.to_spec().as_deref(), Some("passthru:malloc:1GiB"));
/// ```
pub fn parse_spec(spec: &str) -> Result<BdevConfig, SpecError> {
    let fail = |message: String| SpecError {
        spec: spec.to_string(),
        message,
    };
    let mut layers = Vec::new();
    let mut rest = spec.trim();
    let leaf = loop {
        if rest.is_empty() {
            return Err(fail(match layers.last() {
                None => "the spec is empty".to_string(),
                Some(_) => "a stacked bdev needs a base spec after the ':'".to_string(),
            }));
        }
        let (kind, args) = match rest.split_once(':') {
            Some((kind, args)) => (kind.trim(), Some(args.trim())),
            None => (rest, None),
        };
        let kind = kind.to_ascii_lowercase();
        match kind.as_str() {
            "passthru" | "fault" | "cow" => {
                if layers.len() >= MAX_SPEC_DEPTH {
                    return Err(fail(format!(
                        "too many stacked layers (at most {MAX_SPEC_DEPTH})"
                    )));
                }
                let Some(args) = args else {
                    return Err(fail(format!(
                        "{kind:?} needs a base spec, e.g. {kind}:malloc:1GiB"
                    )));
                };
                layers.push(match kind.as_str() {
                    "passthru" => Layer::Passthru,
                    "cow" => Layer::Cow,
                    _ => Layer::Fault,
                });
                rest = args;
            }
            "null" | "malloc" => {
                let args = args.unwrap_or("");
                if args.is_empty() {
                    return Err(fail(format!("{kind:?} needs a size, e.g. {kind}:1GiB")));
                }
                let mut parts = args.split(':');
                let size_text = parts.next().unwrap_or("").trim();
                let size: ByteSize = size_text.parse().map_err(|e| fail(format!("{e}")))?;
                let block_size = match parts.next() {
                    None => DEFAULT_BLOCK_SIZE,
                    Some(text) => parse_block_size(text.trim()).map_err(&fail)?,
                };
                if let Some(extra) = parts.next() {
                    return Err(fail(format!(
                        "unexpected {extra:?} after the block size; {kind} takes SIZE[:BLOCK]"
                    )));
                }
                break if kind == "null" {
                    BdevConfig::Null { size, block_size }
                } else {
                    BdevConfig::Malloc { size, block_size }
                };
            }
            "uring" => {
                let args = args.unwrap_or("");
                if args.is_empty() {
                    return Err(fail(
                        "\"uring\" needs a file or device path, e.g. uring:/var/tmp/disk.img"
                            .to_string(),
                    ));
                }
                let (path, size, preallocate) = split_uring(args).map_err(&fail)?;
                if path.is_empty() {
                    return Err(fail("the uring path is empty".to_string()));
                }
                break BdevConfig::Uring {
                    path: PathBuf::from(path),
                    size,
                    block_size: None,
                    direct: true,
                    preallocate,
                };
            }
            _ => {
                return Err(fail(format!(
                    "unknown bdev type {kind:?}, expected one of {}",
                    BDEV_TYPES.join(", ")
                )))
            }
        }
    };
    let mut bdev = leaf;
    for layer in layers.into_iter().rev() {
        let base = BaseRef::Inline(Box::new(bdev));
        bdev = match layer {
            Layer::Passthru => BdevConfig::Passthru { base },
            Layer::Cow => BdevConfig::Cow { base },
            Layer::Fault => BdevConfig::Fault {
                base,
                read_error_rate: 0.0,
                write_error_rate: 0.0,
                latency_us: 0,
                volatile_cache: false,
            },
        };
    }
    check_body(&bdev, &FieldPath::root()).map_err(|issue| fail(issue.message))?;
    Ok(bdev)
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    let size: ByteSize = text
        .parse()
        .map_err(|_| format!("invalid block size {text:?}: expected a number such as 512 or 4K"))?;
    u32::try_from(size.bytes()).map_err(|_| format!("block size {text:?} is too large"))
}

/// The word after `@SIZE:` that asks for a preallocated file.
const PREALLOC: &str = "prealloc";

/// `PATH[@SIZE[:prealloc]]`: split at the last `@` only if what follows is a
/// size, or a size, a `:` and an option (which must then be `prealloc`).
type UringArgs<'a> = (&'a str, Option<ByteSize>, bool);
fn split_uring(args: &str) -> Result<UringArgs<'_>, String> {
    if let Some((path, tail)) = args.rsplit_once('@') {
        if let Ok(size) = tail.trim().parse::<ByteSize>() {
            return Ok((path.trim(), Some(size), false));
        }
        if let Some((size, option)) = tail.split_once(':') {
            if let Ok(size) = size.trim().parse::<ByteSize>() {
                let option = option.trim();
                if option.eq_ignore_ascii_case(PREALLOC)
                    || option.eq_ignore_ascii_case("preallocate")
                {
                    return Ok((path.trim(), Some(size), true));
                }
                let what = match option {
                    "" => "a uring option after the size's ':' is missing".to_string(),
                    _ => format!("unknown uring option {option:?} after the size"),
                };
                return Err(format!(
                    "{what}; the one option is {PREALLOC:?} (write zeros over what the size \
                     creates or extends)"
                ));
            }
        }
    }
    // `PATH:prealloc` with no size, or with a size that does not parse:
    // more likely a mistake than a file name.
    if let Some((_, word)) = args.rsplit_once(':') {
        if word.trim().eq_ignore_ascii_case(PREALLOC) {
            return Err(format!(
                "{PREALLOC:?} follows a size: uring:PATH@SIZE:{PREALLOC} (the size the file is \
                 created or extended to, e.g. @4G)"
            ));
        }
    }
    Ok((args, None, false))
}

impl BdevConfig {
    /// The `--bdev-spec` string for this bdev, if the spec grammar can express it: not for
    /// named bases, `fault` with non-default knobs, `uring` with an explicit block size,
    /// `direct: false` or `preallocate: true` without a size, or paths that are not UTF-8 or
    /// would parse back differently.
    /// [`parse_spec`] of the result gives back an equal bdev.
    pub fn to_spec(&self) -> Option<String> {
        let inline = |base: &BaseRef| match base {
            BaseRef::Inline(inner) => inner.to_spec(),
            BaseRef::Name(_) => None,
        };
        match self {
            BdevConfig::Null { size, block_size } | BdevConfig::Malloc { size, block_size } => {
                let kind = self.type_name();
                Some(if *block_size == DEFAULT_BLOCK_SIZE {
                    format!("{kind}:{size}")
                } else {
                    format!("{kind}:{size}:{block_size}")
                })
            }
            BdevConfig::Uring {
                path,
                size,
                block_size: None,
                direct: true,
                preallocate,
            } => {
                let path = path.to_str()?;
                if path.is_empty() || path.trim() != path {
                    return None;
                }
                match (size, preallocate) {
                    (Some(size), false) => Some(format!("uring:{path}@{size}")),
                    (Some(size), true) => Some(format!("uring:{path}@{size}:{PREALLOC}")),
                    (None, true) => None,
                    // `a@1G` alone would be read as path `a` with size 1G.
                    (None, false) if !matches!(split_uring(path), Ok((_, None, _))) => None,
                    (None, false) => Some(format!("uring:{path}")),
                }
            }
            BdevConfig::Uring { .. } => None,
            BdevConfig::Passthru { base } => Some(format!("passthru:{}", inline(base)?)),
            BdevConfig::Cow { base } => Some(format!("cow:{}", inline(base)?)),
            BdevConfig::Fault {
                base,
                read_error_rate,
                write_error_rate,
                latency_us: 0,
                volatile_cache: false,
            } if *read_error_rate == 0.0 && *write_error_rate == 0.0 => {
                Some(format!("fault:{}", inline(base)?))
            }
            BdevConfig::Fault { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malloc(size: u64, block_size: u32) -> BdevConfig {
        BdevConfig::Malloc {
            size: ByteSize(size),
            block_size,
        }
    }

    fn inline(b: BdevConfig) -> BaseRef {
        BaseRef::Inline(Box::new(b))
    }

    /// A `uring` bdev with `O_DIRECT` and a detected block size.
    fn uring(path: &str, size: Option<u64>, preallocate: bool) -> BdevConfig {
        BdevConfig::Uring {
            path: path.into(),
            size: size.map(ByteSize),
            block_size: None,
            direct: true,
            preallocate,
        }
    }

    #[test]
    fn leaves() {
        assert_eq!(parse_spec("malloc:1G"), Ok(malloc(1 << 30, 512)));
        assert_eq!(parse_spec("malloc:64MiB:4096"), Ok(malloc(64 << 20, 4096)));
        assert_eq!(
            parse_spec(" MALLOC : 64M : 4K "),
            Ok(malloc(64 << 20, 4096))
        );
        assert_eq!(
            parse_spec("null:4G:512"),
            Ok(BdevConfig::Null {
                size: ByteSize(4 << 30),
                block_size: 512
            })
        );
        assert_eq!(
            parse_spec("uring:/var/tmp/disk.img"),
            Ok(BdevConfig::Uring {
                path: "/var/tmp/disk.img".into(),
                size: None,
                block_size: None,
                direct: true,
                preallocate: false
            })
        );
        assert_eq!(
            parse_spec("uring:/var/tmp/a:b@c.img"),
            Ok(BdevConfig::Uring {
                path: "/var/tmp/a:b@c.img".into(),
                size: None,
                block_size: None,
                direct: true,
                preallocate: false
            })
        );
        assert_eq!(
            parse_spec("uring:/var/tmp/x@dir/disk.img@4GiB"),
            Ok(BdevConfig::Uring {
                path: "/var/tmp/x@dir/disk.img".into(),
                size: Some(ByteSize(4 << 30)),
                block_size: None,
                direct: true,
                preallocate: false
            })
        );
    }

    #[test]
    fn nesting() {
        assert_eq!(
            parse_spec("passthru:passthru:malloc:1G"),
            Ok(BdevConfig::Passthru {
                base: inline(BdevConfig::Passthru {
                    base: inline(malloc(1 << 30, 512))
                })
            })
        );
        assert_eq!(
            parse_spec("fault:passthru:null:1M:4096"),
            Ok(BdevConfig::Fault {
                base: inline(BdevConfig::Passthru {
                    base: inline(BdevConfig::Null {
                        size: ByteSize(1 << 20),
                        block_size: 4096
                    })
                }),
                read_error_rate: 0.0,
                write_error_rate: 0.0,
                latency_us: 0,
                volatile_cache: false,
            })
        );
        let deep = format!("{}malloc:1M", "passthru:".repeat(MAX_SPEC_DEPTH));
        assert!(parse_spec(&deep).is_ok());
        let too_deep = format!("{}malloc:1M", "passthru:".repeat(MAX_SPEC_DEPTH + 1));
        assert!(parse_spec(&too_deep)
            .unwrap_err()
            .message
            .contains("too many"));
        let huge = format!("{}malloc:1M", "fault:".repeat(100_000));
        assert!(parse_spec(&huge).is_err());
    }

    fn err(spec: &str) -> String {
        let e = parse_spec(spec).unwrap_err();
        assert_eq!(e.spec, spec);
        let shown = e.to_string();
        assert!(shown.contains(SPEC_FORMS), "{shown}");
        assert!(
            shown.starts_with(&format!("invalid bdev spec {spec:?}: ")),
            "{shown}"
        );
        e.message
    }

    #[test]
    fn errors() {
        assert_eq!(err(""), "the spec is empty");
        assert_eq!(
            err("disk:1G"),
            "unknown bdev type \"disk\", expected one of null, malloc, uring, passthru, fault, cow"
        );
        assert_eq!(err("malloc"), "\"malloc\" needs a size, e.g. malloc:1GiB");
        assert_eq!(err("malloc:"), "\"malloc\" needs a size, e.g. malloc:1GiB");
        assert_eq!(
            err("malloc:12X"),
            "invalid size \"12X\": expected a number with an optional K/M/G/T suffix"
        );
        assert_eq!(
            err("malloc:1G:1000"),
            "invalid block_size 1000: must be a power of two between 512 and 65536"
        );
        assert_eq!(
            err("null:1G:abc"),
            "invalid block size \"abc\": expected a number such as 512 or 4K"
        );
        assert_eq!(
            err("malloc:1G:512:9"),
            "unexpected \"9\" after the block size; malloc takes SIZE[:BLOCK]"
        );
        assert_eq!(err("malloc:0"), "size must be greater than 0");
        assert_eq!(
            err("malloc:1000"),
            "size 1000 is not a multiple of the block size (512)"
        );
        assert_eq!(
            err("passthru"),
            "\"passthru\" needs a base spec, e.g. passthru:malloc:1GiB"
        );
        assert_eq!(
            err("passthru:"),
            "a stacked bdev needs a base spec after the ':'"
        );
        assert_eq!(
            err("fault:passthru:bogus:1"),
            "unknown bdev type \"bogus\", expected one of null, malloc, uring, passthru, fault, cow"
        );
        assert!(err("uring:").contains("needs a file or device path"));
        assert_eq!(err("uring:@1G"), "the uring path is empty");
        assert_eq!(err("uring:/x@0"), "size must be greater than 0");
        assert!(err("null:1G:99999999999").contains("too large"));
    }

    #[test]
    fn to_spec_round_trips() {
        for spec in [
            "malloc:1GiB",
            "malloc:64MiB:4096",
            "null:1000:8",
            "uring:/var/tmp/disk.img",
            "uring:/var/tmp/disk.img@4GiB",
            "uring:relative:with:colons",
            "passthru:passthru:malloc:1GiB",
            "fault:passthru:null:4KiB:4096",
        ] {
            let Ok(bdev) = parse_spec(spec) else {
                // "null:1000:8" has an invalid block size; it must be rejected.
                assert_eq!(spec, "null:1000:8");
                continue;
            };
            assert_eq!(bdev.to_spec().as_deref(), Some(spec));
            assert_eq!(parse_spec(spec), Ok(bdev));
        }
    }

    #[test]
    fn to_spec_not_representable() {
        let named = BdevConfig::Passthru {
            base: BaseRef::Name("vol0".into()),
        };
        assert_eq!(named.to_spec(), None);
        let knobs = BdevConfig::Fault {
            base: inline(malloc(1 << 20, 512)),
            read_error_rate: 0.5,
            write_error_rate: 0.0,
            latency_us: 0,
            volatile_cache: false,
        };
        assert_eq!(knobs.to_spec(), None);
        let buffered = BdevConfig::Uring {
            path: "/x".into(),
            size: None,
            block_size: None,
            direct: false,
            preallocate: false,
        };
        assert_eq!(buffered.to_spec(), None);
        let preallocated = uring("/x", Some(1 << 30), true);
        let spec = preallocated.to_spec().unwrap();
        assert_eq!(spec, "uring:/x@1GiB:prealloc");
        assert_eq!(parse_spec(&spec), Ok(preallocated));
        assert_eq!(uring("/x", None, true).to_spec(), None);
        assert_eq!(uring("/x@1G:full", None, false).to_spec(), None);
        let ambiguous = BdevConfig::Uring {
            path: "/x@1G".into(),
            size: None,
            block_size: None,
            direct: true,
            preallocate: false,
        };
        assert_eq!(ambiguous.to_spec(), None);
        let with_size = BdevConfig::Uring {
            path: "/x@1G".into(),
            size: Some(ByteSize(1 << 30)),
            block_size: None,
            direct: true,
            preallocate: false,
        };
        let spec = with_size.to_spec().unwrap();
        assert_eq!(parse_spec(&spec), Ok(with_size));
    }

    #[test]
    fn uring_prealloc_option() {
        let want = |path: &str, preallocate| Ok(uring(path, Some(4 << 30), preallocate));
        assert_eq!(parse_spec("uring:/t.img@4G:prealloc"), want("/t.img", true));
        assert_eq!(
            parse_spec("uring:/t.img@4G : PreAllocate "),
            want("/t.img", true)
        );
        assert_eq!(parse_spec("cow:uring:/t.img@4G"), {
            let leaf = want("/t.img", false).unwrap();
            Ok(BdevConfig::Cow { base: inline(leaf) })
        });
        // The option is read after the last `@` only.
        assert_eq!(
            parse_spec("uring:/a@1G:prealloc/t.img@4G"),
            want("/a@1G:prealloc/t.img", false)
        );
        for (bad, says) in [
            ("uring:/t.img@4G:full", "unknown uring option \"full\""),
            ("uring:/t.img@4G:", "option after the size's ':' is missing"),
            ("uring:/t.img:prealloc", "follows a size"),
            ("uring:/t.img@4X:prealloc", "follows a size"),
        ] {
            let err = parse_spec(bad).unwrap_err();
            assert!(
                err.message.contains(says) && err.message.contains("prealloc"),
                "{bad}: {err}"
            );
        }
        // Not a size and not the option after the last `@`: all of it is the path.
        assert_eq!(
            parse_spec("uring:/t@x:v2"),
            Ok(uring("/t@x:v2", None, false))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_spec_never_panics(s in "\\PC{0,64}") {
            let _ = parse_spec(&s);
        }

        #[test]
        fn parse_spec_grammar_shaped_never_panics(
            s in "((passthru|fault|null|malloc|uring|x):){0,6}[0-9KMGiB@/:a-z]{0,12}"
        ) {
            if let Ok(b) = parse_spec(&s) {
                if let Some(spec) = b.to_spec() {
                    proptest::prop_assert_eq!(parse_spec(&spec), Ok(b));
                }
            }
        }
    }
}
