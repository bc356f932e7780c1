//! The operation table: every endpoint the gateway serves, in one place.
//! Proxy routing, span names and upstream URLs all read it; a new endpoint
//! is a new `Operation` variant and its row (plus its body types).
//!
//! Callers reach an operation three ways ([`Inbound::route`]):
//! - `/v1/{op}` — the OpenAI API; the alias is the body's `model`;
//! - `/openai/v1/{op}` — Azure's v1 form, the same as `/v1/{op}` in every
//!   way, so `OpenAI(base_url=<gateway>/openai/v1)` works;
//! - `/openai/deployments/{alias}/{op}?api-version=…` — Azure's deployment
//!   form, for `AzureOpenAI` clients: the alias is the path's (it wins over
//!   any body `model`), and answers and errors keep Azure's shape
//!   ([`Shape::Azure`]);
//! - `/openai/responses?api-version=…` — Azure's preview Responses route
//!   (alias in the body's `model`, Azure's errors), and the Responses API's
//!   calls by id under `/v1/responses/{id}`, `/openai/v1/responses/{id}`
//!   and `/openai/responses/{id}?api-version=…`.

use http::Method;

/// One endpoint of the OpenAI API as the gateway serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    ListModels,
    /// `POST /v1/responses`: the Responses API.
    Responses,
    /// `GET /v1/responses/{id}`.
    GetResponse,
    /// `DELETE /v1/responses/{id}`.
    DeleteResponse,
    /// `POST /v1/responses/{id}/cancel`.
    CancelResponse,
    /// `GET /v1/responses/{id}/input_items`.
    ListInputItems,
}

/// An operation's row: how callers reach it and how it goes to Azure.
#[derive(Debug)]
pub struct Row {
    pub op: Operation,
    pub method: Method,
    /// The OpenAI path callers use; `{id}` stands for a response id.
    pub path: &'static str,
    /// `gen_ai.operation.name`, and the first word of the call's span name.
    pub name: &'static str,
    /// The path under `/openai/deployments/{deployment}/`, upstream and on
    /// the inbound Azure-shaped route; `None` when the gateway answers itself.
    pub azure_path: Option<&'static str>,
    /// The body field that carries the prompt (required; payload logging).
    pub prompt_field: Option<&'static str>,
    /// Whether `stream: true` makes an SSE answer.
    pub streams: bool,
}

/// Indexed by `Operation as usize`.
pub const OPERATIONS: [Row; 9] = [
    Row {
        op: Operation::ChatCompletions,
        method: Method::POST,
        path: "/v1/chat/completions",
        name: "chat",
        azure_path: Some("chat/completions"),
        prompt_field: Some("messages"),
        streams: true,
    },
    Row {
        op: Operation::Completions,
        method: Method::POST,
        path: "/v1/completions",
        name: "text_completion",
        azure_path: Some("completions"),
        prompt_field: Some("prompt"),
        streams: true,
    },
    Row {
        op: Operation::Embeddings,
        method: Method::POST,
        path: "/v1/embeddings",
        name: "embeddings",
        azure_path: Some("embeddings"),
        prompt_field: Some("input"),
        streams: false,
    },
    Row {
        op: Operation::ListModels,
        method: Method::GET,
        path: "/v1/models",
        name: "list_models",
        azure_path: None,
        prompt_field: None,
        streams: false,
    },
    // Azure serves the Responses API only in its v1 and preview forms, never
    // under a deployment: no `azure_path` (see `config::runtime`).
    Row {
        op: Operation::Responses,
        method: Method::POST,
        path: RESPONSES,
        name: "responses",
        azure_path: None,
        prompt_field: Some("input"),
        streams: true,
    },
    Row {
        op: Operation::GetResponse,
        method: Method::GET,
        path: "/v1/responses/{id}",
        name: "responses.get",
        azure_path: None,
        prompt_field: None,
        streams: false,
    },
    Row {
        op: Operation::DeleteResponse,
        method: Method::DELETE,
        path: "/v1/responses/{id}",
        name: "responses.delete",
        azure_path: None,
        prompt_field: None,
        streams: false,
    },
    Row {
        op: Operation::CancelResponse,
        method: Method::POST,
        path: "/v1/responses/{id}/cancel",
        name: "responses.cancel",
        azure_path: None,
        prompt_field: None,
        streams: false,
    },
    Row {
        op: Operation::ListInputItems,
        method: Method::GET,
        path: "/v1/responses/{id}/input_items",
        name: "responses.input_items",
        azure_path: None,
        prompt_field: None,
        streams: false,
    },
];

