//! The operation table: every endpoint the gateway serves, in one place.
//! Proxy routing, span names and upstream URLs all read it; a new endpoint
//! is a new `Operation` variant and its row (plus its body types).

use http::Method;

/// One endpoint of the OpenAI API as the gateway serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    ListModels,
}

/// An operation's row: how callers reach it and how it goes to Azure.
#[derive(Debug)]
pub struct Row {
    pub op: Operation,
    pub method: Method,
    /// The OpenAI path callers use.
    pub path: &'static str,
    /// `gen_ai.operation.name`, and the first word of the call's span name.
    pub name: &'static str,
    /// The path under `/openai/deployments/{deployment}/`; `None` when the
    /// gateway answers itself.
    pub azure_path: Option<&'static str>,
    /// The body field that carries the prompt (required; payload logging).
    pub prompt_field: Option<&'static str>,
    /// Whether `stream: true` makes an SSE answer.
    pub streams: bool,
}

/// Indexed by `Operation as usize`.
pub const OPERATIONS: [Row; 4] = [
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
];

/// The span name of a path no operation serves.
pub const UNKNOWN_NAME: &str = "http";

/// Why a request matched no operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// The path exists, not with this method.
    MethodNotAllowed,
    UnknownPath,
}

impl Operation {
    pub fn row(self) -> &'static Row {
        &OPERATIONS[self as usize]
    }

    /// The operation serving `path`, whatever the method.
    pub fn for_path(path: &str) -> Option<Self> {
        OPERATIONS.iter().find(|r| r.path == path).map(|r| r.op)
    }

    /// The operation for a request line.
    pub fn route(method: &Method, path: &str) -> Result<Self, Unrouted> {
        let op = Self::for_path(path).ok_or(Unrouted::UnknownPath)?;
        if op.row().method == *method {
            Ok(op)
        } else {
            Err(Unrouted::MethodNotAllowed)
        }
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

/// `gen_ai.operation.name` for a request path (`http` when none serves it).
pub fn span_name(path: &str) -> &'static str {
    Operation::for_path(path).map_or(UNKNOWN_NAME, Operation::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_indexed_by_their_operation() {
        for (i, row) in OPERATIONS.iter().enumerate() {
            assert_eq!(row.op as usize, i, "{row:?}");
            assert_eq!(Operation::for_path(row.path), Some(row.op));
        }
    }

    #[test]
    fn routing_by_method_and_path() {
        assert_eq!(
            Operation::route(&Method::POST, "/v1/chat/completions"),
            Ok(Operation::ChatCompletions)
        );
        assert_eq!(
            Operation::route(&Method::GET, "/v1/chat/completions"),
            Err(Unrouted::MethodNotAllowed)
        );
        assert_eq!(
            Operation::route(&Method::POST, "/v1/models"),
            Err(Unrouted::MethodNotAllowed)
        );
        assert_eq!(
            Operation::route(&Method::POST, "/v1/nope"),
            Err(Unrouted::UnknownPath)
        );
        assert_eq!(span_name("/v1/embeddings"), "embeddings");
        assert_eq!(span_name("/nope"), "http");
    }
}
