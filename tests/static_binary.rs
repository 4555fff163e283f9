//! The image's binary and the Dockerfile around it.
//!
//! - The static build (`scripts/build-static`) has no program interpreter and no shared-library
//!   dependency, so it runs in `scratch`, and it runs (`--version`). Building it costs minutes, so
//!   the check needs the path of a built binary in `CLOUDMAP_STATIC_BINARY`: `scripts/test` (and so
//!   CI) builds it and sets that; a bare `cargo test` skips the check and says so.
//! - In a root as empty as `scratch`, as a non-root user, it starts and resolves names.
//! - The ELF reader that decides "static" is itself tested on the ordinary (dynamic) debug binary,
//!   so a reader that sees nothing cannot pass the static check.
//! - The Dockerfile, which cannot be built here (no Docker engine), is checked for the facts the
//!   deployment depends on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the ELF file asks of the system at load time.
#[derive(Debug)]
struct Linkage {
    /// `PT_INTERP`: the dynamic loader (e.g. `/lib64/ld-linux-x86-64.so.2`).
    interpreter: Option<String>,
    /// `DT_NEEDED`: the shared libraries.
    needed: Vec<String>,
}

fn u16_at(b: &[u8], o: usize) -> usize {
    usize::from(u16::from_le_bytes(b[o..o + 2].try_into().unwrap()))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn c_str(b: &[u8], o: usize) -> String {
    let end = b[o..]
        .iter()
        .position(|&c| c == 0)
        .map_or(b.len(), |n| o + n);
    String::from_utf8_lossy(&b[o..end]).into_owned()
}

/// Reads the program headers of a 64-bit little-endian ELF file (x86_64, aarch64).
fn linkage(path: &Path) -> Linkage {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;

    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..4], b"\x7fELF", "{}: not an ELF file", path.display());
    assert_eq!(b[4], 2, "{}: not a 64-bit ELF file", path.display());
    assert_eq!(b[5], 1, "{}: not little-endian", path.display());
    let phoff = usize::try_from(u64_at(&b, 32)).unwrap();
    let (phentsize, phnum) = (u16_at(&b, 54), u16_at(&b, 56));
    // (type, file offset, virtual address, file size) of each program header.
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = phoff + i * phentsize;
            (
                u32::from_le_bytes(b[h..h + 4].try_into().unwrap()),
                u64_at(&b, h + 8),
                u64_at(&b, h + 16),
                u64_at(&b, h + 32),
            )
        })
        .collect();
    let offset_of = |vaddr: u64| -> usize {
        let (_, off, va, _) = headers
            .iter()
            .find(|(t, _, va, sz)| *t == PT_LOAD && (*va..va + sz).contains(&vaddr))
            .expect("address outside every PT_LOAD segment");
        usize::try_from(vaddr - va + off).unwrap()
    };
    let interpreter = headers
        .iter()
        .find(|h| h.0 == PT_INTERP)
        .map(|&(_, off, _, _)| c_str(&b, usize::try_from(off).unwrap()));
    let mut needed = Vec::new();
    if let Some(&(_, off, _, size)) = headers.iter().find(|h| h.0 == PT_DYNAMIC) {
        // Static-pie binaries have a dynamic section too (they relocate themselves), without NEEDED.
        let entries: Vec<(u64, u64)> = (0..usize::try_from(size).unwrap() / 16)
            .map(|i| usize::try_from(off).unwrap() + i * 16)
            .map(|e| (u64_at(&b, e), u64_at(&b, e + 8)))
            .take_while(|(tag, _)| *tag != DT_NULL)
            .collect();
        let strtab = entries.iter().find(|e| e.0 == DT_STRTAB).map(|e| e.1);
        for (_, val) in entries.iter().filter(|e| e.0 == DT_NEEDED) {
            needed.push(match strtab {
                Some(s) => c_str(&b, offset_of(s) + usize::try_from(*val).unwrap()),
                None => format!("<string at {val}>"),
            });
        }
    }
    Linkage {
        interpreter,
        needed,
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_elf_reader_sees_the_loader_and_libc_of_the_ordinary_dynamic_build() {
    let l = linkage(Path::new(env!("CARGO_BIN_EXE_cloudmap-sidecar")));
    let interp = l.interpreter.as_deref().unwrap_or_default();
    assert!(interp.contains("ld-"), "no loader found: {l:?}");
    assert!(
        l.needed.iter().any(|n| n.starts_with("libc.so")),
        "libc not found among the needed libraries: {l:?}"
    );
}

/// The static binary built by `scripts/build-static`, when `scripts/test` says where it is.
fn static_binary() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("CLOUDMAP_STATIC_BINARY") else {
        // CI sets CI=true and runs scripts/test, which always sets the variable.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run scripts/test, which builds the static binary and sets CLOUDMAP_STATIC_BINARY"
        );
        eprintln!(
            "SKIPPED: CLOUDMAP_STATIC_BINARY is not set (scripts/test builds the static binary with scripts/build-static and sets it)"
        );
        return None;
    };
    Some(repo().join(path))
}