const RESPONSES: &str = "/v1/responses";
/// Longest response id segment routed (the id is checked later, and any
/// id that does not open is a 404 like an unknown one).
pub const MAX_PATH_ID: usize = 4096;

/// The span name of a path no operation serves.
pub const UNKNOWN_NAME: &str = "http";

/// Why a request matched no operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// The path exists, not with this method.
    MethodNotAllowed,
    UnknownPath,
    /// Azure's deployment route without a usable `api-version`.
    MissingApiVersion,
}

impl Operation {
    pub fn row(self) -> &'static Row {
        &OPERATIONS[self as usize]
    }

    /// The operation serving `path` (any of its forms), whatever the
    /// method (the first of a path's operations).
    pub fn for_path(path: &str) -> Option<Self> {
        let parsed = parse_path(path).ok()?;
        OPERATIONS
            .iter()
            .find(|r| r.path == parsed.pattern)
            .map(|r| r.op)
    }

    /// Whether the operation names a stored response in its path.
    pub fn by_id(self) -> bool {
        self.row().path.contains("{id}")
    }

    /// Whether it is a Responses API call (stateful: never cached, its ids
    /// sealed).
    pub fn is_responses(self) -> bool {
        self == Operation::Responses || self.by_id()
    }

    /// What follows `/responses/{id}` upstream (`""`, `/cancel`,
    /// `/input_items`).
    pub fn id_suffix(self) -> &'static str {
        self.row()
            .path
            .split_once("{id}")
            .map_or("", |(_, rest)| rest)
    }

    /// `gen_ai.operation.name`.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    pub fn azure_path(self) -> Option<&'static str> {
        self.row().azure_path
    }

    pub fn prompt_field(self) -> Option<&'static str> {
        self.row().prompt_field
    }

    pub fn streams(self) -> bool {
        self.row().streams
    }
}

/// `gen_ai.operation.name` for a request (`http` when none serves it).
pub fn span_name(method: &Method, path: &str) -> &'static str {
    let Ok(parsed) = parse_path(path) else {
        return UNKNOWN_NAME;
    };
    let mut rows = OPERATIONS.iter().filter(|r| r.path == parsed.pattern);
    let first = rows.clone().next();
    rows.find(|r| r.method == *method)
        .or(first)
        .map_or(UNKNOWN_NAME, |r| r.name)
}

/// The shape of answers and errors, decided by the route a caller used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// The OpenAI API (`/v1`, `/openai/v1`): `model` is the alias, Azure's
    /// filter annotations are stripped, errors are OpenAI's envelope.
    #[default]
    OpenAi,
    /// Azure's deployment route: the answer as Azure sent it (`model` as
    /// Azure reports it, filter annotations kept), errors as Azure's
    /// `{"error":{"code","message"}}`.
    Azure,
}

/// Prefix of Azure's deployment route.
const DEPLOYMENTS: &str = "/openai/deployments/";
/// Prefix of Azure's v1 route, which is the OpenAI API under `/openai`.
const AZURE_V1: &str = "/openai";
/// Azure's preview Responses route (`?api-version=` required).
const AZURE_RESPONSES: &str = "/openai/responses";
/// Longest alias accepted in a path (bytes, decoded). Aliases are looked up,
/// never sent on; this only bounds what a hostile path can cost.
pub const MAX_PATH_ALIAS: usize = 256;
/// Longest `api-version` accepted (Azure's are like `2025-04-01-preview`).
pub const MAX_API_VERSION: usize = 64;

