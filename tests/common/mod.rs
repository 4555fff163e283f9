//! Shared integration-test harness: the moto server (one per test binary, started here and stopped
//! when the test process exits), a Cloud Map client to set up and inspect it, a small threaded HTTP
//! server for fakes (ECS task metadata, the application, IMDS), and the sidecar binary as a child
//! process.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_servicediscovery::types::{
    CustomHealthStatus, DnsConfig, DnsRecord, HealthCheckCustomConfig, RecordType, RoutingPolicy,
};
use aws_sdk_servicediscovery::Client;

pub const REGION: &str = "us-east-1";

/// Path of a file in `tests/data`.
pub fn data(path: &str) -> String {
    format!("{}/tests/data/{path}", env!("CARGO_MANIFEST_DIR"))
}

pub fn read_data(path: &str) -> String {
    std::fs::read_to_string(data(path)).expect(path)
}

// ---------------------------------------------------------------------------------------------
// moto

struct Moto {
    port: u16,
    // Never waited for: it lives as long as the test process, and ends with it.
    _child: Mutex<Child>,
    // Kept open for the life of the test process: moto_server.py exits when it reads EOF.
    _stdin: Mutex<ChildStdin>,
}

fn python() -> String {
    std::env::var("CLOUDMAP_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.venv/bin/python", env!("CARGO_MANIFEST_DIR")))
}

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        #[allow(clippy::zombie_processes)]
        let mut child = Command::new(python())
            .arg(format!(
                "{}/tests/support/moto_server.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto: run scripts/setup-venv first (or set CLOUDMAP_TEST_PYTHON)");
        let stdout = child.stdout.take().expect("moto stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("moto port");
        let port: u16 = line.trim().parse().expect("moto printed its port");
        Moto {
            port,
            _stdin: Mutex::new(child.stdin.take().expect("moto stdin")),
            _child: Mutex::new(child),
        }
    })
}

/// The emulator's endpoint, for `AWS_ENDPOINT_URL`.
pub fn moto_url() -> String {
    format!("http://127.0.0.1:{}", moto().port)
}

// ---------------------------------------------------------------------------------------------
// Cloud Map client for setup and assertions

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// A client for the emulator at `endpoint`.
pub fn client_for(endpoint: &str) -> Client {
    let conf = aws_sdk_servicediscovery::Config::builder()
        .behavior_version(aws_sdk_servicediscovery::config::BehaviorVersion::latest())
        .region(aws_sdk_servicediscovery::config::Region::new(REGION))
        .credentials_provider(aws_sdk_servicediscovery::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(conf)
}

pub fn cloudmap() -> Client {
    client_for(&moto_url())
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// What kind of service a test wants.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub custom_health: bool,
    /// DNS records (type, TTL); empty: an HTTP namespace.
    pub records: Vec<(RecordType, i64)>,
}

impl ServiceSpec {
    pub fn http_custom_health() -> Self {
        ServiceSpec {
            custom_health: true,
            records: vec![],
        }
    }
}

/// A fresh namespace with one service in it.
#[derive(Debug, Clone)]
pub struct TestService {
    pub namespace: String,
    pub namespace_id: String,
    pub name: String,
    pub id: String,
}

pub fn fresh_service(spec: ServiceSpec) -> TestService {
    let c = cloudmap();
    block_on(async {
        let namespace = unique("ns");
        if spec.records.is_empty() {
            c.create_http_namespace()
                .name(&namespace)
                .send()
                .await
                .unwrap();
        } else {
            c.create_private_dns_namespace()
                .name(format!("{namespace}.local"))
                // moto allows one private DNS namespace per VPC (real Cloud Map allows many).
                .vpc(unique("vpc"))
                .send()
                .await
                .unwrap();
        }
        let wanted = if spec.records.is_empty() {
            namespace.clone()
        } else {
            format!("{namespace}.local")
        };
        let namespace_id = c
            .list_namespaces()
            .send()
            .await
            .unwrap()
            .namespaces()
            .iter()
            .find(|n| n.name() == Some(wanted.as_str()))
            .and_then(|n| n.id().map(str::to_string))
            .expect("namespace created");
        let mut req = c.create_service().name("ap").namespace_id(&namespace_id);
        if spec.custom_health {
            req = req.health_check_custom_config(HealthCheckCustomConfig::builder().build());
        }
        if !spec.records.is_empty() {
            let mut dns = DnsConfig::builder().routing_policy(RoutingPolicy::Multivalue);
            for (kind, ttl) in &spec.records {
                dns = dns.dns_records(
                    DnsRecord::builder()
                        .r#type(kind.clone())
                        .ttl(*ttl)
                        .build()
                        .unwrap(),
                );
            }
            req = req.dns_config(dns.build().unwrap());
        }
        let id = req
            .send()
            .await
            .unwrap()
            .service()
            .and_then(|s| s.id().map(str::to_string))
            .unwrap();
        TestService {
            namespace: wanted,
            namespace_id,
            name: "ap".to_string(),
            id,
        }
    })
}

/// The instances of a service: ID → attributes.
pub fn instances(service_id: &str) -> HashMap<String, HashMap<String, String>> {
    let c = cloudmap();
    block_on(async {
        let out = c
            .list_instances()
            .service_id(service_id)
            .send()
            .await
            .unwrap();
        out.instances()
            .iter()
            .map(|i| {
                (
                    i.id().unwrap_or_default().to_string(),
                    i.attributes().cloned().unwrap_or_default(),
                )
            })
            .collect()
    })
}

/// Cloud Map's view of an instance's custom health (`None`: unknown instance).
pub fn health(service_id: &str, instance_id: &str) -> Option<String> {
    let c = cloudmap();
    block_on(async {
        let out = c
            .get_instances_health_status()
            .service_id(service_id)
            .send()
            .await
            .ok()?;
        out.status()?
            .get(instance_id)
            .map(|s| s.as_str().to_string())
    })
}

pub fn set_health(service_id: &str, instance_id: &str, status: CustomHealthStatus) {
    let c = cloudmap();
    block_on(async {
        c.update_instance_custom_health_status()
            .service_id(service_id)
            .instance_id(instance_id)
            .status(status)
            .send()
            .await
            .unwrap();
    });
}

/// Poll until `check` holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if check() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server for fakes

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![],
            body: body.into(),
        }
    }

    pub fn json(body: impl Into<Vec<u8>>) -> Self {
        Response::new(200, body).header("Content-Type", "application/json")
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// What the handler returns: a response, or drop the connection without answering.
pub enum Reply {
    Respond(Response),
    Reset,
}

impl From<Response> for Reply {
    fn from(r: Response) -> Self {
        Reply::Respond(r)
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A loopback HTTP server on a free port; every request is recorded.
pub struct HttpFake {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl HttpFake {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> HttpFake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let handler = handler.clone();
                let recorded = recorded.clone();
                thread::spawn(move || serve_connection(stream, &*handler, &recorded));
            }
        });
        HttpFake { port, requests }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }
}

