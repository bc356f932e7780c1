//! The admin console: server-rendered pages on the admin listener under
//! `/console/` (`/` redirects there), embedded in the binary (no CDN, no
//! build step). Writes go through the same [`Admin`] as the REST API, so
//! validation and events are identical; each event's actor is
//! `console:<identity>`.
//!
//! - `session` — sessions (cookie, CSRF token, expiry, revocation)
//! - `oidc`    — single sign-on: discovery, code + PKCE, ID-token checks, roles
//! - `forms`   — form fields → the API's JSON values
//! - `pages`   — the HTML (maud templates, escaped by default)
//! - `playground` — a chat call through a data plane
//!
//! Every POST carries the session's CSRF token (forms without it get 403),
//! and only admins may write (a viewer's post gets 403 too).

mod forms;
pub mod oidc;
mod pages;
mod playground;
pub mod session;

use crate::admin::auth::AdminKeys;
use crate::admin::{Admin, EventFilter};
use crate::error::Error;
use aigw_shared::config::ConsoleConfig;
use aigw_shared::domain::ResourceKind;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use forms::FormData;
use maud::Markup;
use serde::Deserialize;
use session::{Role, Session, Sessions};
use std::sync::Arc;
use std::time::Duration;

const CSS: &str = include_str!("../../console/console.css");
const JS: &str = include_str!("../../console/console.js");

pub struct Console {
    admin: Admin,
    keys: AdminKeys,
    sessions: Sessions,
    oidc: Option<oidc::Oidc>,
    ttl: Duration,
    playground_url: Option<String>,
    http: reqwest::Client,
    /// Cookies marked Secure: the console is reached over https (the SSO
    /// redirect URL says so).
    secure: bool,
}

type Ctx = Arc<Console>;

/// The console's routes, to merge into the admin listener's router.
pub fn router(
    admin: Admin,
    keys: AdminKeys,
    cfg: &ConsoleConfig,
    max_body: usize,
) -> Result<Router, Error> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            Error::Config(aigw_shared::Error::ConfigInvalid {
                key: "admin.console".into(),
                message: format!("HTTP client: {e}"),
            })
        })?;
    let secure = cfg
        .oidc
        .as_ref()
        .is_some_and(|o| o.redirect_url.starts_with("https://"));
    let ctx = Arc::new(Console {
        admin,
        keys,
        sessions: Sessions::default(),
        oidc: cfg.oidc.clone().map(|o| oidc::Oidc::new(o, http.clone())),
        ttl: cfg.session_ttl.0,
        playground_url: cfg.playground_url.clone(),
        http,
        secure,
    });
    Ok(Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(overview))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/oidc/start", get(oidc_start))
        .route("/console/oidc/callback", get(oidc_callback))
        .route(
            "/console/assets/console.css",
            get(|| async { asset("text/css", CSS) }),
        )
        .route(
            "/console/assets/console.js",
            get(|| async { asset("text/javascript", JS) }),
        )
        .route("/console/usage", get(usage))
        .route("/console/usage.csv", get(usage_csv))
        .route("/console/audit", get(audit))
        .route(
            "/console/playground",
            get(playground_page).post(playground_send),
        )
        .route("/console/sessions", get(sessions_page))
        .route("/console/{section}", get(list).post(create))
        .route("/console/{section}/{id}", get(edit_page).post(update))
        .route("/console/{section}/{id}/{action}", post(action))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::map_response(harden))
        .with_state(ctx))
}

/// Headers on every console answer: no framing, no caching, no third-party anything.
async fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in request; without a live session, pages send the browser to sign in.
struct Signed(Session);

impl FromRequestParts<Ctx> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, Response> {
        session::cookie(&parts.headers, session::COOKIE)
            .and_then(|id| ctx.sessions.get(id))
            .map(Signed)
            .ok_or_else(|| {
                if parts.method == http::Method::GET {
                    Redirect::to("/console/login").into_response()
                } else {
                    page_error(
                        StatusCode::UNAUTHORIZED,
                        "sign in first (session missing or expired)",
                    )
                }
            })
    }
}

/// A write from a form: its CSRF token must be the session's, and the session an admin's.
fn authorize_write(s: &Session, form: &FormData) -> Result<(), Error> {
    if !s.csrf_ok(form.get("csrf")) {
        return Err(Error::Forbidden(
            "this form has no valid CSRF token; reload the page and try again".into(),
        ));
    }
    if s.role != Role::Admin {
        return Err(Error::Forbidden(
            "your role (viewer) can read but not change anything".into(),
        ));
    }
    Ok(())
}

fn page_error(status: StatusCode, msg: &str) -> Response {
    (status, pages::error_page(status, msg)).into_response()
}

