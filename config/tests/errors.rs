//! Every kind of config error: exact file, line, column, field path and message.

use hotcopy_config::{load, parse_str, ConfigError, ErrorKind};

#[track_caller]
fn err(text: &str) -> ConfigError {
    match parse_str(text, "config.yaml") {
        Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
        Err(e) => {
            assert_eq!(e.file, "config.yaml", "for {text:?}");
            e
        }
    }
}

/// Asserts `line:column`, field path and kind; returns the message.
#[track_caller]
fn at(text: &str, line: usize, column: usize, field: &str, kind: ErrorKind) -> String {
    let e = err(text);
    assert_eq!(
        (e.line, e.column, e.field.as_str(), e.kind),
        (Some(line), Some(column), field, kind),
        "{e} (for {text:?})"
    );
    let shown = e.to_string();
    let prefix = if field.is_empty() {
        format!("config.yaml:{line}:{column}: ")
    } else {
        format!("config.yaml:{line}:{column}: {field}: ")
    };
    assert_eq!(shown, format!("{prefix}{}", e.message), "for {text:?}");
    e.message
}

/// An expected error: the input, `line`, `column`, field path, kind and message.
type Expected = (
    &'static str,
    usize,
    usize,
    &'static str,
    ErrorKind,
    &'static str,
);

/// Checks each case with [`at`], and its message. A failure shows the input.
#[track_caller]
fn expect(cases: &[Expected]) {
    for &(text, line, column, field, kind, message) in cases {
        assert_eq!(at(text, line, column, field, kind), message, "for {text:?}");
    }
}

use ErrorKind::{Invalid, Schema, Syntax};

// ----------------------------------------------------------------------------------------
// The examples from the spec of this crate.

#[test]
fn bad_size_example() {
    let text = "\
reactors:
  cores: 1
bdevs:
  - name: vol0
    type: malloc
  - name: vol1
    size: 12X
    type: malloc
";
    // (vol0 is missing its size too, but the YAML-level error comes first.)
    assert_eq!(
        err(text).to_string(),
        "config.yaml:7:11: bdevs[1].size: invalid size \"12X\": expected a number with an \
         optional K/M/G/T suffix"
    );
}

#[test]
fn unknown_base_example() {
    let text = "\
bdevs:
  - name: vol0
    type: malloc
    size: 1G

  - name: pt
    type: passthru
    base: vol0

  - name: pt2
    type: passthru
    base: vol9
";
    assert_eq!(
        err(text).to_string(),
        "config.yaml:12:11: bdevs[2].base: unknown bdev \"vol9\" (defined: vol0, pt)"
    );
    let none = "bdevs:\n  - name: pt\n    type: passthru\n    base: pt\n";
    // A self reference is a cycle, not an unknown name.
    expect(&[(
        none,
        4,
        11,
        "bdevs[0].base",
        Invalid,
        "reference cycle: pt -> pt",
    )]);
}

#[test]
fn unknown_variant_example() {
    let text = "reactors:\n  cores: 1\n  idle: spin\n";
    assert_eq!(
        err(text).to_string(),
        "config.yaml:3:9: reactors.idle: unknown variant \"spin\", expected one of poll, sleep"
    );
    expect(&[(
        "buffer_pool:\n  hugepages: maybe\n",
        2,
        14,
        "buffer_pool.hugepages",
        Schema,
        "unknown variant \"maybe\", expected one of auto, on, off",
    )]);
}

// ----------------------------------------------------------------------------------------
// Syntax and type errors (located by the YAML parser).

#[test]
fn syntax_errors() {
    let text = "bdevs:\n  - name: a\n  type: passthru\n";
    assert_eq!(
        err(text).to_string(),
        "config.yaml:3:3: did not find expected '-' indicator, while parsing a block \
         collection at line 2 column 3"
    );
    at(text, 3, 3, "", Syntax);

    let msg = at("reactors: [\n", 2, 1, "", Syntax);
    assert!(msg.contains("did not find expected node content"), "{msg}");

    let msg = at("reactors:\n  cores: 1\n   idle: poll\n", 3, 8, "", Syntax);
    assert!(msg.contains("mapping values are not allowed"), "{msg}");

    let e = err("a: 1\n---\nb: 2\n");
    assert_eq!(e.kind, Syntax);
    assert!(e.message.contains("more than one document"), "{e}");

    let msg = at("bdevs:\n  - name: a\n    size: *nope\n", 3, 11, "", Syntax);
    assert!(msg.contains("unknown anchor"), "{msg}");
}

