//! `aigw.admin.v1.AdminService` over tonic.

use super::auth::AdminKeys;
use super::convert::*;
use super::{Admin, EventFilter, Input, RecordView, View};
use crate::error::Error;
use aigw_shared::domain::ResourceKind;
use aigw_shared::proto::admin::v1 as pb;
use pb::admin_service_server::{AdminService, AdminServiceServer};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct Actor(String);

/// Rejects calls without a valid admin key in `authorization: Bearer …`
/// (or `x-api-key`) metadata and records who called.
#[derive(Clone)]
pub struct AuthInterceptor(AdminKeys);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata();
        let presented = AdminKeys::from_headers(
            md.get("authorization").and_then(|v| v.to_str().ok()),
            md.get("x-api-key").and_then(|v| v.to_str().ok()),
        );
        let actor = presented
            .and_then(|k| self.0.check(k))
            .ok_or_else(|| Status::from(Error::Unauthenticated))?;
        req.extensions_mut().insert(Actor(actor));
        Ok(req)
    }
}

pub fn service(
    admin: Admin,
    keys: AdminKeys,
    max_body: usize,
) -> InterceptedService<AdminServiceServer<GrpcAdmin>, AuthInterceptor> {
    let server = AdminServiceServer::new(GrpcAdmin { admin }).max_decoding_message_size(max_body);
    InterceptedService::new(server, AuthInterceptor(keys))
}

pub struct GrpcAdmin {
    admin: Admin,
}

impl GrpcAdmin {
    /// Read your writes on any replica: `x-aigw-min-seq` metadata waits
    /// (at most 5 s) until this replica has applied that sequence.
    async fn caught_up<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(v) = req.metadata().get("x-aigw-min-seq") else {
            return Ok(());
        };
        let min: u64 = v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Status::invalid_argument("x-aigw-min-seq: must be a non-negative integer")
            })?;
        self.admin
            .engine()
            .wait_for_version(min, std::time::Duration::from_secs(5))
            .await?;
        Ok(())
    }
}

fn actor<T>(req: &Request<T>) -> Result<String, Status> {
    req.extensions()
        .get::<Actor>()
        .map(|a| a.0.clone())
        .ok_or_else(|| Status::from(Error::Unauthenticated))
}

/// A record of another kind where one was asked for: a bug, reported as one.
fn wrong_kind(what: &str) -> Status {
    Status::internal(format!("internal error: expected a {what} record"))
}

fn pk_record(r: RecordView) -> Result<pb::ProviderKeyRecord, Status> {
    let View::ProviderKey(v) = r.value else {
        return Err(wrong_kind("provider key"));
    };
    Ok(pb::ProviderKeyRecord {
        id: r.id,
        value: Some(provider_key_out(v)),
        revision: r.revision,
    })
}

fn model_record(r: RecordView) -> Result<pb::ModelRecord, Status> {
    let View::Model(v) = r.value else {
        return Err(wrong_kind("model"));
    };
    Ok(pb::ModelRecord {
        id: r.id,
        value: Some(model_out(v)),
        revision: r.revision,
    })
}

fn api_key_record(r: RecordView) -> Result<pb::ApiKeyRecord, Status> {
    let View::ApiKey(v) = r.value else {
        return Err(wrong_kind("api key"));
    };
    Ok(pb::ApiKeyRecord {
        id: r.id,
        value: Some(api_key_out(v)),
        revision: r.revision,
    })
}

fn jwt_provider_record(r: RecordView) -> Result<pb::JwtProviderRecord, Status> {
    let View::JwtProvider(v) = r.value else {
        return Err(wrong_kind("jwt provider"));
    };
    Ok(pb::JwtProviderRecord {
        id: r.id,
        value: Some(jwt_provider_out(v)),
        revision: r.revision,
    })
}

type R<T> = Result<Response<T>, Status>;

impl GrpcAdmin {
    async fn create(&self, actor: &str, input: Result<Input, Error>) -> Result<RecordView, Status> {
        Ok(self.admin.create(actor, input?).await?)
    }

