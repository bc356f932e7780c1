//! A JSON object read without building a tree: each field's value is kept
//! as the upstream's raw text, in order, so whatever the gateway does not
//! touch goes on verbatim, and rewriting a field costs only that field.
//!
//! The scanner validates the JSON it skips (structure, strings, numbers,
//! literals; UTF-8 once up front), so a raw value is always valid JSON.

use serde::Deserialize;
use std::borrow::Cow;
use std::io::Write;

/// Deepest nesting accepted (serde_json's own limit).
const MAX_DEPTH: usize = 128;

/// Why a text is not read as a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("invalid JSON at byte {at}")]
    Json { at: usize },
    /// More fields than the reader allows (each costs memory: a body of
    /// tiny fields must not cost many times its size).
    #[error("more than {max} fields in one JSON object")]
    TooManyFields { max: usize },
}

/// A field's value: as received, or rewritten by the gateway.
#[derive(Debug, Clone)]
pub enum Field<'a> {
    /// Valid JSON text, exactly as received.
    Raw(&'a str),
    Str(Cow<'a, str>),
    Objects(Vec<RawObject<'a>>),
    /// Valid JSON text written by the gateway.
    Json(String),
}

impl<'a> Field<'a> {
    pub fn raw(&self) -> Option<&'a str> {
        match self {
            Field::Raw(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the value is JSON `null`.
    pub fn is_null(&self) -> bool {
        self.raw() == Some("null")
    }

    fn write_into<W: Write>(&self, out: &mut W) -> Result<(), serde_json::Error> {
        match self {
            Field::Raw(r) => out.write_all(r.as_bytes()).map_err(serde_json::Error::io),
            Field::Json(j) => out.write_all(j.as_bytes()).map_err(serde_json::Error::io),
            Field::Str(s) => serde_json::to_writer(out, s.as_ref()),
            Field::Objects(v) => {
                out.write_all(b"[").map_err(serde_json::Error::io)?;
                for (i, o) in v.iter().enumerate() {
                    if i > 0 {
                        out.write_all(b",").map_err(serde_json::Error::io)?;
                    }
                    o.write_into(out)?;
                }
                out.write_all(b"]").map_err(serde_json::Error::io)
            }
        }
    }
}

/// A JSON object's fields in their order, values unparsed.
#[derive(Debug, Clone, Default)]
pub struct RawObject<'a> {
    fields: Vec<(Cow<'a, str>, Field<'a>)>,
}

impl<'a> RawObject<'a> {
    /// Reads a JSON object (and nothing after it but whitespace).
    pub fn parse(json: &'a [u8]) -> Result<Self, Invalid> {
        Self::parse_bounded(json, usize::MAX)
    }

    /// Reads a JSON object of at most `max_fields` fields (nested objects are
    /// only checked, not kept, so they cost nothing).
    pub fn parse_bounded(json: &'a [u8], max_fields: usize) -> Result<Self, Invalid> {
        let text = std::str::from_utf8(json).map_err(|e| Invalid::Json {
            at: e.valid_up_to(),
        })?;
        Self::parse_text(text, max_fields)
    }

    /// [`RawObject::parse_bounded`] of a text.
    pub fn parse_text(text: &'a str, max_fields: usize) -> Result<Self, Invalid> {
        let mut s = Scanner {
            text,
            at: 0,
            max_fields,
        };
        let obj = s.object(0)?;
        s.ws();
        if s.at != text.len() {
            return Err(Invalid::Json { at: s.at });
        }
        Ok(obj)
    }

    pub fn get(&self, key: &str) -> Option<&Field<'a>> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Field<'a>> {
        self.fields
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The field's text as received (absent or rewritten: `None`).
    pub fn raw(&self, key: &str) -> Option<&'a str> {
        self.get(key)?.raw()
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields in their order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &Field<'a>)> {
        self.fields.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// The field parsed as `T` (absent, rewritten, or not a `T`: `None`).
    pub fn parse_field<T: Deserialize<'a>>(&self, key: &str) -> Option<T> {
        serde_json::from_str(self.get(key)?.raw()?).ok()
    }

    /// A string field, borrowed when it has no escapes.
    pub fn str_field(&self, key: &str) -> Option<Cow<'a, str>> {
        match self.get(key)? {
            Field::Raw(r) => serde_json::from_str::<Key<'a>>(r).ok().map(|k| k.0),
            Field::Str(s) => Some(s.clone()),
            Field::Objects(_) | Field::Json(_) => None,
        }
    }

    /// Sets `key`, in place when present, else at the end.
    pub fn set(&mut self, key: &'static str, value: Field<'a>) {
        match self.get_mut(key) {
            Some(v) => *v = value,
            None => self.fields.push((Cow::Borrowed(key), value)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.fields.retain(|(k, _)| k != key);
    }

    /// The objects of an array field, parsed for rewriting (and kept so);
    /// `None` when the field is absent or not an array of objects.
    pub fn objects_mut(&mut self, key: &str) -> Option<&mut Vec<RawObject<'a>>> {
        let field = self.get_mut(key)?;
        if let Field::Raw(r) = field {
            *field = Field::Objects(object_array(r)?);
        }
        match field {
            Field::Objects(v) => Some(v),
            _ => None,
        }
    }

    /// The objects of an array field, read-only.
    pub fn objects(&self, key: &str) -> Vec<RawObject<'a>> {
        match self.get(key) {
            Some(Field::Objects(v)) => v.clone(),
            Some(Field::Raw(r)) => object_array(r).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The object as JSON text.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail, and every part is valid UTF-8.
        let _ = self.write_into(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Writes the object as JSON.
    pub fn write_to(&self, mut out: impl Write) -> Result<(), serde_json::Error> {
        self.write_into(&mut out)
    }

    fn write_into<W: Write>(&self, out: &mut W) -> Result<(), serde_json::Error> {
        out.write_all(b"{").map_err(serde_json::Error::io)?;
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.write_all(b",").map_err(serde_json::Error::io)?;
            }
            serde_json::to_writer(&mut *out, k.as_ref())?;
            out.write_all(b":").map_err(serde_json::Error::io)?;
            v.write_into(out)?;
        }
        out.write_all(b"}").map_err(serde_json::Error::io)
    }
}

/// An array of objects, each read raw; `None` if it is anything else.
fn object_array(text: &str) -> Option<Vec<RawObject<'_>>> {
    let mut s = Scanner::new(text);
    s.ws();
    s.eat(b'[').ok()?;
    let mut out = Vec::new();
    s.ws();
    if s.eat(b']').is_ok() {
        return Some(out);
    }
    loop {
        s.ws();
        out.push(s.object(1).ok()?);
        s.ws();
        match s.next().ok()? {
            b',' => continue,
            b']' => return Some(out),
            _ => return None,
        }
    }
}

/// A string borrowed from the input unless it has escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The items of a JSON array, each as its raw text, without collecting
/// them; nothing if `text` is not an array, and it stops at the first error.
pub fn items(text: &str) -> Items<'_> {
    let mut s = Scanner::new(text);
    s.ws();
    let state = if s.eat(b'[').is_ok() {
        s.ws();
        if s.eat(b']').is_ok() {
            ItemsState::Done
        } else {
            ItemsState::First
        }
    } else {
        ItemsState::Done
    };
    Items { s, state }
}

pub struct Items<'a> {
    s: Scanner<'a>,
    state: ItemsState,
}

