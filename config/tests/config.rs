//! Valid configs: defaults, examples, round trips, build order, serde impls, no panics.

use std::path::{Path, PathBuf};

use hotcopy_config::*;
use proptest::prelude::*;

fn parse(text: &str) -> Config {
    match parse_str(text, "test.yaml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_loads_validates_and_round_trips() {
    let files = examples();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_owned())
        .collect();
    for want in ["malloc.yaml", "uring.yaml", "stack.yaml"] {
        assert!(names.iter().any(|n| n == want), "missing example {want}");
    }
    for file in files {
        let config = load(&file).unwrap_or_else(|e| panic!("{e}"));
        config.validate().unwrap();
        assert!(!config.bdevs.is_empty(), "{}", file.display());
        let yaml = config.to_yaml();
        assert_eq!(parse(&yaml), config, "{}:\n{yaml}", file.display());
        // The plain serde impl agrees.
        let via_serde: Config =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(via_serde, config);
    }
}

#[test]
fn example_contents() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let malloc = load(&dir.join("malloc.yaml")).unwrap();
    assert_eq!(
        malloc.bdev("malloc0").unwrap().bdev,
        BdevConfig::Malloc {
            size: ByteSize::gib(1),
            block_size: 512
        }
    );
    assert_eq!(
        malloc.bdev("pt0").unwrap().bdev,
        BdevConfig::Passthru {
            base: BaseRef::Name("malloc0".into())
        }
    );

    let uring = load(&dir.join("uring.yaml")).unwrap();
    assert_eq!(
        uring.bdevs[0].bdev,
        BdevConfig::Uring {
            path: "/var/tmp/hotcopy-disk.img".into(),
            size: Some(ByteSize::gib(4)),
            block_size: None,
            direct: true,
            preallocate: false
        }
    );

    let stack = load(&dir.join("stack.yaml")).unwrap();
    assert_eq!(stack.reactors.idle, IdleMode::Sleep);
    let flaky = &stack.bdev("flaky").unwrap().bdev;
    assert_eq!(flaky.type_name(), "fault");
    assert_eq!(flaky.base(), Some(&BaseRef::Name("pt0".into())));
    assert_eq!(stack.bdev("pt0").unwrap().bdev.type_name(), "passthru");
    assert_eq!(stack.bdev("ram0").unwrap().bdev.type_name(), "malloc");
    let scratch = &stack.bdev("scratch-fault").unwrap().bdev;
    assert!(matches!(scratch.base(), Some(BaseRef::Inline(b)) if b.type_name() == "null"));
    let order: Vec<&str> = stack
        .build_order()
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(order, ["ram0", "pt0", "flaky", "scratch-fault"]);
}

#[test]
fn defaults() {
    let c = parse("");
    assert_eq!(c, Config::default());
    assert_eq!(parse("# only a comment\n"), Config::default());
    assert_eq!(
        parse("reactors:\nbuffer_pool:\nbdevs:\n"),
        Config::default()
    );
    assert_eq!(c.reactors.cores, CoreList::Count(1));
    assert_eq!(c.reactors.cores.cpus(), vec![0]);
    assert_eq!(c.reactors.idle, IdleMode::Poll);
    assert_eq!(c.buffer_pool.hugepages, HugepagesMode::Auto);
    assert_eq!(c.buffer_pool.buffer_size, ByteSize(128 * 1024));
    assert_eq!(c.buffer_pool.count, 1024);
    assert!(c.bdevs.is_empty());
    Config::default().validate().unwrap();

    let text = "bdevs:\n  - name: u\n    type: uring\n    path: /d\n  - name: f\n    type: fault\n    base: u\n";
    let c = parse(text);
    assert_eq!(
        c.bdevs[0].bdev,
        BdevConfig::Uring {
            path: "/d".into(),
            size: None,
            block_size: None,
            direct: true,
            preallocate: false
        }
    );
    assert_eq!(
        c.bdevs[1].bdev,
        BdevConfig::Fault {
            base: BaseRef::Name("u".into()),
            read_error_rate: 0.0,
            write_error_rate: 0.0,
            latency_us: 0,
            volatile_cache: false
        }
    );
}