    async fn update(
        &self,
        actor: &str,
        id: &str,
        input: Result<Input, Error>,
        expected: Option<u64>,
    ) -> Result<RecordView, Status> {
        Ok(self
            .admin
            .update(actor, id, input?, expected, false)
            .await?
            .0)
    }

    async fn delete(
        &self,
        actor: &str,
        kind: ResourceKind,
        id: &str,
        expected: Option<u64>,
    ) -> Result<(), Status> {
        Ok(self.admin.delete(actor, kind, id, expected).await?)
    }

    fn list(&self, kind: ResourceKind) -> Vec<RecordView> {
        self.admin.list(kind)
    }
}

#[tonic::async_trait]
impl AdminService for GrpcAdmin {
    async fn create_provider_key(
        &self,
        req: Request<pb::CreateProviderKeyRequest>,
    ) -> R<pb::ProviderKeyRecord> {
        let a = actor(&req)?;
        let input = provider_key_in(req.into_inner().value).map(Input::ProviderKey);
        Ok(Response::new(pk_record(self.create(&a, input).await?)?))
    }

    async fn get_provider_key(
        &self,
        req: Request<pb::GetProviderKeyRequest>,
    ) -> R<pb::ProviderKeyRecord> {
        self.caught_up(&req).await?;
        let rec = self
            .admin
            .get(ResourceKind::ProviderKey, &req.into_inner().id)?;
        Ok(Response::new(pk_record(rec)?))
    }

    async fn list_provider_keys(
        &self,
        req: Request<pb::ListProviderKeysRequest>,
    ) -> R<pb::ListProviderKeysResponse> {
        self.caught_up(&req).await?;
        let list: Vec<_> = self
            .list(ResourceKind::ProviderKey)
            .into_iter()
            .map(pk_record)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListProviderKeysResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn update_provider_key(
        &self,
        req: Request<pb::UpdateProviderKeyRequest>,
    ) -> R<pb::ProviderKeyRecord> {
        let a = actor(&req)?;
        let r = req.into_inner();
        let input = provider_key_in(r.value).map(Input::ProviderKey);
        Ok(Response::new(pk_record(
            self.update(&a, &r.id, input, r.expected_revision).await?,
        )?))
    }

    async fn delete_provider_key(
        &self,
        req: Request<pb::DeleteProviderKeyRequest>,
    ) -> R<pb::DeleteProviderKeyResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        self.delete(&a, ResourceKind::ProviderKey, &r.id, r.expected_revision)
            .await?;
        Ok(Response::new(pb::DeleteProviderKeyResponse {
            deleted: true,
            id: r.id,
        }))
    }

    async fn create_model(&self, req: Request<pb::CreateModelRequest>) -> R<pb::ModelRecord> {
        let a = actor(&req)?;
        let input = model_in(req.into_inner().value).map(Input::Model);
        Ok(Response::new(model_record(self.create(&a, input).await?)?))
    }

    async fn get_model(&self, req: Request<pb::GetModelRequest>) -> R<pb::ModelRecord> {
        self.caught_up(&req).await?;
        let rec = self.admin.get(ResourceKind::Model, &req.into_inner().id)?;
        Ok(Response::new(model_record(rec)?))
    }

    async fn list_models(&self, req: Request<pb::ListModelsRequest>) -> R<pb::ListModelsResponse> {
        self.caught_up(&req).await?;
        let list: Vec<_> = self
            .list(ResourceKind::Model)
            .into_iter()
            .map(model_record)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListModelsResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn update_model(&self, req: Request<pb::UpdateModelRequest>) -> R<pb::ModelRecord> {
        let a = actor(&req)?;
        let r = req.into_inner();
        let input = model_in(r.value).map(Input::Model);
        Ok(Response::new(model_record(
            self.update(&a, &r.id, input, r.expected_revision).await?,
        )?))
    }

    async fn delete_model(
        &self,
        req: Request<pb::DeleteModelRequest>,
    ) -> R<pb::DeleteModelResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        self.delete(&a, ResourceKind::Model, &r.id, r.expected_revision)
            .await?;
        Ok(Response::new(pb::DeleteModelResponse {
            deleted: true,
            id: r.id,
        }))
    }

