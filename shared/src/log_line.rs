//! Log lines formatted by hand for the hottest one, the access log: the
//! same JSON shape as the `tracing` JSON formatter (`timestamp`, `level`,
//! `message`, the fields, `target`), written into a reused buffer and handed
//! to the log writer thread (`telemetry::write_json_line`). The formatter
//! it replaces made ~150 small writes per line, each re-checked as UTF-8.

use std::fmt::Write as _;

/// One JSON log line being built.
pub struct JsonLine<'b> {
    buf: &'b mut String,
}

impl<'b> JsonLine<'b> {
    /// Starts an INFO line with `message` in `buf` (cleared first).
    pub fn info(buf: &'b mut String, message: &str) -> Self {
        buf.clear();
        let now = time::OffsetDateTime::now_utc();
        let _ = write!(
            buf,
            "{{\"timestamp\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"level\":\"INFO\",\"message\":",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.microsecond()
        );
        push_str(buf, message);
        Self { buf }
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        push_str(self.buf, value);
        self
    }

    pub fn num(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        let _ = write!(self.buf, "{value}");
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.key(key);
        self.buf.push_str(if value { "true" } else { "false" });
        self
    }

    /// Closes the line with its `target` and a newline.
    pub fn finish(mut self, target: &str) -> &'b str {
        self.key("target");
        push_str(self.buf, target);
        self.buf.push_str("}\n");
        self.buf
    }

    fn key(&mut self, key: &str) {
        self.buf.push(',');
        push_str(self.buf, key);
        self.buf.push(':');
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_str(buf: &mut String, s: &str) {
    buf.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        buf.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(buf, "\\u{b:04x}");
        } else {
            buf.push_str(escape);
        }
        plain = i + 1;
    }
    buf.push_str(&s[plain..]);
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_escapes() {
        let mut buf = String::new();
        let line = JsonLine::info(&mut buf, "access")
            .str("model", "gpt\"4o\n\u{1}é")
            .num("status", 200)
            .bool("stream", true)
            .finish("aigw_data_plane::access");
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["model"], "gpt\"4o\n\u{1}é");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], true);
        assert_eq!(v["message"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "aigw_data_plane::access");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
    }
}