#[test]
fn type_errors() {
    let base = "bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n";
    let msg = at(
        &format!("{base}    block_size: abc\n"),
        5,
        17,
        "bdevs[0].block_size",
        Schema,
    );
    assert_eq!(msg, "invalid type: string \"abc\", expected u32");

    let msg = at(
        "buffer_pool:\n  count: -1\n",
        2,
        10,
        "buffer_pool.count",
        Schema,
    );
    assert!(msg.starts_with("invalid type: integer `-1`"), "{msg}");

    let msg = at("reactors:\n  cores: all\n", 2, 10, "reactors.cores", Schema);
    assert!(
        msg.contains("a reactor count (e.g. 2) or a list of CPU ids"),
        "{msg}"
    );

    let msg = at(
        "reactors:\n  cores: [0, x]\n",
        2,
        14,
        "reactors.cores[1]",
        Schema,
    );
    assert!(msg.starts_with("invalid type: string \"x\""), "{msg}");

    let msg = at("bdevs: 5\n", 1, 8, "bdevs", Schema);
    assert_eq!(msg, "invalid type: integer `5`, expected a list of bdevs");

    let msg = at("bdevs:\n  - vol0\n", 2, 5, "bdevs[0]", Schema);
    assert!(
        msg.contains("expected a bdev mapping with `name` and `type` fields"),
        "{msg}"
    );

    let msg = at("- 1\n", 1, 1, "", Schema);
    assert!(
        msg.contains("expected a mapping with fields reactors"),
        "{msg}"
    );

    let text = "bdevs:\n  - name: f\n    type: fault\n    base: [a]\n";
    let msg = at(text, 4, 11, "bdevs[0].base", Schema);
    assert!(
        msg.contains("the name of another bdev, or an inline bdev mapping"),
        "{msg}"
    );

    let text = "bdevs:\n  - name: u\n    type: uring\n    path: /x\n    direct: maybe\n";
    let msg = at(text, 5, 13, "bdevs[0].direct", Schema);
    assert!(msg.contains("expected a boolean"), "{msg}");
    let text = "bdevs:\n  - name: u\n    type: uring\n    path: /x\n    preallocate: 1G\n";
    let msg = at(text, 5, 18, "bdevs[0].preallocate", Schema);
    assert!(msg.contains("expected a boolean"), "{msg}");

    let text = "bdevs:\n  - name: a\n    type: malloc\n    size: -4\n";
    assert_eq!(
        at(text, 4, 11, "bdevs[0].size", Schema),
        "invalid size -4: a size cannot be negative"
    );
    let text = "bdevs:\n  - name: a\n    type: malloc\n    size: 1.5\n";
    assert!(at(text, 4, 11, "bdevs[0].size", Schema).contains("whole number"));
}

#[test]
fn unknown_fields() {
    // Inside an inline base.
    let inline = "\
bdevs:
  - name: f
    type: fault
    base:
      type: malloc
      size: 1G
      colour: red
";
    expect(&[
        (
            "reactor:\n  cores: 1\n",
            1,
            1,
            "reactor",
            Schema,
            "unknown field \"reactor\", expected one of: reactors, buffer_pool, bdevs, \
             rpc_socket, exports (did you mean \"reactors\"?)",
        ),
        (
            "reactors:\n  idel: poll\n",
            2,
            3,
            "reactors.idel",
            Schema,
            "unknown field \"idel\", expected one of: cores, idle (did you mean \"idle\"?)",
        ),
        (
            "buffer_pool:\n  pages: on\n",
            2,
            3,
            "buffer_pool.pages",
            Schema,
            "unknown field \"pages\", expected one of: hugepages, buffer_size, count",
        ),
        // Misspelt field after `type`: the list is the fields of that type.
        (
            "bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    blok_size: 4096\n",
            5,
            5,
            "bdevs[0].blok_size",
            Schema,
            "unknown field \"blok_size\", expected one of: name, type, size, block_size \
             (did you mean \"block_size\"?)",
        ),
        (
            inline,
            7,
            7,
            "bdevs[0].base.colour",
            Schema,
            "unknown field \"colour\", expected one of: type, size, block_size",
        ),
    ]);
    // Misspelt field before `type`: all bdev fields.
    let text = "bdevs:\n  - name: a\n    sise: 1G\n    type: malloc\n";
    let msg = at(text, 3, 5, "bdevs[0].sise", Schema);
    assert!(msg.starts_with("unknown field \"sise\", expected one of: name, type, size,"));
    assert!(msg.ends_with("(did you mean \"size\"?)"), "{msg}");
}