#[test]
fn uring_preallocate() {
    let text =
        "bdevs:\n  - name: u\n    type: uring\n    path: /d\n    size: 1G\n    preallocate: true\n";
    let c = parse(text);
    assert_eq!(
        c.bdevs[0].bdev,
        BdevConfig::Uring {
            path: "/d".into(),
            size: Some(ByteSize::gib(1)),
            block_size: None,
            direct: true,
            preallocate: true
        }
    );
    c.validate().unwrap();
    let yaml = c.to_yaml();
    assert!(yaml.contains("preallocate: true"), "{yaml}");
    assert_eq!(parse(&yaml), c);
    // `false` is the default, and is left out when written.
    let c = parse("bdevs: [{name: u, type: uring, path: /d, preallocate: false}]");
    assert!(matches!(
        c.bdevs[0].bdev,
        BdevConfig::Uring {
            preallocate: false,
            ..
        }
    ));
    let yaml = c.to_yaml();
    assert!(!yaml.contains("preallocate"), "{yaml}");
    // Inline, and through the plain serde impl.
    let b: BdevConfig =
        serde_yaml::from_str("{type: uring, path: /d, size: 1M, preallocate: true}").unwrap();
    assert!(matches!(
        b,
        BdevConfig::Uring {
            preallocate: true,
            ..
        }
    ));
    // The spec shorthand says it after the size, and reads it back.
    let spec = b
        .to_spec()
        .expect("a preallocated file with a size has a spec");
    assert_eq!(spec, "uring:/d@1MiB:prealloc");
    assert_eq!(parse_spec(&spec).unwrap(), b);
}

#[test]
fn cores_and_keywords() {
    assert_eq!(
        parse("reactors: {cores: 3}").reactors.cores.cpus(),
        vec![0, 1, 2]
    );
    let c = parse("reactors: {cores: [2, 5], idle: Sleep}");
    assert_eq!(c.reactors.cores, CoreList::List(vec![2, 5]));
    assert_eq!(c.reactors.cores.cpus(), vec![2, 5]);
    assert_eq!(c.reactors.idle, IdleMode::Sleep);
    for (text, mode) in [
        ("auto", HugepagesMode::Auto),
        ("on", HugepagesMode::On),
        ("off", HugepagesMode::Off),
        ("true", HugepagesMode::On),
        ("false", HugepagesMode::Off),
        ("'off'", HugepagesMode::Off),
    ] {
        let c = parse(&format!("buffer_pool: {{hugepages: {text}}}"));
        assert_eq!(c.buffer_pool.hugepages, mode, "{text}");
    }
}

#[test]
fn sizes_in_yaml() {
    for (text, bytes) in [
        ("4096", 4096u64),
        ("'4096'", 4096),
        ("4K", 4096),
        ("1G", 1 << 30),
        ("1 GB", 1 << 30),
        ("\"512 MiB\"", 512 << 20),
        ("2tib", 2 << 40),
    ] {
        let c = parse(&format!("bdevs: [{{name: a, type: malloc, size: {text}}}]"));
        assert_eq!(
            c.bdevs[0].bdev,
            BdevConfig::Malloc {
                size: ByteSize(bytes),
                block_size: 512
            }
        );
    }
}

#[test]
fn type_names_and_null() {
    // `null` is written unquoted in YAML but is still a type name here.
    let c = parse("bdevs:\n  - name: n\n    type: null\n    size: 1G\n");
    assert_eq!(c.bdevs[0].bdev.type_name(), "null");
    assert_eq!(c.bdevs[0].bdev.base(), None);
    let yaml = c.to_yaml();
    assert_eq!(parse(&yaml), c);
}