fn html(m: Markup) -> Response {
    m.into_response()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Cookies are `Secure` when the console is reached over https: the SSO
/// redirect URL says so, or the TLS-terminating proxy in front does.
fn secure(ctx: &Console, headers: &HeaderMap) -> bool {
    ctx.secure
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn session_cookie(secure: bool, value: &str, max_age: Option<Duration>) -> HeaderValue {
    HeaderValue::from_str(&session::set_cookie(
        session::COOKIE,
        value,
        max_age,
        secure,
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn login_page(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    // Double-submit token: the login form has no session to hold one.
    let token = session::cookie(&headers, session::LOGIN_COOKIE)
        .filter(|t| t.len() == 64)
        .map(str::to_string)
        .unwrap_or_else(session::random_token);
    let mut resp = html(pages::login(&token, ctx.oidc.is_some(), None));
    let cookie = session::set_cookie(
        session::LOGIN_COOKIE,
        &token,
        Some(Duration::from_secs(3600)),
        secure(&ctx, &headers),
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn login(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let form = FormData::new(pairs);
    let expected = session::cookie(&headers, session::LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !session::same(expected, form.get("csrf")) {
        return page_error(
            StatusCode::FORBIDDEN,
            "the sign-in form has no valid CSRF token; reload it",
        );
    }
    let Some(actor) = ctx.keys.check(form.get("admin_key")) else {
        let mut resp = html(pages::login(
            expected,
            ctx.oidc.is_some(),
            Some("That is not an admin key."),
        ));
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    };
    // `admin:<digest prefix>` names the key without revealing it.
    let identity = format!("key:{}", actor.trim_start_matches("admin:"));
    start_session(
        &ctx,
        secure(&ctx, &headers),
        identity,
        Role::Admin,
        see_other("/console/"),
    )
}

fn start_session(
    ctx: &Console,
    secure: bool,
    identity: String,
    role: Role,
    mut resp: Response,
) -> Response {
    let s = ctx.sessions.create(identity, role, ctx.ttl);
    tracing::info!(identity = %s.identity, role = role.name(), "console sign-in");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(secure, &s.id, Some(ctx.ttl)),
    );
    resp
}

async fn logout(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Signed(s): Signed,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    if !s.csrf_ok(FormData::new(pairs).get("csrf")) {
        return page_error(StatusCode::FORBIDDEN, "this form has no valid CSRF token");
    }
    ctx.sessions.revoke(&s.id);
    let mut resp = see_other("/console/login");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(secure(&ctx, &headers), "", None),
    );
    resp
}

async fn oidc_start(State(ctx): State<Ctx>) -> Response {
    let Some(o) = &ctx.oidc else {
        return page_error(
            StatusCode::NOT_FOUND,
            "single sign-on is not configured (admin.console.oidc)",
        );
    };
    match o.start().await {
        Ok(url) => see_other(&url),
        Err(e) => page_error(e.http_status(), &e.to_string()),
    }
}

#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn oidc_callback(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let Some(o) = &ctx.oidc else {
        return page_error(StatusCode::NOT_FOUND, "single sign-on is not configured");
    };
    if let Some(e) = q.error {
        let msg = format!(
            "the identity provider refused: {e} {}",
            q.error_description.unwrap_or_default()
        );
        return page_error(StatusCode::UNAUTHORIZED, &msg);
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page_error(StatusCode::BAD_REQUEST, "the callback needs code and state");
    };
    match o.finish(&code, &state).await {
        // Not a redirect: after a redirect chain that began at the issuer (another
        // site) the browser would withhold the SameSite=Strict cookie just set. A
        // page of ours moving on is a same-site navigation.
        Ok((identity, role)) => start_session(
            &ctx,
            secure(&ctx, &headers),
            identity,
            role,
            html(pages::signed_in()),
        ),
        Err(e) => page_error(e.http_status(), &e.to_string()),
    }
}

async fn overview(State(ctx): State<Ctx>, Signed(s): Signed) -> Response {
    let today = crate::usage::day_of(crate::usage::unix_ms_now());
    let totals = ctx
        .admin
        .usage(None, Some(&today), Some(&today))
        .unwrap_or_default();
    let version = ctx.admin.engine().read().version;
    html(pages::overview(
        &s,
        version,
        &ctx.admin.node_list(),
        totals.first(),
    ))
}

fn kind_of(section: &str) -> Option<ResourceKind> {
    match section {
        "provider_keys" => Some(ResourceKind::ProviderKey),
        "models" => Some(ResourceKind::Model),
        "api_keys" => Some(ResourceKind::ApiKey),
        "jwt_providers" => Some(ResourceKind::JwtProvider),
        _ => None,
    }
}

async fn list(State(ctx): State<Ctx>, Signed(s): Signed, Path(section): Path<String>) -> Response {
    let Some(kind) = kind_of(&section) else {
        return page_error(StatusCode::NOT_FOUND, "no such page");
    };
    html(pages::resources(
        &s,
        &ctx.admin,
        kind,
        &forms::FormState::default(),
        None,
    ))
}

async fn create(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Path(section): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let Some(kind) = kind_of(&section) else {
        return page_error(StatusCode::NOT_FOUND, "no such page");
    };
    let form = FormData::new(pairs);
    if let Err(e) = authorize_write(&s, &form) {
        return page_error(e.http_status(), &e.to_string());
    }
    // An API key made here gets a fresh secret, shown once; the log keeps its hash.
    let generated = (kind == ResourceKind::ApiKey && form.get("jwt_provider_id").is_empty())
        .then(|| format!("sk-aigw-{}", session::random_token()));
    let result = async {
        let input = forms::input(kind, &form, generated.as_deref())?;
        ctx.admin.create(&s.actor(), input).await
    }
    .await;
    match result {
        Ok(rec) => {
            let shown = generated.map(|key| (rec.id.clone(), key));
            html(pages::resources(
                &s,
                &ctx.admin,
                kind,
                &forms::FormState::default(),
                shown.as_ref(),
            ))
        }
        Err(e) => {
            let st = forms::FormState::from_error(&form, &e);
            let mut resp = html(pages::resources(&s, &ctx.admin, kind, &st, None));
            *resp.status_mut() = e.http_status();
            resp
        }
    }
}

async fn edit_page(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Path((section, id)): Path<(String, String)>,
) -> Response {
    let Some(kind) = kind_of(&section) else {
        return page_error(StatusCode::NOT_FOUND, "no such page");
    };
    match ctx.admin.get(kind, &id) {
        Ok(rec) => html(pages::edit(&s, kind, &rec, None, None)),
        Err(e) => page_error(e.http_status(), &e.to_string()),
    }
}

async fn update(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Path((section, id)): Path<(String, String)>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let Some(kind) = kind_of(&section) else {
        return page_error(StatusCode::NOT_FOUND, "no such page");
    };
    let form = FormData::new(pairs);
    if let Err(e) = authorize_write(&s, &form) {
        return page_error(e.http_status(), &e.to_string());
    }
    let result = async {
        let input = forms::json_input(kind, form.get("value"))?;
        let revision = form.get("revision").parse::<u64>().ok();
        ctx.admin
            .update(&s.actor(), &id, input, revision, false)
            .await
    }
    .await;
    match result {
        Ok(_) => see_other(&format!("/console/{section}")),
        Err(e) => match ctx.admin.get(kind, &id) {
            Ok(rec) => {
                let mut resp = html(pages::edit(
                    &s,
                    kind,
                    &rec,
                    Some(form.get("value")),
                    Some(&e.to_string()),
                ));
                *resp.status_mut() = e.http_status();
                resp
            }
            Err(e) => page_error(e.http_status(), &e.to_string()),
        },
    }
}

/// Row buttons: delete a resource, purge a model's cache, revoke a session.
async fn action(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Path((section, id, action)): Path<(String, String, String)>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let form = FormData::new(pairs);
    if let Err(e) = authorize_write(&s, &form) {
        return page_error(e.http_status(), &e.to_string());
    }
    let result = match (section.as_str(), action.as_str()) {
        ("sessions", "revoke") => {
            ctx.sessions.revoke_handle(&id);
            return see_other("/console/sessions");
        }
        ("models", "purge") => ctx
            .admin
            .purge_cache(&id)
            .map(|g| format!("Cache of `{id}` purged (generation {g}).")),
        (_, "delete") => match kind_of(&section) {
            Some(kind) => ctx
                .admin
                .delete(&s.actor(), kind, &id, None)
                .await
                .map(|()| format!("Deleted `{id}`.")),
            None => return page_error(StatusCode::NOT_FOUND, "no such page"),
        },
        _ => return page_error(StatusCode::NOT_FOUND, "no such action"),
    };
    let Some(kind) = kind_of(&section) else {
        return page_error(StatusCode::NOT_FOUND, "no such page");
    };
    let st = match result {
        Ok(notice) => forms::FormState::notice(notice),
        Err(e) => forms::FormState::general_error(&e),
    };
    html(pages::resources(&s, &ctx.admin, kind, &st, None))
}

#[derive(Deserialize, Default)]
pub struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

impl UsageParams {
    /// The range and grouping with defaults: the last 7 days by api key.
    fn resolved(&self) -> (String, String, String) {
        let now = crate::usage::unix_ms_now();
        let week_ago = now.saturating_sub(6 * 86_400_000);
        let pick = |v: &Option<String>, d: String| v.clone().filter(|s| !s.is_empty()).unwrap_or(d);
        let group = match self.group_by.as_deref() {
            Some(g @ ("api_key" | "model" | "deployment")) => g.to_string(),
            _ => "api_key".to_string(),
        };
        (
            pick(&self.from, crate::usage::day_of(week_ago)),
            pick(&self.to, crate::usage::day_of(now)),
            group,
        )
    }
}

async fn usage(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Query(q): Query<UsageParams>,
) -> Response {
    let (from, to, group) = q.resolved();
    let data = (|| {
        Ok::<_, Error>(pages::UsageData {
            rows: ctx
                .admin
                .usage(Some(&format!("day,{group}")), Some(&from), Some(&to))?,
            per_day: ctx.admin.usage(Some("day"), Some(&from), Some(&to))?,
            per_key: ctx.admin.usage(Some("api_key"), Some(&from), Some(&to))?,
        })
    })();
    let names = api_key_names(&ctx.admin);
    match data {
        Ok(d) => html(pages::usage(&s, &from, &to, &group, &d, &names, None)),
        Err(e) => {
            let mut resp = html(pages::usage(
                &s,
                &from,
                &to,
                &group,
                &pages::UsageData::default(),
                &names,
                Some(&e.to_string()),
            ));
            *resp.status_mut() = e.http_status();
            resp
        }
    }
}

/// Api key id → display name, for usage tables.
fn api_key_names(admin: &Admin) -> std::collections::HashMap<String, String> {
    admin
        .engine()
        .read()
        .api_keys
        .iter()
        .filter_map(|(id, r)| r.value.display_name.clone().map(|n| (id.clone(), n)))
        .collect()
}

async fn usage_csv(
    State(ctx): State<Ctx>,
    Signed(_): Signed,
    Query(q): Query<UsageParams>,
) -> Response {
    let (from, to, group) = q.resolved();
    match ctx
        .admin
        .usage(Some(&format!("day,{group}")), Some(&from), Some(&to))
    {
        Ok(rows) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"aigw-usage-{from}-{to}.csv\""),
                ),
            ],
            pages::usage_csv(&group, &rows),
        )
            .into_response(),
        Err(e) => page_error(e.http_status(), &e.to_string()),
    }
}