impl Shape {
    /// The shape a path asks for, routed or not: a 404 under
    /// `/openai/deployments/` is answered in Azure's shape too.
    pub fn of_path(path: &str) -> Self {
        if path.starts_with(DEPLOYMENTS) || azure_responses_rest(path).is_some() {
            Shape::Azure
        } else {
            Shape::OpenAi
        }
    }
}

/// A routed request line: what to do, in which shape, and what the path
/// and query said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub op: Operation,
    pub shape: Shape,
    /// `{alias}` of `/openai/deployments/{alias}/…`, percent-decoded; the
    /// call's alias whatever the body's `model` says.
    pub alias: Option<String>,
    /// The caller's `api-version` (Azure's routes only): accepted
    /// whatever it is, and recorded; upstream gets the provider key's own.
    pub api_version: Option<String>,
    /// `{id}` of `/v1/responses/{id}…`: the caller's (sealed) response id.
    pub response_id: Option<String>,
}

impl Inbound {
    /// Routes a request line. On the deployment route `api-version` is
    /// required, as Azure requires it (Azure answers a missing one 404).
    pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Self, Unrouted> {
        let parsed = parse_path(path)?;
        let op = OPERATIONS
            .iter()
            .filter(|r| r.path == parsed.pattern)
            .find(|r| r.method == *method)
            .ok_or(Unrouted::MethodNotAllowed)?
            .op;
        if !parsed.azure {
            return Ok(Self {
                op,
                shape: Shape::OpenAi,
                alias: None,
                api_version: None,
                response_id: parsed.id,
            });
        }
        let api_version = query
            .and_then(api_version)
            .ok_or(Unrouted::MissingApiVersion)?;
        Ok(Self {
            op,
            shape: Shape::Azure,
            alias: parsed.alias,
            api_version: Some(api_version.to_string()),
            response_id: parsed.id,
        })
    }
}

/// What a path says: its operations' path (`Row::path`), the deployment
/// route's alias, a response id, and whether it is one of Azure's routes.
struct Parsed {
    pattern: &'static str,
    alias: Option<String>,
    id: Option<String>,
    azure: bool,
}

/// The rest of `/openai/responses…` (empty, or from a `/`).
fn azure_responses_rest(path: &str) -> Option<&str> {
    path.strip_prefix(AZURE_RESPONSES)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn parse_path(path: &str) -> Result<Parsed, Unrouted> {
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS) {
        let (segment, op_path) = rest.split_once('/').ok_or(Unrouted::UnknownPath)?;
        let row = OPERATIONS
            .iter()
            .find(|r| r.azure_path == Some(op_path))
            .ok_or(Unrouted::UnknownPath)?;
        return Ok(Parsed {
            pattern: row.path,
            alias: Some(path_alias(segment).ok_or(Unrouted::UnknownPath)?),
            id: None,
            azure: true,
        });
    }
    if let Some(rest) = azure_responses_rest(path) {
        let (pattern, id) = responses_path(rest)?;
        return Ok(Parsed {
            pattern,
            alias: None,
            id,
            azure: true,
        });
    }
    // `/openai/v1/…` is `/v1/…`; `/openai/models` and the like are not.
    let path = match path.strip_prefix(AZURE_V1) {
        Some(rest) if rest.starts_with("/v1/") => rest,
        _ => path,
    };
    if let Some(rest) = path.strip_prefix(RESPONSES) {
        let (pattern, id) = responses_path(rest)?;
        return Ok(Parsed {
            pattern,
            alias: None,
            id,
            azure: false,
        });
    }
    let row = OPERATIONS
        .iter()
        .find(|r| r.path == path && !r.path.contains("{id}"))
        .ok_or(Unrouted::UnknownPath)?;
    Ok(Parsed {
        pattern: row.path,
        alias: None,
        id: None,
        azure: false,
    })
}

