//! A fault-injecting HTTP proxy between the sidecar's AWS SDK and the moto server.
//!
//! moto never throttles, never fails an operation, never answers `DuplicateRequest` and never
//! drops a connection; real Cloud Map does all of these. The proxy forwards every request to moto
//! and, per operation (the `X-Amz-Target` header, e.g.
//! `Route53AutoNaming_v20170314.RegisterInstance`), can instead answer with the real awsJson1_1
//! error shapes (HTTP 400 + `x-amzn-ErrorType` + `{"__type", "message"}`), HTTP 500s, connection
//! resets (RST) or delays; limit the whole API to N calls per second (excess calls throttled);
//! rewrite `GetOperation` answers to `FAIL` with a chosen `ErrorCode` (and undo the change in
//! moto, since a failed operation changed nothing); and answer `DuplicateRequest` naming an
//! operation that stays `PENDING` for a while. Every call is recorded, in order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TARGET_PREFIX: &str = "Route53AutoNaming_v20170314.";
const JSON: &str = "application/x-amz-json-1.1";

/// What to do to a call instead of (or before) forwarding it.
#[derive(Debug, Clone)]
pub enum Fault {
    /// HTTP 400 `ThrottlingException`, as Cloud Map throttles.
    Throttle,
    /// HTTP 500 `InternalFailure`.
    ServerError,
    /// Read the request, then reset the connection without answering.
    Reset,
    /// Wait, then forward (a wait longer than the SDK's attempt timeout makes it time out).
    Delay(Duration),
    /// Any awsJson1_1 error, e.g. `(400, "AccessDeniedException")`.
    Error(u16, &'static str),
    /// HTTP 400 `DuplicateRequest` with a `DuplicateOperationId` naming a made-up operation that
    /// `GetOperation` reports `PENDING` this many times, then `SUCCESS`.
    Duplicate { pending: u32 },
}

/// One call as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: String,
    pub body: Value,
    pub at: Instant,
    /// `forwarded`, `throttled`, `error 500`, `reset`, `duplicate <id>`, `pending <id>`,
    /// `success <id>`, `FAIL <code>`.
    pub outcome: String,
}

struct Rule {
    op: String,
    fault: Fault,
    left: usize,
}

struct OpFail {
    /// `REGISTER_INSTANCE`, `DEREGISTER_INSTANCE`, or any.
    kind: Option<String>,
    code: String,
    left: usize,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    rate: Option<(usize, VecDeque<Instant>)>,
    op_fails: Vec<OpFail>,
    /// Made-up operations (from `Fault::Duplicate`): PENDING answers left.
    pending: HashMap<String, u32>,
    /// Operation ID → (operation name, request body) that started it.
    started: HashMap<String, (String, Value)>,
    /// Operations rewritten to FAIL: their code, so later polls get the same answer.
    failed: HashMap<String, String>,
    /// (service, instance) → the last RegisterInstance body, to undo a failed deregistration.
    last_register: HashMap<(String, String), Value>,
    calls: Vec<Call>,
    next_id: usize,
    reverted: HashSet<String>,
}

/// The proxy; it lives as long as the test process (its threads never end), and is cheap.
pub struct Proxy {
    pub port: u16,
    upstream: String,
    state: Arc<Mutex<State>>,
}

impl Proxy {
    /// A proxy in front of moto.
    pub fn start() -> Proxy {
        Proxy::to(&super::moto_url())
    }

    /// A proxy in front of `upstream` (`http://host:port`).
    pub fn to(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let (st, up) = (state.clone(), upstream.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (st, up) = (st.clone(), up.clone());
                thread::spawn(move || handle(stream, &up, &st));
            }
        });
        Proxy {
            port,
            upstream,
            state,
        }
    }

    /// The endpoint for `AWS_ENDPOINT_URL`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next `times` calls of `op` (e.g. `RegisterInstance`) get `fault`; rules for the same
    /// operation apply in the order they were added.
    pub fn inject(&self, op: &str, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule {
            op: op.to_string(),
            fault,
            left: times,
        });
    }

    /// Every call of `op` gets `fault`, for good.
    pub fn always(&self, op: &str, fault: Fault) {
        self.inject(op, fault, usize::MAX);
    }

    /// At most `per_second` calls in any one-second window reach moto; the rest are throttled.
    pub fn rate_limit(&self, per_second: usize) {
        self.state.lock().unwrap().rate = Some((per_second, VecDeque::new()));
    }

    /// The next `times` operations of `kind` (`REGISTER_INSTANCE`, `DEREGISTER_INSTANCE`; `None`:
    /// any) are reported by GetOperation as `FAIL` with `code`, and their change undone in moto.
    pub fn fail_operations(&self, kind: Option<&str>, code: &str, times: usize) {
        self.state.lock().unwrap().op_fails.push(OpFail {
            kind: kind.map(str::to_string),
            code: code.to_string(),
            left: times,
        });
    }

    /// Stop injecting anything.
    pub fn heal(&self) {
        let mut st = self.state.lock().unwrap();
        st.rules.clear();
        st.rate = None;
        st.op_fails.clear();
    }

    /// Every call so far, in the order they arrived.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// How many calls of `op` arrived (whatever their answer).
    pub fn count(&self, op: &str) -> usize {
        self.calls().iter().filter(|c| c.op == op).count()
    }

    /// Calls per operation.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for c in self.calls() {
            *out.entry(c.op).or_insert(0) += 1;
        }
        out
    }

    /// The request bodies of `op`, in order.
    pub fn bodies(&self, op: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.op == op)
            .map(|c| c.body)
            .collect()
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(stream: &TcpStream) -> Option<Req> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Req {
        method,
        path,
        headers,
        body,
    })
}