#[derive(Deserialize, Default)]
struct AuditParams {
    resource: Option<String>,
}

async fn audit(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Query(q): Query<AuditParams>,
) -> Response {
    const SHOWN: u64 = 200;
    let version = ctx.admin.engine().read().version;
    let resource = q
        .resource
        .as_deref()
        .filter(|r| !r.is_empty())
        .and_then(ResourceKind::parse);
    let filter = EventFilter {
        resource,
        // The newest events (the log's sequence numbers follow the version).
        from_seq: Some(version.saturating_sub(SHOWN - 1).max(1)),
        limit: Some(SHOWN as usize),
        ..EventFilter::default()
    };
    match ctx.admin.events(&filter) {
        Ok(mut events) => {
            events.reverse();
            html(pages::audit(&s, &events, resource))
        }
        Err(e) => page_error(e.http_status(), &e.to_string()),
    }
}

async fn playground_page(State(ctx): State<Ctx>, Signed(s): Signed) -> Response {
    html(pages::playground(
        &s,
        &model_aliases(&ctx.admin),
        ctx.playground_url.as_deref(),
        &FormData::default(),
        None,
    ))
}

fn model_aliases(admin: &Admin) -> Vec<String> {
    admin
        .engine()
        .read()
        .models
        .values()
        .map(|r| r.value.display_name.clone())
        .collect()
}

async fn playground_send(
    State(ctx): State<Ctx>,
    Signed(s): Signed,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let form = FormData::new(pairs);
    // Reads only (a caller's own key pays), so viewers may use it; the CSRF token still counts.
    if !s.csrf_ok(form.get("csrf")) {
        return page_error(
            StatusCode::FORBIDDEN,
            "this form has no valid CSRF token; reload the page",
        );
    }
    let outcome = match &ctx.playground_url {
        Some(base) => playground::send(&ctx.http, base, &form).await,
        None => Err("no data plane to call: set admin.console.playground_url".to_string()),
    };
    html(pages::playground(
        &s,
        &model_aliases(&ctx.admin),
        ctx.playground_url.as_deref(),
        &form,
        Some(&outcome),
    ))
}

async fn sessions_page(State(ctx): State<Ctx>, Signed(s): Signed) -> Response {
    if s.role != Role::Admin {
        return page_error(StatusCode::FORBIDDEN, "only admins see sessions");
    }
    html(pages::sessions(&s, &ctx.sessions.list()))
}