/// What follows `…/responses`: nothing (create), or `/{id}` with an
/// optional `/cancel` or `/input_items`. The id is any non-empty segment:
/// one that does not open later is an unknown response (404).
fn responses_path(rest: &str) -> Result<(&'static str, Option<String>), Unrouted> {
    if rest.is_empty() {
        return Ok((RESPONSES, None));
    }
    let rest = rest.strip_prefix('/').ok_or(Unrouted::UnknownPath)?;
    let (id, suffix) = rest.split_once('/').unwrap_or((rest, ""));
    if id.is_empty() || id.len() > MAX_PATH_ID {
        return Err(Unrouted::UnknownPath);
    }
    let row = OPERATIONS
        .iter()
        .filter(|r| r.path.contains("{id}"))
        .find(|r| {
            r.path
                .split_once("{id}")
                .is_some_and(|(_, s)| s.strip_prefix('/').unwrap_or(s) == suffix)
        })
        .ok_or(Unrouted::UnknownPath)?;
    Ok((row.path, Some(id.to_string())))
}

/// A deployment path segment as an alias: percent-decoded (an alias may
/// hold any character, so `%2F` is a `/` of the alias, not a separator),
/// valid UTF-8, not empty or blank, at most [`MAX_PATH_ALIAS`] bytes, no
/// control characters. `.` and `..` are just names no model has.
fn path_alias(segment: &str) -> Option<String> {
    if segment.is_empty() || segment.len() > MAX_PATH_ALIAS * 3 {
        return None;
    }
    let mut bytes = Vec::with_capacity(segment.len());
    let mut it = segment.bytes();
    while let Some(b) = it.next() {
        if b != b'%' {
            bytes.push(b);
            continue;
        }
        let hex = |c: Option<u8>| char::from(c?).to_digit(16);
        let (hi, lo) = (hex(it.next())?, hex(it.next())?);
        bytes.push(u8::try_from(hi * 16 + lo).ok()?);
    }
    let alias = String::from_utf8(bytes).ok()?;
    let ok = !alias.trim().is_empty()
        && alias.len() <= MAX_PATH_ALIAS
        && !alias.chars().any(char::is_control);
    ok.then_some(alias)
}

