//! The operator API over real gRPC on loopback: never open without the token; start, get, list, watch,
//! and the contract's refusals as gRPC statuses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dm_bus::{Bus, Names};
use dm_orchestrator::{Config, Orchestrator, admin};
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{DelegationId, ListDelegationsRequest, StartDelegationRequest};
use dm_saga::pb::{DelType, Device, Phase, Role};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const TOKEN: &str = "operator-token-for-tests";

async fn serve() -> (String, Orchestrator) {
    let config = Config {
        names: Names::new("dms1").unwrap(),
        server_id: "dms1.example".into(),
        saga: dm_saga::Config::default(),
        ack_wait: Duration::from_secs(5),
    };
    let orchestrator = Orchestrator::new(config, Bus::in_process()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = admin::server(orchestrator.clone(), TOKEN.into());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (url, orchestrator)
}

fn with_token<T>(mut r: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn start_request() -> StartDelegationRequest {
    let mut r = StartDelegationRequest {
        peer_server_id: "dms2.example".into(),
        device: Some(Device {
            dev_id: "IMEI:1".into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    r.set_role(Role::Delegating);
    r.set_del_type(DelType::Partial);
    r
}

#[tokio::test]
async fn the_api_needs_the_token_and_maps_the_contract() {
    let (url, o) = serve().await;
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut client = AdminClient::new(channel);
    // No token, wrong token: refused.
    let err = client
        .list_delegations(ListDelegationsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .list_delegations(with_token(
            tonic::Request::new(ListDelegationsRequest::default()),
            "wrong",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Start: the NOTIF is out, waiting for the peer.
    let started = client
        .start_delegation(with_token(tonic::Request::new(start_request()), TOKEN))
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(started.phase(), Phase::NotifSent);
    let id = DelegationId {
        peer_server_id: started.peer_server_id.clone(),
        session_id: started.session_id.clone(),
    };
    let got = client
        .get_delegation(with_token(tonic::Request::new(id.clone()), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state.unwrap().session_id, started.session_id);
    let list = client
        .list_delegations(with_token(
            tonic::Request::new(ListDelegationsRequest {
                dev_id: "IMEI:1".into(),
            }),
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.delegations.len(), 1);
    // A second delegation of the same device while one is in progress: 409.
    let err = client
        .start_delegation(with_token(tonic::Request::new(start_request()), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().starts_with("409"));
    // Revoking before Active: 409 from the decider; releasing as the delegating side: 409 too.
    let err = client
        .revoke_delegation(with_token(tonic::Request::new(id.clone()), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    // Unknown delegation: 404.
    let unknown = DelegationId {
        peer_server_id: "x".into(),
        session_id: "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11".into(),
    };
    let err = client
        .get_delegation(with_token(tonic::Request::new(unknown), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Watch: the current state comes first.
    let mut watch = client
        .watch_delegation(with_token(tonic::Request::new(id), TOKEN))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.state.unwrap().phase(), Phase::NotifSent);
    // Then every change: the peer says no, the delegation ends, and so does the stream.
    let nack = dm_saga::pb::Event {
        kind: Some(dm_saga::pb::event::Kind::Peer(dm_saga::pb::PeerMessage {
            msg_id: "0b6a7e0c-5d1e-4c41-9b0e-3d3f3c2b1a10".into(),
            sender: started.peer_server_id.clone(),
            session_id: started.session_id.clone(),
            stale: String::new(),
            body: Some(dm_saga::pb::peer_message::Body::Res(dm_saga::pb::ResBody {
                ack: false,
                status_code: 403,
                reason: "not offered".into(),
            })),
        })),
    };
    o.apply(&started.peer_server_id, &started.session_id, &nack)
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.state.unwrap().phase(), Phase::Declined);
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream ends with the delegation");
}
