//! The library API (`cloudmap_sidecar::Registration`) against the moto server: register, set
//! health, shut down, and deregistration on drop from inside and outside a tokio runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;

use aws_sdk_servicediscovery::config::{Credentials, Region, SharedCredentialsProvider};
use cloudmap_sidecar::{Error, Health, Registration};
use common::*;

/// The emulator, without touching this process's environment.
fn sdk() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "tests",
        )))
        .endpoint_url(moto_url())
        .build()
}

/// The emulator's instances, from async code (the harness's helpers block on their own runtime).
async fn listed(
    service_id: &str,
) -> std::collections::HashMap<String, std::collections::HashMap<String, String>> {
    let id = service_id.to_string();
    tokio::task::spawn_blocking(move || instances(&id))
        .await
        .unwrap()
}

/// A fresh service, from async code.
async fn fresh() -> TestService {
    tokio::task::spawn_blocking(|| fresh_service(ServiceSpec::http_custom_health()))
        .await
        .unwrap()
}

#[tokio::test]
async fn register_set_health_and_shutdown() {
    let svc = fresh().await;
    // The same calls as the crate's doc example.
    let registration = Registration::builder()
        .service_id(&svc.id)
        .instance_id("lib-1")
        .ip(Ipv4Addr::new(10, 4, 0, 1))
        .port(8080)
        .attribute("TIER", "ap")
        .sdk_config(sdk())
        .register()
        .await
        .unwrap();
    assert_eq!(registration.instance_id(), "lib-1");
    assert_eq!(registration.service_id(), svc.id);
    let attrs = listed(&svc.id).await;
    assert_eq!(
        attrs["lib-1"].get("AWS_INSTANCE_IPV4").map(String::as_str),
        Some("10.4.0.1")
    );
    assert_eq!(attrs["lib-1"].get("TIER").map(String::as_str), Some("ap"));

    registration.set_health(Health::Unhealthy).await.unwrap();
    let id = svc.id.clone();
    let status = tokio::task::spawn_blocking(move || health(&id, "lib-1"))
        .await
        .unwrap();
    assert_eq!(status.as_deref(), Some("UNHEALTHY"));

    registration.shutdown().await.unwrap();
    let left = listed(&svc.id).await;
    assert!(left.is_empty(), "{left:?}");
}

/// `#[tokio::test]` runs on a current-thread runtime: drop must neither panic there nor need
/// that runtime to make progress, and the instance is gone once `drop` returns.
#[tokio::test]
async fn dropping_inside_a_current_thread_runtime_deregisters_before_returning() {
    let svc = fresh().await;
    let registration = Registration::builder()
        .namespace(&svc.namespace)
        .service(&svc.name)
        .instance_id("lib-drop-1")
        .ip(Ipv4Addr::new(10, 4, 0, 2))
        .sdk_config(sdk())
        .register()
        .await
        .unwrap();
    assert!(listed(&svc.id).await.contains_key("lib-drop-1"));
    drop(registration);
    assert!(listed(&svc.id).await.is_empty(), "gone when drop returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_inside_a_multi_thread_runtime_deregisters_too() {
    let svc = fresh().await;
    let registration = Registration::builder()
        .service_id(&svc.id)
        .instance_id("lib-drop-2")
        .ip(Ipv4Addr::new(10, 4, 0, 3))
        .sdk_config(sdk())
        .register()
        .await
        .unwrap();
    // A call leaves a pooled connection owned by this runtime; then drop from one of its tasks.
    registration.set_health(Health::Healthy).await.unwrap();
    tokio::spawn(async move { drop(registration) })
        .await
        .unwrap();
    assert!(listed(&svc.id).await.is_empty());
}

#[test]
fn dropping_outside_any_runtime_deregisters() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let registration = block_on(
        Registration::builder()
            .service_id(&svc.id)
            .instance_id("lib-drop-3")
            .ip(Ipv4Addr::new(10, 4, 0, 4))
            .sdk_config(sdk())
            .register(),
    )
    .unwrap();
    assert!(instances(&svc.id).contains_key("lib-drop-3"));
    drop(registration);
    assert!(instances(&svc.id).is_empty());
}

#[tokio::test]
async fn invalid_settings_are_configuration_errors_naming_the_flag() {
    let err = Registration::builder()
        .service_id("not-a-service")
        .setting("health-interval", "soon")
        .sdk_config(sdk())
        .register()
        .await
        .unwrap_err();
    let Error::Config(text) = &err else {
        panic!("expected a configuration error, got {err:?}");
    };
    assert!(
        text.contains("--service-id (CLOUDMAP_SERVICE_ID)"),
        "{text}"
    );
    assert!(
        text.contains("--health-interval (CLOUDMAP_HEALTH_INTERVAL)"),
        "{text}"
    );
    assert_eq!(err.exit_status().code(), 2);

    let err = Registration::builder()
        .service_id("srv-doesnotexist")
        .instance_id("x")
        .ip(Ipv4Addr::new(10, 4, 0, 5))
        .sdk_config(sdk())
        .register()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