/// `api-version` from a query string, if present and sane: 1 to
/// [`MAX_API_VERSION`] characters of `[A-Za-z0-9._-]` (what every Azure
/// version looks like; anything else Azure does not serve either, and it
/// goes into logs and spans).
fn api_version(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "api-version")
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_API_VERSION
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_indexed_by_their_operation() {
        for (i, row) in OPERATIONS.iter().enumerate() {
            assert_eq!(row.op as usize, i, "{row:?}");
            let path = row.path.replace("{id}", "resp_1");
            let r = Inbound::route(&row.method, &path, None).unwrap();
            assert_eq!(r.op, row.op, "{path}");
            assert_eq!(span_name(&row.method, &path), row.name);
        }
    }

    #[test]
    fn routing_by_method_and_path() {
        assert_eq!(
            Inbound::route(&Method::POST, "/v1/chat/completions", None).map(|r| r.op),
            Ok(Operation::ChatCompletions)
        );
        assert_eq!(
            Inbound::route(&Method::GET, "/v1/chat/completions", None).map(|r| r.op),
            Err(Unrouted::MethodNotAllowed)
        );
        assert_eq!(
            Inbound::route(&Method::POST, "/v1/models", None).map(|r| r.op),
            Err(Unrouted::MethodNotAllowed)
        );
        assert_eq!(
            Inbound::route(&Method::POST, "/v1/nope", None).map(|r| r.op),
            Err(Unrouted::UnknownPath)
        );
        assert_eq!(span_name(&Method::POST, "/v1/embeddings"), "embeddings");
        assert_eq!(span_name(&Method::POST, "/nope"), "http");
    }

    fn azure(path: &str, query: Option<&str>) -> Result<Inbound, Unrouted> {
        Inbound::route(&Method::POST, path, query)
    }

    #[test]
    fn azure_deployment_routes() {
        let q = Some("api-version=2024-10-21");
        for (op_path, op) in [
            ("chat/completions", Operation::ChatCompletions),
            ("completions", Operation::Completions),
            ("embeddings", Operation::Embeddings),
        ] {
            let r = azure(&format!("/openai/deployments/gpt-4o/{op_path}"), q).unwrap();
            assert_eq!(
                r,
                Inbound {
                    op,
                    shape: Shape::Azure,
                    alias: Some("gpt-4o".into()),
                    api_version: Some("2024-10-21".into()),
                    response_id: None,
                }
            );
        }
        // Any sane version, wherever it is in the query.
        let r = azure(
            "/openai/deployments/m/chat/completions",
            Some("x=1&api-version=2025-04-01-preview&y"),
        )
        .unwrap();
        assert_eq!(r.api_version.as_deref(), Some("2025-04-01-preview"));
        assert_eq!(
            Shape::of_path("/openai/deployments/m/nope"),
            Shape::Azure,
            "a 404 under the deployment route is Azure's too"
        );
        assert_eq!(
            span_name(&Method::POST, "/openai/deployments/m/embeddings"),
            "embeddings"
        );
    }

    #[test]
    fn azure_v1_routes_are_the_openai_api() {
        for (path, op) in [
            ("/openai/v1/chat/completions", Operation::ChatCompletions),
            ("/openai/v1/completions", Operation::Completions),
            ("/openai/v1/embeddings", Operation::Embeddings),
        ] {
            let r = azure(path, None).unwrap();
            assert_eq!((r.op, r.shape, r.alias), (op, Shape::OpenAi, None));
        }
        assert_eq!(
            Inbound::route(&Method::GET, "/openai/v1/models", None).map(|r| r.op),
            Ok(Operation::ListModels)
        );
        for nope in [
            "/openai/models",
            "/openai/chat/completions",
            "/openai/v1/v1/models",
            "/openai/v1",
            "/openai/v1/",
        ] {
            assert_eq!(Operation::for_path(nope), None, "{nope}");
        }
    }

    #[test]
    fn responses_routes() {
        let q = Some("api-version=2025-03-01-preview");
        for (base, shape, query) in [
            ("/v1/responses", Shape::OpenAi, None),
            ("/openai/v1/responses", Shape::OpenAi, None),
            ("/openai/responses", Shape::Azure, q),
        ] {
            let r = Inbound::route(&Method::POST, base, query).unwrap();
            assert_eq!(
                (r.op, r.shape, r.response_id),
                (Operation::Responses, shape, None)
            );
            for (method, suffix, op) in [
                (Method::GET, "", Operation::GetResponse),
                (Method::DELETE, "", Operation::DeleteResponse),
                (Method::POST, "/cancel", Operation::CancelResponse),
                (Method::GET, "/input_items", Operation::ListInputItems),
            ] {
                let path = format!("{base}/resp_abc{suffix}");
                let r = Inbound::route(&method, &path, query).unwrap();
                assert_eq!(
                    (r.op, r.shape, r.response_id.as_deref()),
                    (op, shape, Some("resp_abc")),
                    "{method} {path}"
                );
                assert!(op.by_id() && op.is_responses());
                assert_eq!(op.id_suffix(), suffix);
            }
            assert_eq!(
                Inbound::route(&Method::PUT, &format!("{base}/r"), query).map(|r| r.op),
                Err(Unrouted::MethodNotAllowed)
            );
            for nope in ["/r/other", "/r/cancel/x", "//cancel", "/"] {
                assert_eq!(
                    Inbound::route(&Method::POST, &format!("{base}{nope}"), query).map(|r| r.op),
                    Err(Unrouted::UnknownPath),
                    "{base}{nope}"
                );
            }
        }
        assert_eq!(
            Inbound::route(&Method::POST, "/openai/responses", None),
            Err(Unrouted::MissingApiVersion)
        );
        assert_eq!(Shape::of_path("/openai/responses/x"), Shape::Azure);
        assert_eq!(Shape::of_path("/openai/responsesx"), Shape::OpenAi);
        assert_eq!(
            span_name(&Method::DELETE, "/v1/responses/r"),
            "responses.delete"
        );
        assert!(!Operation::Responses.by_id() && Operation::Responses.is_responses());
    }

    #[test]
    fn hostile_deployment_paths() {
        let q = Some("api-version=2024-10-21");
        let unknown = |path: &str| {
            assert_eq!(azure(path, q), Err(Unrouted::UnknownPath), "{path}");
        };
        unknown("/openai/deployments//chat/completions");
        unknown("/openai/deployments/%20/chat/completions");
        unknown("/openai/deployments/m");
        unknown("/openai/deployments/m/");
        unknown("/openai/deployments/m/models");
        unknown("/openai/deployments/m/chat/completions/");
        unknown("/openai/deployments/m/chat//completions");
        unknown("/openai/deployments/m/responses");
        unknown("/openai/deployments/a/b/chat/completions");
        unknown("/openai/deployments/m%ZZ/chat/completions");
        unknown("/openai/deployments/m%/chat/completions");
        unknown("/openai/deployments/%FF%FE/chat/completions");
        unknown("/openai/deployments/a%00b/chat/completions");
        unknown(&format!(
            "/openai/deployments/{}/chat/completions",
            "a".repeat(MAX_PATH_ALIAS + 1)
        ));
        unknown(&format!(
            "/openai/deployments/{}/chat/completions",
            "%41".repeat(MAX_PATH_ALIAS + 1)
        ));
        let alias = |path: &str| azure(path, q).unwrap().alias.unwrap();
        assert_eq!(
            alias(&format!(
                "/openai/deployments/{}/chat/completions",
                "a".repeat(MAX_PATH_ALIAS)
            ))
            .len(),
            MAX_PATH_ALIAS
        );
        // A percent-encoded slash is part of the alias, not a separator.
        assert_eq!(
            alias("/openai/deployments/org%2Fmodel/chat/completions"),
            "org/model"
        );
        assert_eq!(
            alias("/openai/deployments/..%2F..%2Fadmin/embeddings"),
            "../../admin"
        );
        // Dots are a name no model has, nothing more: nothing is resolved.
        assert_eq!(alias("/openai/deployments/../chat/completions"), "..");
        assert_eq!(alias("/openai/deployments/gpt%204o/completions"), "gpt 4o");
        assert_eq!(alias("/openai/deployments/caf%C3%A9/completions"), "café");
    }

    #[test]
    fn api_version_is_required_on_the_deployment_route() {
        let path = "/openai/deployments/m/chat/completions";
        for q in [
            None,
            Some(""),
            Some("api-version="),
            Some("api-version"),
            Some("apiversion=1"),
            Some("api-version=2024%2D10%2D21"),
            Some("api-version=a b"),
        ] {
            assert_eq!(azure(path, q), Err(Unrouted::MissingApiVersion), "{q:?}");
        }
        let long = format!("api-version={}", "1".repeat(MAX_API_VERSION + 1));
        assert_eq!(azure(path, Some(&long)), Err(Unrouted::MissingApiVersion));
        assert_eq!(
            Inbound::route(&Method::GET, path, Some("api-version=1")),
            Err(Unrouted::MethodNotAllowed)
        );
        // The OpenAI routes take no api-version and ignore one.
        let r = azure("/v1/chat/completions", Some("api-version=1")).unwrap();
        assert_eq!((r.shape, r.api_version), (Shape::OpenAi, None));
    }
}