fn full_config() -> Config {
    Config {
        reactors: ReactorsConfig {
            cores: CoreList::List(vec![3, 1]),
            idle: IdleMode::Sleep,
        },
        buffer_pool: BufferPoolConfig {
            hugepages: HugepagesMode::Off,
            buffer_size: ByteSize(12288),
            count: 7,
        },
        bdevs: vec![
            NamedBdev {
                name: "f".into(),
                bdev: BdevConfig::Fault {
                    base: BaseRef::Name("p".into()),
                    read_error_rate: 0.1,
                    write_error_rate: 1.0,
                    latency_us: 12,
                    volatile_cache: true,
                },
            },
            NamedBdev {
                name: "p".into(),
                bdev: BdevConfig::Passthru {
                    base: BaseRef::Name("u".into()),
                },
            },
            NamedBdev {
                name: "u".into(),
                bdev: BdevConfig::Uring {
                    path: "/tmp/with: colon #and hash".into(),
                    size: Some(ByteSize(3 << 30)),
                    block_size: Some(4096),
                    direct: false,
                    preallocate: true,
                },
            },
            NamedBdev {
                name: "true".into(),
                bdev: BdevConfig::Passthru {
                    base: BaseRef::Inline(Box::new(BdevConfig::Fault {
                        base: BaseRef::Inline(Box::new(BdevConfig::Null {
                            size: ByteSize(1000 * 512),
                            block_size: 512,
                        })),
                        read_error_rate: 0.0,
                        write_error_rate: 0.25,
                        latency_us: 0,
                        volatile_cache: false,
                    })),
                },
            },
            NamedBdev {
                name: "123".into(),
                bdev: BdevConfig::Malloc {
                    size: ByteSize(65536),
                    block_size: 65536,
                },
            },
        ],
        rpc_socket: Some("/var/tmp/with space.sock".into()),
        exports: vec![
            ExportConfig {
                name: "disk one".into(),
                bdev: "123".into(),
                listen: "unix:/var/tmp/nbd.sock".parse().unwrap(),
                read_only: false,
            },
            ExportConfig {
                name: "u".into(),
                bdev: "u".into(),
                listen: "[::1]:10809".parse().unwrap(),
                read_only: true,
            },
        ],
        tracking: Default::default(),
    }
}

#[test]
fn to_yaml_round_trips() {
    let c = full_config();
    c.validate().unwrap();
    let yaml = c.to_yaml();
    assert_eq!(parse(&yaml), c, "{yaml}");
    // And the output looks like the documented schema.
    assert!(yaml.contains("idle: sleep"), "{yaml}");
    assert!(yaml.contains("buffer_size: 12KiB"), "{yaml}");
    assert!(yaml.contains("size: 3GiB"), "{yaml}");
    assert!(
        yaml.contains("- name: f\n  type: fault\n  base: p\n"),
        "{yaml}"
    );
}