#[test]
fn fields_of_another_type() {
    let inline = "\
bdevs:
  - name: p
    type: passthru
    base:
      size: 1G
      read_error_rate: 0.5
      type: null
";
    expect(&[
        // After `type:`, rejected while reading the key.
        (
            "bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    path: /x\n",
            5,
            5,
            "bdevs[0].path",
            Schema,
            "field \"path\" is not valid for a malloc bdev (valid fields: name, type, size, \
             block_size)",
        ),
        // Before `type:`, rejected after the mapping is read; still points at the key.
        (
            "bdevs:\n  - name: a\n    base: b\n    size: 1G\n    type: malloc\n",
            3,
            5,
            "bdevs[0].base",
            Schema,
            "field \"base\" is not valid for a malloc bdev (valid fields: name, type, size, \
             block_size)",
        ),
        // A uring-only field on another type, after or before `type:`.
        (
            "bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    preallocate: true\n",
            5,
            5,
            "bdevs[0].preallocate",
            Schema,
            "field \"preallocate\" is not valid for a malloc bdev (valid fields: name, type, \
             size, block_size)",
        ),
        (
            "bdevs:\n  - name: a\n    preallocate: true\n    base: b\n    type: passthru\n",
            3,
            5,
            "bdevs[0].preallocate",
            Schema,
            "field \"preallocate\" is not valid for a passthru bdev (valid fields: name, type, \
             base)",
        ),
        (
            inline,
            6,
            7,
            "bdevs[0].base.read_error_rate",
            Schema,
            "field \"read_error_rate\" is not valid for a null bdev (valid fields: type, size, \
             block_size)",
        ),
    ]);
    // A name inside an inline base.
    let text =
        "bdevs:\n  - name: p\n    type: passthru\n    base: {name: x, type: null, size: 1G}\n";
    let msg = at(text, 4, 12, "bdevs[0].base.name", Schema);
    assert!(
        msg.starts_with("field \"name\" is not allowed in an inline bdev"),
        "{msg}"
    );
}

#[test]
fn missing_fields() {
    expect(&[
        (
            "bdevs:\n  - name: a\n    size: 1G\n",
            2,
            5,
            "bdevs[0]",
            Schema,
            "missing field \"type\" (one of null, malloc, uring, passthru, fault, cow)",
        ),
        (
            "bdevs:\n  - type: malloc\n    size: 1G\n",
            2,
            5,
            "bdevs[0]",
            Schema,
            "missing field \"name\": every entry of `bdevs` needs a unique name",
        ),
        (
            "bdevs:\n  - name: ok\n    type: null\n    size: 1G\n  - name: a\n    type: malloc\n",
            5,
            5,
            "bdevs[1]",
            Schema,
            "missing field \"size\": a malloc bdev needs one, e.g. `size: 1GiB`",
        ),
    ]);
    let text = "bdevs:\n  - name: u\n    type: uring\n";
    assert!(at(text, 2, 5, "bdevs[0]", Schema).starts_with("missing field \"path\""));
    let text = "bdevs:\n  - name: f\n    type: fault\n    base:\n      type: passthru\n";
    assert!(at(text, 5, 7, "bdevs[0].base", Schema).starts_with("missing field \"base\""));
}

#[test]
fn duplicate_keys() {
    expect(&[
        (
            "bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    size: 2G\n",
            5,
            5,
            "bdevs[0].size",
            Schema,
            "duplicate field \"size\"",
        ),
        (
            "reactors: {}\nbdevs: []\nreactors: {}\n",
            3,
            1,
            "reactors",
            Schema,
            "duplicate field \"reactors\"",
        ),
    ]);
}

// ----------------------------------------------------------------------------------------
// Semantic errors (located by path after parsing).

#[test]
fn duplicate_bdev_names() {
    let text = "\
bdevs:
  - name: vol0
    type: malloc
    size: 1G
  - name: other
    type: null
    size: 1G
  - name: vol0
    type: null
    size: 1G
";
    assert_eq!(
        at(text, 8, 11, "bdevs[2].name", Invalid),
        "duplicate bdev name \"vol0\" (first defined by bdevs[0] at line 2)"
    );
}

