//! Are the owning EC2 instances still there? `DescribeInstances` by instance ID, 100 a call.
//!
//! EC2 answers a list of IDs with every instance it knows (terminated ones stay visible for about
//! an hour), but fails the whole call with `InvalidInstanceID.NotFound` when one ID is unknown.
//! So a batch that fails that way is asked again one ID at a time; an ID that EC2 alone says it
//! does not know counts as gone, but only when the instance's own availability zone places it in
//! the sweeper's Region (EC2 is regional: elsewhere, "not found" proves nothing).
//!
//! [`Ec2Api`] makes that one call without `aws-sdk-ec2`, whose generated code (the whole EC2 API)
//! would cost more build time than the rest of the project together: the request is a SigV4-signed
//! Query-protocol POST (aws-sigv4, with the SDK configuration's credentials, Region and endpoint
//! settings), sent through the SDK's own HTTPS connector (rustls with aws-lc), and the answer is
//! read with aws-smithy-xml: crates the other SDKs build anyway.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_async::rt::sleep::TokioSleep;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_http_client::Connector;
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};
use aws_types::service_config::ServiceConfigKey;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::owner::OwnerState;
use crate::backoff::Backoff;
use crate::metadata::error_chain;

/// IDs per DescribeInstances call (the API takes more; 100 keeps answers small).
pub const BATCH: usize = 100;

/// Why one DescribeInstances call did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DescribeError {
    /// `InvalidInstanceID.NotFound`: at least one of the IDs is unknown to EC2 here.
    NotFound,
    /// Anything else: the owners stay unknown.
    Other(String),
}

/// One DescribeInstances call: `(instance ID, state name)` for each instance EC2 returned.
#[allow(async_fn_in_trait)]
pub trait DescribeInstances {
    async fn describe(&self, ids: &[String]) -> Result<Vec<(String, String)>, DescribeError>;
}

/// The state of each `(instance ID, in the sweeper's Region)`, keyed by instance ID.
pub async fn check<D: DescribeInstances>(
    api: &D,
    hosts: &[(String, bool)],
) -> HashMap<String, OwnerState> {
    let in_region: HashMap<&str, bool> = hosts.iter().map(|(id, r)| (id.as_str(), *r)).collect();
    let ids: Vec<String> = hosts
        .iter()
        .map(|(id, _)| id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut out = HashMap::new();
    for batch in ids.chunks(BATCH) {
        debug!(instances = batch.len(), "DescribeInstances");
        match api.describe(batch).await {
            Ok(found) => out.extend(interpret(batch, &found)),
            Err(DescribeError::NotFound) => {
                for id in batch {
                    let one = std::slice::from_ref(id);
                    let state = match api.describe(one).await {
                        Ok(found) => interpret(one, &found).remove(id),
                        Err(DescribeError::NotFound) if in_region.get(id.as_str()) == Some(&true) => {
                            Some(OwnerState::Gone("instance not found".to_string()))
                        }
                        Err(DescribeError::NotFound) => Some(OwnerState::Unknown(
                            "EC2 does not know the instance here, and its AVAILABILITY_ZONE does not place it in the sweeper's Region".to_string(),
                        )),
                        Err(DescribeError::Other(why)) => Some(OwnerState::Unknown(why)),
                    };
                    if let Some(state) = state {
                        out.insert(id.clone(), state);
                    }
                }
            }
            Err(DescribeError::Other(why)) => {
                warn!(instances = batch.len(), "{why}; keeping their instances");
                out.extend(
                    batch
                        .iter()
                        .map(|id| (id.clone(), OwnerState::Unknown(why.clone()))),
                );
            }
        }
    }
    out
}

/// The EC2 Query API version the request and the parser follow.
const API_VERSION: &str = "2016-11-15";
/// Attempts per call, as the SDK clients are configured (`crate::aws_config`).
const ATTEMPTS: u32 = 3;
/// Error codes that mean "try again".
const RETRYABLE: [&str; 5] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "Unavailable",
];

