//! A strict serde deserializer over the option tree gathered from a URL, a file and the
//! environment.
//!
//! The `config` crate's own deserializer coerces freely (0.15: a float becomes an integer by
//! rounding, `"yes"`, `"on"` and `true` become 1, a negative number for an unsigned field is
//! reported as "invalid type: string", and its errors echo values verbatim). This one:
//!
//! - gives integers only to integer fields: digits from text (`-5`, `+7`), integers from
//!   TOML/YAML; floats, booleans and words are refused, never rounded or converted;
//! - lets the field's own type judge the range, and says it as one (`expected an integer from
//!   0 to 65535, got 70000`), naming the option by its full path (`jetstream.ack_wait`);
//! - takes booleans as `true`/`false` (and, from text, `yes`/`no`/`on`/`off`/`1`/`0`), never a
//!   number;
//! - never shows the value of an option whose name looks secret, and shows URLs in values
//!   without their userinfo.
//!
//! Text values (URL query, environment) carry no type of their own, so for self-describing
//! targets (`serde_json::Value` maps such as AMQP `queue_arguments`) they are read as a
//! boolean, integer or number when they are written as one, and as a string otherwise.

use std::fmt;

use config::{Map, Value, ValueKind};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};

use crate::redact::{is_secret_name, redact_text};

/// The origin given to values that came as untyped text (URL query, environment).
const TEXT_ORIGIN: &str = "text";

/// A value that came as text from a URL or an environment variable.
pub(crate) fn text(s: impl Into<String>) -> Value {
    Value::new(Some(&TEXT_ORIGIN.to_owned()), ValueKind::String(s.into()))
}

/// Marks every string in `options` (collected from the environment) as text.
pub(crate) fn mark_text(options: Map<String, Value>) -> Map<String, Value> {
    fn mark(value: Value) -> Value {
        match value.kind {
            ValueKind::String(s) => text(s),
            ValueKind::Table(t) => Value::new(None, ValueKind::Table(mark_text(t))),
            ValueKind::Array(a) => {
                Value::new(None, ValueKind::Array(a.into_iter().map(mark).collect()))
            }
            kind => Value::new(None, kind),
        }
    }
    options.into_iter().map(|(k, v)| (k, mark(v))).collect()
}

/// Deserializes `T` from `options`, strictly.
pub(crate) fn from_options<T: de::DeserializeOwned>(
    options: Map<String, Value>,
) -> Result<T, OptionError> {
    T::deserialize(De {
        value: Value::new(None, ValueKind::Table(options)),
        path: String::new(),
    })
}

