//! REST shim compatible with the AISIX admin API (`/admin/v1/...`).

use super::auth::AdminKeys;
use super::{Admin, EventFilter, Input, RecordView};
use crate::error::Error;
use aigw_shared::domain::ResourceKind;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

#[derive(Clone)]
struct Ctx {
    admin: Admin,
    keys: AdminKeys,
    max_body: usize,
    listeners: crate::metrics::Listeners,
    metrics_auth: std::sync::Arc<aigw_shared::config::MetricsAuth>,
}

/// Who made the request, for the event's `actor`.
#[derive(Clone)]
struct Actor(String);

pub const OPENAPI: &str = include_str!("openapi.json");

/// Routes: health and the OpenAPI document are open; everything under
/// `/admin/v1` requires an admin key.
pub fn router(
    admin: Admin,
    keys: AdminKeys,
    max_body: usize,
    listeners: crate::metrics::Listeners,
    metrics_auth: aigw_shared::config::MetricsAuth,
) -> Router {
    let ctx = Ctx {
        admin,
        keys,
        max_body,
        listeners,
        metrics_auth: std::sync::Arc::new(metrics_auth),
    };
    let api = Router::new()
        .route("/admin/v1/events", get(list_events))
        .route(
            "/admin/v1/nodes",
            get(list_nodes).post(issue_node_credential),
        )
        .route("/admin/v1/nodes/{id}", get(read_node).delete(revoke_node))
        .route(
            "/admin/v1/nodes/{id}/credentials/{credential_id}",
            axum::routing::delete(revoke_node_credential),
        )
        .route("/admin/v1/usage", get(query_usage))
        .route("/admin/v1/{collection}", get(list).post(create))
        .route(
            "/admin/v1/{collection}/{id}",
            get(read).put(replace).delete(remove),
        )
        .route(
            "/admin/v1/models/{id}/cache",
            axum::routing::delete(purge_cache),
        )
        .route_layer(middleware::from_fn_with_state(ctx.clone(), authenticate));
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route(
            "/readyz",
            get(|| async { Json(json!({"status": "ready"})) }),
        )
        .route(
            "/admin/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .with_state(ctx)
}

/// Prometheus text, for an admin key, the metrics token, or (without a
/// token) a scrape from this machine; see `control_plane.metrics_auth`.
async fn metrics(State(ctx): State<Ctx>, req: Request) -> Response {
    if admin_actor(&ctx.keys, req.headers()).is_none() && !ctx.metrics_auth.allows_request(&req) {
        return error(
            StatusCode::UNAUTHORIZED,
            "/metrics needs an admin key or control_plane.metrics_auth.token as a bearer token",
        );
    }
    let version = ctx.admin.engine().read().version;
    let l = &ctx.listeners;
    let text = crate::metrics::METRICS.render(ctx.admin.nodes(), version)
        + &aigw_shared::listener::render_metrics(&[&l.admin, &l.grpc]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error_msg": msg }))).into_response()
}

/// The actor of the admin key a request presents, if it is one of ours.
fn admin_actor(keys: &AdminKeys, h: &http::HeaderMap) -> Option<String> {
    AdminKeys::from_headers(
        h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
        h.get("x-api-key").and_then(|v| v.to_str().ok()),
    )
    .and_then(|k| keys.check(k))
}

async fn authenticate(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    match admin_actor(&ctx.keys, req.headers()) {
        Some(actor) => {
            req.extensions_mut().insert(Actor(actor));
            // Read your writes on any replica: wait until this one has
            // applied the sequence asked for; every answer says where it is.
            let engine = ctx.admin.engine().clone();
            match min_seq(&req) {
                Ok(Some(min)) => {
                    if let Err(e) = engine.wait_for_version(min, MIN_SEQ_WAIT).await {
                        return with_seq(e.into_response(), engine.read().version);
                    }
                }
                Ok(None) => {}
                Err(e) => return e.into_response(),
            }
            let response = next.run(req).await;
            let version = engine.read().version;
            with_seq(response, version)
        }
        None => Error::Unauthenticated.into_response(),
    }
}

/// How long a read waits for `min_seq` before answering 503.
const MIN_SEQ_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The request header asking for a sequence (also `?min_seq=`).
pub const MIN_SEQ_HEADER: &str = "x-aigw-min-seq";
/// The response header naming the sequence the answer reflects.
pub const SEQ_HEADER: &str = "x-aigw-seq";

/// `X-Aigw-Min-Seq` or `?min_seq=`, if the request has either.
fn min_seq(req: &Request) -> Result<Option<u64>, Error> {
    let bad = || Error::Invalid("min_seq: must be a non-negative integer".into());
    if let Some(v) = req.headers().get(MIN_SEQ_HEADER) {
        return v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(bad);
    }
    for pair in req.uri().query().unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("min_seq=") {
            return v.parse().map(Some).map_err(|_| bad());
        }
    }
    Ok(None)
}

fn with_seq(mut response: Response, version: u64) -> Response {
    response
        .headers_mut()
        .insert(SEQ_HEADER, HeaderValue::from(version));
    response
}

fn kind_of(collection: &str) -> Result<ResourceKind, Error> {
    match collection {
        "provider_keys" | "models" | "apikeys" | "api_keys" | "jwt_providers" => {
            ResourceKind::parse(collection)
                .ok_or_else(|| Error::UnknownCollection(collection.to_string()))
        }
        _ => Err(Error::UnknownCollection(collection.to_string())),
    }
}

/// Reads at most `max` bytes of body, then parses JSON naming the bad field.
async fn parse_body<T: DeserializeOwned>(body: Body, max: usize) -> Result<T, Error> {
    let bytes: Bytes = match aigw_shared::body::read_limited(body, max).await {
        Ok(b) => b,
        Err(aigw_shared::Error::BodyTooLarge { limit }) => {
            return Err(Error::PayloadTooLarge { limit })
        }
        Err(e) => return Err(Error::Invalid(e.to_string())),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Invalid(
            "request body is empty; expected a JSON object".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            "malformed JSON"
        } else {
            "invalid value"
        };
        if path == "." || path == "?" {
            Error::Invalid(format!("{what}: {inner}"))
        } else {
            Error::Invalid(format!("{path}: {what}: {inner}"))
        }
    })?;
    de.end().map_err(|e| {
        Error::Invalid(format!(
            "malformed JSON: unexpected data after the JSON document: {e}"
        ))
    })?;
    Ok(value)
}