#[test]
fn the_static_build_needs_no_loader_and_no_library_and_runs() {
    let Some(path) = static_binary() else { return };
    let l = linkage(&path);
    assert_eq!(
        l.interpreter,
        None,
        "{}: has a program interpreter",
        path.display()
    );
    assert!(
        l.needed.is_empty(),
        "{}: needs shared libraries {:?}",
        path.display(),
        l.needed
    );

    let out = Command::new(&path)
        .arg("--version")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(out.status.success(), "--version: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("cloudmap-sidecar {}", env!("CARGO_PKG_VERSION"))
    );
}

/// What the `scratch` image gives the binary: a root with nothing but the binary, the CA bundle,
/// `/tmp` and (from the container runtime) `/etc/hosts`, and a non-root user. In that root the
/// binary starts, finds the CA bundle through `SSL_CERT_FILE` as the image sets it, and resolves the
/// Cloud Map endpoint's name without any NSS library (a static glibc build relies on the `files`
/// and `dns` modules inside libc.a for that): its GetService reaches a loopback fake under a name
/// only `/etc/hosts` knows.
#[test]
fn the_static_binary_runs_in_an_empty_root_as_a_non_root_user_and_resolves_names() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    let Some(binary) = static_binary() else {
        return;
    };
    let chroot = Path::new("/usr/sbin/chroot");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !chroot.exists() || !is_root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with /usr/sbin/chroot"
        );
        eprintln!("SKIPPED: needs root and /usr/sbin/chroot to build a scratch-like root");
        return;
    }
    let root = std::env::temp_dir().join(format!("cloudmap-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy(&binary, root.join("cloudmap-sidecar")).unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 cloudmap.test\n").unwrap();
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        std::fs::copy(bundle, root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    }

    // Cloud Map, as far as GetService: the service does not exist (a configuration error, exit 2).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed before the request head ended");
            head.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"__type":"ServiceNotFound","Message":"no such service"}"#;
        write!(
            conn,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&head).to_lowercase()
    });

    let out = Command::new(chroot)
        .arg("--userspec=65532:65532")
        .arg(&root)
        .args(["/cloudmap-sidecar", "--service-id", "srv-0123456789abcdef0"])
        .args([
            "--ip",
            "10.0.0.1",
            "--instance-id",
            "task-1",
            "--start-timeout",
            "20s",
        ])
        .env_clear()
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .env("AWS_ENDPOINT_URL", format!("http://cloudmap.test:{port}"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    // If the sidecar never connected, unblock the fake with an empty request, which fails below.
    if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = c.write_all(b"\r\n\r\n");
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected the configuration error exit: {log}"
    );
    assert!(
        log.contains("service srv-0123456789abcdef0 not found"),
        "{log}"
    );
    if bundle.exists() {
        assert!(!log.contains("no native root CA certificates"), "{log}");
    }
    let head = fake.join().unwrap();
    assert!(
        head.contains("x-amz-target: route53autonaming_v20170314.getservice"),
        "{head}"
    );
    assert!(
        head.contains(&format!("host: cloudmap.test:{port}")),
        "{head}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// The final stage's instructions (after the last `FROM`), continuation lines joined.
fn final_stage() -> (String, Vec<(String, String)>) {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_ascii_uppercase(), v.trim().to_string())
        })
        .collect();
    let last_from = instructions.iter().rposition(|(k, _)| k == "FROM").unwrap();
    (
        instructions[last_from].1.clone(),
        instructions[last_from + 1..].to_vec(),
    )
}

fn one(stage: &[(String, String)], key: &str) -> String {
    let found: Vec<&String> = stage
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "the final stage needs exactly one {key}");
    found[0].clone()
}

#[test]
fn the_image_is_scratch_with_the_binary_as_pid_1_in_exec_form_as_a_non_root_user() {
    let (from, stage) = final_stage();
    assert_eq!(from, "scratch");
    // Exec form (a JSON list): the binary is PID 1 and gets SIGTERM itself.
    let entrypoint: Vec<String> = serde_json::from_str(&one(&stage, "ENTRYPOINT"))
        .expect("ENTRYPOINT in exec form (a JSON list)");
    assert_eq!(entrypoint, ["/cloudmap-sidecar"]);
    let cmd: Vec<String> =
        serde_json::from_str(&one(&stage, "CMD")).expect("CMD in exec form (a JSON list)");
    assert_eq!(cmd, ["run"]);
    let user = one(&stage, "USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER must be a numeric non-root user (scratch has no /etc/passwd): {user}"
    );
    let health = one(&stage, "HEALTHCHECK");
    assert!(
        health.ends_with(r#"CMD ["/cloudmap-sidecar", "healthcheck"]"#),
        "HEALTHCHECK must run the binary in exec form: {health}"
    );
}

#[test]
fn the_image_carries_the_static_binary_and_the_ca_bundle_for_https_to_aws() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        text.contains("scripts/build-static --target musl"),
        "the build stage must use scripts/build-static (musl) so that the binary is static"
    );
    assert!(text.contains("/rootfs/etc/ssl/certs/ca-certificates.crt"));
    let (_, stage) = final_stage();
    assert!(stage
        .iter()
        .any(|(k, v)| k == "COPY" && v == "--from=build /rootfs/ /"));
    assert_eq!(
        one(&stage, "ENV"),
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for path in ["/target", "/.git", "/.venv"] {
        assert!(
            ignore.lines().any(|l| l == path),
            ".dockerignore must exclude {path}"
        );
    }
}