/// Reads a boolean written as text or as a boolean: `true`/`false`, `yes`/`no`, `on`/`off`,
/// `1`/`0` (any case).
pub(crate) fn parse_bool(value: &Value) -> Option<bool> {
    match &value.kind {
        ValueKind::Boolean(b) => Some(*b),
        ValueKind::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// An option whose value does not fit its configuration type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    /// The option's path (`capacity`, `jetstream.ack_wait`, `servers[1]`); empty for the
    /// whole configuration.
    option: String,
    problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    /// No such option; `expected` lists the known ones.
    Unknown { expected: &'static [&'static str] },
    /// A value of the wrong kind or out of range.
    Invalid {
        expected: String,
        got: Option<String>,
    },
    /// A required option is absent.
    Missing(&'static str),
    /// The field's own explanation.
    Other(String),
}

impl OptionError {
    /// An error about option `option`: expected `expected`, got `got` (shown unless the
    /// option looks secret).
    pub(crate) fn invalid(option: &str, expected: impl Into<String>, got: &Value) -> Self {
        OptionError {
            option: option.to_owned(),
            problem: Problem::Invalid {
                expected: expected.into(),
                got: render(got),
            },
        }
        .discreet()
    }

    /// The option's path (`capacity`, `jetstream.ack_wait`); empty when the problem is the
    /// configuration as a whole.
    pub fn option(&self) -> &str {
        &self.option
    }

    /// Gives a still unplaced error its place: `path`, and the value as written there.
    fn locate(mut self, path: &str, shown: Option<&String>) -> Self {
        if !self.option.is_empty() || path.is_empty() {
            return self;
        }
        self.option = path.to_owned();
        if let (Problem::Invalid { got, .. }, Some(shown)) = (&mut self.problem, shown) {
            *got = Some(shown.clone());
        }
        self.discreet()
    }

    /// Forgets the value if the option looks secret, so neither `Display` nor `Debug` can
    /// show it.
    fn discreet(mut self) -> Self {
        if is_secret_name(&self.option) {
            match &mut self.problem {
                Problem::Invalid { got, .. } => {
                    *got = Some("a value that is not shown (it may be a secret)".to_owned());
                }
                Problem::Other(message) => {
                    *message = "invalid value (not shown: it may be a secret)".to_owned();
                }
                Problem::Unknown { .. } | Problem::Missing(_) => {}
            }
        }
        self
    }

    fn at_root(problem: Problem) -> Self {
        OptionError {
            option: String::new(),
            problem,
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let option = &self.option;
        if let Problem::Unknown { expected } = &self.problem {
            write!(f, "unknown option `{option}`")?;
            return match expected {
                [] => f.write_str(": this section takes no options"),
                [only] => write!(f, ": the only option here is `{only}`"),
                names => write!(f, ": expected {}", one_of(names)),
            };
        }
        if !option.is_empty() {
            write!(f, "option `{option}`: ")?;
        }
        match &self.problem {
            Problem::Unknown { .. } => Ok(()),
            Problem::Invalid { expected, got } => {
                write!(f, "expected {expected}")?;
                match got {
                    Some(got) => write!(f, ", got {got}"),
                    None => Ok(()),
                }
            }
            Problem::Missing(field) => write!(f, "`{field}` is required"),
            Problem::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for OptionError {}

impl de::Error for OptionError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        OptionError::at_root(Problem::Other(redact_text(&msg.to_string()).into_owned()))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        OptionError::at_root(Problem::Invalid {
            expected: expectation(exp),
            got: Some(unexpected(&unexp)),
        })
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        OptionError::at_root(Problem::Invalid {
            expected: expectation(exp),
            got: Some(format!("{len} elements")),
        })
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        OptionError::at_root(Problem::Invalid {
            expected: one_of(expected),
            got: Some(format!("`{}`", clip(variant))),
        })
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        OptionError::at_root(Problem::Unknown { expected })
    }

    fn missing_field(field: &'static str) -> Self {
        OptionError::at_root(Problem::Missing(field))
    }
}

/// `one of `a`, `b` or `c``.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("one of {} or {last}", init.join(", ")),
    }
}

/// What a visitor expects, in words: serde's primitive names (`u16`, `a nonzero usize`)
/// become the integer range they allow.
fn expectation(exp: &dyn Expected) -> String {
    let text = exp.to_string();
    let (nonzero, name) = match text.strip_prefix("a nonzero ") {
        Some(name) => (true, name),
        None => (false, text.as_str()),
    };
    let range: Option<(i128, u128)> = match name {
        "u8" => Some((0, u8::MAX.into())),
        "u16" => Some((0, u16::MAX.into())),
        "u32" => Some((0, u32::MAX.into())),
        "u64" => Some((0, u64::MAX.into())),
        "u128" => Some((0, u128::MAX)),
        "usize" => Some((0, usize::MAX as u128)),
        "i8" => Some((i8::MIN.into(), i8::MAX as u128)),
        "i16" => Some((i16::MIN.into(), i16::MAX as u128)),
        "i32" => Some((i32::MIN.into(), i32::MAX as u128)),
        "i64" => Some((i64::MIN.into(), i64::MAX as u128)),
        "i128" => Some((i128::MIN, i128::MAX as u128)),
        "isize" => Some((isize::MIN as i128, isize::MAX as u128)),
        _ => None,
    };
    match (range, name) {
        (Some((0, max)), _) if nonzero => format!("an integer from 1 to {max}"),
        (Some((min, max)), _) if nonzero => format!("a nonzero integer from {min} to {max}"),
        (Some((min, max)), _) => format!("an integer from {min} to {max}"),
        (None, "f32" | "f64") => "a number".to_owned(),
        (None, "a boolean") => "true or false".to_owned(),
        _ => text,
    }
}

/// A value as written, for "got …" (`None` for tables and lists, which are not shown).
fn render(value: &Value) -> Option<String> {
    Some(match &value.kind {
        ValueKind::Nil => "nothing (null)".to_owned(),
        ValueKind::Boolean(b) => format!("{b} (a boolean)"),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        ValueKind::Float(x) => format!("{x:?}"),
        ValueKind::String(s) if s.is_empty() => "an empty value".to_owned(),
        ValueKind::String(s) => format!("`{}`", clip(&redact_text(s))),
        ValueKind::Table(_) | ValueKind::Array(_) => return None,
    })
}

fn unexpected(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("{b} (a boolean)"),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(x) => format!("{x:?}"),
        Unexpected::Char(c) => format!("`{c}`"),
        Unexpected::Str(s) => format!("`{}`", clip(&redact_text(s))),
        Unexpected::Unit => "nothing (null)".to_owned(),
        Unexpected::Map => "a table".to_owned(),
        Unexpected::Seq => "a list".to_owned(),
        other => other.to_string(),
    }
}