#[test]
fn reference_cycles() {
    let two = "\
bdevs:
  - name: a
    type: passthru
    base: b
  - name: b
    type: fault
    base: a
";
    // Three bdevs, one via an inline base, listed out of order, plus an unrelated chain.
    let three = "\
bdevs:
  - name: ram
    type: malloc
    size: 1M
  - name: user
    type: passthru
    base: ram
  - name: y
    type: passthru
    base: z
  - name: x
    type: fault
    base:
      type: passthru
      base: y
  - name: z
    type: passthru
    base: x
";
    expect(&[
        (
            two,
            4,
            11,
            "bdevs[0].base",
            Invalid,
            "reference cycle: a -> b -> a",
        ),
        (
            three,
            10,
            11,
            "bdevs[2].base",
            Invalid,
            "reference cycle: y -> z -> x -> y",
        ),
    ]);
}

#[test]
fn base_claimed_twice() {
    let text = "\
bdevs:
  - name: vol0
    type: malloc
    size: 1G
  - name: pt
    type: passthru
    base: vol0
  - name: f
    type: fault
    base:
      type: passthru
      base: vol0
";
    assert_eq!(
        at(text, 12, 13, "bdevs[2].base.base", Invalid),
        "bdev \"vol0\" is already the base of \"pt\"; a bdev can be the base of only one other \
         bdev (claimed by bdevs[1] at line 7)"
    );
}

#[test]
fn unknown_base_in_inline_chain() {
    let text = "\
bdevs:
  - name: f
    type: fault
    base: {type: passthru, base: {type: passthru, base: nowhere}}
";
    assert_eq!(
        at(text, 4, 57, "bdevs[0].base.base.base", Invalid),
        "unknown bdev \"nowhere\" (no other bdevs are defined)"
    );
}

#[test]
fn bad_block_sizes() {
    for (bs, col) in [
        ("1000", 17),
        ("256", 17),
        ("131072", 17),
        ("0", 17),
        ("4097", 17),
    ] {
        let text =
            format!("bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    block_size: {bs}\n");
        assert_eq!(
            at(&text, 5, col, "bdevs[0].block_size", Invalid),
            format!("invalid block_size {bs}: must be a power of two between 512 and 65536")
        );
    }
    let text = "bdevs:\n  - name: u\n    type: uring\n    path: /x\n    block_size: 100\n";
    at(text, 5, 17, "bdevs[0].block_size", Invalid);
    let text = "bdevs:\n  - name: p\n    type: passthru\n    base:\n      type: null\n      size: 1M\n      block_size: 3\n";
    at(text, 7, 19, "bdevs[0].base.block_size", Invalid);
    // The largest and smallest are fine.
    for bs in [512, 4096, 65536] {
        let text =
            format!("bdevs:\n  - name: a\n    type: malloc\n    size: 1G\n    block_size: {bs}\n");
        parse_str(&text, "config.yaml").unwrap();
    }
}

#[test]
fn zero_and_misaligned_sizes() {
    expect(&[
        (
            "bdevs:\n  - name: a\n    type: malloc\n    size: 0\n",
            4,
            11,
            "bdevs[0].size",
            Invalid,
            "size must be greater than 0",
        ),
        (
            "bdevs:\n  - name: a\n    type: malloc\n    block_size: 4096\n    size: 6K\n",
            5,
            11,
            "bdevs[0].size",
            Invalid,
            "size 6144 is not a multiple of the block size (4096)",
        ),
    ]);
    let text = "bdevs:\n  - name: a\n    type: null\n    size: 0 KiB\n";
    at(text, 4, 11, "bdevs[0].size", Invalid);
    let text = "bdevs:\n  - name: u\n    type: uring\n    path: /x\n    size: 0\n";
    at(text, 5, 11, "bdevs[0].size", Invalid);
    let text =
        "bdevs:\n  - name: f\n    type: fault\n    base:\n      type: malloc\n      size: 0\n";
    at(text, 6, 13, "bdevs[0].base.size", Invalid);
}