fn write_response(mut stream: &TcpStream, resp: &Resp) {
    let mut out = format!("HTTP/1.1 {} X\r\n", resp.status);
    for (k, v) in &resp.headers {
        let k_low = k.to_ascii_lowercase();
        if ["content-length", "connection", "transfer-encoding"].contains(&k_low.as_str()) {
            continue;
        }
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

/// Close with RST instead of FIN: what a load balancer or a crashed server does.
fn reset(stream: TcpStream) {
    let _guard = super::runtime().enter();
    if stream.set_nonblocking(true).is_ok() {
        if let Ok(s) = tokio::net::TcpStream::from_std(stream) {
            let _ = s.set_zero_linger();
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> Resp {
    Resp {
        status,
        headers: vec![
            ("Content-Type".into(), JSON.into()),
            ("x-amzn-ErrorType".into(), code.into()),
        ],
        body: json!({"__type": code, "message": message})
            .to_string()
            .into_bytes(),
    }
}

fn ok_json(v: Value) -> Resp {
    Resp {
        status: 200,
        headers: vec![("Content-Type".into(), JSON.into())],
        body: v.to_string().into_bytes(),
    }
}

enum Action {
    Forward,
    Answer(Resp),
    Reset,
    Delay(Duration),
}

fn handle(stream: TcpStream, upstream: &str, state: &Mutex<State>) {
    let Some(req) = read_request(&stream) else {
        return;
    };
    let op = req
        .header("x-amz-target")
        .map(|t| t.trim_start_matches(TARGET_PREFIX).to_string())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);

    let (action, index) = {
        let mut st = state.lock().unwrap();
        let index = st.calls.len();
        st.calls.push(Call {
            op: op.clone(),
            body: body.clone(),
            at: Instant::now(),
            outcome: "forwarded".into(),
        });
        let now = Instant::now();
        let limited = match &mut st.rate {
            Some((limit, window)) => {
                while window
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    window.pop_front();
                }
                if window.len() >= *limit {
                    true
                } else {
                    window.push_back(now);
                    false
                }
            }
            None => false,
        };
        let fault = if limited {
            Some(Fault::Throttle)
        } else {
            st.rules
                .iter_mut()
                .find(|r| r.op == op && r.left > 0)
                .map(|r| {
                    r.left -= 1;
                    r.fault.clone()
                })
        };
        let operation_id = body
            .get("OperationId")
            .and_then(Value::as_str)
            .map(str::to_string);
        let action = match fault {
            Some(Fault::Throttle) => {
                Action::Answer(error(400, "ThrottlingException", "Rate exceeded"))
            }
            Some(Fault::ServerError) => Action::Answer(error(
                500,
                "InternalFailure",
                "The request processing has failed because of an unknown error",
            )),
            Some(Fault::Reset) => Action::Reset,
            Some(Fault::Delay(d)) => Action::Delay(d),
            Some(Fault::Error(status, code)) => {
                Action::Answer(error(status, code, &format!("injected {code}")))
            }
            Some(Fault::Duplicate { pending }) => {
                st.next_id += 1;
                let id = format!("dup-op-{}", st.next_id);
                st.pending.insert(id.clone(), pending);
                let mut resp = error(
                    400,
                    "DuplicateRequest",
                    "Another operation is running on this instance",
                );
                resp.body = json!({
                    "__type": "DuplicateRequest",
                    "Message": "Another operation is running on this instance",
                    "DuplicateOperationId": id,
                })
                .to_string()
                .into_bytes();
                Action::Answer(resp)
            }
            None => match operation_id {
                Some(id) if op == "GetOperation" && st.pending.contains_key(&id) => {
                    let left = st.pending.get_mut(&id).unwrap();
                    let status = if *left > 0 {
                        *left -= 1;
                        "PENDING"
                    } else {
                        "SUCCESS"
                    };
                    Action::Answer(ok_json(json!({
                        "Operation": {"Id": id, "Type": "REGISTER_INSTANCE", "Status": status}
                    })))
                }
                _ => Action::Forward,
            },
        };
        (action, index)
    };

    let outcome;
    let resp = match action {
        Action::Reset => {
            set_outcome(state, index, "reset".into());
            reset(stream);
            return;
        }
        Action::Answer(resp) => {
            outcome = match resp.status {
                200 => {
                    let v: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                    format!(
                        "{} {}",
                        v["Operation"]["Status"]
                            .as_str()
                            .unwrap_or("ok")
                            .to_lowercase(),
                        v["Operation"]["Id"].as_str().unwrap_or_default()
                    )
                }
                400 if String::from_utf8_lossy(&resp.body).contains("ThrottlingException") => {
                    "throttled".to_string()
                }
                s => format!(
                    "error {s} {}",
                    resp.headers
                        .iter()
                        .find(|(k, _)| k == "x-amzn-ErrorType")
                        .map(|(_, v)| v.as_str())
                        .unwrap_or_default()
                ),
            };
            (resp, String::new())
        }
        Action::Delay(d) => {
            thread::sleep(d);
            outcome = format!("delayed {d:?}");
            match forward(upstream, &req) {
                Some(r) => after_forward(state, upstream, &req, &op, &body, r),
                None => return,
            }
        }
        Action::Forward => {
            outcome = "forwarded".into();
            match forward(upstream, &req) {
                Some(r) => after_forward(state, upstream, &req, &op, &body, r),
                None => return,
            }
        }
    };
    let outcome = if resp.1.is_empty() {
        outcome
    } else {
        resp.1.clone()
    };
    set_outcome(state, index, outcome);
    write_response(&stream, &resp.0);
}

fn set_outcome(state: &Mutex<State>, index: usize, outcome: String) {
    if let Some(c) = state.lock().unwrap().calls.get_mut(index) {
        c.outcome = outcome;
    }
}

/// Remember which request started which operation; rewrite GetOperation answers to FAIL.
/// Returns the response and, when rewritten, the outcome to record.
fn after_forward(
    state: &Mutex<State>,
    upstream: &str,
    req: &Req,
    op: &str,
    body: &Value,
    resp: Resp,
) -> (Resp, String) {
    if resp.status != 200 {
        return (resp, String::new());
    }
    let mut answer: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    let mut st = state.lock().unwrap();
    match op {
        "RegisterInstance" | "DeregisterInstance" => {
            if let Some(id) = answer["OperationId"].as_str() {
                st.started
                    .insert(id.to_string(), (op.to_string(), body.clone()));
            }
            if op == "RegisterInstance" {
                let key = (
                    body["ServiceId"].as_str().unwrap_or_default().to_string(),
                    body["InstanceId"].as_str().unwrap_or_default().to_string(),
                );
                st.last_register.insert(key, body.clone());
            }
            (resp, String::new())
        }
        "GetOperation" => {
            let id = answer["Operation"]["Id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let kind = answer["Operation"]["Type"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let code = match st.failed.get(&id) {
                Some(code) => Some(code.clone()),
                None => st
                    .op_fails
                    .iter_mut()
                    .find(|f| f.left > 0 && f.kind.as_deref().is_none_or(|k| k == kind))
                    .map(|f| {
                        f.left -= 1;
                        f.code.clone()
                    }),
            };
            let Some(code) = code else {
                return (resp, String::new());
            };
            st.failed.insert(id.clone(), code.clone());
            // A failed operation changed nothing: undo in moto what it did.
            let undo = if st.reverted.insert(id.clone()) {
                match st.started.get(&id) {
                    Some((started_by, b)) if started_by == "RegisterInstance" => Some((
                        "DeregisterInstance",
                        json!({"ServiceId": b["ServiceId"], "InstanceId": b["InstanceId"]}),
                    )),
                    Some((_, b)) => st
                        .last_register
                        .get(&(
                            b["ServiceId"].as_str().unwrap_or_default().to_string(),
                            b["InstanceId"].as_str().unwrap_or_default().to_string(),
                        ))
                        .cloned()
                        .map(|reg| ("RegisterInstance", reg)),
                    None => None,
                }
            } else {
                None
            };
            drop(st);
            if let Some((undo_op, undo_body)) = undo {
                let mut headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.eq_ignore_ascii_case("x-amz-target"))
                    .cloned()
                    .collect();
                headers.push(("X-Amz-Target".into(), format!("{TARGET_PREFIX}{undo_op}")));
                let undo_req = Req {
                    method: "POST".into(),
                    path: req.path.clone(),
                    headers,
                    body: undo_body.to_string().into_bytes(),
                };
                let r = forward(upstream, &undo_req);
                assert_eq!(
                    r.map(|r| r.status),
                    Some(200),
                    "undoing operation {id} in moto"
                );
            }
            answer["Operation"]["Status"] = json!("FAIL");
            answer["Operation"]["ErrorCode"] = json!(code);
            answer["Operation"]["ErrorMessage"] = json!(format!("injected {code}"));
            (
                Resp {
                    status: 200,
                    headers: resp.headers,
                    body: answer.to_string().into_bytes(),
                },
                format!("FAIL {code}"),
            )
        }
        _ => (resp, String::new()),
    }
}

/// Send `req` to `upstream` on a fresh connection and read the whole answer.
fn forward(upstream: &str, req: &Req) -> Option<Resp> {
    let mut s = TcpStream::connect(upstream).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        let k_low = k.to_ascii_lowercase();
        if ["content-length", "connection", "host"].contains(&k_low.as_str()) {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Host: {upstream}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        req.body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&req.body);
    s.write_all(&bytes).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Some(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 || data.len() < end + 2 + size {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[(end + 4 + size).min(data.len())..];
    }
}