    async fn create_api_key(&self, req: Request<pb::CreateApiKeyRequest>) -> R<pb::ApiKeyRecord> {
        let a = actor(&req)?;
        let input = api_key_in(req.into_inner().value).map(Input::ApiKey);
        Ok(Response::new(api_key_record(
            self.create(&a, input).await?,
        )?))
    }

    async fn get_api_key(&self, req: Request<pb::GetApiKeyRequest>) -> R<pb::ApiKeyRecord> {
        self.caught_up(&req).await?;
        let rec = self.admin.get(ResourceKind::ApiKey, &req.into_inner().id)?;
        Ok(Response::new(api_key_record(rec)?))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> R<pb::ListApiKeysResponse> {
        self.caught_up(&req).await?;
        let list: Vec<_> = self
            .list(ResourceKind::ApiKey)
            .into_iter()
            .map(api_key_record)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListApiKeysResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn update_api_key(&self, req: Request<pb::UpdateApiKeyRequest>) -> R<pb::ApiKeyRecord> {
        let a = actor(&req)?;
        let r = req.into_inner();
        let input = api_key_in(r.value).map(Input::ApiKey);
        Ok(Response::new(api_key_record(
            self.update(&a, &r.id, input, r.expected_revision).await?,
        )?))
    }

    async fn delete_api_key(
        &self,
        req: Request<pb::DeleteApiKeyRequest>,
    ) -> R<pb::DeleteApiKeyResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        self.delete(&a, ResourceKind::ApiKey, &r.id, r.expected_revision)
            .await?;
        Ok(Response::new(pb::DeleteApiKeyResponse {
            deleted: true,
            id: r.id,
        }))
    }

    async fn create_jwt_provider(
        &self,
        req: Request<pb::CreateJwtProviderRequest>,
    ) -> R<pb::JwtProviderRecord> {
        let a = actor(&req)?;
        let input = jwt_provider_in(req.into_inner().value).map(Input::JwtProvider);
        Ok(Response::new(jwt_provider_record(
            self.create(&a, input).await?,
        )?))
    }

    async fn get_jwt_provider(
        &self,
        req: Request<pb::GetJwtProviderRequest>,
    ) -> R<pb::JwtProviderRecord> {
        self.caught_up(&req).await?;
        let rec = self
            .admin
            .get(ResourceKind::JwtProvider, &req.into_inner().id)?;
        Ok(Response::new(jwt_provider_record(rec)?))
    }

    async fn list_jwt_providers(
        &self,
        req: Request<pb::ListJwtProvidersRequest>,
    ) -> R<pb::ListJwtProvidersResponse> {
        self.caught_up(&req).await?;
        let list: Vec<_> = self
            .list(ResourceKind::JwtProvider)
            .into_iter()
            .map(jwt_provider_record)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListJwtProvidersResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn update_jwt_provider(
        &self,
        req: Request<pb::UpdateJwtProviderRequest>,
    ) -> R<pb::JwtProviderRecord> {
        let a = actor(&req)?;
        let r = req.into_inner();
        let input = jwt_provider_in(r.value).map(Input::JwtProvider);
        Ok(Response::new(jwt_provider_record(
            self.update(&a, &r.id, input, r.expected_revision).await?,
        )?))
    }

    async fn delete_jwt_provider(
        &self,
        req: Request<pb::DeleteJwtProviderRequest>,
    ) -> R<pb::DeleteJwtProviderResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        self.delete(&a, ResourceKind::JwtProvider, &r.id, r.expected_revision)
            .await?;
        Ok(Response::new(pb::DeleteJwtProviderResponse {
            deleted: true,
            id: r.id,
        }))
    }

    async fn list_events(&self, req: Request<pb::ListEventsRequest>) -> R<pb::ListEventsResponse> {
        self.caught_up(&req).await?;
        let r = req.into_inner();
        let resource = match r.resource.as_str() {
            "" => None,
            other => Some(ResourceKind::parse(other).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "resource: unknown `{other}`; use provider_keys, models, apikeys, jwt_providers, nodes"
                ))
            })?),
        };
        let events = self.admin.events(&EventFilter {
            resource,
            resource_id: (!r.resource_id.is_empty()).then_some(r.resource_id),
            from_seq: (r.from_seq > 0).then_some(r.from_seq),
            to_seq: (r.to_seq > 0).then_some(r.to_seq),
            limit: (r.limit > 0).then_some(r.limit as usize),
        })?;
        let list: Vec<pb::Event> = events
            .into_iter()
            .map(|e| pb::Event {
                seq: e.seq,
                at: e.at,
                actor: e.actor,
                r#type: e.type_name,
                version: e.version,
                resource: e.resource,
                resource_id: e.resource_id,
                payload_json: e.payload.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListEventsResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> R<pb::ListNodesResponse> {
        self.caught_up(&req).await?;
        let list: Vec<pb::Node> = self
            .admin
            .node_list()
            .into_iter()
            .map(|n| pb::Node {
                node_id: n.status.node_id,
                address: n.status.address,
                applied_version: n.status.applied_version,
                last_seen: n.status.last_seen,
                connected: n.status.connected,
                last_error: n.status.last_error.unwrap_or_default(),
                targets: n
                    .status
                    .targets
                    .into_iter()
                    .map(|t| pb::TargetHealth {
                        provider_key_id: t.provider_key_id,
                        deployment: t.deployment,
                        healthy: t.healthy,
                        last_probe: t.last_probe.unwrap_or_default(),
                        consecutive_failures: t.consecutive_failures,
                        last_error: t.last_error.unwrap_or_default(),
                    })
                    .collect(),
                credentials: n
                    .credentials
                    .into_iter()
                    .map(|c| pb::NodeCredential {
                        id: c.id,
                        issued_at: c.issued_at,
                        description: c.description.unwrap_or_default(),
                    })
                    .collect(),
                revision: n.revision,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse {
            total: list.len() as u64,
            list,
        }))
    }

    async fn issue_node_credential(
        &self,
        req: Request<pb::IssueNodeCredentialRequest>,
    ) -> R<pb::IssueNodeCredentialResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        let description = (!r.description.is_empty()).then_some(r.description);
        let issued = self
            .admin
            .issue_node_credential(&a, &r.node_id, description)
            .await?;
        Ok(Response::new(pb::IssueNodeCredentialResponse {
            node_id: issued.node_id,
            credential_id: issued.credential_id,
            token: issued.token,
            issued_at: issued.issued_at,
            revision: issued.revision,
        }))
    }

    async fn revoke_node_credential(
        &self,
        req: Request<pb::RevokeNodeCredentialRequest>,
    ) -> R<pb::RevokeNodeCredentialResponse> {
        let a = actor(&req)?;
        let r = req.into_inner();
        if r.credential_id.is_empty() {
            self.delete(&a, ResourceKind::Node, &r.node_id, r.expected_revision)
                .await?;
        } else {
            self.admin
                .revoke_node_credential(&a, &r.node_id, &r.credential_id, r.expected_revision)
                .await?;
        }
        Ok(Response::new(pb::RevokeNodeCredentialResponse {
            revoked: true,
            node_id: r.node_id,
        }))
    }

    async fn query_usage(&self, req: Request<pb::QueryUsageRequest>) -> R<pb::QueryUsageResponse> {
        let r = req.into_inner();
        let rows = self
            .admin
            .usage(Some(&r.group_by), Some(&r.from), Some(&r.to))?
            .into_iter()
            .map(|row| pb::UsageRow {
                group: row
                    .group
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                requests: row.requests,
                errors: row.errors,
                prompt_tokens: row.prompt_tokens,
                completion_tokens: row.completion_tokens,
                cost_usd: row.cost_usd,
                cache_hits: row.cache_hits,
            })
            .collect();
        Ok(Response::new(pb::QueryUsageResponse { rows }))
    }
}