async fn parse_input(kind: ResourceKind, body: Body, max: usize) -> Result<Input, Error> {
    Ok(match kind {
        ResourceKind::ProviderKey => Input::ProviderKey(parse_body(body, max).await?),
        ResourceKind::Model => Input::Model(parse_body(body, max).await?),
        ResourceKind::ApiKey => Input::ApiKey(parse_body(body, max).await?),
        ResourceKind::JwtProvider => Input::JwtProvider(parse_body(body, max).await?),
        // `kind_of` never yields it: nodes have their own routes.
        ResourceKind::Node => return Err(Error::UnknownCollection("nodes".into())),
    })
}

/// `If-Match: 3` or `If-Match: "3"`.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"');
    text.parse()
        .map(Some)
        .map_err(|_| Error::Invalid("If-Match: expected a revision number".into()))
}

fn record_response(status: StatusCode, rec: RecordView) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", rec.revision)).ok();
    let mut resp = (status, Json(rec)).into_response();
    if let Some(etag) = etag {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp
}

async fn list(State(ctx): State<Ctx>, Path(collection): Path<String>) -> Result<Response, Error> {
    let list = ctx.admin.list(kind_of(&collection)?);
    Ok(Json(json!({ "total": list.len(), "list": list })).into_response())
}

async fn create(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(collection): Path<String>,
    body: Body,
) -> Result<Response, Error> {
    let input = parse_input(kind_of(&collection)?, body, ctx.max_body).await?;
    let rec = ctx.admin.create(&actor, input).await?;
    Ok(record_response(StatusCode::CREATED, rec))
}