#[test]
fn serde_impls_on_their_own() {
    let b: BdevConfig = serde_yaml::from_str("{type: malloc, size: 1M}").unwrap();
    assert_eq!(
        b,
        BdevConfig::Malloc {
            size: ByteSize(1 << 20),
            block_size: 512
        }
    );
    let n: NamedBdev =
        serde_yaml::from_str("{name: a, type: passthru, base: {type: null, size: 1M}}").unwrap();
    assert_eq!(n.name, "a");
    assert_eq!(n.bdev.type_name(), "passthru");
    let r: BaseRef = serde_yaml::from_str("vol0").unwrap();
    assert_eq!(r, BaseRef::Name("vol0".into()));
    assert!(serde_yaml::from_str::<BdevConfig>("{type: malloc, size: 1M, path: /x}").is_err());
    assert!(serde_yaml::from_str::<BdevConfig>("{name: a, type: malloc, size: 1M}").is_err());
    assert!(serde_yaml::from_str::<NamedBdev>("{type: malloc, size: 1M}").is_err());
    let e = serde_yaml::from_str::<NamedBdev>("{name: a, type: malloc}").unwrap_err();
    assert!(e.to_string().contains("missing field \"size\""), "{e}");
    // Config's own Deserialize validates too.
    assert!(serde_yaml::from_str::<Config>("bdevs: [{name: a, type: passthru, base: b}]").is_err());
    // JSON works as well.
    let c: Config =
        serde_json::from_str(r#"{"bdevs":[{"name":"a","type":"malloc","size":"1G"}]}"#).unwrap();
    assert_eq!(
        c.bdevs[0].bdev,
        BdevConfig::Malloc {
            size: ByteSize(1 << 30),
            block_size: 512
        }
    );
    let json = serde_json::to_string(&full_config()).unwrap();
    assert_eq!(
        serde_json::from_str::<Config>(&json).unwrap(),
        full_config()
    );
}

#[test]
fn bdev_lookup() {
    let c = full_config();
    assert_eq!(c.bdev("u").unwrap().bdev.type_name(), "uring");
    assert!(c.bdev("nope").is_none());
    assert_eq!(c.bdevs[0].bdev.base_name(), Some("p"));
    assert_eq!(c.bdevs[3].bdev.base_name(), None);
}

fn order(c: &Config) -> Vec<&str> {
    c.build_order().iter().map(|b| b.name.as_str()).collect()
}

#[test]
fn build_order_puts_bases_first() {
    assert_eq!(order(&full_config()), ["u", "p", "f", "true", "123"]);
    let c = parse(
        "\
bdevs:
  - {name: top, type: passthru, base: mid}
  - {name: solo, type: null, size: 1M}
  - {name: mid, type: fault, base: {type: passthru, base: low}}
  - {name: low, type: malloc, size: 1M}
  - {name: other, type: passthru, base: solo}
",
    );
    let o = order(&c);
    assert_eq!(o, ["low", "mid", "top", "solo", "other"]);
    for b in &c.bdevs {
        if let Some(base) = b.bdev.base_name() {
            let pos = |n: &str| o.iter().position(|x| *x == n).unwrap();
            assert!(pos(base) < pos(&b.name), "{base} before {}", b.name);
        }
    }
}

#[test]
fn build_order_terminates_on_invalid_configs() {
    let mk = |name: &str, base: &str| NamedBdev {
        name: name.into(),
        bdev: BdevConfig::Passthru {
            base: BaseRef::Name(base.into()),
        },
    };
    let c = Config {
        bdevs: vec![mk("a", "b"), mk("b", "a"), mk("c", "zzz"), mk("d", "d")],
        ..Config::default()
    };
    assert_eq!(order(&c), ["b", "a", "c", "d"]);
    let e = c.validate().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert_eq!(e.line, None);
    // Unknown names are reported before cycles.
    assert_eq!(
        e.to_string(),
        "<config>: bdevs[2].base: unknown bdev \"zzz\" (defined: a, b, d)"
    );
    let c = Config {
        bdevs: vec![mk("a", "b"), mk("b", "a")],
        ..Config::default()
    };
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "<config>: bdevs[0].base: reference cycle: a -> b -> a"
    );
}

// ----------------------------------------------------------------------------------------
// Property tests.

fn leaf() -> impl Strategy<Value = BdevConfig> {
    let block = prop_oneof![Just(512u32), Just(4096), Just(65536)];
    prop_oneof![
        (1u64..1 << 20, block.clone(), any::<bool>()).prop_map(|(n, bs, null)| {
            let size = ByteSize(n * u64::from(bs));
            if null {
                BdevConfig::Null {
                    size,
                    block_size: bs,
                }
            } else {
                BdevConfig::Malloc {
                    size,
                    block_size: bs,
                }
            }
        }),
        (
            "/[a-z0-9 :@#._-]{1,20}",
            proptest::option::of(1u64..1 << 20),
            proptest::option::of(block),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(path, size, bs, direct, preallocate)| BdevConfig::Uring {
                path: path.into(),
                size: size.map(|n| ByteSize(n * u64::from(bs.unwrap_or(512)))),
                block_size: bs,
                direct,
                preallocate,
            }),
    ]
}

