//! Bounded request-body reading for both planes.

use crate::error::Error;
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use std::time::Duration;

/// How much of an oversized body is read and thrown away so the client, still
/// uploading, can read the 413 instead of hitting a reset connection.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads the whole body if it fits in `max` bytes; otherwise drains a bounded
/// amount more and returns [`Error::BodyTooLarge`].
pub async fn read_limited<B>(body: B, max: usize) -> Result<Bytes, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            let mut drained = 0usize;
            let drain = async {
                while let Some(Ok(f)) = body.frame().await {
                    drained += f.data_ref().map_or(0, |d| d.len());
                    if drained > DRAIN_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            return Err(Error::BodyTooLarge { limit: max });
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
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