async fn read(
    State(ctx): State<Ctx>,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Response, Error> {
    Ok(record_response(
        StatusCode::OK,
        ctx.admin.get(kind_of(&collection)?, &id)?,
    ))
}

async fn replace(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let kind = kind_of(&collection)?;
    let expected = if_match(&headers)?;
    let input = parse_input(kind, body, ctx.max_body).await?;
    let (rec, created) = ctx.admin.update(&actor, &id, input, expected, true).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(record_response(status, rec))
}

async fn remove(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let kind = kind_of(&collection)?;
    ctx.admin
        .delete(&actor, kind, &id, if_match(&headers)?)
        .await?;
    Ok(Json(json!({ "deleted": true, "id": id })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    resource: Option<String>,
    resource_id: Option<String>,
    from_seq: Option<u64>,
    to_seq: Option<u64>,
    limit: Option<usize>,
    /// Taken by the authentication layer (read-your-writes).
    #[allow(dead_code)]
    min_seq: Option<u64>,
}

async fn list_events(
    State(ctx): State<Ctx>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Error> {
    let Query(q) = query.map_err(|e| Error::Invalid(e.body_text()))?;
    let resource = match q.resource.as_deref() {
        None | Some("") => None,
        Some(r) => Some(ResourceKind::parse(r).ok_or_else(|| {
            Error::Invalid(format!(
                "resource: unknown `{r}`; use provider_keys, models, apikeys, jwt_providers, nodes"
            ))
        })?),
    };
    let events = ctx.admin.events(&EventFilter {
        resource,
        resource_id: q.resource_id.filter(|s| !s.is_empty()),
        from_seq: q.from_seq,
        to_seq: q.to_seq,
        limit: q.limit,
    })?;
    Ok(Json(json!({ "total": events.len(), "list": events })).into_response())
}

/// `DELETE /admin/v1/models/{id}/cache`: empty the model's response cache fleet-wide.
async fn purge_cache(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, Error> {
    let generation = ctx.admin.purge_cache(&id)?;
    Ok(Json(json!({ "purged": true, "id": id, "generation": generation })).into_response())
}

async fn list_nodes(State(ctx): State<Ctx>) -> Response {
    let nodes = ctx.admin.node_list();
    Json(json!({ "total": nodes.len(), "list": nodes })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueNode {
    node_id: String,
    description: Option<String>,
}

/// `POST /admin/v1/nodes`: a new credential for a node; the token is in this
/// answer only.
async fn issue_node_credential(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    body: Body,
) -> Result<Response, Error> {
    let req: IssueNode = parse_body(body, ctx.max_body).await?;
    let issued = ctx
        .admin
        .issue_node_credential(&actor, &req.node_id, req.description)
        .await?;
    let mut resp = (StatusCode::CREATED, Json(issued)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn read_node(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, Error> {
    Ok(Json(ctx.admin.node(&id)?).into_response())
}

/// `DELETE /admin/v1/nodes/{id}`: revokes every credential of the node.
async fn revoke_node(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    ctx.admin
        .delete(&actor, ResourceKind::Node, &id, if_match(&headers)?)
        .await?;
    Ok(Json(json!({ "revoked": true, "node_id": id })).into_response())
}

async fn revoke_node_credential(
    State(ctx): State<Ctx>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((id, credential_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    ctx.admin
        .revoke_node_credential(&actor, &id, &credential_id, if_match(&headers)?)
        .await?;
    Ok(
        Json(json!({ "revoked": true, "node_id": id, "credential_id": credential_id }))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    group_by: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// Taken by the authentication layer (read-your-writes).
    #[allow(dead_code)]
    min_seq: Option<u64>,
}

async fn query_usage(
    State(ctx): State<Ctx>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Error> {
    let Query(q) = query.map_err(|e| Error::Invalid(e.body_text()))?;
    let rows = ctx
        .admin
        .usage(q.group_by.as_deref(), q.from.as_deref(), q.to.as_deref())?;
    Ok(Json(json!({ "total": rows.len(), "rows": rows })).into_response())
}