/// A bdev tree; a `Passthru` whose base is `Name("")` is a placeholder for a named base.
fn tree() -> impl Strategy<Value = BdevConfig> {
    let placeholder = Just(BdevConfig::Passthru {
        base: BaseRef::Name(String::new()),
    });
    prop_oneof![3 => leaf(), 1 => placeholder].prop_recursive(4, 8, 1, |inner| {
        prop_oneof![
            inner.clone().prop_map(|b| BdevConfig::Passthru {
                base: BaseRef::Inline(Box::new(b))
            }),
            (
                inner,
                0.0f64..=1.0,
                0.0f64..=1.0,
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(b, r, w, latency_us, volatile_cache)| BdevConfig::Fault {
                    base: BaseRef::Inline(Box::new(b)),
                    read_error_rate: r,
                    write_error_rate: w,
                    latency_us,
                    volatile_cache,
                }),
        ]
    })
}

/// Replace the placeholder of bdev `i` by a reference to bdev `i - 1` (each claimed once, no
/// cycles), or by a malloc leaf for bdev 0.
fn resolve(b: &mut BdevConfig, prev: Option<&str>) {
    match b {
        BdevConfig::Passthru { base } | BdevConfig::Fault { base, .. } => match base {
            BaseRef::Inline(inner) => resolve(inner, prev),
            BaseRef::Name(name) if name.is_empty() => match prev {
                Some(p) => *name = p.to_string(),
                None => {
                    *base = BaseRef::Inline(Box::new(BdevConfig::Malloc {
                        size: ByteSize(1 << 20),
                        block_size: 512,
                    }))
                }
            },
            BaseRef::Name(_) => {}
        },
        _ => {}
    }
}

fn config() -> impl Strategy<Value = Config> {
    let cores = prop_oneof![
        (1usize..64).prop_map(CoreList::Count),
        proptest::collection::btree_set(0usize..1024, 1..8)
            .prop_map(|s| CoreList::List(s.into_iter().rev().collect())),
    ];
    let idle = prop_oneof![Just(IdleMode::Poll), Just(IdleMode::Sleep)];
    let huge = prop_oneof![
        Just(HugepagesMode::Auto),
        Just(HugepagesMode::On),
        Just(HugepagesMode::Off)
    ];
    (
        cores,
        idle,
        huge,
        1u64..1024,
        1usize..100_000,
        proptest::collection::vec(tree(), 0..6),
        "[A-Za-z0-9_.-]{1,8}",
    )
        .prop_map(|(cores, idle, hugepages, pages, count, trees, prefix)| {
            let mut bdevs: Vec<NamedBdev> = Vec::new();
            for (i, mut bdev) in trees.into_iter().enumerate() {
                let prev = bdevs.last().map(|b| b.name.clone());
                resolve(&mut bdev, prev.as_deref());
                bdevs.push(NamedBdev {
                    name: format!("{prefix}{i}"),
                    bdev,
                });
            }
            Config {
                reactors: ReactorsConfig { cores, idle },
                buffer_pool: BufferPoolConfig {
                    hugepages,
                    buffer_size: ByteSize(pages * 4096),
                    count,
                },
                bdevs,
                ..Config::default()
            }
        })
}

const VALID: &str = include_str!("../examples/stack.yaml");

/// Random edits of a valid file: delete, insert or replace a span with YAML-ish text.
fn mutated() -> impl Strategy<Value = String> {
    let edit = (
        any::<proptest::sample::Index>(),
        0usize..12,
        "[ \\n:\\-\\[\\]{}#&*!|>'\"a-z0-9.,?%@`~]{0,8}",
    );
    proptest::collection::vec(edit, 1..6).prop_map(|edits| {
        let mut text: Vec<char> = VALID.chars().collect();
        for (at, len, insert) in edits {
            let start = at.index(text.len() + 1);
            let end = (start + len).min(text.len());
            text.splice(start..end, insert.chars());
        }
        text.into_iter().collect()
    })
}