fn serve_connection(stream: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    // One request per connection: every response says `Connection: close`.
    {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req = Request {
            method,
            path,
            headers,
            body,
        };
        recorded.lock().unwrap().push(req.clone());
        match handler(&req) {
            Reply::Reset => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            Reply::Respond(resp) => {
                let mut out = format!("HTTP/1.1 {} X\r\n", resp.status);
                for (k, v) in &resp.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n",
                    resp.body.len()
                ));
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&resp.body);
                let _ = stream.write_all(&bytes);
                let _ = stream.flush();
            }
        }
    }
}

/// A fake ECS task metadata endpoint serving `task` (a fixture body) at `/v4/test/task` and `me`
/// (the sidecar's own container body) at `/v4/test`; the first `fail_first` requests get HTTP 500
/// with the agent's JSON-string error body.
pub fn ecs_metadata(task: String, me: String, fail_first: usize) -> HttpFake {
    let served = AtomicUsize::new(0);
    let error = read_data("ecs-v4/agent-error-404-task-lookup.json");
    HttpFake::start(move |req| {
        if served.fetch_add(1, Ordering::SeqCst) < fail_first {
            return Response::new(500, error.clone()).into();
        }
        match req.path.as_str() {
            "/v4/test" => Response::json(me.clone()).into(),
            "/v4/test/task" => Response::json(task.clone()).into(),
            _ => Response::new(404, error.clone()).into(),
        }
    })
}

/// The sidecar's own container body, not part of any fixture task.
pub const SIDECAR_CONTAINER: &str = r#"{"DockerId":"cafe0000sidecar","Name":"cloudmap-sidecar","Type":"NORMAL","KnownStatus":"RUNNING"}"#;

/// An application whose `/health` answers 200 or 503 as `healthy` says.
pub struct App {
    pub server: HttpFake,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    pub fn start(healthy: bool) -> App {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(healthy));
        let f = flag.clone();
        let server = HttpFake::start(move |_| {
            if f.load(Ordering::SeqCst) {
                Response::new(200, "ok").into()
            } else {
                Response::new(503, "unhealthy").into()
            }
        });
        App {
            server,
            healthy: flag,
        }
    }

    pub fn health_url(&self) -> String {
        format!("{}/health", self.server.url())
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar binary

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cloudmap-sidecar")
}

