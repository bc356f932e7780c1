//! Bounded request-body reading for both planes.

use crate::error::Error;
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use std::time::Duration;

/// How much of an oversized body is read and thrown away so the client, still
/// uploading, can read the 413 instead of hitting a reset connection (many
/// clients send the whole body before reading). Bounded in bytes and time,
/// so a slow or endless upload cannot hold the connection.
pub const DRAIN_BYTES: usize = 64 * 1024 * 1024;
pub const DRAIN_TIME: Duration = Duration::from_secs(10);
/// Most of a declared body length reserved before any of it arrives.
const PREALLOC: usize = 8 * 1024 * 1024;

/// Reads the whole body if it fits in `max` bytes; otherwise drains a bounded
/// amount more and returns [`Error::BodyTooLarge`].
pub async fn read_limited<B>(body: B, max: usize) -> Result<Bytes, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // A declared length sizes the buffer in at most two steps (growing by
    // doubling would briefly hold up to three times the body): [`PREALLOC`]
    // at first, the whole length once that much has come, so a length a
    // client declares but never sends costs at most [`PREALLOC`].
    let declared = usize::try_from(body.size_hint().lower())
        .unwrap_or(usize::MAX)
        .min(max);
    let mut buf = BytesMut::with_capacity(declared.min(PREALLOC));
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            drain(body).await;
            return Err(Error::BodyTooLarge { limit: max });
        }
        if buf.capacity() - buf.len() < data.len() {
            let want = declared.max(buf.len() + data.len());
            buf.reserve(want - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Reads and discards what is left of a refused body, at most
/// [`DRAIN_BYTES`] within [`DRAIN_TIME`]; whatever remains then is the
/// client's problem (the connection closes).
pub async fn drain<B>(body: B)
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut drained = 0usize;
    let drain = async {
        while let Some(Ok(f)) = body.frame().await {
            drained = drained.saturating_add(f.data_ref().map_or(0, |d| d.len()));
            if drained > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    #[tokio::test]
    async fn reads_within_limit_and_rejects_beyond() {
        let ok = read_limited(Full::new(Bytes::from_static(b"hello")), 5)
            .await
            .unwrap();
        assert_eq!(&ok[..], b"hello");
        let err = read_limited(Full::new(Bytes::from_static(b"hello!")), 5)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BodyTooLarge { limit: 5 }));
        // Split across frames.
        let frames = futures_frames(&[b"abc", b"def"]);
        assert!(matches!(
            read_limited(frames, 5).await,
            Err(Error::BodyTooLarge { .. })
        ));
        let frames = futures_frames(&[b"ab", b"c"]);
        assert_eq!(&read_limited(frames, 5).await.unwrap()[..], b"abc");
    }

    fn futures_frames(
        parts: &[&'static [u8]],
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = parts
            .iter()
            .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(tokio_stream::iter(frames))
    }
}
