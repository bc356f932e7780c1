//! Reading and checking the caller's request: content type, size, JSON, the
//! fields the operation needs (`openai::request`), and the body for Azure.

use crate::error::Error;
use crate::openai::request::{self as wire, Fields, Invalid};
use crate::openai::Operation;
use bytes::Bytes;
use http::{header, HeaderMap};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A checked request, ready to send upstream (cheap to clone: shared body).
#[derive(Clone)]
pub struct Request {
    pub fields: Fields,
    /// The parsed body, for the response cache's key and token counting.
    pub parsed: Arc<Map<String, Value>>,
    /// The body for Azure: the caller's own bytes unless it had to change.
    pub body: Bytes,
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

fn invalid_json(message: String) -> Error {
    Error::InvalidRequest {
        message,
        param: None,
        code: Some("invalid_json"),
    }
}

/// Reads at most `max` bytes, parses JSON once and checks the fields `op` needs.
pub async fn read<B>(
    op: Operation,
    headers: &HeaderMap,
    body: B,
    max: usize,
) -> Result<Request, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    check_content_type(headers)?;
    check_declared_length(headers, max)?;
    let bytes = read_body(body, max).await?;
    let mut parsed = parse_object(&bytes)?;
    let fields = wire::read_fields(op, &parsed)?;
    let body = if fields.stream {
        // The body changes: Azure is asked for the usage chunk.
        wire::ask_for_stream_usage(&mut parsed)?;
        Bytes::from(
            serde_json::to_vec(&parsed).map_err(|e| Error::InvalidRequest {
                message: e.to_string(),
                param: None,
                code: None,
            })?,
        )
    } else {
        bytes
    };
    Ok(Request {
        fields,
        parsed: Arc::new(parsed),
        body,
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

/// A declared length over the limit is refused before reading (413).
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

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(invalid_json(
            "the request body must be a JSON object".to_string(),
        )),
        Err(e) => Err(invalid_json(format!(
            "we could not parse the JSON body of your request: {e}"
        ))),
    }
}