#[test]
fn error_rates() {
    let base = "bdevs:\n  - name: f\n    type: fault\n    base: {type: null, size: 1G}\n";
    for (field, value) in [
        ("read_error_rate", "1.5"),
        ("write_error_rate", "-0.1"),
        ("read_error_rate", ".nan"),
        ("write_error_rate", "2"),
    ] {
        let text = format!("{base}    {field}: {value}\n");
        let column = 5 + field.len() + 2;
        let msg = at(&text, 5, column, &format!("bdevs[0].{field}"), Invalid);
        assert!(
            msg.starts_with(field) && msg.ends_with("is outside [0, 1]"),
            "{msg}"
        );
    }
    for value in ["0", "1", "0.5", "1.0"] {
        let text = format!("{base}    read_error_rate: {value}\n");
        parse_str(&text, "config.yaml").unwrap();
    }
}

#[test]
fn reactors() {
    expect(&[
        (
            "reactors:\n  cores: []\n",
            2,
            10,
            "reactors.cores",
            Invalid,
            "core list is empty: list at least one CPU id, e.g. [0]",
        ),
        (
            "reactors:\n  cores: 0\n",
            2,
            10,
            "reactors.cores",
            Invalid,
            "reactor count must be at least 1",
        ),
        (
            "reactors:\n  cores:\n    - 0\n    - 3\n    - 0\n",
            5,
            7,
            "reactors.cores[2]",
            Invalid,
            "CPU 0 is listed twice (first listed as cores[0] at line 3)",
        ),
        (
            "reactors:\n  cores: [0, 5000]\n",
            2,
            14,
            "reactors.cores[1]",
            Invalid,
            "CPU id 5000 is out of range (must be below 1024)",
        ),
    ]);
    at(
        "reactors:\n  cores: 100000\n",
        2,
        10,
        "reactors.cores",
        Invalid,
    );
}

#[test]
fn buffer_pool() {
    expect(&[
        (
            "buffer_pool:\n  buffer_size: 1000\n",
            2,
            16,
            "buffer_pool.buffer_size",
            Invalid,
            "buffer_size 1000 is not a multiple of 4096",
        ),
        (
            "buffer_pool:\n  buffer_size: 6K\n",
            2,
            16,
            "buffer_pool.buffer_size",
            Invalid,
            "buffer_size 6144 is not a multiple of 4096",
        ),
        (
            "buffer_pool:\n  buffer_size: 0\n",
            2,
            16,
            "buffer_pool.buffer_size",
            Invalid,
            "buffer_size must be greater than 0",
        ),
        (
            "buffer_pool:\n  count: 0\n",
            2,
            10,
            "buffer_pool.count",
            Invalid,
            "count must be greater than 0",
        ),
    ]);
}

#[test]
fn bdev_names() {
    let text = "bdevs:\n  - name: ''\n    type: null\n    size: 1G\n";
    assert_eq!(
        at(text, 2, 11, "bdevs[0].name", Invalid),
        "bdev name is empty"
    );
    for bad in ["'a b'", "vol/0", "\"tab\\t\"", "é"] {
        let text = format!("bdevs:\n  - name: {bad}\n    type: null\n    size: 1G\n");
        let msg = at(&text, 2, 11, "bdevs[0].name", Invalid);
        assert!(msg.starts_with("invalid bdev name "), "{msg}");
        assert!(
            msg.ends_with("use only letters, digits, '_', '.' and '-'"),
            "{msg}"
        );
    }
    let text = "bdevs:\n  - name: Vol-0.a_b\n    type: null\n    size: 1G\n";
    parse_str(text, "config.yaml").unwrap();
}

#[test]
fn uring_empty_path() {
    let text = "bdevs:\n  - name: u\n    type: uring\n    path: ''\n";
    assert_eq!(at(text, 4, 11, "bdevs[0].path", Invalid), "path is empty");
}

#[test]
fn flow_style_and_aliases_are_located() {
    let text = "bdevs: [{name: a, type: malloc, size: 1G, block_size: 3}]\n";
    at(text, 1, 55, "bdevs[0].block_size", Invalid);
    // The error is reported where the alias is used.
    let text = "\
bdevs:
  - &ram
    name: a
    type: malloc
    size: 1G
  - *ram
";
    let e = err(text);
    assert_eq!(e.field, "bdevs[1].name");
    assert!(e.message.starts_with("duplicate bdev name \"a\""), "{e}");
    assert!(e.line.is_some());
}

