//! Step 8: answers from the model's response cache, or fetches the answer
//! as JSON (one fetch for any number of identical concurrent misses) and
//! keeps it; a stream caller gets it replayed as SSE either way.

use super::call::Call;
use super::request::Request;
use super::{full, json_response, Proxy, ProxyBody, CACHE_STATUS, SERVED_BY};
use crate::cache::{Answer, Store};
use crate::config::Route;
use crate::error::Error;
use crate::openai::Operation;
use crate::usage::CacheStatus;
use http::{header, HeaderValue, Response};
use http_body_util::BodyExt;
use std::sync::Arc;

impl Proxy {
    pub(super) async fn cached(
        &self,
        op: Operation,
        route: &Route,
        store: Store,
        inbound: &http::HeaderMap,
        request: Request,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Error> {
        let (alias, shape) = (route.alias.clone(), call.shape);
        let (key, body) = request
            .with_object(move |object, _| {
                (
                    crate::cache::key(&alias, shape, object),
                    crate::cache::json_body(object),
                )
            })
            .await?;
        let (stream, include_usage) = (request.fields.stream, request.fields.caller_wants_usage);
        let mut fetch = Request { body, ..request };
        fetch.fields.stream = false;
        let entry = store
            .entry(key)
            .or_try_insert_with(self.fetch_answer(op, route, inbound, &fetch, &mut *call))
            .await
            .map_err(|e| e.duplicate())?;
        let hit = !entry.is_fresh();
        let answer = entry.into_value();
        if !hit {
            // Apply the size bound now rather than at moka's next housekeeping.
            store.run_pending_tasks().await;
        }
        record_cache_outcome(call, hit, &answer);
        let mut r = if stream {
            let mut r = Response::new(full(crate::cache::sse_from_json(
                &answer.body,
                shape,
                include_usage,
            )));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            r
        } else {
            json_response(answer.body.clone())
        };
        r.headers_mut()
            .insert(SERVED_BY.clone(), answer.served_by.clone());
        r.headers_mut().insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(if hit { "hit" } else { "miss" }),
        );
        Ok(r)
    }

    /// A miss: the answer from Azure, whole, to keep.
    async fn fetch_answer(
        &self,
        op: Operation,
        route: &Route,
        inbound: &http::HeaderMap,
        fetch: &Request,
        call: &mut Call,
    ) -> Result<Arc<Answer>, Error> {
        let resp = self.forward(op, route, inbound, fetch, call).await?;
        let served_by = resp
            .headers()
            .get(&SERVED_BY)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("cache"));
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Upstream(format!("reading the answer to cache: {e}")))?
            .to_bytes();
        Ok(Arc::new(Answer { body, served_by }))
    }
}

fn record_cache_outcome(call: &mut Call, hit: bool, answer: &Answer) {
    if !hit {
        call.cache_status(CacheStatus::Miss);
        return;
    }
    call.cache_status(CacheStatus::Hit);
    if let Some(a) = call.usage() {
        // Served without Azure: no tokens spent, no cost.
        a.set_usage((0, 0));
        if a.wants_completion() {
            let text = crate::openai::Answer::parse(&answer.body)
                .map(|a| a.completion_text())
                .unwrap_or_default();
            a.add_completion_text(&text);
        }
    }
}
