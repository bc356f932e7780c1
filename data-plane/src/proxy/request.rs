//! Reading and checking the caller's request: content type, size, JSON, the
//! fields the operation needs (`openai::request`), and the body for Azure.
//! The body is never turned into a JSON tree: its top level is read as raw
//! text (`openai::raw`), so a request costs about its own size in memory
//! whatever its shape, and large bodies are read off the async workers.

use crate::error::Error;
use crate::openai::raw::RawObject;
use crate::openai::request::{self as wire, Fields, Invalid};
use crate::openai::Operation;
use bytes::Bytes;
use http::{header, HeaderMap};

/// Bodies at least this large are checked on the blocking pool: a scan of
/// megabytes would hold up every other call on the same worker.
const CHECK_INLINE: usize = 256 * 1024;

/// A checked request, ready to send upstream (cheap to clone: shared body).
#[derive(Clone)]
pub struct Request {
    pub fields: Fields,
    /// The body for Azure, a checked JSON object: the caller's own bytes
    /// unless it had to change. The response cache keys on it and token
    /// limits count it (`object`).
    pub body: Bytes,
}

impl Request {
    /// The body's top level, read again where a step needs more than
    /// `fields`: one linear scan, no tree.
    pub fn object(&self) -> Result<RawObject<'_>, Error> {
        Ok(wire::parse(&self.body)?)
    }

    /// `f` of the body's top level: here for a small body, on the blocking
    /// pool for a large one (reading it again and walking it takes as long
    /// as checking it did).
    pub async fn with_object<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&RawObject<'_>, &Fields) -> T + Send + 'static,
    {
        if self.body.len() < CHECK_INLINE {
            return Ok(f(&self.object()?, &self.fields));
        }
        let request = self.clone();
        tokio::task::spawn_blocking(move || Ok(f(&request.object()?, &request.fields)))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(format!("reading the request: {e}"))))?
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::InvalidRequest {
            message: e.message,
            param: e.param,
            code: e.code,
        }
    }
}

/// Reads at most `max` bytes, reads the JSON object's top level once and
/// checks the fields `op` needs; `path_alias` is the alias Azure's
/// deployment route named (see `wire::read_fields`).
pub async fn read<B>(
    op: Operation,
    path_alias: Option<&str>,
    headers: &HeaderMap,
    body: B,
    max: usize,
) -> Result<Request, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    check_content_type(headers)?;
    if let Err(e) = check_declared_length(headers, max) {
        // Read (and drop) the upload anyway: a client that sends its whole
        // body before reading then gets the 413, not a reset connection.
        aigw_shared::body::drain(body).await;
        return Err(e);
    }
    let bytes = read_body(body, max).await?;
    if bytes.len() < CHECK_INLINE {
        return check(op, path_alias, bytes);
    }
    let path_alias = path_alias.map(str::to_owned);
    tokio::task::spawn_blocking(move || check(op, path_alias.as_deref(), bytes))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("checking the request: {e}"))))?
}

/// The checks and the one rewrite (chat and completions streams ask Azure
/// for usage; a Responses stream always ends with it).
pub(super) fn check(
    op: Operation,
    path_alias: Option<&str>,
    bytes: Bytes,
) -> Result<Request, Error> {
    let mut object = wire::parse(&bytes)?;
    let fields = wire::read_fields(op, &object, path_alias)?;
    if !fields.stream || op == Operation::Responses {
        drop(object);
        return Ok(Request {
            fields,
            body: bytes,
        });
    }
    wire::ask_for_stream_usage(&mut object)?;
    let mut out = Vec::with_capacity(bytes.len() + 32);
    object
        .write_to(&mut out)
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    Ok(Request {
        fields,
        body: Bytes::from(out),
    })
}

/// JSON or nothing said (415 otherwise).
fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or_default();
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(Error::UnsupportedMediaType)
    }
}

/// A declared length over the limit is refused without keeping any of the
/// body (413).
fn check_declared_length(headers: &HeaderMap, max: usize) -> Result<(), Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > u64::try_from(max).unwrap_or(u64::MAX) => {
            Err(Error::PayloadTooLarge { limit: max })
        }
        _ => Ok(()),
    }
}

async fn read_body<B>(body: B, max: usize) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    match aigw_shared::body::read_limited(body, max).await {
        Ok(b) => Ok(b),
        Err(aigw_shared::Error::BodyTooLarge { limit }) => Err(Error::PayloadTooLarge { limit }),
        Err(e) => Err(Error::InvalidRequest {
            message: e.to_string(),
            param: None,
            code: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(content_len: usize) -> Bytes {
        Bytes::from(format!(
            r#"{{"model":"m","temperature":0,"stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(content_len)
        ))
    }

    #[tokio::test]
    async fn large_bodies_are_read_the_same_off_the_workers() {
        for len in [10, CHECK_INLINE * 2] {
            let r = check(Operation::ChatCompletions, None, chat(len)).unwrap();
            assert!(r.fields.stream && r.fields.deterministic && r.fields.prompt_chars == len);
            let inline = crate::cache::key("a", crate::openai::Shape::OpenAi, &r.object().unwrap());
            let got = r
                .with_object(|o, f| {
                    (
                        crate::cache::key("a", crate::openai::Shape::OpenAi, o),
                        f.prompt_chars,
                    )
                })
                .await
                .unwrap();
            assert_eq!(got, (inline, len));
            // The stream rewrite asked for usage and kept the caller's fields.
            let o = r.object().unwrap();
            let opts = o.raw("stream_options").unwrap();
            assert_eq!(
                crate::openai::raw::lookup(opts, "include_usage"),
                Some("true")
            );
            assert_eq!(o.raw("temperature"), Some("0"));
        }
    }
}