#[test]
fn comments_and_blank_lines_do_not_shift_lines() {
    let text = "\
# leading comment

bdevs:   # the list
  # a comment line
  - name: a      # trailing

    type: malloc
    # between
    size: 1G
    block_size: 1000   # bad
";
    at(text, 10, 17, "bdevs[0].block_size", Invalid);
}

// ----------------------------------------------------------------------------------------
// Files.

#[test]
fn unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let e = load(&missing).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io(std::io::ErrorKind::NotFound));
    assert_eq!(e.file, missing.display().to_string());
    assert_eq!((e.line, e.column, e.field.as_str()), (None, None, ""));
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("{}: cannot read config file: ", missing.display())));
    assert!(shown.contains("os error 2"), "{shown}");

    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Io(_)), "{e}");
    assert!(e.to_string().contains("os error"), "{e}");
}

#[test]
fn invalid_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, b"bdevs:\n  - name: ab\xff\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(e.kind, Syntax);
    assert_eq!((e.line, e.column), (Some(2), Some(13)));
    assert!(
        e.to_string()
            .ends_with(":2:13: the file is not valid UTF-8"),
        "{e}"
    );
}

#[test]
fn load_reports_the_path_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, "reactors:\n  idle: spin\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:9: reactors.idle: unknown variant \"spin\", expected one of poll, sleep",
            path.display()
        )
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000));
    assert_eq!(err(&deep).kind, Schema);
    let deep = format!("reactors: {}{}", "{a: ".repeat(2_000), "}".repeat(2_000));
    err(&deep);
    let deep = format!("bdevs: [{}{}]", "[".repeat(2_000), "]".repeat(2_000));
    err(&deep);

    // Inline bases nest as deep as the YAML parser allows.
    let mut base = "{type: malloc, size: 1M}".to_string();
    for _ in 0..40 {
        base = format!("{{type: passthru, base: {base}}}");
    }
    let text = format!("bdevs:\n  - name: deep\n    type: fault\n    base: {base}\n");
    let config = parse_str(&text, "config.yaml").unwrap();
    assert_eq!(parse_str(&config.to_yaml(), "again.yaml").unwrap(), config);
    let mut base = "{type: malloc, size: 1M}".to_string();
    for _ in 0..1000 {
        base = format!("{{type: passthru, base: {base}}}");
    }
    let text = format!("bdevs:\n  - name: deep\n    type: fault\n    base: {base}\n");
    assert!(err(&text).message.contains("recursion limit"));
}

// ----------------------------------------------------------------------------------------
// The daemon's sections: tracking stores, the RPC socket, exports.

const COW: &str = "\
bdevs:
  - name: disk
    type: malloc
    size: 8M
  - name: vol
    type: cow
    base: disk
";

