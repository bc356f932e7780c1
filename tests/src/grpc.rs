//! gRPC clients: the admin service with its bearer key, and server reflection.

use aigw_shared::proto::admin::v1::admin_service_client::AdminServiceClient;
use anyhow::{bail, Context, Result};
use prost::Message;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// Adds `authorization: Bearer <key>` to every call (or nothing without a key).
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    pub fn new(key: Option<&str>) -> Result<Self> {
        Ok(Self(
            key.map(|k| format!("Bearer {k}").parse())
                .transpose()
                .context("admin key is not valid metadata")?,
        ))
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AdminGrpc = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

pub async fn channel(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// An `AdminService` client; `key: None` sends no credentials.
pub async fn admin_client(url: &str, key: Option<&str>) -> Result<AdminGrpc> {
    Ok(AdminServiceClient::with_interceptor(
        channel(url).await?,
        BearerAuth::new(key)?,
    ))
}

/// One `grpc.reflection.v1` request/response exchange.
pub async fn reflect(url: &str, request: MessageRequest) -> Result<MessageResponse> {
    let mut client = ServerReflectionClient::new(channel(url).await?);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = stream
        .message()
        .await?
        .context("reflection stream ended without a response")?;
    resp.message_response
        .context("reflection response is empty")
}

/// Fully-qualified names of the services the server lists.
pub async fn list_services(url: &str) -> Result<Vec<String>> {
    match reflect(url, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(l) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => bail!("unexpected reflection answer: {other:?}"),
    }
}

/// The file descriptors the server returns for `symbol`.
pub async fn file_containing_symbol(
    url: &str,
    symbol: &str,
) -> Result<Vec<prost_types::FileDescriptorProto>> {
    match reflect(
        url,
        MessageRequest::FileContainingSymbol(symbol.to_string()),
    )
    .await?
    {
        MessageResponse::FileDescriptorResponse(f) => f
            .file_descriptor_proto
            .iter()
            .map(|b| {
                prost_types::FileDescriptorProto::decode(b.as_slice())
                    .context("decoding a file descriptor")
            })
            .collect(),
        MessageResponse::ErrorResponse(e) => {
            bail!("reflection error {}: {}", e.error_code, e.error_message)
        }
        other => bail!("unexpected reflection answer: {other:?}"),
    }
}

/// Opens the config stream as a node would: sends a hello with `node_id`
/// and `token`, and returns the first snapshot, or the status the control
/// plane refused the stream with.
pub async fn config_watch_first(
    channel: Channel,
    node_id: &str,
    token: &str,
) -> Result<Result<aigw_shared::proto::config::v1::Snapshot, Status>> {
    use aigw_shared::proto::config::v1 as pb;
    let mut client = pb::config_service_client::ConfigServiceClient::new(channel);
    let hello = pb::WatchRequest {
        kind: Some(pb::watch_request::Kind::Hello(pb::Hello {
            node_id: node_id.into(),
            token: token.into(),
            version: 0,
            address: "test".into(),
            last_error: String::new(),
        })),
    };
    // The request stream stays open (a node acks on it) until the answer.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await?;
    let answer = match client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(Some(snap)) => Ok(snap),
            Ok(None) => Err(Status::aborted("the stream ended without a snapshot")),
            Err(s) => Err(s),
        },
        Err(s) => Err(s),
    };
    drop(tx);
    Ok(answer)
}
