//! `bdev_spec`: the one-line grammars of the command line and the config:
//! `--bdev-spec` ([`parse_spec`]), sizes ([`ByteSize`]) and listen addresses
//! ([`Listen`]). Every input goes to all three.
//!
//! Properties: an error carries a message (and, for specs, the spec and the
//! accepted forms); every bdev `parse_spec` accepts has a spec string
//! ([`BdevConfig::to_spec`] is `Some`) that parses back to an equal bdev;
//! every accepted size and listen address displays as text that parses back
//! equal.

use hotcopy_config::{parse_spec, BdevConfig, ByteSize, Listen, SPEC_FORMS};

pub fn bdev_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    spec(&text);
    size(&text);
    listen(&text);
}

fn spec(text: &str) {
    match parse_spec(text) {
        Ok(bdev) => {
            let Some(again) = bdev.to_spec() else {
                panic!("parse_spec({text:?}) = {bdev:?}, which has no spec string");
            };
            let back: Result<BdevConfig, _> = parse_spec(&again);
            assert_eq!(back, Ok(bdev), "{text:?} -> {again:?}");
        }
        Err(e) => {
            assert_eq!(e.spec, text);
            assert!(!e.message.is_empty());
            assert!(e.to_string().contains(SPEC_FORMS));
        }
    }
}

fn size(text: &str) {
    match text.parse::<ByteSize>() {
        Ok(size) => {
            let shown = size.to_string();
            assert_eq!(shown.parse::<ByteSize>(), Ok(size), "{text:?} -> {shown:?}");
        }
        Err(e) => {
            assert_eq!(e.input, text);
            assert!(!e.reason.is_empty());
        }
    }
}

fn listen(text: &str) {
    match text.parse::<Listen>() {
        Ok(l) => {
            let shown = l.to_string();
            assert_eq!(shown.parse::<Listen>(), Ok(l), "{text:?} -> {shown:?}");
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