/// DescribeInstances over HTTPS, signed with the SDK configuration's credentials.
#[derive(Debug, Clone)]
pub struct Ec2Api {
    http: Arc<Connector>,
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
}

/// One attempt's failure.
enum Attempt {
    Retry(String),
    Fail(DescribeError),
}

impl Ec2Api {
    /// Endpoint as the SDKs choose it: `AWS_ENDPOINT_URL_EC2` (or the profile's `ec2` service
    /// section), then `AWS_ENDPOINT_URL`, then the Region's public endpoint.
    pub fn from_config(sdk: &aws_config::SdkConfig, region: &str) -> Self {
        let service_endpoint = ServiceConfigKey::builder()
            .service_id("EC2")
            .env("AWS_ENDPOINT_URL")
            .profile("endpoint_url")
            .build()
            .ok()
            .and_then(|key| sdk.service_config().and_then(|c| c.load_config(key)));
        let endpoint = service_endpoint
            .or_else(|| sdk.endpoint_url().map(str::to_string))
            .unwrap_or_else(|| default_endpoint(region));
        // The same connector the SDK clients use by default, with the timeouts of `crate::aws_config`.
        let http = Connector::builder()
            .connector_settings(
                HttpConnectorSettings::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .read_timeout(Duration::from_secs(5))
                    .build(),
            )
            .sleep_impl(TokioSleep::new())
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .build();
        Ec2Api {
            http: Arc::new(http),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.to_string(),
            credentials: sdk.credentials_provider(),
        }
    }

    async fn attempt(&self, body: &str) -> Result<String, Attempt> {
        let Some(provider) = &self.credentials else {
            return Err(Attempt::Fail(DescribeError::Other(
                "DescribeInstances: no AWS credentials (give the task a role, or set AWS_* credentials)".to_string(),
            )));
        };
        let creds = provider.provide_credentials().await.map_err(|e| {
            Attempt::Retry(format!(
                "DescribeInstances: cannot load credentials: {}",
                error_chain(&e)
            ))
        })?;
        let identity = Identity::from(creds);
        let url = format!("{}/", self.endpoint);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| {
                Attempt::Fail(DescribeError::Other(format!(
                    "DescribeInstances: cannot sign: {e}"
                )))
            })?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            [("content-type", content_type)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .and_then(|req| sign(req, &params))
        .map_err(|e| {
            Attempt::Fail(DescribeError::Other(format!(
                "DescribeInstances: cannot sign a request for {url}: {e} (check AWS_ENDPOINT_URL_EC2)"
            )))
        })?;
        let (instructions, _) = signable.into_parts();
        let mut req = HttpRequest::new(SdkBody::from(body.to_string()));
        let built = req
            .set_uri(url.as_str())
            .map_err(|e| e.to_string())
            .and_then(|()| req.set_method("POST").map_err(|e| e.to_string()));
        if let Err(e) = built {
            return Err(Attempt::Fail(DescribeError::Other(format!(
                "DescribeInstances: bad endpoint {url}: {e} (check AWS_ENDPOINT_URL_EC2)"
            ))));
        }
        req.headers_mut()
            .insert("content-type", content_type.to_string());
        for (name, value) in instructions.headers() {
            req.headers_mut()
                .insert(name.to_string(), value.to_string());
        }
        let call = tokio::time::timeout(Duration::from_secs(10), self.http.call(req));
        let resp = match call.await {
            Err(_) => {
                return Err(Attempt::Retry(format!(
                    "DescribeInstances at {url}: no answer in 10s"
                )))
            }
            Ok(Err(e)) => {
                return Err(Attempt::Retry(format!(
                    "DescribeInstances at {url}: {}",
                    error_chain(&e)
                )))
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        let bytes = ByteStream::new(resp.into_body())
            .collect()
            .await
            .map_err(|e| {
                Attempt::Retry(format!("DescribeInstances at {url}: {}", error_chain(&e)))
            })?
            .into_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let (code, message) = parse_error(&text).unwrap_or_default();
        let what = format!("DescribeInstances at {url} failed: HTTP {status} {code}: {message}");
        if code == "InvalidInstanceID.NotFound" {
            Err(Attempt::Fail(DescribeError::NotFound))
        } else if status >= 500 || status == 429 || RETRYABLE.contains(&code.as_str()) {
            Err(Attempt::Retry(what))
        } else if code == "UnauthorizedOperation" || code.starts_with("AuthFailure") {
            Err(Attempt::Fail(DescribeError::Other(format!(
                "{what} (grant ec2:DescribeInstances to the sweeper's role)"
            ))))
        } else {
            Err(Attempt::Fail(DescribeError::Other(what)))
        }
    }
}

impl DescribeInstances for Ec2Api {
    async fn describe(&self, ids: &[String]) -> Result<Vec<(String, String)>, DescribeError> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let body = query(ids, token.as_deref());
            let mut backoff = Backoff::cloud_map();
            let deadline = Instant::now() + Duration::from_secs(30);
            let xml = loop {
                match self.attempt(&body).await {
                    Ok(xml) => break xml,
                    Err(Attempt::Fail(e)) => return Err(e),
                    Err(Attempt::Retry(why)) => {
                        if backoff.attempts() + 1 >= ATTEMPTS || !backoff.wait(deadline).await {
                            return Err(DescribeError::Other(why));
                        }
                        debug!(attempt = backoff.attempts(), "{why}; retrying");
                    }
                }
            };
            let (page, next) = parse_instances(&xml).map_err(|e| {
                DescribeError::Other(format!("DescribeInstances: unreadable answer: {e}"))
            })?;
            found.extend(page);
            token = next;
            if token.is_none() {
                return Ok(found);
            }
        }
    }
}