#[derive(PartialEq)]
enum ItemsState {
    First,
    More,
    Done,
}

impl<'a> Iterator for Items<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = &mut self.s;
        match self.state {
            ItemsState::Done => return None,
            ItemsState::First => {}
            ItemsState::More => {
                s.ws();
                if s.eat(b',').is_err() {
                    self.state = ItemsState::Done;
                    return None;
                }
            }
        }
        s.ws();
        let from = s.at;
        if s.value(1).is_err() {
            self.state = ItemsState::Done;
            return None;
        }
        self.state = ItemsState::More;
        s.slice(from).ok()
    }
}

/// The value of `key` in the JSON object `text`, found by scanning (nothing
/// is kept); `None` if absent or `text` is not an object. With duplicate
/// keys, the first.
pub fn lookup<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let [v] = lookup_each(text, [key]);
    v
}

/// [`lookup`] of several keys in one pass over `text`: it stops once each
/// is found, so a value after the last key wanted is never read.
pub fn lookup_each<'a, const N: usize>(text: &'a str, keys: [&str; N]) -> [Option<&'a str>; N] {
    let mut found = [None; N];
    let mut s = Scanner::new(text);
    s.ws();
    if s.eat(b'{').is_err() {
        return found;
    }
    s.ws();
    if s.eat(b'}').is_ok() {
        return found;
    }
    while found.iter().any(Option::is_none) {
        s.ws();
        let Ok(k) = s.key() else { break };
        s.ws();
        if s.eat(b':').is_err() {
            break;
        }
        s.ws();
        let from = s.at;
        if s.value(1).is_err() {
            break;
        }
        if let Some(i) = keys.iter().position(|want| *want == k) {
            if found[i].is_none() {
                found[i] = s.slice(from).ok();
            }
        }
        s.ws();
        if s.eat(b',').is_err() {
            break;
        }
    }
    found
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
    /// Most fields `object` keeps.
    max_fields: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            at: 0,
            max_fields: usize::MAX,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn fail<T>(&self) -> Result<T, Invalid> {
        Err(Invalid::Json { at: self.at })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Result<u8, Invalid> {
        let b = self.peek().ok_or(Invalid::Json { at: self.at })?;
        self.at += 1;
        Ok(b)
    }

    fn eat(&mut self, want: u8) -> Result<(), Invalid> {
        if self.peek() == Some(want) {
            self.at += 1;
            Ok(())
        } else {
            self.fail()
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn slice(&self, from: usize) -> Result<&'a str, Invalid> {
        self.text
            .get(from..self.at)
            .ok_or(Invalid::Json { at: from })
    }

    /// `{ "key": value, ... }`, the values kept raw.
    fn object(&mut self, depth: usize) -> Result<RawObject<'a>, Invalid> {
        self.ws();
        self.eat(b'{')?;
        let mut fields = Vec::with_capacity(8);
        self.ws();
        if self.eat(b'}').is_ok() {
            return Ok(RawObject { fields });
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let from = self.at;
            self.value(depth + 1)?;
            if fields.len() >= self.max_fields {
                return Err(Invalid::TooManyFields {
                    max: self.max_fields,
                });
            }
            fields.push((key, Field::Raw(self.slice(from)?)));
            self.ws();
            match self.next()? {
                b',' => continue,
                b'}' => return Ok(RawObject { fields }),
                _ => return Err(Invalid::Json { at: self.at - 1 }),
            }
        }
    }

    fn key(&mut self) -> Result<Cow<'a, str>, Invalid> {
        let from = self.at;
        let escaped = self.string()?;
        let raw = self.slice(from)?;
        if !escaped {
            // Without escapes the key is the text between the quotes.
            return raw
                .get(1..raw.len().saturating_sub(1))
                .map(Cow::Borrowed)
                .ok_or(Invalid::Json { at: from });
        }
        serde_json::from_str::<String>(raw)
            .map(Cow::Owned)
            .map_err(|_| Invalid::Json { at: from })
    }

    /// Skips one value, checking it.
    fn value(&mut self, depth: usize) -> Result<(), Invalid> {
        if depth > MAX_DEPTH {
            return self.fail();
        }
        match self.peek() {
            Some(b'{') => self.skip_object(depth),
            Some(b'[') => self.skip_array(depth),
            Some(b'"') => self.string().map(drop),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.fail(),
        }
    }

    fn skip_object(&mut self, depth: usize) -> Result<(), Invalid> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_ok() {
            return Ok(());
        }
        loop {
            self.ws();
            self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            self.value(depth + 1)?;
            self.ws();
            match self.next()? {
                b',' => continue,
                b'}' => return Ok(()),
                _ => return Err(Invalid::Json { at: self.at - 1 }),
            }
        }
    }

    fn skip_array(&mut self, depth: usize) -> Result<(), Invalid> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_ok() {
            return Ok(());
        }
        loop {
            self.ws();
            self.value(depth + 1)?;
            self.ws();
            match self.next()? {
                b',' => continue,
                b']' => return Ok(()),
                _ => return Err(Invalid::Json { at: self.at - 1 }),
            }
        }
    }

    /// Skips a string; whether it had escapes.
    fn string(&mut self) -> Result<bool, Invalid> {
        self.eat(b'"')?;
        let mut escaped = false;
        loop {
            self.at += plain_run(self.bytes().get(self.at..).unwrap_or_default());
            match self.next()? {
                b'"' => return Ok(escaped),
                b'\\' => {
                    escaped = true;
                    match self.next()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            for _ in 0..4 {
                                if !self.next()?.is_ascii_hexdigit() {
                                    return Err(Invalid::Json { at: self.at - 1 });
                                }
                            }
                        }
                        _ => return Err(Invalid::Json { at: self.at - 1 }),
                    }
                }
                0x00..=0x1f => return Err(Invalid::Json { at: self.at - 1 }),
                _ => {}
            }
        }
    }

    fn literal(&mut self, word: &str) -> Result<(), Invalid> {
        if self
            .text
            .get(self.at..)
            .is_some_and(|t| t.starts_with(word))
        {
            self.at += word.len();
            Ok(())
        } else {
            self.fail()
        }
    }

    fn digits(&mut self) -> Result<(), Invalid> {
        let from = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == from {
            self.fail()
        } else {
            Ok(())
        }
    }

    fn number(&mut self) -> Result<(), Invalid> {
        let _ = self.eat(b'-');
        if self.eat(b'0').is_err() {
            self.digits()?;
        }
        if self.eat(b'.').is_ok() {
            self.digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.digits()?;
        }
        Ok(())
    }
}

