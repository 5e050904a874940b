//! `config_yaml`: the config file parser and validator.
//!
//! Input: the text of a config file (bytes that are not UTF-8 are replaced,
//! as the daemon never sees them: `load` refuses such a file first).
//!
//! Properties: [`parse_str`] returns a config or an error; an error has a
//! non-empty message, names the file, and points (when it has a position) at
//! a line of the text; an accepted config passes [`Config::validate`], its
//! build and creation orders list each of its bdevs once, and
//! [`Config::to_yaml`] gives text that parses back to an equal config.

use hotcopy_config::{parse_str, Config, ConfigError};

const ORIGIN: &str = "fuzz.yaml";

pub fn config_yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_str(&text, ORIGIN) {
        Ok(config) => accepted(&config),
        Err(e) => refused(&text, &e),
    }
}

fn accepted(config: &Config) {
    if let Err(e) = config.validate() {
        panic!("parse_str accepted a config that validate refuses: {e}");
    }
    let mut names: Vec<&str> = config.bdevs.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    for (what, order) in [
        ("build", config.build_order()),
        ("creation", config.creation_order()),
    ] {
        let mut listed: Vec<&str> = order.iter().map(|b| b.name.as_str()).collect();
        listed.sort_unstable();
        assert_eq!(listed, names, "{what} order");
    }
    let yaml = config.to_yaml();
    match parse_str(&yaml, "to_yaml.yaml") {
        Ok(again) => assert_eq!(&again, config, "to_yaml:\n{yaml}"),
        Err(e) => panic!("to_yaml gave text parse_str refuses: {e}\n{yaml}"),
    }
}

fn refused(text: &str, e: &ConfigError) {
    assert!(!e.message.trim().is_empty(), "empty message: {e:?}");
    assert_eq!(e.file, ORIGIN);
    let shown = e.to_string();
    assert!(shown.starts_with(ORIGIN), "{shown}");
    // YAML breaks lines at LF, CR, CRLF, NEL, LS and PS; an error may sit
    // just past the last line (end of input).
    let breaks = text
        .replace("\r\n", "\n")
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    if let Some(line) = e.line {
        assert!(
            (1..=breaks + 2).contains(&line),
            "line {line} of a {breaks}-break text: {shown}"
        );
    }
    if let Some(column) = e.column {
        assert!(column >= 1, "{shown}");
    }
}