/// The Region's public EC2 endpoint.
fn default_endpoint(region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://ec2.{region}.{suffix}")
}

/// The form body of DescribeInstances for `ids`.
fn query(ids: &[String], token: Option<&str>) -> String {
    let mut body = format!("Action=DescribeInstances&Version={API_VERSION}");
    for (n, id) in ids.iter().enumerate() {
        body.push_str(&format!("&InstanceId.{}={}", n + 1, form_encode(id)));
    }
    if let Some(t) = token {
        body.push_str(&format!("&NextToken={}", form_encode(t)));
    }
    body
}

/// Percent-encoding for a form value (everything but unreserved characters).
fn form_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One DescribeInstances answer: `(instance ID, state name)` pairs and the `nextToken`.
pub type Page = (Vec<(String, String)>, Option<String>);

/// `(instance ID, state name)` of every instance in a DescribeInstances answer, and its
/// `nextToken`. Only `reservationSet/item/instancesSet/item/{instanceId, instanceState/name}` are
/// read: other `instanceId`s (network interface attachments…) nest deeper and are skipped.
pub fn parse_instances(xml: &str) -> Result<Page, String> {
    let mut doc = Document::new(xml);
    let mut root = doc.root_element().map_err(|e| e.to_string())?;
    if !root.start_el().matches("DescribeInstancesResponse") {
        return Err(format!("root element is {}", root.start_el().local()));
    }
    let mut out = Vec::new();
    let mut token = None;
    while let Some(mut tag) = root.next_tag() {
        match tag.start_el().local() {
            "reservationSet" => {
                while let Some(mut reservation) = tag.next_tag() {
                    while let Some(mut field) = reservation.next_tag() {
                        if field.start_el().local() == "instancesSet" {
                            while let Some(mut instance) = field.next_tag() {
                                out.push(parse_instance(&mut instance)?);
                            }
                        }
                    }
                }
            }
            "nextToken" => {
                let t = try_data(&mut tag).map_err(|e| e.to_string())?;
                if !t.trim().is_empty() {
                    token = Some(t.trim().to_string());
                }
            }
            _ => {}
        }
    }
    Ok((out, token))
}

fn parse_instance(instance: &mut ScopedDecoder) -> Result<(String, String), String> {
    let (mut id, mut state) = (String::new(), String::new());
    while let Some(mut field) = instance.next_tag() {
        match field.start_el().local() {
            "instanceId" => {
                id = try_data(&mut field)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .to_string()
            }
            "instanceState" => {
                while let Some(mut s) = field.next_tag() {
                    if s.start_el().local() == "name" {
                        state = try_data(&mut s)
                            .map_err(|e| e.to_string())?
                            .trim()
                            .to_string();
                    }
                }
            }
            _ => {}
        }
    }
    Ok((id, state))
}