/// How many bytes at the start of `b` a JSON string takes as they are: up
/// to the first `"`, `\` or control character. A prompt is mostly such a
/// run, and every pass over a request skips it, so it is checked a block at
/// a time, branch-free, in a form the compiler turns into SIMD compares
/// (`(c ^ 2) <= 0x20` is `c < 0x20 || c == b'"'`): about 0.7 instructions a
/// byte instead of 12 for a byte at a time.
fn plain_run(b: &[u8]) -> usize {
    const BLOCK: usize = 32;
    let mut n = 0;
    for block in b.chunks_exact(BLOCK) {
        let mut hit = 0u8;
        for &c in block {
            hit |= u8::from((c ^ 2) <= 0x20) | u8::from(c == b'\\');
        }
        if hit != 0 {
            break;
        }
        n += BLOCK;
    }
    let rest = b.get(n..).unwrap_or_default();
    n + rest
        .iter()
        .position(|&c| c < 0x20 || c == b'"' || c == b'\\')
        .unwrap_or(rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_run_stops_at_the_first_byte_a_string_must_look_at() {
        let naive = |b: &[u8]| {
            b.iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len())
        };
        // Every special byte at every offset of a 0..=70-byte run (blocks
        // and the rest after them), among
        // ASCII, UTF-8 (high-bit) and the bytes next to the special ones.
        let fillers = [b'a', 0xc3, 0xa9, 0x7f, 0xff, 0x21, 0x23, 0x5b, 0x5d, 0x20];
        for special in [b'"', b'\\', 0x00, 0x01, 0x0a, 0x1f] {
            for len in 0..=70 {
                for at in 0..=len {
                    for filler in fillers {
                        let mut b = vec![filler; len];
                        if at < len {
                            b[at] = special;
                        }
                        assert_eq!(plain_run(&b), naive(&b), "{b:?}");
                    }
                }
            }
        }
        proptest::proptest!(|(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200))| {
            proptest::prop_assert_eq!(plain_run(&b), naive(&b));
        });
    }

    fn written(o: &RawObject<'_>) -> String {
        let mut out = Vec::new();
        o.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn untouched_fields_go_on_verbatim_and_in_order() {
        let json = br#"{"z":1.50,"a":{"deep":[1, 2]},"s":"x\"y","n":null, "k\u0041":-0.5e+3}"#;
        let mut o = RawObject::parse(json).unwrap();
        assert_eq!(o.str_field("s").as_deref(), Some("x\"y"));
        assert!(o.get("n").unwrap().is_null());
        assert!(o.get("kA").is_some(), "escaped keys are decoded");
        o.set("s", Field::Str("new".into()));
        o.remove("n");
        assert_eq!(
            written(&o),
            r#"{"z":1.50,"a":{"deep":[1, 2]},"s":"new","kA":-0.5e+3}"#
        );
    }

    #[test]
    fn lookup_each_finds_the_first_of_each_key_in_one_pass() {
        let o = r#"{"a":"1","b":{"a":2},"a":3,"c":[4]}"#;
        assert_eq!(
            lookup_each(o, ["c", "a", "z"]),
            [Some("[4]"), Some(r#""1""#), None]
        );
        assert_eq!(lookup(o, "b"), Some(r#"{"a":2}"#));
        // It stops once every key is found: what follows is never read.
        assert_eq!(
            lookup_each(r#"{"a":1,"b":2, oops"#, ["b", "a"]),
            [Some("2"), Some("1")]
        );
        assert_eq!(
            lookup_each(r#"{"a":1, oops"#, ["b", "a"]),
            [None, Some("1")]
        );
        for not_object in ["", "[1]", "\"a\"", "{", "{}"] {
            assert_eq!(lookup_each(not_object, ["a"]), [None]);
        }
    }

    #[test]
    fn array_objects_are_rewritten_in_place() {
        let json = br#"{"choices":[{"i":0,"drop":{}},{"i":1}],"x":true}"#;
        let mut o = RawObject::parse(json).unwrap();
        for c in o.objects_mut("choices").unwrap() {
            c.remove("drop");
        }
        assert_eq!(written(&o), r#"{"choices":[{"i":0},{"i":1}],"x":true}"#);
    }

    #[test]
    fn invalid_json_is_refused() {
        for bad in [
            &b"[1]"[..],
            b"{",
            b"{\"a\":}",
            b"{\"a\":tru}",
            b"{\"a\":1,}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":01}",
            b"{\"a\":1} x",
            b"{\"a\":\"\\q\"}",
            b"{\"a\":\xff}",
        ] {
            assert!(
                RawObject::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(RawObject::parse(deep.as_bytes()).is_err());
        assert!(RawObject::parse(b" {\"a\" : [ {} , \"\\u00e9\" ] } ").is_ok());
    }
}