/// At most 64 characters of `s`.
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// An integer written as text: optional sign, then decimal digits only.
enum IntText {
    Neg(i128),
    Pos(u128),
    /// Digits, but beyond 128 bits.
    Huge,
}

fn parse_int(s: &str) -> Option<IntText> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let Ok(magnitude) = digits.parse::<u128>() else {
        return Some(IntText::Huge);
    };
    Some(match negative {
        false => IntText::Pos(magnitude),
        true if magnitude <= i128::MAX as u128 => IntText::Neg(-(magnitude as i128)),
        true if magnitude == i128::MAX as u128 + 1 => IntText::Neg(i128::MIN),
        true => IntText::Huge,
    })
}

/// A number written as text (`1.5`, `1e3`, `-2`), finite.
fn parse_float(s: &str) -> Option<f64> {
    let looks_numeric = s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    s.parse::<f64>()
        .ok()
        .filter(|x| looks_numeric && x.is_finite())
}

fn visit_signed<'de, V: Visitor<'de>>(n: i128, visitor: V) -> Result<V::Value, OptionError> {
    if let Ok(n) = u64::try_from(n) {
        visitor.visit_u64(n)
    } else if let Ok(n) = i64::try_from(n) {
        visitor.visit_i64(n)
    } else {
        visitor.visit_i128(n)
    }
}

fn visit_unsigned<'de, V: Visitor<'de>>(n: u128, visitor: V) -> Result<V::Value, OptionError> {
    match u64::try_from(n) {
        Ok(n) => visitor.visit_u64(n),
        Err(_) => visitor.visit_u128(n),
    }
}

/// Deserializes one value; `path` names it in errors.
struct De {
    value: Value,
    path: String,
}

impl De {
    fn is_text(&self) -> bool {
        self.value.origin() == Some(TEXT_ORIGIN)
    }

    /// Integers for integer fields; anything else goes to the visitor as it is, which
    /// refuses it with its own expectation (the range).
    fn integer<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        match self.value.kind {
            ValueKind::I64(n) => visit_signed(n.into(), visitor),
            ValueKind::I128(n) => visit_signed(n, visitor),
            ValueKind::U64(n) => visitor.visit_u64(n),
            ValueKind::U128(n) => visit_unsigned(n, visitor),
            ValueKind::String(s) => match parse_int(&s) {
                Some(IntText::Pos(n)) => visit_unsigned(n, visitor),
                Some(IntText::Neg(n)) => visit_signed(n, visitor),
                Some(IntText::Huge) => Err(de::Error::invalid_value(
                    Unexpected::Other("an integer beyond 128 bits"),
                    &visitor,
                )),
                None => visitor.visit_string(s),
            },
            _ => self.deserialize_any(visitor),
        }
    }
}

