//! The one place control-plane errors become HTTP answers and gRPC statuses.

use crate::error::Error;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

impl Error {
    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } | Error::UnknownCollection(_) => StatusCode::NOT_FOUND,
            Error::Duplicate(_) | Error::Reference(_) | Error::StaleRevision { .. } => {
                StatusCode::CONFLICT
            }
            Error::Unauthenticated | Error::SignIn(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Storage(_) | Error::Crypto(_) | Error::Config(_) | Error::Io(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.http_status();
        if status.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
        }
        (
            status,
            Json(serde_json::json!({ "error_msg": self.to_string() })),
        )
            .into_response()
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::NotFound { .. } | Error::UnknownCollection(_) => Code::NotFound,
            Error::Duplicate(_) => Code::AlreadyExists,
            Error::Reference(_) => Code::FailedPrecondition,
            Error::StaleRevision { .. } => Code::Aborted,
            Error::Unauthenticated | Error::SignIn(_) => Code::Unauthenticated,
            Error::Forbidden(_) => Code::PermissionDenied,
            Error::PayloadTooLarge { .. } => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Storage(_) | Error::Crypto(_) | Error::Config(_) | Error::Io(_) => {
                tracing::error!(error = %e, "admin request failed");
                Code::Internal
            }
        };
        tonic::Status::new(code, e.to_string())
    }
}
