//! Reading a method's named parameters with errors that name the parameter.
//!
//! A handler takes each parameter it knows from a [`Params`] and then calls
//! [`Params::done`] *before it acts*: a parameter left over is an unknown one
//! (a typo must not be ignored), and the error lists the parameters the
//! method takes. Sizes and rates take a number of bytes or a size string
//! (`"64M"`, `"1GiB"`), and booleans and numbers also come as strings, so
//! that `hotcopy rpc METHOD --param k=v` can pass anything.

use serde_json::{Map, Value};

use super::error::{Result, ServeError};
use hotcopy_config::ByteSize;

/// The named parameters of one request.
pub struct Params {
    map: Map<String, Value>,
    /// Every parameter the method takes (for the unknown-parameter message).
    known: &'static [&'static str],
}

impl Params {
    /// `params` as sent: absent, `null` or an object. By-position (an array)
    /// is refused: every method here takes named parameters.
    pub fn new(params: Option<Value>, known: &'static [&'static str]) -> Result<Params> {
        let map = match params {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(Value::Array(_)) => {
                return Err(ServeError::InvalidParams(
                    "params must be an object of named parameters, not an array".into(),
                ))
            }
            Some(other) => {
                return Err(ServeError::InvalidParams(format!(
                    "params must be an object of named parameters, not {}",
                    kind(&other)
                )))
            }
        };
        Ok(Params { map, known })
    }

    /// Fails on any parameter not taken yet.
    pub fn done(self) -> Result<()> {
        if let Some(k) = self.map.keys().next() {
            let takes = if self.known.is_empty() {
                "this method takes no parameters".to_string()
            } else {
                format!("this method takes: {}", self.known.join(", "))
            };
            return Err(ServeError::param(k, format!("unknown parameter; {takes}")));
        }
        Ok(())
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// A required parameter, as JSON.
    pub fn value(&mut self, name: &str) -> Result<Value> {
        self.take(name)
            .ok_or_else(|| ServeError::param(name, "missing required parameter"))
    }

    pub fn opt_value(&mut self, name: &str) -> Option<Value> {
        self.take(name)
    }

    pub fn str(&mut self, name: &str) -> Result<String> {
        let v = self.value(name)?;
        as_str(name, v)
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>> {
        self.take(name).map(|v| as_str(name, v)).transpose()
    }

    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>> {
        self.take(name)
            .map(|v| match v {
                Value::Bool(b) => Ok(b),
                Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
                Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
                other => Err(ServeError::param(
                    name,
                    format!("expected true or false, got {}", short(&other)),
                )),
            })
            .transpose()
    }

    pub fn bool_or(&mut self, name: &str, default: bool) -> Result<bool> {
        Ok(self.opt_bool(name)?.unwrap_or(default))
    }

    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>> {
        self.take(name).map(|v| as_u64(name, &v)).transpose()
    }

    /// A byte count: a number, or a size string with an optional binary suffix.
    pub fn opt_size(&mut self, name: &str) -> Result<Option<u64>> {
        self.take(name).map(|v| as_size(name, &v)).transpose()
    }

    pub fn size(&mut self, name: &str) -> Result<u64> {
        let v = self.value(name)?;
        as_size(name, &v)
    }

    /// A finite number (JSON number, or a string that parses as one).
    pub fn opt_f64(&mut self, name: &str) -> Result<Option<f64>> {
        self.take(name)
            .map(|v| {
                let x = match &v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                x.filter(|x| x.is_finite()).ok_or_else(|| {
                    ServeError::param(name, format!("expected a number, got {}", short(&v)))
                })
            })
            .transpose()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value as shown in an error: short, and its kind when it is not a scalar.
fn short(v: &Value) -> String {
    match v {
        Value::Array(_) | Value::Object(_) => kind(v).to_string(),
        _ => {
            let s = v.to_string();
            if s.chars().count() > 64 {
                format!("{}...", s.chars().take(64).collect::<String>())
            } else {
                s
            }
        }
    }
}

pub fn as_str(name: &str, v: Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(ServeError::param(
            name,
            format!("expected a string, got {}", short(&other)),
        )),
    }
}

pub fn as_u64(name: &str, v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            ServeError::param(name, format!("expected a whole number >= 0, got {n}"))
        }),
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| {
            ServeError::param(name, format!("expected a whole number >= 0, got {s:?}"))
        }),
        other => Err(ServeError::param(
            name,
            format!("expected a whole number >= 0, got {}", short(other)),
        )),
    }
}

pub fn as_size(name: &str, v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            ServeError::param(name, format!("expected a number of bytes >= 0, got {n}"))
        }),
        Value::String(s) => s
            .parse::<ByteSize>()
            .map(|b| b.0)
            .map_err(|e| ServeError::param(name, e)),
        other => Err(ServeError::param(
            name,
            format!(
                "expected a size (bytes, or a string such as \"64M\"), got {}",
                short(other)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Params {
        Params::new(Some(v), &["a", "b"]).unwrap()
    }

    #[test]
    fn missing_unknown_and_wrong_kinds_name_the_parameter() {
        let mut q = p(json!({"a": 1}));
        let e = q.str("a").unwrap_err().to_string();
        assert_eq!(e, "a: expected a string, got 1");
        let e = p(json!({})).str("a").unwrap_err().to_string();
        assert_eq!(e, "a: missing required parameter");
        let q = p(json!({"c": 1}));
        assert_eq!(
            q.done().unwrap_err().to_string(),
            "c: unknown parameter; this method takes: a, b"
        );
        assert!(Params::new(Some(json!([1])), &[]).is_err());
        assert!(Params::new(Some(json!("x")), &[]).is_err());
    }

    #[test]
    fn sizes_numbers_and_booleans_also_come_as_strings() {
        let mut q = p(json!({"a": "64M", "b": 4096}));
        assert_eq!(q.size("a").unwrap(), 64 << 20);
        assert_eq!(q.size("b").unwrap(), 4096);
        let mut q = p(json!({"a": "true", "b": "17"}));
        assert_eq!(q.opt_bool("a").unwrap(), Some(true));
        assert_eq!(q.opt_u64("b").unwrap(), Some(17));
        let mut q = p(json!({"a": -1, "b": "12X"}));
        assert!(q.opt_u64("a").unwrap_err().to_string().starts_with("a: "));
        assert!(q
            .size("b")
            .unwrap_err()
            .to_string()
            .starts_with("b: invalid size"));
        // null is absent.
        let mut q = p(json!({"a": null}));
        assert_eq!(q.opt_str("a").unwrap(), None);
        q.done().unwrap();
    }
}
