//! [`ConfigError`] and the field paths it reports.

use std::fmt;

/// What kind of problem a [`ConfigError`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read (missing, unreadable, a directory, ...).
    Io(std::io::ErrorKind),
    /// The text is not valid YAML (or not valid UTF-8, or holds several documents).
    Syntax,
    /// The YAML does not match the schema: unknown or misspelt field, wrong type, missing
    /// field, bad size string, unknown enum variant, ...
    Schema,
    /// The config is well-formed but not valid: duplicate or unknown bdev names, reference
    /// cycles, bad block sizes, zero sizes, ...
    Invalid,
}

/// A problem with a config file, with the file, line, column and field it concerns.
///
/// `Display` renders it as `FILE[:LINE[:COLUMN]]: [FIELD: ]MESSAGE`, e.g.
///
/// ```text
/// config.yaml:7:11: bdevs[1].size: invalid size "12X": expected a number with an optional K/M/G/T suffix
/// config.yaml:12:11: bdevs[2].base: unknown bdev "vol9" (defined: vol0, pt)
/// config.yaml:3:9: reactors.idle: unknown variant "spin", expected one of poll, sleep
/// config.yaml:3:3: did not find expected '-' indicator, while parsing a block collection at line 2 column 3
/// missing.yaml: cannot read config file: No such file or directory (os error 2)
/// ```
///
/// Lines and columns are 1-based. The field path uses `.` between mapping keys and `[i]` for
/// list indices; it is empty for problems that concern the whole file (syntax errors,
/// unreadable files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// What kind of problem this is.
    pub kind: ErrorKind,
    /// The file (or origin name given to [`parse_str`](crate::parse_str)).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Path of the offending field, e.g. `bdevs[1].size`; empty when not about one field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = self.file.clone();
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                out.push_str(&format!(":{column}"));
            }
        }
        out.push_str(": ");
        if !self.field.is_empty() {
            out.push_str(&self.field);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }

    pub(crate) fn io(file: &str, err: &std::io::Error) -> Self {
        ConfigError {
            kind: ErrorKind::Io(err.kind()),
            file: file.to_string(),
            line: None,
            column: None,
            field: String::new(),
            message: format!("cannot read config file: {err}"),
        }
    }
}

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Where a value sits in the document, e.g. `bdevs[1].base.size`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FieldPath(pub(crate) Vec<Seg>);

impl FieldPath {
    pub(crate) fn root() -> Self {
        FieldPath(Vec::new())
    }

    pub(crate) fn key(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_string()));
        p
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(index));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A problem found after parsing, identified by the path of the value (or key) at fault.
/// Turned into a [`ConfigError`] by locating the path in the source text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub(crate) path: FieldPath,
    /// Point at the key `path` ends in, rather than at its value.
    pub(crate) at_key: bool,
    pub(crate) message: String,
    /// An extra `(text, path)`: rendered as ` (text[ at line N])` after the message.
    pub(crate) note: Option<(String, FieldPath)>,
}

impl Issue {
    pub(crate) fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Issue {
            path,
            at_key: false,
            message: message.into(),
            note: None,
        }
    }

    pub(crate) fn at_key(mut self) -> Self {
        self.at_key = true;
        self
    }

    pub(crate) fn with_note(mut self, text: impl Into<String>, path: FieldPath) -> Self {
        self.note = Some((text.into(), path));
        self
    }

    /// The message with its note, given a way to find the line of the note's path.
    pub(crate) fn full_message(&self, line_of: impl Fn(&FieldPath) -> Option<usize>) -> String {
        match &self.note {
            None => self.message.clone(),
            Some((text, path)) => match line_of(path) {
                Some(line) => format!("{} ({text} at line {line})", self.message),
                None => format!("{} ({text})", self.message),
            },
        }
    }

    /// Render without source text: `path: message (note)`.
    pub(crate) fn to_config_error(&self, file: &str) -> ConfigError {
        ConfigError {
            kind: ErrorKind::Invalid,
            file: file.to_string(),
            line: None,
            column: None,
            field: self.path.to_string(),
            message: self.full_message(|_| None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        let mut e = ConfigError {
            kind: ErrorKind::Schema,
            file: "config.yaml".into(),
            line: Some(7),
            column: Some(11),
            field: "bdevs[1].size".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "config.yaml:7:11: bdevs[1].size: bad");
        e.column = None;
        assert_eq!(e.to_string(), "config.yaml:7: bdevs[1].size: bad");
        e.line = None;
        e.field.clear();
        assert_eq!(e.to_string(), "config.yaml: bad");
    }

    #[test]
    fn field_path_display() {
        let p = FieldPath::root()
            .key("bdevs")
            .index(2)
            .key("base")
            .key("size");
        assert_eq!(p.to_string(), "bdevs[2].base.size");
        assert_eq!(FieldPath::root().to_string(), "");
    }
}