#[test]
fn tracking_errors() {
    let cases: Vec<(String, usize, usize, &str, ErrorKind, &str)> = vec![
        (
            format!("{COW}    tracking:\n      offset: 4K\n"),
            9,
            7,
            "bdevs[1].tracking",
            Schema,
            "missing field \"bdev\": the bdev that keeps the change tracking, e.g. \
             `bdev: uring:/var/tmp/vol.cbt@1M` or the name of a bdev in `bdevs:`",
        ),
        (
            format!("{COW}    tracking:\n      bdev: nope\n"),
            9,
            13,
            "bdevs[1].tracking.bdev",
            Invalid,
            "unknown bdev \"nope\" (defined: disk, vol)",
        ),
        (
            format!("{COW}    tracking:\n      bdev: disk\n"),
            9,
            13,
            "bdevs[1].tracking.bdev",
            Invalid,
            "bdev \"disk\" is under the cow bdev \"vol\": the tracking of its writes cannot be \
             kept on the volume itself",
        ),
        (
            format!("{COW}    tracking:\n      bdev: malloc:1M\n      offset: 100\n"),
            10,
            15,
            "bdevs[1].tracking.offset",
            Invalid,
            "offset 100 is not a multiple of 4096 (the store's header is one 4 KiB block)",
        ),
        (
            format!("{COW}    tracking:\n      bdev: malloc:12X\n"),
            9,
            13,
            "bdevs[1].tracking.bdev",
            Schema,
            "invalid bdev spec \"malloc:12X\": invalid size \"12X\": expected a number with an \
             optional K/M/G/T suffix (accepted forms: null:SIZE[:BLOCK], malloc:SIZE[:BLOCK], \
             uring:PATH[@SIZE[:prealloc]], passthru:SPEC, fault:SPEC, cow:SPEC)",
        ),
        (
            format!("{COW}    tracking:\n      bdev: malloc:1M\n      ofset: 0\n"),
            10,
            7,
            "bdevs[1].tracking.ofset",
            Schema,
            "unknown field \"ofset\", expected one of: bdev, offset (did you mean \"offset\"?)",
        ),
        (
            "bdevs:\n  - name: m\n    type: malloc\n    size: 1M\n    tracking: {bdev: x}\n"
                .to_string(),
            5,
            5,
            "bdevs[0].tracking",
            Schema,
            "field \"tracking\" is not valid for a malloc bdev (valid fields: name, type, size, \
             block_size)",
        ),
    ];
    for (text, line, column, field, kind, message) in &cases {
        assert_eq!(
            at(text, *line, *column, field, *kind),
            *message,
            "for {text:?}"
        );
    }
    // A store that is the base of another bdev, and two stores at one offset.
    let text = "\
bdevs:
  - {name: a, type: cow, base: {type: malloc, size: 1M}, tracking: {bdev: s}}
  - {name: b, type: cow, base: {type: malloc, size: 1M}, tracking: {bdev: s}}
  - {name: s, type: malloc, size: 1M}
";
    let e = err(text);
    assert_eq!(e.field, "bdevs[1].tracking.bdev", "{e}");
    assert!(
        e.message
            .starts_with("another cow bdev keeps its tracking on \"s\" at offset 0"),
        "{e}"
    );
    let text = "\
bdevs:
  - {name: a, type: cow, base: {type: malloc, size: 1M}, tracking: {bdev: s}}
  - {name: p, type: passthru, base: s}
  - {name: s, type: malloc, size: 1M}
";
    assert!(err(text).message.contains("is the base of \"p\""));
}

#[test]
fn export_and_socket_errors() {
    let base =
        "bdevs:\n  - {name: d, type: malloc, size: 1M}\n  - {name: p, type: passthru, base: d}\n";
    let cases: Vec<(String, usize, usize, &str, ErrorKind, &str)> = vec![
        (
            format!("{base}exports:\n  - bdev: x\n"),
            5,
            11,
            "exports[0].bdev",
            Invalid,
            "unknown bdev \"x\" (defined: d, p)",
        ),
        (
            format!("{base}exports:\n  - name: n\n"),
            5,
            5,
            "exports[0]",
            Schema,
            "missing field \"bdev\": the bdev to export, e.g. `bdev: vol0`",
        ),
        (
            format!("{base}exports:\n  - bdev: p\n    listen: 10809\n"),
            6,
            13,
            "exports[0].listen",
            Schema,
            "invalid listen address \"10809\": expected HOST:PORT (e.g. 127.0.0.1:10809) or \
             unix:PATH",
        ),
        (
            format!("{base}exports:\n  - bdev: d\n"),
            5,
            11,
            "exports[0].bdev",
            Invalid,
            "bdev \"d\" is the base of \"p\", which claims it: export \"p\" instead, or set \
             `read_only: true`",
        ),
        (
            format!("{base}exports:\n  - bdev: p\n  - {{bdev: d, name: p, read_only: true}}\n"),
            6,
            21,
            "exports[1].name",
            Invalid,
            "duplicate export \"p\" on 127.0.0.1:10809 (first defined by exports[0] at line 5)",
        ),
        (
            format!("{base}exports:\n  - bdev: p\n    port: 1\n"),
            6,
            5,
            "exports[0].port",
            Schema,
            "unknown field \"port\", expected one of: name, bdev, listen, read_only",
        ),
        (
            format!("{base}rpc_socket: \"\"\n"),
            4,
            13,
            "rpc_socket",
            Invalid,
            "rpc_socket is empty",
        ),
    ];
    for (text, line, column, field, kind, message) in &cases {
        assert_eq!(
            at(text, *line, *column, field, *kind),
            *message,
            "for {text:?}"
        );
    }
    // Read-only exports of a claimed bdev are fine; so is one name on two addresses.
    parse_str(
        &format!(
            "{base}exports:\n  - {{bdev: d, read_only: true}}\n  - {{bdev: p, name: d, listen: unix:/tmp/x}}\n"
        ),
        "ok.yaml",
    )
    .unwrap();
}