fn check_outcome(text: &str) {
    match parse_str(text, "fuzz.yaml") {
        Ok(config) => {
            config.validate().unwrap();
            let again = parse_str(&config.to_yaml(), "again.yaml").unwrap();
            assert_eq!(again, config);
            let _ = config.build_order();
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(!e.message.is_empty());
            if e.kind == ErrorKind::Invalid {
                assert!(e.line.is_some(), "{e}");
            }
            if let Some(line) = e.line {
                assert!(line <= text.lines().count() + 1, "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_configs_round_trip(config in config()) {
        config.validate().unwrap();
        let yaml = config.to_yaml();
        let back = parse_str(&yaml, "gen.yaml").map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert_eq!(&back, &config);
        let order = config.build_order();
        prop_assert_eq!(order.len(), config.bdevs.len());
        for b in &config.bdevs {
            if let Some(spec) = b.bdev.to_spec() {
                prop_assert_eq!(&parse_spec(&spec).unwrap(), &b.bdev);
            }
        }
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        check_outcome(&text);
    }

    #[test]
    fn yamlish_text_never_panics(text in "[ \\n:\\-\\[\\]{}#&*!a-z0-9_]{0,120}") {
        check_outcome(&text);
    }

    #[test]
    fn mutated_files_never_panic(text in mutated()) {
        check_outcome(&text);
    }
}

#[test]
fn serve_sections_parse_with_defaults_and_round_trip() {
    let c = parse(
        "\
bdevs:
  - {name: disk, type: uring, path: /var/tmp/d.img, size: 64M}
  - name: vol
    type: cow
    base: disk
    tracking:
      bdev: uring:/var/tmp/vol.cbt@1M
  - name: vol2
    type: cow
    base: {type: malloc, size: 8M}
    tracking:
      bdev: stores
      offset: 8K
  - {name: stores, type: malloc, size: 1M}
rpc_socket: /var/tmp/h.sock
exports:
  - bdev: vol
  - {bdev: vol2, name: second, listen: unix:/var/tmp/n.sock, read_only: true}
",
    );
    assert_eq!(c.rpc_socket.as_deref(), Some(Path::new("/var/tmp/h.sock")));
    assert_eq!(
        c.exports[0],
        ExportConfig {
            name: "vol".into(),
            bdev: "vol".into(),
            listen: DEFAULT_NBD_LISTEN.parse().unwrap(),
            read_only: false,
        }
    );
    assert_eq!(c.exports[1].listen, Listen::Unix("/var/tmp/n.sock".into()));
    assert!(c.exports[1].read_only);
    let t = &c.tracking["vol"];
    assert_eq!(t.offset, ByteSize(0));
    assert_eq!(
        t.bdev,
        BaseRef::Inline(Box::new(BdevConfig::Uring {
            path: "/var/tmp/vol.cbt".into(),
            size: Some(ByteSize::mib(1)),
            block_size: None,
            direct: true,
            preallocate: false
        }))
    );
    assert_eq!(c.tracking["vol2"].bdev, BaseRef::Name("stores".into()));
    assert_eq!(c.tracking["vol2"].offset, ByteSize(8192));
    let yaml = c.to_yaml();
    assert_eq!(parse(&yaml), c, "{yaml}");
    assert!(yaml.contains("  tracking:\n"), "{yaml}");
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    // The store is created before the cow bdev that keeps its tracking there.
    let order: Vec<&str> = c.creation_order().iter().map(|b| b.name.as_str()).collect();
    let at = |n: &str| order.iter().position(|x| *x == n).unwrap();
    assert!(at("stores") < at("vol2"), "{order:?}");
    assert!(at("disk") < at("vol"), "{order:?}");
    assert_eq!(order.len(), 4);
}

#[test]
fn creation_order_terminates_on_cycles_through_tracking() {
    let mut c =
        parse("bdevs:\n  - {name: a, type: cow, base: b}\n  - {name: b, type: malloc, size: 1M}\n");
    c.tracking.insert(
        "a".into(),
        TrackingConfig {
            bdev: BaseRef::Name("a".into()),
            offset: ByteSize(0),
        },
    );
    assert_eq!(c.creation_order().len(), 2);
    assert!(c.validate().is_err());
}
