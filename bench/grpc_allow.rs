//! The gRPC ceiling of `bench/verifier.sh`: an Envoy `ext_authz` server that answers
//! every `Check` with `OK` and nothing else, on the same tonic stack as the verifier.
//!
//!   cargo run --release --example grpc-allow -- 127.0.0.1:18183

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;

struct Allow;

#[tonic::async_trait]
impl Authorization for Allow {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse { status: Some(RpcStatus::default()), ..Default::default() }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18183".into()).parse()?;
    tonic::transport::Server::builder().add_service(AuthorizationServer::new(Allow)).serve(addr).await?;
    Ok(())
}