impl<'de> Deserializer<'de> for De {
    type Error = OptionError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let is_text = self.is_text();
        match self.value.kind {
            ValueKind::Nil => visitor.visit_unit(),
            ValueKind::Boolean(b) => visitor.visit_bool(b),
            ValueKind::I64(n) => visit_signed(n.into(), visitor),
            ValueKind::I128(n) => visit_signed(n, visitor),
            ValueKind::U64(n) => visitor.visit_u64(n),
            ValueKind::U128(n) => visit_unsigned(n, visitor),
            ValueKind::Float(x) => visitor.visit_f64(x),
            ValueKind::String(s) if is_text => {
                // Untyped text for a self-describing target: its own type where it has one.
                match (s.as_str(), parse_int(&s), parse_float(&s)) {
                    ("true", ..) => visitor.visit_bool(true),
                    ("false", ..) => visitor.visit_bool(false),
                    (_, Some(IntText::Pos(n)), _) => visit_unsigned(n, visitor),
                    (_, Some(IntText::Neg(n)), _) => visit_signed(n, visitor),
                    (_, None, Some(x)) => visitor.visit_f64(x),
                    _ => visitor.visit_string(s),
                }
            }
            ValueKind::String(s) => visitor.visit_string(s),
            ValueKind::Table(table) => visitor.visit_map(Table::new(table, self.path)),
            ValueKind::Array(items) => visitor.visit_seq(List::new(items, self.path)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match parse_bool(&self.value) {
            Some(b) => visitor.visit_bool(b),
            None => self.deserialize_any(visitor),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.integer(visitor)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value.kind {
            ValueKind::String(s) => match parse_float(&s) {
                Some(x) => visitor.visit_f64(x),
                None => visitor.visit_string(s),
            },
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        // Typed scalars (TOML `linger.ms = 5`) are written out; nothing is lost.
        match self.value.kind {
            ValueKind::String(s) => visitor.visit_string(s),
            ValueKind::Boolean(b) => visitor.visit_string(b.to_string()),
            ValueKind::I64(n) => visitor.visit_string(n.to_string()),
            ValueKind::I128(n) => visitor.visit_string(n.to_string()),
            ValueKind::U64(n) => visitor.visit_string(n.to_string()),
            ValueKind::U128(n) => visitor.visit_string(n.to_string()),
            ValueKind::Float(x) => visitor.visit_string(x.to_string()),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_byte_buf(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value.kind {
            ValueKind::String(s) => visitor.visit_byte_buf(s.into_bytes()),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value.kind {
            ValueKind::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value.kind {
            ValueKind::Table(table) => visitor.visit_map(Table::new(table, self.path)),
            _ => Err(OptionError::at_root(Problem::Invalid {
                expected: "a table of options".to_owned(),
                got: None,
            })),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value.kind {
            ValueKind::String(s) => visitor.visit_enum(s.into_deserializer()),
            ValueKind::Table(table) if table.len() == 1 => {
                let (variant, value) = table.into_iter().next().expect("one entry");
                let path = child(&self.path, &variant);
                visitor.visit_enum(Variant {
                    variant,
                    value,
                    path,
                })
            }
            _ => Err(OptionError::at_root(Problem::Invalid {
                expected: one_of(variants),
                got: None,
            })),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }
}

/// The entries of a table, in key order (so the first problem reported is stable).
struct Table {
    entries: std::vec::IntoIter<(String, Value)>,
    pending: Option<(String, Value)>,
    path: String,
}

impl Table {
    fn new(table: Map<String, Value>, path: String) -> Self {
        let mut entries: Vec<(String, Value)> = table.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Table {
            entries: entries.into_iter(),
            pending: None,
            path,
        }
    }
}

impl<'de> MapAccess<'de> for Table {
    type Error = OptionError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = child(&self.path, &key);
        let key = seed
            .deserialize(De {
                value: Value::new(None, ValueKind::String(key)),
                path: path.clone(),
            })
            .map_err(|e| e.locate(&path, None))?;
        self.pending = Some((path, value));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let Some((path, value)) = self.pending.take() else {
            return Err(de::Error::custom("a value was asked for before its key"));
        };
        let shown = render(&value);
        seed.deserialize(De {
            value,
            path: path.clone(),
        })
        .map_err(|e| e.locate(&path, shown.as_ref()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// The items of a list; item `i` of option `servers` is `servers[i]`.
struct List {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: String,
}

impl List {
    fn new(items: Vec<Value>, path: String) -> Self {
        List {
            items: items.into_iter().enumerate(),
            path,
        }
    }
}

impl<'de> SeqAccess<'de> for List {
    type Error = OptionError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        let shown = render(&value);
        seed.deserialize(De {
            value,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.locate(&path, shown.as_ref()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// An enum written as a one-entry table: `{ variant = content }`.
struct Variant {
    variant: String,
    value: Value,
    path: String,
}

impl<'de> EnumAccess<'de> for Variant {
    type Error = OptionError;
    type Variant = De;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), Self::Error> {
        let variant: de::value::StringDeserializer<OptionError> = self.variant.into_deserializer();
        let tag = seed.deserialize(variant)?;
        Ok((
            tag,
            De {
                value: self.value,
                path: self.path,
            },
        ))
    }
}

impl<'de> VariantAccess<'de> for De {
    type Error = OptionError;

    fn unit_variant(self) -> Result<(), Self::Error> {
        if matches!(self.value.kind, ValueKind::Nil) {
            return Ok(());
        }
        Err(OptionError::at_root(Problem::Invalid {
            expected: "no value".to_owned(),
            got: None,
        })
        .locate(&self.path, render(&self.value).as_ref()))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        let (path, shown) = (self.path.clone(), render(&self.value));
        seed.deserialize(self)
            .map_err(|e| e.locate(&path, shown.as_ref()))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let path = self.path.clone();
        self.deserialize_seq(visitor)
            .map_err(|e| e.locate(&path, None))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let path = self.path.clone();
        self.deserialize_map(visitor)
            .map_err(|e| e.locate(&path, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;
    use std::num::NonZeroU32;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        small: u16,
        signed: i32,
        flag: bool,
        ratio: f64,
        name: String,
        api_token: u32,
        nested: Nested,
        free: BTreeMap<String, serde_json::Value>,
        list: Vec<u8>,
        mode: Option<Mode>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        limit: Option<NonZeroU32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Slow,
    }

    fn table(entries: Vec<(&str, Value)>) -> Map<String, Value> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    fn typed(kind: ValueKind) -> Value {
        Value::new(Some(&"app.toml".to_owned()), kind)
    }

    fn parse(entries: Vec<(&str, Value)>) -> Result<Sample, OptionError> {
        from_options(table(entries))
    }

    fn err(entries: Vec<(&str, Value)>) -> String {
        parse(entries).unwrap_err().to_string()
    }

    #[test]
    fn integers_from_text_and_files() {
        let s = parse(vec![
            ("small", text("+7")),
            ("signed", text("-5")),
            (
                "list",
                typed(ValueKind::Array(vec![text("1"), typed(ValueKind::I64(2))])),
            ),
        ])
        .unwrap();
        assert_eq!((s.small, s.signed, s.list), (7, -5, vec![1, 2]));
        assert_eq!(
            parse(vec![("small", typed(ValueKind::I64(9)))])
                .unwrap()
                .small,
            9
        );
    }

    #[test]
    fn out_of_range_and_negative_numbers_say_the_range() {
        let e = err(vec![("small", text("70000"))]);
        assert_eq!(
            e,
            "option `small`: expected an integer from 0 to 65535, got `70000`"
        );
        let e = err(vec![("small", text("-5"))]);
        assert_eq!(
            e,
            "option `small`: expected an integer from 0 to 65535, got `-5`"
        );
        let e = err(vec![("small", typed(ValueKind::I64(-5)))]);
        assert_eq!(
            e,
            "option `small`: expected an integer from 0 to 65535, got -5"
        );
        let e = err(vec![("signed", text("99999999999999999999999"))]);
        assert_eq!(
            e,
            "option `signed`: expected an integer from -2147483648 to 2147483647, got `99999999999999999999999`"
        );
        let huge = "9".repeat(60);
        let e = err(vec![("small", text(huge.clone()))]);
        assert!(e.contains("from 0 to 65535") && e.contains(&huge), "{e}");
        let e = err(vec![(
            "list",
            typed(ValueKind::Array(vec![text("1"), text("300")])),
        )]);
        assert_eq!(
            e,
            "option `list[1]`: expected an integer from 0 to 255, got `300`"
        );
    }

    #[test]
    fn zero_where_nonzero_is_required() {
        let e = err(vec![(
            "nested",
            typed(ValueKind::Table(table(vec![("limit", text("0"))]))),
        )]);
        assert_eq!(
            e,
            "option `nested.limit`: expected an integer from 1 to 4294967295, got `0`"
        );
    }

    #[test]
    fn no_lossy_coercions_to_integers() {
        for (value, shown) in [
            (typed(ValueKind::Float(1.5)), "1.5"),
            (typed(ValueKind::Float(2.0)), "2.0"),
            (text("1.5"), "`1.5`"),
            (text("1e3"), "`1e3`"),
            (text("yes"), "`yes`"),
            (text("true"), "`true`"),
            (typed(ValueKind::Boolean(true)), "true (a boolean)"),
            (typed(ValueKind::String("yes".into())), "`yes`"),
        ] {
            let e = err(vec![("small", value)]);
            assert_eq!(
                e,
                format!("option `small`: expected an integer from 0 to 65535, got {shown}")
            );
        }
    }

    #[test]
    fn booleans_are_words_not_numbers() {
        for (word, want) in [("true", true), ("Yes", true), ("off", false), ("0", false)] {
            assert_eq!(
                parse(vec![("flag", text(word))]).unwrap().flag,
                want,
                "{word}"
            );
        }
        assert_eq!(
            err(vec![("flag", text("2"))]),
            "option `flag`: expected true or false, got `2`"
        );
        assert_eq!(
            err(vec![("flag", typed(ValueKind::I64(1)))]),
            "option `flag`: expected true or false, got 1"
        );
    }

    #[test]
    fn numbers_and_strings() {
        let s = parse(vec![
            ("ratio", text("1e3")),
            ("name", typed(ValueKind::I64(5))),
        ])
        .unwrap();
        assert_eq!((s.ratio, s.name.as_str()), (1000.0, "5"));
        let s = parse(vec![("ratio", typed(ValueKind::I64(2)))]).unwrap();
        assert_eq!(s.ratio, 2.0);
        assert_eq!(
            err(vec![("ratio", text("nan"))]),
            "option `ratio`: expected a number, got `nan`"
        );
    }

    #[test]
    fn text_gets_its_own_type_in_free_form_maps() {
        let free = typed(ValueKind::Table(table(vec![
            ("n", text("100000")),
            ("b", text("true")),
            ("x", text("1.5")),
            ("s", text("lazy")),
            ("t", typed(ValueKind::String("7".into()))),
        ])));
        let s = parse(vec![("free", free)]).unwrap();
        let json = serde_json::to_string(&s.free).unwrap();
        assert_eq!(json, r#"{"b":true,"n":100000,"s":"lazy","t":"7","x":1.5}"#);
    }

    #[test]
    fn unknown_options_and_variants_are_named() {
        assert_eq!(
            err(vec![(
                "nested",
                typed(ValueKind::Table(table(vec![("limt", text("1"))])))
            )]),
            "unknown option `nested.limt`: the only option here is `limit`"
        );
        assert!(err(vec![("smal", text("1"))])
            .starts_with("unknown option `smal`: expected one of `small`, "));
        assert_eq!(
            err(vec![("mode", text("medium"))]),
            "option `mode`: expected one of `fast` or `slow`, got `medium`"
        );
        assert_eq!(
            parse(vec![("mode", text("slow"))]).unwrap().mode,
            Some(Mode::Slow)
        );
        assert_eq!(
            err(vec![("nested", text("5"))]),
            "option `nested`: expected a table of options, got `5`"
        );
    }

    #[test]
    fn secrets_are_never_shown() {
        let e = parse(vec![("api_token", text("hunter2"))]).unwrap_err();
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        let e = e.to_string();
        assert_eq!(
            e,
            "option `api_token`: expected an integer from 0 to 4294967295, got a value that is not shown (it may be a secret)"
        );
        let e = err(vec![("small", text("amqp://u:hunter2@h/x"))]);
        assert!(!e.contains("hunter2"), "{e}");
    }
}