/// A command for the binary with a clean environment: only what the test gives it, plus the
/// emulator's endpoint and test credentials.
pub fn sidecar_command(endpoint: &str) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // Its own state file: tests run side by side, and the default path is shared.
        .env(
            "CLOUDMAP_STATE_FILE",
            std::env::temp_dir().join(format!("{}.state", unique("cloudmap-test"))),
        );
    cmd
}

/// A running sidecar, with its stderr collected.
pub struct Sidecar {
    child: Child,
    log: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Sidecar {
    pub fn spawn(mut cmd: Command) -> Sidecar {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sidecar");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        Sidecar {
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {name} failed");
    }

    /// Wait for exit; panics (with the log) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        if let Some(s) = self.status {
            return s.code().unwrap_or(-1);
        }
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                // Let the reader threads drain the pipes.
                thread::sleep(Duration::from_millis(50));
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "sidecar did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_log(&self, timeout: Duration, needle: &str) {
        wait_until(timeout, &format!("log line containing {needle:?}"), || {
            self.log().contains(needle)
        });
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run the binary to completion (for commands that exit by themselves).
pub fn run_to_exit(cmd: Command, timeout: Duration) -> (i32, String) {
    let mut s = Sidecar::spawn(cmd);
    let code = s.wait(timeout);
    (code, s.log())
}

// ---------------------------------------------------------------------------------------------
// EC2 instance metadata (IMDSv2)

/// What the IMDS fake serves, from `tests/data/imds/` (`local-ipv4.txt`; the instance ID and AZ
/// from `instance-identity-document.json`, as the EC2 user guide's examples give them).
pub const IMDS_LOCAL_IPV4: &str = "10.1.2.22";
pub const IMDS_INSTANCE_ID: &str = "i-1234567890abcdef0";
pub const IMDS_AZ: &str = "us-west-2b";

/// A loopback IMDSv2 that behaves like EC2 with `http-tokens=required` (moto's IMDS does not: its
/// token reply lacks the TTL header, which aws-config's client requires):
/// - `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1..=21600, else 400),
///   is refused with `X-Forwarded-For` (403) or on a version-specific path (403), and answers with
///   the token and the TTL header;
/// - `GET`/`HEAD` without a valid `X-aws-ec2-metadata-token` get 401 with an empty body;
/// - known items answer 200 `text/plain`, unknown ones 404.
pub fn imds_fake() -> HttpFake {
    let token = read_data("imds/api-token-response-body.txt")
        .trim()
        .to_string();
    let doc: serde_json::Value =
        serde_json::from_str(&read_data("imds/instance-identity-document.json")).unwrap();
    let field = |k: &str| doc[k].as_str().unwrap().to_string();
    let items: HashMap<String, String> = [
        (
            "/latest/meta-data/local-ipv4",
            read_data("imds/local-ipv4.txt").trim().to_string(),
        ),
        ("/latest/meta-data/instance-id", field("instanceId")),
        (
            "/latest/meta-data/placement/availability-zone",
            field("availabilityZone"),
        ),
        ("/latest/meta-data/placement/region", field("region")),
        (
            "/latest/meta-data/local-hostname",
            read_data("imds/local-hostname.txt").trim().to_string(),
        ),
        (
            "/latest/meta-data/",
            read_data("imds/meta-data-root-listing.txt"),
        ),
        (
            "/latest/dynamic/instance-identity/document",
            read_data("imds/instance-identity-document.json"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(items["/latest/meta-data/local-ipv4"], IMDS_LOCAL_IPV4);
    assert_eq!(items["/latest/meta-data/instance-id"], IMDS_INSTANCE_ID);
    let ec2 = |status: u16, body: &str| {
        Response::new(status, body.to_string())
            .header("Server", "EC2ws")
            .header("Content-Type", "text/plain")
    };
    HttpFake::start(move |req| match req.method.as_str() {
        "PUT" if req.path == "/latest/api/token" => {
            if req.header("x-forwarded-for").is_some() {
                return ec2(403, "").into();
            }
            match req
                .header("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|t| t.trim().parse::<u32>().ok())
            {
                Some(ttl) if (1..=21600).contains(&ttl) => ec2(200, &token)
                    .header("X-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())
                    .into(),
                _ => ec2(400, "").into(),
            }
        }
        "PUT" if req.path.ends_with("/api/token") => ec2(403, "").into(),
        "GET" | "HEAD" => {
            if req.header("x-aws-ec2-metadata-token") != Some(token.as_str()) {
                return ec2(401, "").into();
            }
            match items.get(req.path.as_str()) {
                Some(v) => ec2(200, v).into(),
                None => ec2(404, "").into(),
            }
        }
        _ => ec2(405, "").into(),
    })
}

/// The IMDS fake's token (what a valid `X-aws-ec2-metadata-token` carries).
pub fn imds_token() -> String {
    read_data("imds/api-token-response-body.txt")
        .trim()
        .to_string()
}

pub mod proxy;
