//! The console's HTML. maud escapes every interpolated value; there is no
//! inline script or style (the CSP forbids them): behaviour is in
//! `console/console.js`, looks in `console/console.css`.

use super::forms::{FormData, FormState, TARGET_ROWS};
use super::playground::Outcome;
use super::session::{Role, Session};
use crate::admin::{Admin, EventView, NodeView, RecordView, View};
use crate::usage::UsageRow;
use aigw_shared::domain::ResourceKind;
use axum::http::StatusCode;
use maud::{html, Markup, DOCTYPE};
use std::collections::HashMap;

const NAV: &[(&str, &str)] = &[
    ("/console/", "Overview"),
    ("/console/provider_keys", "Provider keys"),
    ("/console/models", "Models"),
    ("/console/api_keys", "API keys"),
    ("/console/jwt_providers", "JWT providers"),
    ("/console/usage", "Usage"),
    ("/console/audit", "Audit log"),
    ("/console/playground", "Playground"),
];

fn head(title: &str) -> Markup {
    html! {
        (DOCTYPE)
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · aigw console" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// The frame of every signed-in page: navigation, who is signed in, sign-out.
fn layout(s: &Session, current: &str, title: &str, body: Markup) -> Markup {
    html! {
        (head(title))
        body {
            a.skip href="#main" { "Skip to content" }
            header.top {
                span.brand { "aigw" }
                nav aria-label="Console" {
                    ul {
                        @for (href, label) in NAV {
                            li { a href=(href) aria-current=[(*href == current).then_some("page")] { (label) } }
                        }
                        @if s.role == Role::Admin {
                            li { a href="/console/sessions" aria-current=[("/console/sessions" == current).then_some("page")] { "Sessions" } }
                        }
                    }
                }
                div.who {
                    span #identity { (s.identity) } " "
                    span.role #role { (s.role.name()) }
                    form method="post" action="/console/logout" {
                        (csrf(s))
                        button.link type="submit" { "Sign out" }
                    }
                }
            }
            main #main {
                h1 { (title) }
                (body)
            }
        }
    }
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

pub fn error_page(status: StatusCode, msg: &str) -> Markup {
    html! {
        (head("Error"))
        body {
            main #main.narrow {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                p.error role="alert" #page-error { (msg) }
                p { a href="/console/" { "Back to the console" } }
            }
        }
    }
}

/// After single sign-on: moves on to the console from a page of its own site.
pub fn signed_in() -> Markup {
    html! {
        (DOCTYPE)
        head {
            meta charset="utf-8";
            meta http-equiv="refresh" content="0;url=/console/";
            title { "Signed in · aigw console" }
            link rel="stylesheet" href="/console/assets/console.css";
        }
        body { main #main.narrow { p { "Signed in. " a href="/console/" { "Continue to the console" } } } }
    }
}

pub fn login(csrf_token: &str, sso: bool, error: Option<&str>) -> Markup {
    html! {
        (head("Sign in"))
        body {
            main #main.narrow {
                h1 { "aigw console" }
                @if let Some(e) = error { p.error role="alert" #login-error { (e) } }
                form method="post" action="/console/login" {
                    input type="hidden" name="csrf" value=(csrf_token);
                    div.field {
                        label for="admin_key" { "Admin key" }
                        input #admin_key type="password" name="admin_key" autocomplete="current-password" required autofocus;
                    }
                    button #sign-in type="submit" { "Sign in" }
                }
                @if sso {
                    p.or { "or" }
                    p { a.button #sso href="/console/oidc/start" { "Sign in with single sign-on" } }
                }
            }
        }
    }
}

fn field_error(st: &FormState, name: &str) -> Markup {
    html! {
        @if let Some(e) = st.error(name) {
            p.error role="alert" id=(err_id(name)) { (e) }
        }
    }
}

fn input_id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn err_id(name: &str) -> String {
    format!("{}-error", input_id(name))
}

/// A labelled input; its error (if any) below it and tied to it for screen readers.
fn field(st: &FormState, name: &str, label: &str, kind: &str, hint: Option<&str>) -> Markup {
    let id = input_id(name);
    let bad = st.error(name).is_some();
    html! {
        div.field.invalid[bad] {
            label for=(id) { (label) }
            // A typed secret is not sent back into the page, even after an error.
            input id=(id) type=(kind) name=(name) value=(if kind == "password" { "" } else { st.values.get(name) })
                aria-invalid=[bad.then_some("true")] aria-describedby=[bad.then(|| err_id(name))];
            @if let Some(h) = hint { small { (h) } }
            (field_error(st, name))
        }
    }
}

fn checkbox(st: &FormState, name: &str, label: &str) -> Markup {
    let id = input_id(name);
    html! {
        div.field.check {
            input id=(id) type="checkbox" name=(name) value="on" checked[st.values.has(name)];
            label for=(id) { (label) }
        }
    }
}

fn select(st: &FormState, name: &str, label: &str, options: &[(String, String)]) -> Markup {
    let id = input_id(name);
    let current = st.values.get(name);
    html! {
        div.field {
            label for=(id) { (label) }
            select id=(id) name=(name) {
                @for (value, text) in options {
                    option value=(value) selected[current == value] { (text) }
                }
            }
            (field_error(st, name))
        }
    }
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub fn overview(s: &Session, version: u64, nodes: &[NodeView], today: Option<&UsageRow>) -> Markup {
    let t = today.cloned();
    let body = html! {
        section aria-labelledby="today" {
            h2 #today { "Today (UTC)" }
            dl.stats {
                div { dt { "Requests" } dd #requests-today { (t.as_ref().map_or(0, |r| r.requests)) } }
                div { dt { "Errors" } dd { (t.as_ref().map_or(0, |r| r.errors)) } }
                div { dt { "Tokens" } dd { (t.as_ref().map_or(0, |r| r.total_tokens)) } }
                div { dt { "Cost" } dd { "$" (format!("{:.4}", t.as_ref().map_or(0.0, |r| r.cost_usd))) } }
            }
        }
        section aria-labelledby="nodes" {
            h2 #nodes { "Nodes" }
            p { "Config version " strong #config-version { (version) } "; each node shows the version it applied." }
            @if nodes.is_empty() {
                p.empty { "No data plane has connected yet." }
            } @else {
                table #nodes-table {
                    thead { tr { th { "Node" } th { "Address" } th { "Version applied" } th { "Connected" } th { "Last seen" } th { "Last error" } th { "Targets" } } }
                    tbody {
                        @for n in nodes {
                            @let st = &n.status;
                            tr {
                                td { (st.node_id) }
                                td { (st.address) }
                                td { (st.applied_version) @if st.applied_version < version { " " span.warn { "(behind)" } } }
                                td { @if st.connected { span.ok { "yes" } } @else { span.bad { "no" } } }
                                td { (st.last_seen) }
                                td { (st.last_error.as_deref().unwrap_or("—")) }
                                td {
                                    @if st.targets.is_empty() { "no probes" }
                                    ul.plain {
                                        @for tg in &st.targets {
                                            li {
                                                @if tg.healthy { span.ok { "healthy" } } @else { span.bad { "unhealthy" } }
                                                " " (tg.provider_key_id) " / " (tg.deployment)
                                                @if let Some(e) = &tg.last_error { " — " (e) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(s, "/console/", "Overview", body)
}

fn section_of(kind: ResourceKind) -> (&'static str, &'static str) {
    match kind {
        ResourceKind::ProviderKey => ("provider_keys", "Provider keys"),
        ResourceKind::Model => ("models", "Models"),
        ResourceKind::ApiKey => ("api_keys", "API keys"),
        ResourceKind::JwtProvider => ("jwt_providers", "JWT providers"),
        ResourceKind::Node => ("nodes", "Nodes"),
    }
}

/// A resource list with its create form (admins), and a new API key shown once.
pub fn resources(
    s: &Session,
    admin: &Admin,
    kind: ResourceKind,
    st: &FormState,
    new_key: Option<&(String, String)>,
) -> Markup {
    let (section, title) = section_of(kind);
    let records = admin.list(kind);
    let is_admin = s.role == Role::Admin;
    let body = html! {
        @if let Some(n) = &st.notice { p.notice role="status" #notice { (n) } }
        @if let Some((id, key)) = new_key {
            section.shown-once aria-labelledby="new-key-title" {
                h2 #new-key-title { "New API key" }
                p { "Copy it now: it is shown only this once (only its sha256 is stored). Id " code { (id) } "." }
                div.copy {
                    input #new-key type="text" readonly value=(key) aria-label="The new API key";
                    button type="button" data-copy="new-key" { "Copy" }
                }
            }
        }
        table #list {
            thead { tr {
                th { "Id" } th { "Name" } th { "Details" } th { "Rev." }
                th { span.sr-only { "Actions" } }
            } }
            tbody {
                @if records.is_empty() { tr { td colspan="5" .empty { "None yet." } } }
                @for r in &records {
                    tr data-id=(r.id) {
                        td { code { (r.id) } }
                        td { (name_of(r)) }
                        td { (summary(r)) }
                        td { (r.revision) }
                        td.actions {
                            a href=(format!("/console/{section}/{}", r.id)) { @if is_admin { "Edit" } @else { "View" } }
                            @if is_admin {
                                @if kind == ResourceKind::Model {
                                    form.inline method="post" action=(format!("/console/models/{}/purge", r.id)) {
                                        (csrf(s))
                                        button.secondary type="submit" { "Purge cache" }
                                    }
                                }
                                form.inline method="post" action=(format!("/console/{section}/{}/delete", r.id)) data-confirm=(format!("Delete {}?", r.id)) {
                                    (csrf(s))
                                    button.danger type="submit" aria-label=(format!("Delete {}", r.id)) { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if is_admin {
            section.create aria-labelledby="create-title" {
                h2 #create-title { "Create" }
                form #create-form method="post" action=(format!("/console/{section}")) novalidate {
                    (csrf(s))
                    @if let Some(e) = &st.general { p.error role="alert" #form-error { (e) } }
                    (create_fields(admin, kind, st))
                    button #create type="submit" { "Create" }
                }
            }
        }
    };
    layout(s, &format!("/console/{section}"), title, body)
}

fn name_of(r: &RecordView) -> String {
    match &r.value {
        View::ProviderKey(p) => p.display_name.clone(),
        View::Model(m) => m.display_name.clone(),
        View::ApiKey(k) => k.display_name.clone().unwrap_or_default(),
        View::JwtProvider(p) => p.display_name.clone(),
    }
}

fn summary(r: &RecordView) -> Markup {
    match &r.value {
        View::ProviderKey(p) => {
            html! { (p.api_base) " · api " (p.api_version) " · secret write-only" }
        }
        View::Model(m) => html! {
            ul.plain {
                @for t in m.resolved_targets() {
                    li { (t.provider_key_id) " / " (t.model_name) " · priority " (t.priority) " · weight " (t.weight) }
                }
                @if let Some(r) = &m.routing { li { "routing: " (snake(&r.strategy)) } }
                @if let Some(l) = &m.rate_limit { li { "limits: " (limits(l)) } }
                @if let Some(c) = &m.cost { li { "cost: $" (c.input_per_1k) " in / $" (c.output_per_1k) " out per 1k" } }
                @if m.cache.is_some_and(|c| c.enabled) { li { "cache on" } }
            }
        },
        View::ApiKey(k) => html! {
            @if k.disabled { span.bad { "disabled" } " · " }
            @if let Some(p) = &k.jwt_provider_id { "JWT of " (p) " · " }
            "models: " (if k.allowed_models.is_empty() { "none".to_string() } else { k.allowed_models.join(", ") })
            @if let Some(l) = &k.rate_limit { " · limits: " (limits(l)) }
            @if let Some(b) = &k.budget { " · budget $" (b.max_usd) " / " (snake(&b.period)) }
            @if let Some(e) = &k.expires_at { " · expires " (crate::events::format_rfc3339(*e)) }
        },
        View::JwtProvider(p) => html! { (p.issuer) " · audiences " (p.audiences.join(", ")) },
    }
}

/// An enum as the API writes it (`round_robin`).
fn snake<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn limits(l: &aigw_shared::domain::RateLimit) -> String {
    let parts: Vec<String> = [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("rpd", l.rpd),
        ("tpd", l.tpd),
        ("concurrency", l.concurrency),
    ]
    .into_iter()
    .filter_map(|(n, v)| v.map(|v| format!("{v} {n}")))
    .collect();
    parts.join(", ")
}

fn create_fields(admin: &Admin, kind: ResourceKind, st: &FormState) -> Markup {
    match kind {
        ResourceKind::ProviderKey => html! {
            (field(st, "display_name", "Name", "text", None))
            (field(st, "api_base", "API base", "url", Some("https://<resource>.openai.azure.com")))
            (field(st, "api_version", "API version", "text", Some("empty: 2024-10-21; or v1")))
            (select(st, "credential", "Credential", &pairs(&[
                ("api_key", "API key"),
                ("client_secret", "Entra ID: client secret"),
                ("managed_identity", "Entra ID: managed identity"),
                ("workload_identity", "Entra ID: workload identity (AKS)"),
            ])))
            fieldset data-credential="api_key" {
                legend { "API key" }
                (field(st, "secret", "Key", "password", Some("write-only: never shown again")))
            }
            fieldset data-credential="client_secret" {
                legend { "Client secret" }
                (field(st, "secret.tenant_id", "Tenant id", "text", None))
                (field(st, "secret.client_id", "Client id", "text", None))
                (field(st, "secret.client_secret", "Client secret", "password", None))
            }
            fieldset data-credential="managed_identity" {
                legend { "Managed identity" }
                (field(st, "secret.managed_identity.client_id", "Client id (user-assigned; empty: system-assigned)", "text", None))
            }
            div.field {
                label for="ca_pem" { "Extra CA (PEM, optional)" }
                textarea #ca_pem name="ca_pem" rows="2" { (st.values.get("ca_pem")) }
                (field_error(st, "ca_pem"))
            }
            (checkbox(st, "allow_insecure_upstream", "Allow plain http (local simulators only)"))
        },
        ResourceKind::Model => {
            let keys: Vec<(String, String)> = std::iter::once((String::new(), "—".to_string()))
                .chain(
                    admin
                        .list(ResourceKind::ProviderKey)
                        .iter()
                        .map(|r| (r.id.clone(), format!("{} ({})", name_of(r), r.id))),
                )
                .collect();
            html! {
                (field(st, "display_name", "Alias (what callers send as model)", "text", None))
                fieldset {
                    legend { "Targets (Azure deployments)" }
                    (field_error(st, "targets"))
                    table.targets {
                        thead { tr { th { "Provider key" } th { "Deployment" } th { "Priority" } th { "Weight" } } }
                        tbody {
                            @for i in 0..TARGET_ROWS {
                                @let f = |n: &str| format!("targets[{i}].{n}");
                                tr {
                                    td { select name=(f("provider_key_id")) aria-label=(format!("Target {} provider key", i + 1)) id=(input_id(&f("provider_key_id"))) {
                                        @for (v, t) in &keys { option value=(v) selected[st.values.get(&f("provider_key_id")) == v] { (t) } }
                                    } }
                                    td { input type="text" name=(f("model_name")) id=(input_id(&f("model_name"))) value=(st.values.get(&f("model_name"))) aria-label=(format!("Target {} deployment", i + 1)); }
                                    td { input type="number" min="0" name=(f("priority")) value=(st.values.get(&f("priority"))) aria-label=(format!("Target {} priority", i + 1)) placeholder="0"; }
                                    td { input type="number" min="0" name=(f("weight")) value=(st.values.get(&f("weight"))) aria-label=(format!("Target {} weight", i + 1)) placeholder="1"; }
                                }
                            }
                        }
                    }
                }
                (select(st, "routing.strategy", "Routing", &pairs(&[("", "weighted (default)"), ("round_robin", "round robin"), ("least_latency", "least latency")])))
                div.row {
                    (field(st, "routing.retries", "Retries", "number", None))
                    (field(st, "routing.timeout", "Timeout", "text", Some("e.g. 30s")))
                    (field(st, "rate_limit.rpm", "Requests / minute", "number", None))
                    (field(st, "rate_limit.tpm", "Tokens / minute", "number", None))
                }
                div.row {
                    (field(st, "cost.input_per_1k", "USD per 1k input tokens", "text", None))
                    (field(st, "cost.output_per_1k", "USD per 1k output tokens", "text", None))
                    (field(st, "cache.ttl_seconds", "Cache TTL (s)", "number", None))
                }
                (checkbox(st, "cache.enabled", "Cache responses"))
            }
        }
        ResourceKind::ApiKey => {
            let models: Vec<String> = std::iter::once("*".to_string())
                .chain(admin.list(ResourceKind::Model).iter().map(name_of))
                .collect();
            let providers: Vec<(String, String)> =
                std::iter::once((String::new(), "— (a generated key)".to_string()))
                    .chain(
                        admin
                            .list(ResourceKind::JwtProvider)
                            .iter()
                            .map(|r| (r.id.clone(), name_of(r))),
                    )
                    .collect();
            let chosen = st.values.all("allowed_models");
            html! {
                (field(st, "display_name", "Name", "text", None))
                fieldset #allowed_models {
                    legend { "Allowed models" }
                    @for (i, m) in models.iter().enumerate() {
                        div.check {
                            input type="checkbox" name="allowed_models" value=(m) id=(format!("allowed-{i}")) checked[chosen.contains(&m.as_str())];
                            label for=(format!("allowed-{i}")) { @if m == "*" { "all models (*)" } @else { (m) } }
                        }
                    }
                    (field_error(st, "allowed_models"))
                }
                div.row {
                    (field(st, "rate_limit.rpm", "Requests / minute", "number", None))
                    (field(st, "rate_limit.tpm", "Tokens / minute", "number", None))
                    (field(st, "budget.max_usd", "Budget (USD)", "text", None))
                }
                (select(st, "budget.period", "Budget period", &pairs(&[("month", "month"), ("day", "day"), ("total", "total")])))
                (field(st, "expires_at", "Expires", "date", Some("end of that day, UTC")))
                (checkbox(st, "disabled", "Disabled"))
                fieldset {
                    legend { "JWT binding (instead of a generated key)" }
                    (select(st, "jwt_provider_id", "JWT provider", &providers))
                    (field(st, "jwt_subject", "Subject (caller id)", "text", None))
                    (field(st, "jwt_claims", "Required claims", "text", Some("name=value, comma-separated")))
                }
            }
        }
        ResourceKind::JwtProvider => html! {
            (field(st, "display_name", "Name", "text", None))
            (field(st, "issuer", "Issuer", "url", None))
            (field(st, "audiences", "Audiences", "text", Some("comma-separated")))
            (field(st, "jwks_uri", "JWKS URI (optional: from discovery)", "url", None))
            (field(st, "claim_mappings.caller_id", "Caller id claims", "text", Some("comma-separated, e.g. oid, sub")))
            (field(st, "clock_skew", "Clock skew", "text", Some("e.g. 60s")))
        },
        ResourceKind::Node => html! {},
    }
}

/// One resource as JSON (secrets masked): editable by admins, read-only for viewers.
pub fn edit(
    s: &Session,
    kind: ResourceKind,
    rec: &RecordView,
    typed: Option<&str>,
    error: Option<&str>,
) -> Markup {
    let (section, title) = section_of(kind);
    let json = typed
        .map(str::to_string)
        .unwrap_or_else(|| serde_json::to_string_pretty(&rec.value).unwrap_or_default());
    let is_admin = s.role == Role::Admin;
    let body = html! {
        p { a href=(format!("/console/{section}")) { "← " (title) } }
        form method="post" action=(format!("/console/{section}/{}", rec.id)) {
            (csrf(s))
            input type="hidden" name="revision" value=(rec.revision);
            @if let Some(e) = error { p.error role="alert" #form-error { (e) } }
            div.field {
                label for="value" { "Value (JSON, as the admin API takes it; " code { "***" } " keeps a stored secret)" }
                textarea #value name="value" rows="22" spellcheck="false" readonly[!is_admin]
                    aria-invalid=[error.map(|_| "true")] aria-describedby=[error.map(|_| "form-error")] { (json) }
            }
            @if is_admin { button #save type="submit" { "Save" } }
        }
    };
    layout(
        s,
        &format!("/console/{section}"),
        &format!("{} · {}", title, rec.id),
        body,
    )
}

#[derive(Default)]
pub struct UsageData {
    /// Grouped by day and the chosen dimension.
    pub rows: Vec<UsageRow>,
    pub per_day: Vec<UsageRow>,
    pub per_key: Vec<UsageRow>,
}

/// Horizontal bars as inline SVG (no chart library, no script).
fn bars(id: &str, label: &str, items: &[(String, f64)], unit: &str) -> Markup {
    let max = items.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    let row = 26;
    let height = (items.len().max(1) * row) as u32;
    html! {
        figure.chart {
            figcaption { (label) }
            @if items.is_empty() { p.empty { "No data in this range." } } @else {
                svg #(id) role="img" aria-label=(label) viewBox=(format!("0 0 600 {height}")) width="100%" height=(height) {
                    @for (i, (name, v)) in items.iter().enumerate() {
                        @let y = i * row;
                        @let w = if max > 0.0 { (v / max * 330.0).max(1.0) } else { 1.0 };
                        text x="0" y=(y + 17) class="axis" { (truncate(name, 24)) }
                        rect x="170" y=(y + 4) width=(format!("{w:.1}")) height="18" class="bar" {}
                        text x=(format!("{:.1}", 176.0 + w)) y=(y + 17) class="value" { (unit) (format!("{v:.4}")) }
                    }
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    } else {
        s.to_string()
    }
}

pub fn usage(
    s: &Session,
    from: &str,
    to: &str,
    group: &str,
    d: &UsageData,
    key_names: &HashMap<String, String>,
    error: Option<&str>,
) -> Markup {
    let label = |dim: &str, v: &str| -> String {
        match key_names.get(v) {
            Some(n) if dim == "api_key" => format!("{n} ({v})"),
            _ => v.to_string(),
        }
    };
    let per_day: Vec<(String, f64)> = d
        .per_day
        .iter()
        .map(|r| (r.group.get("day").cloned().unwrap_or_default(), r.cost_usd))
        .collect();
    let mut top: Vec<(String, f64)> = d
        .per_key
        .iter()
        .map(|r| {
            (
                label("api_key", r.group.get("api_key").map_or("", String::as_str)),
                r.cost_usd,
            )
        })
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(8);
    let query = format!("from={from}&to={to}&group_by={group}");
    let body = html! {
        form.filters method="get" action="/console/usage" {
            div.field { label for="from" { "From" } input #from type="date" name="from" value=(from); }
            div.field { label for="to" { "To" } input #to type="date" name="to" value=(to); }
            div.field {
                label for="group_by" { "Group by" }
                select #group_by name="group_by" {
                    @for (v, t) in [("api_key", "API key"), ("model", "Model"), ("deployment", "Deployment")] {
                        option value=(v) selected[group == v] { (t) }
                    }
                }
            }
            button type="submit" { "Show" }
            a.button.secondary #csv href=(format!("/console/usage.csv?{query}")) download { "Export CSV" }
        }
        @if let Some(e) = error { p.error role="alert" #form-error { (e) } }
        div.charts {
            (bars("chart-cost-per-day", "Cost per day (USD)", &per_day, "$"))
            (bars("chart-top-keys", "Top API keys by cost (USD)", &top, "$"))
        }
        table #usage-table {
            thead { tr {
                th { "Day" } th { (group.replace('_', " ")) } th.num { "Requests" } th.num { "Errors" }
                th.num { "Prompt tokens" } th.num { "Completion tokens" } th.num { "Cost (USD)" } th.num { "Cache hits" }
            } }
            tbody {
                @if d.rows.is_empty() { tr { td colspan="8" .empty { "No usage in this range." } } }
                @for r in &d.rows {
                    tr {
                        td.nowrap { (r.group.get("day").map_or("", String::as_str)) }
                        td { (label(group, r.group.get(group).map_or("", String::as_str))) }
                        td.num { (r.requests) } td.num { (r.errors) }
                        td.num { (r.prompt_tokens) } td.num { (r.completion_tokens) }
                        td.num { (format!("{:.6}", r.cost_usd)) } td.num { (r.cache_hits) }
                    }
                }
            }
        }
    };
    layout(s, "/console/usage", "Usage", body)
}

pub fn usage_csv(group: &str, rows: &[UsageRow]) -> String {
    // Quoted as RFC 4180 asks; a leading formula character is defused for spreadsheets.
    let cell = |v: &str| {
        let v = if v.starts_with(['=', '+', '-', '@']) {
            format!("'{v}")
        } else {
            v.to_string()
        };
        format!("\"{}\"", v.replace('"', "\"\""))
    };
    let mut out = format!("day,{group},requests,errors,prompt_tokens,completion_tokens,total_tokens,cost_usd,cache_hits\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{:.6},{}\n",
            cell(r.group.get("day").map_or("", String::as_str)),
            cell(r.group.get(group).map_or("", String::as_str)),
            r.requests,
            r.errors,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cost_usd,
            r.cache_hits
        ));
    }
    out
}

pub fn audit(s: &Session, events: &[EventView], resource: Option<ResourceKind>) -> Markup {
    let current = resource.map(|k| k.collection()).unwrap_or("");
    let body = html! {
        form.filters method="get" action="/console/audit" {
            div.field {
                label for="resource" { "Resource" }
                select #resource name="resource" {
                    option value="" { "all" }
                    @for k in ResourceKind::ALL {
                        option value=(k.collection()) selected[current == k.collection()] { (k.collection()) }
                    }
                    option value="nodes" selected[current == "nodes"] { "nodes" }
                }
            }
            button type="submit" { "Filter" }
        }
        table #audit-table {
            thead { tr { th { "#" } th { "Time (UTC)" } th { "Actor" } th { "Event" } th { "Resource" } th { "Change (secrets masked)" } } }
            tbody {
                @if events.is_empty() { tr { td colspan="6" .empty { "No events." } } }
                @for e in events {
                    tr {
                        td { (e.seq) }
                        td.nowrap title=(e.at) { (e.at.split_once('.').map_or(e.at.clone(), |(s, _)| format!("{s}Z"))) }
                        td.actor { (e.actor) }
                        td { (e.type_name) }
                        td { (e.resource) " " code { (e.resource_id) } }
                        td { details { summary { "payload" } pre { (serde_json::to_string_pretty(&e.payload).unwrap_or_default()) } } }
                    }
                }
            }
        }
    };
    layout(s, "/console/audit", "Audit log", body)
}

pub fn playground(
    s: &Session,
    aliases: &[String],
    url: Option<&str>,
    form: &FormData,
    outcome: Option<&Result<Outcome, String>>,
) -> Markup {
    let body = html! {
        p { "Sends a chat completion through "
            @if let Some(u) = url { code { (u) } } @else { "a data plane (none configured: admin.console.playground_url)" }
            " with the caller key you type (used for this call only, never stored)." }
        form #playground-form method="post" action="/console/playground" {
            (csrf(s))
            div.row {
                div.field {
                    label for="model" { "Model" }
                    select #model name="model" {
                        @for a in aliases { option value=(a) selected[form.get("model") == a] { (a) } }
                    }
                }
                div.field {
                    label for="caller_key" { "Caller API key" }
                    // Not echoed back into the page after a call.
                    input #caller_key type="password" name="caller_key" autocomplete="off";
                }
            }
            div.field {
                label for="message" { "Message" }
                textarea #message name="message" rows="4" { (form.get("message")) }
            }
            div.field.check {
                input #stream type="checkbox" name="stream" value="on" checked[form.has("stream")];
                label for="stream" { "Stream (SSE)" }
            }
            button #send type="submit" { "Send" }
        }
        @match outcome {
            Some(Ok(o)) => {
                section #result aria-live="polite" {
                    h2 { "Answer" }
                    dl.stats {
                        div { dt { "Status" } dd #result-status { (o.status) } }
                        div { dt { "Latency" } dd #result-latency { (o.latency_ms) " ms" } }
                        div { dt { "Tokens (prompt / completion)" } dd #result-tokens {
                            (o.prompt_tokens.map_or("—".into(), |t| t.to_string())) " / " (o.completion_tokens.map_or("—".into(), |t| t.to_string()))
                        } }
                        div { dt { "Served by" } dd #result-served-by { (o.served_by.as_deref().unwrap_or("—")) } }
                    }
                    @if let Some(e) = &o.error { pre.error #result-error { (e) } }
                    @else { pre.answer #result-answer { (o.answer) } }
                }
            }
            Some(Err(e)) => { p.error role="alert" #form-error { (e) } }
            None => {}
        }
    };
    layout(s, "/console/playground", "Playground", body)
}

pub fn sessions(s: &Session, list: &[Session]) -> Markup {
    let body = html! {
        table #sessions-table {
            thead { tr { th { "Identity" } th { "Role" } th { "Signed in (UTC)" } th { span.sr-only { "Actions" } } } }
            tbody {
                @for x in list {
                    tr {
                        td { (x.identity) @if x.id == s.id { " (you)" } }
                        td { (x.role.name()) }
                        td { (crate::events::format_rfc3339(x.created)) }
                        td { form.inline method="post" action=(format!("/console/sessions/{}/revoke", x.handle())) {
                            (csrf(s))
                            button.danger type="submit" { "Revoke" }
                        } }
                    }
                }
            }
        }
    };
    layout(s, "/console/sessions", "Sessions", body)
}