/// `(Code, Message)` of an EC2 error answer: `<Response><Errors><Error><Code>…`.
pub fn parse_error(xml: &str) -> Option<(String, String)> {
    let mut doc = Document::new(xml);
    let mut root = doc.root_element().ok()?;
    while let Some(mut errors) = root.next_tag() {
        if errors.start_el().local() != "Errors" {
            continue;
        }
        // EC2 sends one <Error> per answer: read the first.
        let mut error = errors.next_tag()?;
        let (mut code, mut message) = (String::new(), String::new());
        while let Some(mut f) = error.next_tag() {
            match f.start_el().local() {
                "Code" => code = try_data(&mut f).ok()?.to_string(),
                "Message" => message = try_data(&mut f).ok()?.to_string(),
                _ => {}
            }
        }
        return Some((code, message));
    }
    None
}

/// Judge each requested instance from one answer.
pub fn interpret(requested: &[String], found: &[(String, String)]) -> HashMap<String, OwnerState> {
    requested
        .iter()
        .map(|id| {
            let state = match found.iter().find(|(f, _)| f == id).map(|(_, s)| s.as_str()) {
                // A stopped instance serves nothing until it starts again, when its sidecar
                // registers anew; `stopping` may still be deregistering itself.
                Some(s @ ("terminated" | "shutting-down" | "stopped")) => {
                    OwnerState::Gone(format!("instance {s}"))
                }
                Some("") => OwnerState::Unknown("DescribeInstances gave no state".to_string()),
                Some(s) => OwnerState::Alive(s.to_string()),
                None => OwnerState::Unknown(
                    "DescribeInstances answered without the instance".to_string(),
                ),
            };
            (id.clone(), state)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// EC2 as documented: unknown IDs fail the whole call.
    struct FakeEc2 {
        known: HashMap<String, String>,
        fail: Option<String>,
        calls: Mutex<Vec<usize>>,
    }

    impl DescribeInstances for FakeEc2 {
        async fn describe(&self, ids: &[String]) -> Result<Vec<(String, String)>, DescribeError> {
            self.calls.lock().unwrap().push(ids.len());
            if let Some(why) = &self.fail {
                return Err(DescribeError::Other(why.clone()));
            }
            if ids.iter().any(|id| !self.known.contains_key(id)) {
                return Err(DescribeError::NotFound);
            }
            Ok(ids
                .iter()
                .map(|id| (id.clone(), self.known[id].clone()))
                .collect())
        }
    }

    fn fake(known: &[(&str, &str)], fail: Option<&str>) -> FakeEc2 {
        FakeEc2 {
            known: known
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fail: fail.map(str::to_string),
            calls: Mutex::new(vec![]),
        }
    }

    #[tokio::test]
    async fn terminated_and_stopped_are_gone_running_and_stopping_alive() {
        let api = fake(
            &[
                ("i-1", "terminated"),
                ("i-2", "shutting-down"),
                ("i-3", "stopped"),
                ("i-4", "running"),
                ("i-5", "stopping"),
                ("i-6", "pending"),
            ],
            None,
        );
        let hosts: Vec<(String, bool)> = (1..=6).map(|n| (format!("i-{n}"), true)).collect();
        let out = check(&api, &hosts).await;
        for gone in ["i-1", "i-2", "i-3"] {
            assert!(
                matches!(out[gone], OwnerState::Gone(_)),
                "{gone}: {:?}",
                out[gone]
            );
        }
        for alive in ["i-4", "i-5", "i-6"] {
            assert!(matches!(out[alive], OwnerState::Alive(_)), "{alive}");
        }
        assert_eq!(*api.calls.lock().unwrap(), [6]);
    }

    #[tokio::test]
    async fn an_unknown_id_is_asked_alone_and_counts_as_gone_only_in_this_region() {
        let api = fake(&[("i-1", "running")], None);
        let hosts = vec![
            ("i-1".to_string(), true),
            ("i-2".to_string(), true),
            ("i-3".to_string(), false),
        ];
        let out = check(&api, &hosts).await;
        assert!(matches!(out["i-1"], OwnerState::Alive(_)));
        assert_eq!(out["i-2"], OwnerState::Gone("instance not found".into()));
        assert!(matches!(out["i-3"], OwnerState::Unknown(_)));
        assert_eq!(*api.calls.lock().unwrap(), [3, 1, 1, 1]);
    }

    #[tokio::test]
    async fn a_failed_call_leaves_every_owner_unknown() {
        let api = fake(&[], Some("DescribeInstances failed: HTTP 500"));
        let hosts = vec![("i-1".to_string(), true)];
        let out = check(&api, &hosts).await;
        assert!(matches!(out["i-1"], OwnerState::Unknown(ref why) if why.contains("HTTP 500")));
    }

    #[tokio::test]
    async fn batches_hold_at_most_one_hundred_ids() {
        let known: Vec<(String, String)> = (0..250)
            .map(|n| (format!("i-{n:03}"), "running".to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = known
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let api = fake(&refs, None);
        let hosts: Vec<(String, bool)> = known.iter().map(|(id, _)| (id.clone(), true)).collect();
        let out = check(&api, &hosts).await;
        assert_eq!(out.len(), 250);
        assert_eq!(*api.calls.lock().unwrap(), [100, 100, 50]);
    }

    /// Shaped like EC2's documented answer (trimmed), with the nested `instanceId` of a network
    /// interface attachment that must not be taken for an instance.
    const ANSWER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
    <reservationSet>
        <item>
            <reservationId>r-1234567890abcdef0</reservationId>
            <ownerId>123456789012</ownerId>
            <instancesSet>
                <item>
                    <instanceId>i-1234567890abcdef0</instanceId>
                    <imageId>ami-bff32ccc</imageId>
                    <instanceState><code>16</code><name>running</name></instanceState>
                    <networkInterfaceSet>
                        <item>
                            <attachment><instanceId>i-ffffffffffffffff0</instanceId></attachment>
                        </item>
                    </networkInterfaceSet>
                </item>
                <item>
                    <instanceId>i-0598c7d356eba48d7</instanceId>
                    <instanceState><code>48</code><name>terminated</name></instanceState>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
    <nextToken>abc+/=</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn instances_and_their_states_are_read_from_the_answer() {
        let (found, token) = parse_instances(ANSWER).unwrap();
        assert_eq!(
            found,
            [
                ("i-1234567890abcdef0".to_string(), "running".to_string()),
                ("i-0598c7d356eba48d7".to_string(), "terminated".to_string())
            ]
        );
        assert_eq!(token.as_deref(), Some("abc+/="));
        assert!(parse_instances("<Other/>").is_err());
    }

    #[test]
    fn error_answers_give_their_code() {
        let xml = "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-0000000000000dead' does not exist</Message></Error></Errors><RequestID>x</RequestID></Response>";
        let (code, message) = parse_error(xml).unwrap();
        assert_eq!(code, "InvalidInstanceID.NotFound");
        assert!(message.contains("does not exist"));
        assert_eq!(parse_error("not xml"), None);
    }

    #[test]
    fn the_query_lists_every_id_and_encodes_the_token() {
        let ids = vec!["i-1".to_string(), "i-2".to_string()];
        assert_eq!(
            query(&ids, Some("a+b=")),
            "Action=DescribeInstances&Version=2016-11-15&InstanceId.1=i-1&InstanceId.2=i-2&NextToken=a%2Bb%3D"
        );
        assert_eq!(
            default_endpoint("eu-west-1"),
            "https://ec2.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            default_endpoint("cn-north-1"),
            "https://ec2.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn an_answer_without_the_instance_leaves_it_unknown() {
        let out = interpret(&["i-1".to_string()], &[]);
        assert!(matches!(out["i-1"], OwnerState::Unknown(_)));
    }
}
